"""Routing-trace throughput: `omnilab trace` (omnilab.trace.run.trace_corpus) on its grouped prefill and on its eager
path, against transformers' own forward with `output_router_logits`, on the same batches of the same corpus, in
one run. One table.

    python bench/trace.py                                   # CPU: 2 real-shape layers, a small vocabulary
    python bench/trace.py --device cuda --real --layers 48  # one GPU: the real 48-layer thinker shapes, bf16

The model is a random-weight Qwen3-Omni thinker built by transformers itself on the bench device
(`Qwen3OmniMoeThinkerForConditionalGeneration`, every weight N(0, 0.02), norms 1): `--real` takes the real
config (data/reference, 152,064-row vocabulary, real audio/vision towers), otherwise the decode bench's
shapes (real layer shapes, vocabulary 8,192, tiny towers). No checkpoint is written: the selective model
(omnilab.model.decoder.SelectiveMoE) is assembled over the same tensors (its backbone is transformers' parameters,
its ExpertCache serves views of transformers' fused expert tensors, and the grouped prefill's stacked experts
are transformers' fused tensors themselves), so every row runs every expert resident in one copy of the weights.
Its config and layout come from the sparse on-disk layout of the same config.

Measured, on the corpus the bench writes (eval-split documents repeated up to --tokens tokens, cut to
--max-tokens, tokenized by a small byte-level BPE), each after a warm-up:
- `omnilab trace`, grouped prefill (omnilab.gpu.prefill.TracePrefill, the default on CUDA): trace_corpus end to end:
  length batching, every expert resident and one grouped GEMM per projection per layer, each layer's routing
  (top-k ids, weights, entropy) copied to pinned host memory without the host waiting, Parquet shards written
  (zstd) by background writer threads, each shard whole once its batch's last layer is on the host, the manifest;
  with --writers / --spin / --by-layer, more such rows: other writer counts, writers spinning on the layers'
  events, writers writing row group by row group as the layers arrive (the way before: bench/gil_writer.py);
  with --batch-rows, the same at other padded-token counts per batch; with --whole-tail, the same with every shard
  forced whole (trace_corpus's own way since run 7, so these rows repeat --writers' rows);
- the same prefill alone: TracePrefill.record_async over the plan's batches (routing to the host, no Parquet),
  to separate the device's part from the writing; with its default glue (prefill_kernels.py's fused glue for
  bf16 on CUDA) and, where that is not the torch glue, once more with glue="torch" (the eager modules and
  step.expert_mix around the same GEMMs), the before and after of the fused glue in one run, and how often the two
  glues' expert ids agree;
  with --glues triton, the same for the Triton glue without the fused gate|up GEMM (the default before run 7),
  alone and end to end;
- the Parquet writing alone: the same shards written from that routing in host memory by the same writer threads;
- `omnilab trace`, eager path (`--prefill eager`): the selective model's prefill through its hooks (eager
  expert loop, one host sync per layer; stops after the last router), the same writing;
- transformers: for each batch of the trace's own plan, right-padded as the trace pads it,
  `model.model(input_ids, output_router_logits=True)` (the thinker without its lm_head, as the trace skips it),
  then each layer's top-k of the softmax and the weights copied to the host; once with transformers' default
  experts implementation (grouped_mm where torch has it) and once with `experts_implementation="eager"`.
The hardware floor is the compute floor: 2 x the active parameters a token multiplies (every layer's q/k/v/o
projections, router and top-k experts; attention scores, embedding and lm_head left out) against the
device's peak bf16 FLOP/s (--peak-tflops; H200 SXM dense bf16: 989).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from omnilab.memory import AnonPeak  # noqa: E402

REAL_SHAPES = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                   num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=768,
                   norm_topk_prob=True, vocab_size=8192, max_position_embeddings=4096)


def build_config(real: bool, layers: int) -> dict:
    from omnilab.testing.synth import real_shape_config, tiny_omni_config

    if real:
        return real_shape_config(layers)
    return tiny_omni_config(**REAL_SHAPES, num_hidden_layers=layers)


def build_transformers(config: dict, dtype, device):
    """transformers' thinker built directly on the device by its own initialisation (seeded), eval mode."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    from omnilab.tokenizer import quiet_transformers

    thinker_config = Qwen3OmniMoeConfig.from_dict(config).thinker_config
    torch.manual_seed(0)
    with quiet_transformers(), torch.device(device):
        hf = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(thinker_config, dtype=dtype)
    return hf.eval().requires_grad_(False)


