#!/bin/bash
# One GPU machine session of the wave's measurements, through the device tool, in stages that fit its 10-minute
# calls (the machine stays warm between calls, /dev/shm with it). Results go to $OUT.
#   STAGES="tests build48 resident" bash bench/gpu_session.sh
#   STAGES="offload before-after" bash bench/gpu_session.sh
#   STAGES="compare plan cpu" bash bench/gpu_session.sh
# Stages: tests (scripts/gpu_tests.sh), gemm (bench/prefill_gemm.py: the fused glue's gate|up GEMM per block size, the fastest then taken by the trace stage), mix (bench/expert_mix.py), triton (decode.py fast-compiled vs fast-triton), step (decode.py eager, grouped_mm, the default), build48 (the 48-layer real-shape thinker in /dev/shm, in the background),
# tune (bench/tune_token_mix.py), profile (bench/step_profile.py), batched (bench/batched.py), hybrid (bench/offload.py with host),
# resident / offload (bench/faces.py: the CLI beside the engine), before-after (bench/decode.py's compiled fast
# path at the commit before the re-rooming, carried in .old/, and now), compare (omnilab compare on cuda, bf16 and
# fp32), host (bench/host_rate.py), trace (bench/trace.py on 131k tokens, batches as omnilab trace's default sizes them; TRACE_TORCH_ATTENTION=1: a row with cuDNN's attention; TRACE_WRITERS, TRACE_SPIN, TRACE_BY_LAYER, TRACE_WHOLE_TAIL, TRACE_BATCH_ROWS: more end-to-end rows per writer count: other counts, writers spinning on the events, shards written by layer, every shard whole; per batch size; TRACE_GLUES=triton: the Triton glue's rows beside the default fused one), plan (omnilab plan on this machine), notebooks (NB="03 05": run_notebooks on the 48-layer checkpoint), cpu (bench/faces.py on the CPU, 8 layers, beside transformers).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W=/dev/shm/ol
C48=$W/omni-thinker-48l
if [ ! -d /tmp/site/transformers ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
log() { echo "[session $(date +%T) +${SECONDS}s] $*"; }
left() { echo $(( ${DEADLINE:-100000} - SECONDS )); }  # seconds to DEADLINE (the call's limit less a margin)
wait48() { [ -f $W/build48.started ] || return 0; while [ ! -f $W/build48.done ]; do sleep 2; done; }  # if begun here

for stage in ${STAGES:-tests}; do
  log "stage $stage"
  case $stage in
    build48)
      mkdir -p $W; touch $W/build48.started
      # the audio and vision towers (2.4 GB bf16) when /dev/shm has room beside the 61 GB thinker (notebook 06)
      towers=False; [ "$(df --output=avail -B1G /dev/shm | tail -1)" -ge 68 ] && towers=True
      [ -n "${TOWERS:-}" ] && towers=$TOWERS
      log "build48: towers=$towers, $(df -h --output=size,avail /dev/shm | tail -1)"
      (python3 -c "
import torch
from omnilab.testing.synth import real_shape_checkpoint
from omnilab.testing.synth import attach_tokenizer
real_shape_checkpoint('$C48', layers=48, dtype=torch.bfloat16, device='cuda', towers=$towers, progress=False)
attach_tokenizer('$C48', 'data/omni-tiny')  # the notebooks tokenize; prompts elsewhere are ids
" > $OUT/build48.log 2>&1; touch $W/build48.done; df -h /dev/shm >> $OUT/build48.log) &
      ;;
    tests)
      t=${TESTS_TIMEOUT:-300}; [ $(left) -lt $t ] && t=$(left)  # within the call's DEADLINE when one is set
      OUT=$OUT timeout $t bash scripts/gpu_tests.sh -q 2>&1 | grep -E 'FAILED|ERROR|passed|failed|Error' | tail -30
      ;;
    mix)  # one layer's expert mix per compute way and batch (bench/expert_mix.py), the fused Triton kernel beside
      hbm=$(python3 -c "import torch; print(4.8 if 'H200' in torch.cuda.get_device_name() else 3.35)")
      timeout 150 python3 bench/expert_mix.py --hbm-tb-s $hbm 2>&1 | tee $OUT/expert_mix.txt | tail -30
      ;;
    triton)  # bench/decode.py's compiled fast path with grouped_mm and with the fused Triton expert mix, 48 layers
      wait48
      hbm=$(python3 -c "import torch; print(4.8 if 'H200' in torch.cuda.get_device_name() else 3.35)")
      timeout 400 python3 bench/decode.py --checkpoint $C48 --device cuda --rows fast-compiled,fast-triton \
        --prompt-tokens 128 --new-tokens 128 --slow-tokens 16 --free-tokens 8 --repeats 3 --hbm-tb-s $hbm \
        --workdir /tmp/tri --out $OUT/decode_triton.json --markdown $OUT/decode_triton.md \
        $([ -f $OUT/token_config.json ] && echo --token-config $OUT/token_config.json) 2>&1 | tail -8
      ;;
    step)  # issue 28's resident row: the default compiled step (bf16 on CUDA: Triton mix and step kernels) beside
      # grouped_mm and the eager path (exactness columns), 48 layers; STEP_ROWS=hf,...: transformers' experts
      # implementations (HF_IMPL) too, their logits against each other being transformers' own bf16 noise
      wait48
      hbm=$(python3 -c "import torch; print(4.8 if 'H200' in torch.cuda.get_device_name() else 3.35)")
      timeout $(left) python3 bench/decode.py --checkpoint $C48 --device cuda --rows ${STEP_ROWS:-eager,fast-grouped,fast-triton-mix,fast-compiled} --hf-impl ${HF_IMPL:-grouped_mm,eager} \
        --prompt-tokens 128 --new-tokens 128 --slow-tokens 16 --free-tokens 8 --repeats 3 --hbm-tb-s $hbm \
        --workdir /tmp/step --out $OUT/decode_step.json --markdown $OUT/decode_step.md \
        $([ -f $OUT/step_config.json ] && echo --token-config $OUT/step_config.json) 2>&1 | tail -8
      ;;
    kernels)  # the step's Triton GEMVs and top-k against torch at the real shapes (bench/step_kernels.py), SWEEP=1 tries block sizes;
      # KERNEL_ROWS="8 32": per batch (the tl.dot tables past 2 rows), each batch's best saved as $OUT/token_config_b<rows>.json,
      # which the batched stage then takes for that batch
      hbm=$(python3 -c "import torch; print(4.8 if 'H200' in torch.cuda.get_device_name() else 3.35)")
      for r in ${KERNEL_ROWS:-1}; do
        save=$OUT/step_config.json; [ "$r" -gt 2 ] && save=$OUT/token_config_b$r.json
        timeout 200 python3 bench/step_kernels.py --hbm-tb-s $hbm --rows $r $([ -n "${SWEEP:-}" ] && echo --sweep --seconds ${SWEEP_SECONDS:-90} --save $save) \
          2>&1 | tee $OUT/step_kernels_r$r.txt | grep -v "^  {" | tail -30
      done
      ;;
    tune)  # block sizes of the fused mix's batch-1 token mode (bench/tune_token_mix.py), distinct layers cycled
      wait48
      hbm=$(python3 -c "import torch; print(4.8 if 'H200' in torch.cuda.get_device_name() else 3.35)")
      # TUNE_BATCH=8: the scan mode of batched decode (then STAGES=batched with TOKEN_CONFIG=$OUT/token_config_b8.json)
      # TUNE_BATCH="8 32": one search per batch, each saved as $OUT/token_config_b<batch>.json
      for b in ${TUNE_BATCH:-1}; do
        timeout 300 python3 bench/tune_token_mix.py --hbm-tb-s $hbm --batch $b --seconds ${TUNE_SECONDS:-150} --save $OUT/token_config_b$b.json 2>&1 | tee $OUT/tune_token_mix_b$b.txt | grep -v "^  {" | tail -30
      done
      ;;
    profile)  # where the compiled step's GPU time goes, per expert compute (bench/step_profile.py, 4 layers)
      wait48
      # PROFILE_BATCH=8: the batched step (bench/batched.py's)
      timeout 300 python3 bench/step_profile.py --layers 4 --batch ${PROFILE_BATCH:-1} --computes ${COMPUTES:-grouped_mm,triton} 2>&1 | tee $OUT/step_profile_b${PROFILE_BATCH:-1}.txt | tail -45
      ;;
    batched)  # batched decode per compute way against each batch's HBM floor (bench/batched.py, 48 layers); a batch
      # with its own tuned block sizes ($OUT/token_config_b<batch>.json of STAGES=tune) runs alone with them
      wait48
      hbm=$(python3 -c "import torch; print(4.8 if 'H200' in torch.cuda.get_device_name() else 3.35)")
      plain=""
      for b in $(echo ${BATCHES:-1,8,32,64} | tr , ' '); do
        if [ -z "${TOKEN_CONFIG:-}" ] && [ -f $OUT/token_config_b$b.json ]; then
          timeout $(left) python3 bench/batched.py --checkpoint $C48 --batches $b --hbm-tb-s $hbm --computes ${BATCHED_COMPUTES:-triton} \
            --token-config $OUT/token_config_b$b.json --out $OUT/batched_b$b.json --markdown $OUT/batched_b$b.md 2>&1 | tail -3
        else
          plain=$plain${plain:+,}$b
        fi
      done
      [ -n "$plain" ] && timeout $(left) python3 bench/batched.py --checkpoint $C48 --batches $plain --hbm-tb-s $hbm \
        $([ -n "${TOKEN_CONFIG:-}" ] && echo --token-config $TOKEN_CONFIG) \
        --out $OUT/batched.json --markdown $OUT/batched.md 2>&1 | tail -12
      ;;
    resident)
      wait48
      timeout $(left) python3 bench/faces.py --checkpoint $C48 --device cuda --rows engine-resident,cli-resident,cli-sampling \
        --new-tokens 64 --repeats 2 --out $OUT/faces_resident.json --markdown $OUT/faces_resident.md 2>&1 | tail -20
      ;;
    offload)
      wait48
      timeout $(left) python3 bench/faces.py --checkpoint $C48 --device cuda --rows engine-offload,cli-offload --budget 8GB \
        --new-tokens 64 --repeats 2 --out $OUT/faces_offload.json --markdown $OUT/faces_offload.md 2>&1 | tail -20
      ;;
    before-after)
      wait48
      for tree in old new; do
        root=$PWD; [ $tree = old ] && root=$PWD/.old
        (cd "$root" && PYTHONPATH=/tmp/site:$root timeout 200 python3 bench/decode.py --checkpoint $C48 --device cuda \
          --rows fast-compiled --prompt-tokens 128 --new-tokens 128 --slow-tokens 16 --free-tokens 8 --repeats 3 \
          --workdir /tmp/ba-$tree --out $OUT/decode_$tree.json --markdown $OUT/decode_$tree.md 2>&1 | tail -4)
      done
      ;;
    hybrid)  # bench/offload.py at an 8 GB cap: every miss copied, and hybrid (a share of misses on the host's cores)
      wait48
      timeout $(left) python3 bench/offload.py --checkpoint $C48 --device cuda --rows ${HYBRID_ROWS:-omnilab,noise} --prompt-tokens 16 \
        --new-tokens 32 --plan ${HYBRID_PLAN:-8/uniform/compile,8/uniform/compile+host,8/locality/compile,8/locality/compile+host} \
        --out $OUT/offload_hybrid.json --markdown $OUT/offload_hybrid.md 2>&1 | grep -v "^\[offload\] .*phases" | tail -8
      cat $OUT/offload_hybrid.md 2>/dev/null | head -12; grep -A60 "noise floor, per MoE" $OUT/offload_hybrid.md | head -8
      ;;
    gemm)  # the fused glue's gate|up GEMM against the Triton glue's gather + grouped_mm + silu_mul (bench/prefill_gemm.py);
      # its fastest block sizes go to $OUT/gate_up.json, which the trace stage then takes for the fused glue
      timeout 240 python3 bench/prefill_gemm.py --tokens 16384 --save $OUT/gate_up.json 2>&1 | tee $OUT/prefill_gemm.txt | tail -22
      ;;
    trace)  # issue 28's trace row (bench/trace.py): omnilab trace end to end, the grouped prefill alone per glue (Triton, torch),
      # transformers' grouped_mm and eager experts, TRACE_TOKENS (>= 100k) tokens, the real 48-layer shapes built on the GPU
      wait48  # the build's GPU work first: the trace's model is another 61 GB
      timeout $(left) python3 bench/trace.py --device cuda --real --layers 48 --tokens ${TRACE_TOKENS:-131072} --max-tokens 512 \
        --batch-tokens ${TRACE_BATCH_TOKENS:-auto} --peak-tflops 989 --no-eager-trace $([ -n "${TRACE_TORCH_ATTENTION:-}" ] && echo --torch-attention) $([ -n "${TRACE_NO_HF_EAGER:-}" ] && echo --no-hf-eager) \
        $([ -n "${TRACE_PROFILE:-}" ] && echo --profile $OUT/trace_profile.txt) $([ -n "${TRACE_WRITERS:-}" ] && echo --writers $TRACE_WRITERS) \
        $([ -n "${TRACE_SPIN:-}" ] && echo --spin $TRACE_SPIN) $([ -n "${TRACE_BY_LAYER:-}" ] && echo --by-layer $TRACE_BY_LAYER) \
        $([ -n "${TRACE_BATCH_ROWS:-}" ] && echo --batch-rows $TRACE_BATCH_ROWS) \
        $([ -n "${TRACE_GLUES:-}" ] && echo --glues $TRACE_GLUES) $([ -n "${TRACE_WHOLE_TAIL:-}" ] && echo --whole-tail $TRACE_WHOLE_TAIL) $([ -f $OUT/gate_up.json ] && echo --gate-up-config $OUT/gate_up.json) --out $OUT/trace.json 2>&1 | tee $OUT/trace.txt | tail -30
      ;;
    host)  # hybrid offload's host side: experts computed on the host's cores, cold, per thread count, with and without copies beside (bench/host_rate.py)
      # --gap-ms: the experts in groups of 4 (a layer's host choices) with the thread spinning between groups, as in a
      # hybrid step; then the same with torch's OpenMP threads kept spinning (do sleeping threads cost the step?)
      timeout 150 python3 bench/host_rate.py --threads ${HOST_THREADS:-1,8,15,16} --experts 64 --gap-ms 0,1,3 --out $OUT/host_rate.json 2>&1 | tee $OUT/host_rate.txt | tail -16
      # the experts read through a registered memory map of a file in /dev/shm, as the shard-mapped host tier reads them
      timeout 120 python3 bench/host_rate.py --threads 8,16 --experts 64 --gap-ms 1 --mapped /dev/shm/host_rate.bin --out $OUT/host_rate_mapped.json 2>&1 | tee $OUT/host_rate_mapped.txt | tail -8
      OMP_WAIT_POLICY=ACTIVE timeout 90 python3 bench/host_rate.py --threads 15,16 --experts 64 --gap-ms 0,1,3 --out $OUT/host_rate_active.json 2>&1 | tee $OUT/host_rate_active.txt | tail -9
      ;;
    before-after-offload)  # bench/offload.py before the re-rooming (.old/) and now: one 8 GB uniform row each
      wait48
      for tree in old new; do
        root=$PWD; [ $tree = old ] && root=$PWD/.old
        (cd "$root" && PYTHONPATH=/tmp/site:$root timeout $(( $(left) / 2 )) python3 bench/offload.py --checkpoint $C48 \
          --device cuda --plan 8/uniform/compile+slot --rows omnilab --prompt-tokens 16 --new-tokens 32 \
          --out $OUT/offload_$tree.json --markdown $OUT/offload_$tree.md 2>&1 | tail -3)
      done
      ;;
    compare)
      wait48
      for dtype in bfloat16 float32; do
        timeout 270 python3 -m omnilab compare $C48 --input-ids 3,17,42,9,11,5,6,7,8,9,10,11,12,13,14,15 \
          --device cuda --dtype $dtype --json > $OUT/compare_$dtype.json 2> $OUT/compare_$dtype.err
        echo "compare $dtype: exit $?"; tail -2 $OUT/compare_$dtype.err
        python3 -c "
import json; r = json.load(open('$OUT/compare_$dtype.json'))
print({k: r[k] for k in ('first_divergence', 'local_first_divergence', 'max_rel_err', 'top1_agreement', 'seconds', 'peak_gpu_bytes', 'peak_rss_bytes', 'engine')})" 2>&1 | tail -1
      done
      ;;
    plan)
      wait48
      python3 -m omnilab plan $C48 --device cuda --json > $OUT/plan48.json 2> $OUT/plan48.err; echo "plan: exit $?"
      python3 -m omnilab plan $C48 --device cuda | tee $OUT/plan48.txt | head -12
      ;;
    notebooks)  # NB="03 05": the notebooks on the 48-layer checkpoint, work sized to minutes (bench/results/notebooks_gpu_48l.md)
      wait48
      # papermill where the machine has the Jupyter stack, else bench/notebooks_plain.py (the cells in a plain process)
      if python3 -c "import papermill, ipykernel" 2>/dev/null; then
        timeout ${NB_TIMEOUT:-$(left)} python3 -c "
from omnilab.regress import run_notebooks
run_notebooks(out='$OUT/nb48', only='${NB:-03 05}'.split(), checkpoint='$C48', device='cuda',
              parameters={'per_domain': 2, 'max_tokens': 64, 'n_addition': 10, 'max_new_tokens': 16, 'text_per_domain': 1,
                          'per_kind': 3, 'masking_counts': '8,32', 'partial_experts': '0-7'})