def shared_experts(store, hf_text) -> None:
    """Make an ExpertStore serve views of transformers' fused tensors (gate_up [E, 2I, H]: rows :I gate, I: up;
    down [E, H, I]) instead of reading its checkpoint: both models then hold one set of expert weights."""
    from omnilab.model.experts import ExpertWeights

    def load(layer: int, expert: int) -> ExpertWeights:
        ex = hf_text.layers[layer].mlp.experts
        I = ex.gate_up_proj.shape[1] // 2
        return ExpertWeights(ex.gate_up_proj[expert, :I], ex.gate_up_proj[expert, I:], ex.down_proj[expert])

    store.load = load


def build_selective(hf, config: dict, dtype, device, layout_dir: Path):
    """SelectiveMoE over transformers' tensors: its config/layout from the sparse layout of `config`."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.model.decoder import SelectiveMoE, rope_inv_freq
    from omnilab.model.experts import ExpertCache, ExpertStore
    from omnilab.testing.synth import sparse_from_config

    if not (layout_dir / "config.json").exists():
        sparse_from_config(config, layout_dir, dtype=dtype)
    checkpoint = Checkpoint(layout_dir)
    cfg, layout = checkpoint.arch
    text = hf.model.language_model
    store = ExpertStore(checkpoint, cfg, layout, dtype, device)
    shared_experts(store, text)
    cache = ExpertCache(store)
    with torch.device("meta"):
        model = SelectiveMoE(cfg, cache)
    state = {f"model.{k}": v for k, v in text.state_dict().items() if ".mlp.experts." not in k}
    state["lm_head.weight"] = hf.lm_head.weight
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.eval().requires_grad_(False)
    model.checkpoint = checkpoint
    return model


def write_corpus(path: Path, tokens: int, max_tokens: int, tokenizer) -> int:
    """Eval-split documents, repeated until the corpus holds `tokens` tokens (each document cut to max_tokens)."""
    repo = Path(__file__).resolve().parent.parent
    rows = [json.loads(line) for line in (repo / "data" / "eval" / "eval.jsonl").read_text().splitlines() if line]
    total, out, i = 0, [], 0
    while total < tokens:
        row = rows[i % len(rows)]
        text = row["text"] if i < len(rows) else f"{i}: {row['text']}"  # a repeat differs in its first tokens
        n = min(max_tokens, len(tokenizer(text)["input_ids"]))
        out.append(json.dumps({"domain": row["domain"], "text": text}))
        total += n
        i += 1
    path.write_text("\n".join(out) + "\n")
    return total


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def transformers_rows(hf, batches, ids, k: int, device, pad: int, repeats: int) -> tuple[float, list]:
    """tokens/s of transformers' forward + router top-k to host over the batches (median of `repeats`), and the
    first batch's top-k ids per layer (for the agreement check)."""
    tokens = sum(len(ids[d]) for b in batches for d in b)
    first = None
    speeds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for n, batch in enumerate(batches):
            T = max(len(ids[d]) for d in batch)
            x = torch.full((len(batch), T), pad, dtype=torch.long)  # [B, T], right padded as the trace pads
            for j, d in enumerate(batch):
                x[j, : len(ids[d])] = torch.tensor(ids[d])
            hf.model.rope_deltas = None
            with torch.no_grad():
                out = hf.model(input_ids=x.to(device), output_router_logits=True, use_cache=False)
                logits = torch.stack(out.router_logits)  # [L, B * T, E]
                w, e = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1)  # [L, N, k]
                w = w / w.sum(-1, keepdim=True)
                e, w = e.to(torch.int32).cpu(), w.cpu()
            if n == 0 and first is None:
                first = e.view(e.shape[0], len(batch), T, k)
        sync(device)
        speeds.append(tokens / (time.perf_counter() - start))
    return statistics.median(speeds), first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--real", action="store_true", help="the real config (152,064 vocab, real towers)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=4096, help="corpus size in tokens")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-tokens", type=lambda v: v if v == "auto" else int(v), default=2048,
                   help="padded tokens per batch, or auto: what omnilab trace's default takes here "
                        "(omnilab.gpu.prefill.batch_tokens_for, once the experts are resident)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes of each transformers row (median)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the compute floor "
                                                                   "(H200 bf16 dense: 989)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of one batch here")
    p.add_argument("--no-eager-trace", action="store_true", help="leave out the omnilab eager-path row (and the "
                                                                  "grouped-against-eager comparison)")
    p.add_argument("--writers", default="", help="comma-separated writer-thread counts: one more end-to-end "
                   "row each (the default count is trace_corpus's)")
    p.add_argument("--spin", default="", help="comma-separated writer-thread counts: one more end-to-end row each "
                   "with the writers spinning on the layers' events (torch's default events) instead of sleeping")
    p.add_argument("--by-layer", default="", help="comma-separated writer-thread counts: one more end-to-end row "
                   "each with the shards written row group by row group as the layers arrive (write_routing_shard's "
                   "by_layer)")
    p.add_argument("--batch-rows", default="", help="comma-separated padded-token counts per batch: one more "
                   "end-to-end row each at that --batch-tokens (omnilab trace's own default is 4096)")
    p.add_argument("--no-hf-eager", action="store_true", help="leave out transformers' eager-experts row (40 s at 131k "
                   "tokens on an H100)")
    p.add_argument("--torch-attention", action="store_true", help="one more end-to-end row: the prefill's attention "
                   "as torch's SDPA chooses it (cuDNN first on an H100) instead of FlashAttention")
    p.add_argument("--whole-tail", default="", help="comma-separated writer-thread counts: one more end-to-end "
                   "row each with every shard written whole (trace_corpus's own way since run 7)")
    p.add_argument("--glues", default="", help="comma-separated glues beyond the default and torch (triton): a "
                   "prefill-alone row and an end-to-end row each")
    p.add_argument("--gate-up-config", default=None, help="a JSON of prefill_kernels.GATE_UP_ROWS (the fused glue's "
                   "block sizes; bench/prefill_gemm.py --save)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()

    from omnilab import trace
    from omnilab.dtypes import as_dtype
    from omnilab.gpu.prefill import ResidentExperts, TracePrefill, batch_tokens_for
    from omnilab.testing.synth import tiny_tokenizer
    from omnilab.trace.shards import default_writers

    if args.gate_up_config:
        from omnilab.gpu import prefill_kernels

        prefill_kernels.GATE_UP_ROWS = json.loads(Path(args.gate_up_config).read_text())["GATE_UP_ROWS"]
    dtype, device = as_dtype(args.dtype), torch.device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="omnilab-bench-trace-"))
    work.mkdir(parents=True, exist_ok=True)
    config = build_config(args.real, args.layers)
    tokenizer = tiny_tokenizer(256)
    corpus_tokens = write_corpus(work / "corpus.jsonl", args.tokens, args.max_tokens, tokenizer)
    is_cuda = device.type == "cuda"
    peak_gpu = lambda: torch.cuda.max_memory_allocated() if is_cuda else None  # noqa: E731
    reset_gpu = lambda: torch.cuda.reset_peak_memory_stats() if is_cuda else None  # noqa: E731

    t0 = time.perf_counter()
    with AnonPeak() as anon:
        hf = build_transformers(config, dtype, device)
        build_s = time.perf_counter() - t0
        model = build_selective(hf, config, dtype, device, work / "layout")
        cfg = model.config
        text = hf.model.language_model
        experts = ResidentExperts({i: text.layers[i].mlp.experts.gate_up_proj for i in cfg.moe_layers},
                                  {i: text.layers[i].mlp.experts.down_proj for i in cfg.moe_layers})
        recorder = TracePrefill(model, experts)  # transformers' fused expert tensors: no copy; its default glue
        # the torch glue beside the default one, for the before / after (on the CPU the default is the torch glue)
        recorders = [recorder] + ([TracePrefill(model, experts, glue="torch")] if recorder.glue != "torch" else [])
        extra = [TracePrefill(model, experts, glue=g) for g in args.glues.split(",") if g not in ("", recorder.glue)]
        recorders += extra
        print(f"[bench] built {cfg.num_hidden_layers} layers x {cfg.num_experts} experts on {device} in "
              f"{build_s:.0f} s; experts {model.cache.store.total_bytes / 1e9:.1f} GB", file=sys.stderr, flush=True)
        if args.batch_tokens == "auto":  # as trace_corpus's default decides it, the experts resident
            args.batch_tokens = batch_tokens_for(model)
            print(f"[bench] --batch-tokens auto: {args.batch_tokens}", file=sys.stderr, flush=True)
        # the warm-up: documents for a few full batches, not 8 documents (so warmed, the first end-to-end row on an
        # H100 ran at half the speed of the rows after it, each of which differed from it in one setting only)
        lines = (work / "corpus.jsonl").read_text().splitlines()
        (work / "warm.jsonl").write_text("\n".join(lines[:2 * args.batch_tokens // max(1, args.max_tokens // 2)])
                                         + "\n")
        kw = dict(max_tokens=args.max_tokens, batch_tokens=args.batch_tokens, progress=False, model=model,
                  tokenizer=tokenizer)
        results, gpu = {}, {}
        paths_run = (("grouped", recorder),) + ((("eager", "eager"),) if not args.no_eager_trace else ())
        for name, prefill in paths_run:
            trace.trace_corpus(work / "layout", [work / "warm.jsonl"], work / f"warm-{name}", prefill=prefill,
                               **kw)  # warm-up (the eager one loads every expert into the cache)
            reset_gpu()
            results[name] = trace.trace_corpus(work / "layout", [work / "corpus.jsonl"], work / f"trace-{name}",
                                               prefill=prefill, **kw)
            gpu[name] = peak_gpu()
            print(f"[bench] trace ({name}): {results[name].summary()}", file=sys.stderr, flush=True)

        spinning = TracePrefill(model, experts, spin=True) if args.spin else None
        torch_attention = TracePrefill(model, experts, attention="torch") if args.torch_attention else None
        counts = lambda arg: [int(x) for x in arg.split(",") if x]  # noqa: E731
        # the same trace, one setting changed: (key, what, trace_corpus arguments, every shard written by layer
        # (True), whole (False) or as trace_corpus asks (None), the table's row; {batches}: the trace's batch count)
        more = [(f"grouped-w{w}", f"{w} writers", {"writers": w}, None, f"  the same, {w} writer threads")
                for w in counts(args.writers)] + \
            [(f"grouped-w{w}-spin", f"{w} writers, spin", {"writers": w, "prefill": spinning}, None,
              f"  the same, {w} writer threads spinning on the events (torch default events)")
             for w in counts(args.spin)] + \
            [(f"grouped-w{w}-by-layer", f"{w} writers, by layer", {"writers": w}, True,
              f"  the same, {w} writer threads, each shard written by layer as the layers arrive")
             for w in counts(args.by_layer)] + \
            [(f"grouped-w{w}-whole", f"{w} writers, every shard whole", {"writers": w}, False,
              f"  the same, {w} writer threads, every shard written whole")
             for w in counts(args.whole_tail)] + \
            [(f"grouped-b{b}", f"{b} padded tokens a batch", {"batch_tokens": b}, None,
              f"  the same, batches of at most {b} padded tokens ({{batches}} batches)")
             for b in counts(args.batch_rows)] + \
            [("grouped-torch-attention", "torch's SDPA choice", {"prefill": torch_attention}, None,
              "  the same, the attention as torch's SDPA chooses it (cuDNN first on an H100)")
             for _ in range(bool(torch_attention))] + \
            [(f"grouped-{r.glue}", f"{r.glue} glue", {"prefill": r}, None, f"  the same, {r.glue} glue")
             for r in extra]
        labels = {key: label for key, *_, label in more}  # the rows of the table, in this order
        trace_run = importlib.import_module("omnilab.trace.run")
        whole = trace_run.write_routing_shard
        for key, what, setting, by_layer, _ in more:
            reset_gpu()
            if by_layer is not None:  # every shard one way, whatever trace_corpus asks
                trace_run.write_routing_shard = every_shard(whole, by_layer)
            try:
                results[key] = trace.trace_corpus(work / "layout", [work / "corpus.jsonl"], work / f"trace-{key}",
                                                  **{**kw, "prefill": recorder, **setting})
            finally:
                trace_run.write_routing_shard = whole
            gpu[key] = peak_gpu()
            print(f"[bench] trace (grouped, {what}): {results[key].summary()}", file=sys.stderr, flush=True)
        plan = json.loads((work / "trace-grouped" / "plan.json").read_text())
        docs = trace.read_corpus([work / "corpus.jsonl"]).documents
        ids = trace.tokenize(tokenizer, docs["text"].tolist(), args.max_tokens, cfg.vocab_size)
        pad = tokenizer.pad_token_id
        k = cfg.num_experts_per_tok
        alone = {}  # glue -> (tokens/s, peak GPU bytes, routings)
        for r in recorders:
            prefill_rows(r, plan["batches"][:1], ids, device, pad)  # warm-up (the Triton glue compiles)
            reset_gpu()
            speed, routed = prefill_rows(r, plan["batches"], ids, device, pad)
            alone[r.glue] = (speed, peak_gpu(), routed)
            print(f"[bench] grouped prefill alone, {r.glue} glue: {speed:,.0f} tokens/s", file=sys.stderr, flush=True)
        routings = alone[recorder.glue][2]
        glues_agree = {g: glue_agreement(alone["torch"][2], alone[g][2]) for g in alone if g != "torch"}
        write_speed, writers = writing_rows(routings, plan["batches"], ids, docs["domain"].tolist(),
                                            [int(i) for i in cfg.moe_layers], work / "write-only")
        del routings
        print(f"[bench] Parquet writing alone ({writers} writer threads): {write_speed:,.0f} tokens/s", file=sys.stderr,
              flush=True)
        for glue in alone:
            alone[glue] = alone[glue][:2]  # the routings are no longer needed
        if args.profile:
            profile(recorders, hf, plan["batches"][0], ids, device, pad, k, Path(args.profile))
        rows = []
        for impl in ("default",) + (() if args.no_hf_eager else ("eager",)):
            if impl == "eager":
                hf.set_experts_implementation("eager")
            name = hf.model.language_model.config._experts_implementation
            transformers_rows(hf, plan["batches"][:1], ids, k, device, pad, 1)  # warm-up
            reset_gpu()
            speed, first = transformers_rows(hf, plan["batches"], ids, k, device, pad, args.repeats)
            rows.append({"setting": f"transformers forward + router logits ({name} experts)", "tokens_per_s": speed,
                         "peak_gpu_bytes": peak_gpu(), "first": first})
            print(f"[bench] {rows[-1]['setting']}: {speed:,.0f} tokens/s", file=sys.stderr, flush=True)

    agreement = {name: first_batch_agreement(trace.TraceDataset(work / f"trace-{name}"), plan, rows[0]["first"], k)
                 for name in results}
    paths = compare_traces(work / "trace-grouped", work / "trace-eager", k) if "eager" in results else None
    active = active_params(cfg)
    floor = args.peak_tflops * 1e12 / (2 * active) if args.peak_tflops else None
    out = {"device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
           "layers": cfg.num_hidden_layers, "experts": cfg.num_experts, "top_k": k, "vocab": cfg.vocab_size,
           "corpus_tokens": corpus_tokens, "documents": results["grouped"].documents,
           "batches": results["grouped"].batches,
           "omnilab": [
               {"setting": f"omnilab trace, grouped prefill ({recorder.glue} glue, "
                           f"{recorder.attention + ' attention, ' if is_cuda else ''}"
                           f"{default_writers()} writer threads: the defaults on CUDA; Parquet written in the "
                           f"background)",
                "tokens_per_s": results["grouped"].tokens_per_s, "seconds": results["grouped"].seconds,
                "writing_tail_s": results["grouped"].writing_tail_s,
                "peak_gpu_bytes": gpu["grouped"]},
               *({"setting": label.format(batches=results[key].batches), "tokens_per_s": results[key].tokens_per_s,
                  "seconds": results[key].seconds, "writing_tail_s": results[key].writing_tail_s,
                  "peak_gpu_bytes": gpu[key]} for key, label in labels.items()),
               *({"setting": f"  the grouped prefill alone, {glue} glue (routing to host, no Parquet)",
                  "tokens_per_s": speed, "peak_gpu_bytes": peak} for glue, (speed, peak) in alone.items()),
               {"setting": f"  the Parquet writing alone (the same shards from host memory, {writers} thread{'s' * (writers > 1)})",
                "tokens_per_s": write_speed, "peak_gpu_bytes": None},
               *([{"setting": "omnilab trace, eager path (--prefill eager; Parquet written)",
                   "tokens_per_s": results["eager"].tokens_per_s, "seconds": results["eager"].seconds,
                   "peak_gpu_bytes": gpu["eager"]}] if "eager" in results else [])],
           "transformers": [{k_: v for k_, v in r.items() if k_ != "first"} for r in rows],
           "topk_agreement_first_batch": agreement, "grouped_vs_eager": paths, "glues_agree": glues_agree,
           "active_params": active, "compute_floor_tokens_per_s": floor, "peak_anon_bytes": anon.peak,
           "args": vars(args)}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(table(out, " ".join(sys.argv)))
    return 0


def every_shard(write, by_layer: bool):
    """write_routing_shard writing every shard whole (by_layer False) or by layer, whatever its caller asks."""
    return lambda *args, **kw: write(*args, **{**kw, "by_layer": by_layer})


def prefill_rows(recorder, batches, ids, device, pad: int) -> tuple[float, list]:
    """tokens/s of the grouped prefill alone over the batches: TracePrefill.record_async, each batch's routing
    waited for on the host one batch later (as the trace's writers wait for it), and the routings."""
    tokens = sum(len(ids[d]) for b in batches for d in b)
    sync(device)
    start = time.perf_counter()
    pending, routings = [], []
    for batch in batches:
        pending.append(recorder.record_async([ids[d] for d in batch], batch, pad_id=pad))
        if len(pending) > 1:
            routings.append(pending.pop(0).wait())
    routings += [p.wait() for p in pending]
    sync(device)
    return tokens / (time.perf_counter() - start), routings


def glue_agreement(a, b) -> dict:
    """Two glues' routings of the same batches: expert ids equal per (token, layer, rank), top-k sets equal per
    (token, layer), and the largest weight difference."""
    import numpy as np

    ea = np.concatenate([r.experts for r in a], axis=1)  # [L, tokens, k]
    eb = np.concatenate([r.experts for r in b], axis=1)
    weight = max(float(np.abs(x.weights - y.weights).max()) for x, y in zip(a, b))
    return {"expert_ids_equal": float((ea == eb).mean()),
            "topk_sets_equal": float((np.sort(ea, -1) == np.sort(eb, -1)).all(-1).mean()), "max_weight_diff": weight}


def writing_rows(routings, batches, ids, domains, layers, folder: Path) -> tuple[float, int]:
    """tokens/s of writing the plan's shards alone, from routings in host memory, with the trace's writer threads
    (omnilab.trace.shards.ShardWriter, the same count as trace_corpus takes)."""

    from omnilab.trace.shards import ShardWriter, default_writers, shard_name, write_routing_shard

    folder.mkdir(parents=True, exist_ok=True)
    writers = default_writers()
    tokens = sum(len(ids[d]) for b in batches for d in b)
    start = time.perf_counter()
    with ShardWriter(workers=writers, depth=writers + 1) as writer:
        for b, (batch, routing) in enumerate(zip(batches, routings)):
            writer.submit(folder / shard_name(b), partial(write_routing_shard, docs=batch,
                                                          domains=[domains[d] for d in batch],
                                                          token_ids=[ids[d] for d in batch], layers=layers,
                                                          routing=routing))
    return tokens / (time.perf_counter() - start), writers


def profile(recorders, hf, batch, ids, device, pad: int, k: int, path: Path) -> None:
    """torch.profiler over one batch: the grouped prefill with each glue, then transformers' forward + router top-k
    (its default experts); the operators by device time, written to `path`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    tables = []
    runs = [(f"omnilab grouped prefill, {r.glue} glue", r) for r in recorders]
    for name, recorder in runs + [("transformers forward + router logits", None)]:
        sync(device)
        with torch_profile(activities=activities) as prof:
            if recorder is not None:
                recorder.record([ids[d] for d in batch], batch, pad_id=pad)
            else:
                transformers_rows(hf, [batch], ids, k, device, pad, 1)
            sync(device)
        sort = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
        tables.append(f"## {name}: one batch of {len(batch)} documents\n\n"
                      + prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60))
    path.write_text("\n\n".join(tables) + "\n")


def first_batch_agreement(t, plan, first, k: int) -> float:
    """Top-k set agreement of a trace with transformers' router on the plan's first batch."""
    frame = t.read(columns=["doc", "position", "layer", "rank", "expert"])
    agree = []
    for j, d in enumerate(plan["batches"][0]):
        mine = frame[frame["doc"] == d]
        for li, layer in enumerate(t.layers):
            a = mine[mine["layer"] == layer]["expert"].to_numpy().reshape(-1, k)  # [T, k]
            b = first[li, j, : a.shape[0]].numpy()
            agree.append((a[:, :, None] == b[:, None, :]).any(-1).mean())
    return float(sum(agree) / len(agree))


def compare_traces(a, b, k: int) -> dict:
    """Two traces of the same plan, shard by shard: rows equal in every integer column, expert ids equal per row,
    top-k sets equal per (token, layer), top-k set overlap, and the largest weight difference."""
    import numpy as np
    import pyarrow.parquet as pq

    ints = ("doc", "domain", "position", "token_id", "layer", "rank")
    rows = same_rows = same_ids = same_sets = 0
    overlap, weight = 0.0, 0.0
    for fa in sorted((Path(a) / "shards").glob("*.parquet")):
        ta, tb = pq.read_table(fa), pq.read_table(Path(b) / "shards" / fa.name)
        rows += ta.num_rows
        same_rows += ta.num_rows if all(ta.column(c).equals(tb.column(c)) for c in ints) else 0
        ea, eb = (t.column("expert").to_numpy().reshape(-1, k) for t in (ta, tb))  # [tokens x layers, k]
        same_ids += int((ea == eb).sum())
        sa, sb = np.sort(ea, axis=1), np.sort(eb, axis=1)
        same_sets += int((sa == sb).all(axis=1).sum())
        overlap += float((ea[:, :, None] == eb[:, None, :]).any(-1).sum())
        weight = max(weight, float(np.abs(ta.column("weight").to_numpy() - tb.column("weight").to_numpy()).max()))
    return {"rows": rows, "rows_equal_int_columns": same_rows, "expert_ids_equal": same_ids / rows,
            "topk_sets_equal": same_sets * k / rows, "topk_set_overlap": overlap / rows, "max_weight_diff": weight}


def active_params(cfg) -> int:
    """Parameters one token multiplies in the decoder layers: q/k/v/o, the router and its top-k experts (or the
    dense MLP) of every layer; the embedding (a lookup) and the lm_head (not computed) left out."""
    H, hd = cfg.hidden_size, cfg.head_dim
    attn = H * hd * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)  # q, o and k, v projections
    total = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            total += attn + cfg.num_experts * H + cfg.num_experts_per_tok * 3 * H * cfg.moe_intermediate_size
        else:
            total += attn + 3 * H * cfg.intermediate_size
    return total


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def table(r: dict, command: str) -> str:
    gb = 1e9
    lines = [f"`python {command}`", "",
             f"{r['device']}, torch {r['torch']}, {r['dtype']}; random thinker with {r['layers']} layers x "
             f"{r['experts']} experts (top {r['top_k']}), vocabulary {r['vocab']:,}; corpus {r['corpus_tokens']:,} "
             f"tokens in {r['documents']:,} documents (at most {r['args']['max_tokens']} tokens each), "
             f"{r['batches']} batches of at most {r['args']['batch_tokens']} padded tokens. Same batches for every row.",
             ""]
    tf = r["transformers"]
    floor = r["compute_floor_tokens_per_s"]
    head = "| setting | tokens/s | " + " | ".join(f"x {x['setting'].split('(')[1].split()[0]}" for x in tf)
    head += " | x compute floor |" if floor else " |"
    lines += [head + " peak GPU memory |", "|---|---:|" + "---:|" * (len(tf) + bool(floor)) + "---:|"]
    gpu = lambda x: f"{x / gb:.1f} GB" if x else ""  # noqa: E731
    for row in r["omnilab"] + tf:
        v = row["tokens_per_s"]
        ratios = [f"{v / x['tokens_per_s']:.2f}" for x in tf] + ([f"{v / floor:.3f}"] if floor else [])
        lines.append(f"| {row['setting']} | {v:,.0f} | {' | '.join(ratios)} | {gpu(row['peak_gpu_bytes'])} |")
    if floor:
        lines.append(f"| compute floor: 2 x {r['active_params'] / 1e9:.2f} B active parameters per token at "
                     f"{r['args']['peak_tflops']:g} TFLOP/s | {floor:,.0f} | "
                     + " | ".join(f"{floor / x['tokens_per_s']:.2f}" for x in tf) + " | 1.000 | |")
    c = r["grouped_vs_eager"]
    a = r["topk_agreement_first_batch"]
    versus = (f"Grouped prefill against the eager path, the whole trace ({c['rows']:,} rows): integer columns equal "
              f"in {c['rows_equal_int_columns'] / c['rows']:.4f} of the rows, expert id equal per row "
              f"{c['expert_ids_equal']:.4f}, top-k set equal per (token, layer) {c['topk_sets_equal']:.4f}, "
              f"top-k set overlap {c['topk_set_overlap']:.4f}, largest weight difference "
              f"{c['max_weight_diff']:.2g} ({r['dtype']}). ") if c else ""
    for glue, g in r["glues_agree"].items():
        versus += (f"Grouped prefill alone, {glue} glue against torch glue ({r['dtype']}): expert id equal per row "
                   f"{g['expert_ids_equal']:.4f}, top-k set equal per (token, layer) {g['topk_sets_equal']:.4f}, "
                   f"largest weight difference {g['max_weight_diff']:.2g}. ")
    lines += ["", versus + f"Top-k set agreement with transformers' "
                  f"({tf[0]['setting'].split('(')[1].split()[0]}) router on the first batch: "
                  + ", ".join(f"{name} {v:.4f}" for name, v in a.items())
                  + f". Peak anon RSS {r['peak_anon_bytes'] / gb:.2f} GB."]
    tails = [row for row in r["omnilab"] if row.get("writing_tail_s") is not None]
    if tails:  # where an end-to-end row's seconds went: the last shards' writing after the last forward
        lines += ["", "End to end, seconds (of which the last shards' writing after the last forward): "
                  + "; ".join(f"{row['setting'].strip().split(' (')[0]}: {row['seconds']:.2f} "
                              f"({row['writing_tail_s']:.2f})" for row in tails) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