" 2>&1 | grep -v "cell .*/" | tail -15
      else
        timeout ${NB_TIMEOUT:-$(left)} python3 bench/notebooks_plain.py --checkpoint $C48 --device cuda --out $OUT/nb48 \
          --only ${NB:-03 05} --timeout 560 -p per_domain=2 -p max_tokens=64 -p n_addition=10 -p max_new_tokens=16 \
          -p text_per_domain=1 -p per_kind=3 -p 'masking_counts="8,32"' -p partial_experts=0-7 \
          ${NB_EXTRA:-} 2>&1 | tee $OUT/nb48.log | grep -v "cell .*/" | tail -15
      fi
      cat $OUT/nb48/resources.md 2>/dev/null | tail -8
      ;;
    sweep05)  # notebook 05's sweep without Jupyter (bench/sweep05.py), where papermill is not installed
      wait48
      timeout $(left) python3 bench/sweep05.py $C48 --device cuda --out $OUT --budget-shares ${SHARES:-0.125,0.25,0.5} 2>&1 | grep -v "it/s\]" | tail -40
      ;;
    cpu)
      mkdir -p /tmp/ol
      [ -d /tmp/ol/omni-thinker-8l ] || python3 -c "
import torch
from omnilab.testing.synth import real_shape_checkpoint
real_shape_checkpoint('/tmp/ol/omni-thinker-8l', layers=8, dtype=torch.bfloat16, device='cuda', towers=False, progress=False)"
      CUDA_VISIBLE_DEVICES= timeout 500 python3 bench/faces.py --checkpoint /tmp/ol/omni-thinker-8l --device cpu \
        --dtype bfloat16 --rows hf,engine-resident,cli-resident --hf-impl grouped_mm,batched_mm --prompt-tokens 16 \
        --new-tokens 16 --repeats 1 --workdir /tmp/ol --out $OUT/faces_cpu.json --markdown $OUT/faces_cpu.md 2>&1 | tail -12
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
log "done"
