"""Decode and prefill speed of omnilab's fast path (omnilab.gpu.fast) against omnilab's eager path and transformers'
experts implementations (eager / grouped_mm / batched_mm), in one run, on one random-weight real-shape thinker.

    python bench/decode.py --device cuda --layers 48                   # the issue-12 table (bf16)
    python bench/decode.py --device cuda --layers 4 --dtype float32    # exactness: greedy tokens in fp32
    python bench/decode.py --suite budgets                             # the selective model at expert budgets
    python bench/decode.py --checkpoint DIR ...                        # any Qwen3-Omni / Qwen3-MoE checkpoint
    python bench/decode.py --device cuda --layers 48 --rows fast-compiled,fast-triton   # the fused Triton experts
    python bench/decode.py --device cuda --layers 48 --rows fast-triton-mix,fast-triton --hbm-tb-s 3.35
                                          # the step's Triton GEMVs and top-k (step_kernels.py) against without

The checkpoint (unless --checkpoint) is `omnilab.testing.synth.real_shape_checkpoint`: the real Qwen3-Omni thinker
layout, real shapes and vocabulary (152,064 rows), `--layers` decoder layers, random N(0, 0.02) weights filled in
place (on the GPU when --device cuda), written to --workdir (default /dev/shm: the 48-layer thinker is 61 GB).

A random-weight model's greedy output repeats one token, so one token routes the same way at every step. Decode
here is teacher-forced: every row feeds the same fixed random token ids (seeded), so each step routes
differently, and records the argmax after each forced input ("forced argmax"). Each row also produces a few
free greedy tokens (the exactness check in fp32). Rows run in their own subprocesses, so peak memory
(torch.cuda.max_memory_allocated; RssAnon sampled) belongs to that row alone. Speed is the median of --repeats
timed runs after a warm-up, as a ratio to transformers' best experts implementation measured in the same run and
to the HBM floor (bytes read per decoded token at --hbm-tb-s TB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omnilab.memory import AnonPeak, status_bytes

HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BUDGETS = (1.0, 0.5, 0.25, 0.10)


# -- memory --------------------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """VmHWM: the process's peak resident set, file-backed pages of mmap'd shards included."""
    return status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gpu_peak() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- inputs --------------------------------------------------------------------------------------------------------


def inputs(args, vocab: int):
    """The prompt [P] and the teacher-forced decode inputs [n] every row uses (fixed seeds)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (args.prompt_tokens,), generator=gen)
    forced = torch.randint(0, vocab, (args.new_tokens,), generator=gen)
    return prompt, forced


def hbm_bytes_per_token(config, context: int, dtype_bytes: int) -> int:
    """Bytes a batch-1 decode step must read: every layer's attention and router weights, the top-k experts of
    each MoE layer, the final norm and lm_head, one embedding row and the KV cache up to `context` positions."""
    H, hd = config.hidden_size, config.head_dim
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    attn = H * nh * hd * 2 + H * nkv * hd * 2 + 2 * H + 2 * hd  # q, o, k, v, two norms, q/k norms
    expert = 3 * H * config.moe_intermediate_size
    per_layer = [attn + (config.num_experts * H + config.num_experts_per_tok * expert if config.is_moe_layer(i)
                         else 3 * H * config.intermediate_size) for i in range(config.num_hidden_layers)]
    kv = config.num_hidden_layers * 2 * nkv * hd * context
    return (sum(per_layer) + config.vocab_size * H + 2 * H + kv) * dtype_bytes


# -- rows (each in its own subprocess) -----------------------------------------------------------------------------


def row_transformers(args) -> list[dict]:
    """transformers' thinker (device_map onto the device), one load, one row per experts implementation."""
    import torch
    from transformers import DynamicCache

    from omnilab import Checkpoint
    from omnilab.dtypes import as_dtype
    from omnilab.tokenizer import quiet_transformers

    checkpoint = Checkpoint(args.checkpoint)
    config, layout = checkpoint.arch
    if layout.model_type == "qwen3_omni_moe":
        from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as model_cls
    else:
        from transformers import AutoModelForCausalLM as model_cls
    prompt, forced = inputs(args, config.vocab_size)
    dev = args.device
    rows = []
    with AnonPeak() as anon:
        start = time.perf_counter()
        with quiet_transformers():
            hf = model_cls.from_pretrained(str(checkpoint.root), dtype=as_dtype(args.dtype), device_map=dev,
                                           attn_implementation="sdpa", experts_implementation="eager",
                                           trust_remote_code=False, use_kernels=False)  # offline: no hub kernels
        hf.eval().requires_grad_(False)
        if layout.model_type == "qwen3_omni_moe" and not hasattr(hf.config, "vision_start_token_id"):
            hf.config.vision_start_token_id = 151652  # as omnilab.reference.whole: read by get_rope_index, never matched
        load_s = time.perf_counter() - start

        def run(n_forced: int, n_free: int, record: bool):
            """Prefill, n_forced teacher-forced steps, then n_free greedy steps from the same state."""
            ids = prompt[None].to(dev)
            cache = DynamicCache(config=hf.config.get_text_config())
            _sync(dev)
            t0 = time.perf_counter()
            out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            _sync(dev)
            t1 = time.perf_counter()
            argmax, kept = [logits.argmax(-1)], [logits] if record else []
            for j in range(n_forced - 1):
                out = hf(input_ids=forced[None, j:j + 1].to(dev), past_key_values=out.past_key_values, use_cache=True)
                logits = out.logits[:, -1].float()
                argmax.append(logits.argmax(-1))
                if record:
                    kept.append(logits)
            _sync(dev)
            t2 = time.perf_counter()
            free = []
            if n_free:  # fresh prefill, then greedy
                cache = DynamicCache(config=hf.config.get_text_config())
                out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
                for _ in range(n_free):
                    tok = out.logits[:, -1].argmax(-1)
                    free.append(int(tok))
                    out = hf(input_ids=tok[:, None], past_key_values=out.past_key_values, use_cache=True)
            return t1 - t0, t2 - t1, [int(a) for a in argmax], (torch.stack(kept, 1)[0].cpu() if record else None), free

        for impl in args.hf_impl:
            hf.set_experts_implementation(impl)
            torch.cuda.reset_peak_memory_stats() if dev.startswith("cuda") else None
            with torch.no_grad():
                run(2, 0, False)  # warm-up
                runs = [run(args.slow_tokens, 0, False) for _ in range(args.repeats)]
                _, _, argmax, logits, free = run(args.slow_tokens, args.free_tokens, True)
            path = Path(args.scratch) / f"logits-hf-{impl}.pt"
            torch.save(logits, path)
            rows.append(_speed_row(f"transformers {impl}", runs, args.prompt_tokens, args.slow_tokens,
                                   argmax=argmax, free=free, logits_file=str(path), load_s=load_s,
                                   peak_gpu_bytes=_gpu_peak(), peak_anon_bytes=anon.peak))
    return rows


def _speed_row(name, runs, P, n, **extra) -> dict:
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"row": name, "prefill_tokens_per_s": P / prefill, "decode_tokens_per_s": (n - 1) / decode,
            "decode_runs": [(n - 1) / r[1] for r in runs], "decode_steps": n - 1, **extra}


def row_omnilab_eager(args) -> list[dict]:
    """omnilab's SelectiveMoE, every expert preloaded into its cache (budget: all), eager forward per token."""
    import torch

    from omnilab.model.decoder import KVCache, SelectiveMoE

    dev = args.device
    with AnonPeak() as anon:
        start = time.perf_counter()
        model = SelectiveMoE.from_checkpoint(args.checkpoint, dtype=args.dtype, device=dev, tokenizer=False)
        for layer in model.config.moe_layers:  # all resident: the timed steps never load
            for e in range(model.config.num_experts):
                model.cache.get(layer, e)
        load_s = time.perf_counter() - start
        prompt, forced = inputs(args, model.config.vocab_size)

        def run(n_forced: int, n_free: int, record: bool):
            kv = KVCache(model.config.num_hidden_layers)
            _sync(dev)
            t0 = time.perf_counter()
            logits = model(prompt[None], kv=kv)[:, -1].float()
            _sync(dev)
            t1 = time.perf_counter()
            argmax, kept = [logits.argmax(-1)], [logits] if record else []
            for j in range(n_forced - 1):
                logits = model(forced[None, j:j + 1], kv=kv)[:, -1].float()
                argmax.append(logits.argmax(-1))
                if record:
                    kept.append(logits)
            _sync(dev)
            t2 = time.perf_counter()
            free = model.generate(prompt.tolist(), n_free, vocab_limit=None).new_token_ids[0] if n_free else []
            return t1 - t0, t2 - t1, [int(a) for a in argmax], (torch.stack(kept, 1)[0].cpu() if record else None), free

        with torch.no_grad():
            run(2, 0, False)
            runs = [run(args.slow_tokens, 0, False) for _ in range(args.repeats)]
            _, _, argmax, logits, free = run(args.slow_tokens, args.free_tokens, True)
        path = Path(args.scratch) / "logits-omnilab-eager.pt"
        torch.save(logits, path)
    return [_speed_row("omnilab eager (all resident)", runs, args.prompt_tokens, args.slow_tokens, argmax=argmax,
                       free=free, logits_file=str(path), load_s=load_s, peak_gpu_bytes=_gpu_peak(),
                       peak_anon_bytes=anon.peak, hits=model.cache.stats.hits, misses=model.cache.stats.misses)]


def apply_tuned(path) -> None:
    """Set the Triton kernels' block tables from a JSON file of bench/tune_token_mix.py --save (TOKEN_GATE_UP /
    TOKEN_DOWN, or with --batch > 1 SLOT_GATE_UP / SLOT_DOWN) or bench/step_kernels.py --sweep --save (QKV, WIDE,
    NARROW, DOT_QKV, DOT_WIDE, DOT_NARROW, ROUTE_WARPS); the tables a file does not name keep their defaults."""
    import omnilab.gpu.fused_moe as fm
    import omnilab.gpu.step_kernels as sk

    tuned = json.loads(Path(path).read_text())
    for module, names in ((fm, ("TOKEN_GATE_UP", "TOKEN_DOWN", "SLOT_GATE_UP", "SLOT_DOWN")),
                          (sk, ("QKV", "WIDE", "NARROW", "DOT_QKV", "DOT_WIDE", "DOT_NARROW", "ROUTE_WARPS"))):
        for name in names:
            setattr(module, name, tuned.get(name, getattr(module, name)))


def row_fast(args, compile: bool, compute: str | None = None, step_kernels: bool = True) -> list[dict]:
    """omnilab.gpu.fast.FastDecoder: slot pool of every expert, static KV, the decode step as a CUDA graph;
    compute: its expert mix (None: the decoder's default; "triton": omnilab.gpu.fused_moe, and for decode-sized
    bf16 steps omnilab.gpu.step_kernels' GEMVs and top-k unless step_kernels=False)."""
    import torch

    from omnilab.gpu.fast import FastDecoder
    from omnilab.model.decoder import SelectiveMoE

    dev = args.device
    if args.token_config:  # tuned block sizes: the Triton rows, the default one included
        apply_tuned(args.token_config)
    if not step_kernels:  # the expert mix alone in Triton: the projections and top-k through torch
        import omnilab.gpu.step as step

        step.GEMV_MAX_TOKENS = 0
    with AnonPeak() as anon:
        start = time.perf_counter()
        model = SelectiveMoE.from_checkpoint(args.checkpoint, dtype=args.dtype, device=dev, tokenizer=False)
        decoder = FastDecoder(model, max_len=args.prompt_tokens + args.new_tokens, compile=compile, compute=compute)
        load_s = time.perf_counter() - start
        prompt, forced = inputs(args, model.config.vocab_size)
        start = time.perf_counter()
        try:
            decoder.generate(prompt, args.new_tokens, forced=forced)  # warm-up: capture (and compile)
        except Exception as e:  # report the failure and measure without the graph rather than nothing
            if not decoder.graph_enabled:
                raise
            print(f"[bench] CUDA graph capture failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            decoder.graph_enabled = False
            torch.cuda.synchronize()
            decoder.generate(prompt, args.new_tokens, forced=forced)
        capture_s = time.perf_counter() - start
        gens = [decoder.generate(prompt, args.new_tokens, forced=forced) for _ in range(args.repeats)]
        runs = [(g.prefill_seconds, g.seconds - g.prefill_seconds) for g in gens]
        check = decoder.generate(prompt, args.slow_tokens, forced=forced, record_logits=True)
        free = decoder.generate(prompt, args.free_tokens).new_token_ids[0] if args.free_tokens else []
        graphed = decoder.graph_enabled
        decoder.graph_enabled = False  # the same steps without the CUDA graph (the captured one is kept)
        plain = decoder.generate(prompt, args.new_tokens, forced=forced).decode_tokens_per_s
        decoder.graph_enabled = graphed
        tag = f"{'-compiled' * compile}{'-' + compute if compute else ''}{'-mix' * (not step_kernels)}"
        path = Path(args.scratch) / f"logits-fast{tag}.pt"
        torch.save(check.logits[:, 0].cpu(), path)
        routing_seen = int((gens[-1].routing >= 0).all())
    name = "omnilab fast path" + (" (compiled layer)" if compile else "") + (f" [{compute}]" if compute else "")
    name += "" if step_kernels else " (expert mix only)"
    row = _speed_row(name, runs, args.prompt_tokens, args.new_tokens, argmax=check.new_token_ids[0],
                     argmax_long=gens[-1].new_token_ids[0], free=free, logits_file=str(path), load_s=load_s,
                     capture_s=capture_s, peak_gpu_bytes=_gpu_peak(), peak_anon_bytes=anon.peak,
                     pool_bytes=decoder.pool.nbytes, kv_bytes=decoder.kv.nbytes, routing_recorded=routing_seen,
                     graph=graphed, compute=decoder.compute, no_graph_decode_tokens_per_s=plain)
    return [row]


def row_budget(args) -> list[dict]:
    """The selective model at an expert budget (fraction of every expert's bytes), greedy generate."""
    import torch

    from omnilab.model.decoder import SelectiveMoE
    from omnilab.model.experts import ExpertCache

    fraction = float(args.budget)
    with AnonPeak() as anon:
        model = SelectiveMoE.from_checkpoint(args.checkpoint, dtype=args.dtype, device=args.device, tokenizer=False)
        prompt, _ = inputs(args, model.config.vocab_size)
        store = model.cache.store
        budget = int(store.total_bytes * fraction)
        model.cache = ExpertCache(store, budget)
        model(prompt[None, :2])
        runs = []
        for _ in range(args.repeats):
            model.cache.clear()
            model.cache.reset_stats()
            gen = model.generate(prompt.tolist(), args.new_tokens, vocab_limit=None)
            runs.append((gen, model.cache.stats.to_dict()))
    out, stats = sorted(runs, key=lambda r: r[0].tokens_per_s)[len(runs) // 2]
    del torch
    return [{"row": f"selective {fraction:.0%}", **stats, "budget_bytes": budget, "tokens_per_s": out.tokens_per_s,
             "decode_tokens_per_s": out.decode_tokens_per_s, "free": out.new_token_ids[0],
             "peak_rss_bytes": peak_rss_bytes(), "peak_anon_bytes": anon.peak, "peak_gpu_bytes": _gpu_peak()}]


ROWS = {"hf": row_transformers, "eager": row_omnilab_eager, "fast": lambda a: row_fast(a, False),
        "fast-compiled": lambda a: row_fast(a, True), "fast-triton": lambda a: row_fast(a, True, "triton"),
        "fast-grouped": lambda a: row_fast(a, True, "grouped_mm"),  # the bf16 default before compute="triton"
        "fast-triton-mix": lambda a: row_fast(a, True, "triton", step_kernels=False),
        "budget": row_budget}


# -- the run -------------------------------------------------------------------------------------------------------


def build_checkpoint(args) -> Path:
    import torch

    from omnilab.testing.synth import real_shape_checkpoint

    out = Path(args.workdir) / f"omni-thinker-{args.layers}l"
    start = time.perf_counter()
    real_shape_checkpoint(out, layers=args.layers, dtype=torch.bfloat16, device=args.device.split(":")[0],
                          towers=False, progress=False)
    print(f"[bench] checkpoint {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: synthesize one, see --layers)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the synthesized checkpoint")
    p.add_argument("--workdir", default="/dev/shm/omnilab-bench", help="where the synthesized checkpoint goes")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--suite", choices=("fast", "budgets"), default="fast")
    p.add_argument("--rows", default="hf,eager,fast,fast-compiled", help="fast suite: rows to run, comma-separated "
                   "(also fast-triton: fast-compiled with the fused Triton expert kernels, omnilab.gpu.fused_moe, "
                   "and the step's Triton GEMVs and top-k, omnilab.gpu.step_kernels; fast-triton-mix: the expert "
                   "kernels alone)")
    p.add_argument("--hf-impl", default=",".join(HF_IMPLEMENTATIONS), help="transformers experts implementations")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128, help="teacher-forced decode steps of the fast path")
    p.add_argument("--slow-tokens", type=int, default=16, help="teacher-forced steps of the eager rows (and the "
                   "steps whose logits are compared)")
    p.add_argument("--free-tokens", type=int, default=8, help="free greedy tokens per row (exactness check)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hbm-tb-s", type=float, default=4.8, help="HBM bandwidth for the floor (H200: 4.8 TB/s)")
    p.add_argument("--row-timeout", type=int, default=900, help="seconds a row may take")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--markdown", default=None, help="write the table (with command and hardware) here")
    p.add_argument("--token-config", default=None, help="the fast-triton rows' block sizes: a JSON file "
                   "{\"TOKEN_GATE_UP\": {...}, \"TOKEN_DOWN\": {...}} (bench/tune_token_mix.py --save writes one) "
                   "and/or QKV, WIDE, NARROW, ROUTE_WARPS (bench/step_kernels.py --sweep --save)")
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    p.add_argument("--budget", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.hf_impl = [s for s in args.hf_impl.split(",") if s]
    if args.row:
        print(json.dumps(ROWS[args.row](args)))
        return 0

    ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(args)
    scratch = Path(args.workdir) / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    jobs = ([("budget", str(b)) for b in BUDGETS] if args.suite == "budgets"
            else [(r, None) for r in args.rows.split(",") if r])
    rows, errors = [], []
    for name, budget in jobs:
        cmd = [sys.executable, __file__, "--row", name, "--checkpoint", str(ckpt), "--scratch", str(scratch)]
        for flag in ("dtype", "device", "prompt_tokens", "new_tokens", "slow_tokens", "free_tokens", "repeats"):
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        cmd += ["--hf-impl", ",".join(args.hf_impl)] + (["--budget", budget] if budget else [])
        cmd += ["--token-config", args.token_config] if args.token_config else []
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
        except subprocess.TimeoutExpired:
            errors.append(f"{name}: over --row-timeout {args.row_timeout} s")
            continue
        print(f"[bench] row {name}{' ' + budget if budget else ''}: {time.perf_counter() - start:.0f} s, "
              f"rc {done.returncode}", file=sys.stderr, flush=True)
        if done.returncode != 0:
            errors.append(f"{name}: " + (done.stderr.strip().splitlines() or ["(no output)"])[-1])
            print(done.stderr[-4000:], file=sys.stderr)
            continue
        print(done.stderr[-1500:], file=sys.stderr)
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        if args.out:  # after every row: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows, errors, ckpt, args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(text)
    return 1 if errors and not rows else 0


def compare(rows) -> None:
    """Add logits' relative error and argmax / greedy agreement against omnilab eager and transformers' rows."""
    import torch

    by = {r["row"]: r for r in rows}
    eager = by.get("omnilab eager (all resident)")
    hf = next((r for r in rows if r["row"].startswith("transformers")), None)
    for r in rows:
        for tag, base in (("eager", eager), ("hf", hf)):
            if base is None or base is r or "logits_file" not in r:
                continue
            a, b = torch.load(r["logits_file"]), torch.load(base["logits_file"])
            n = min(len(a), len(b))
            a, b = a[:n], b[:n]
            r[f"rel_err_vs_{tag}"] = float((a - b).norm() / b.norm())
            r[f"argmax_same_vs_{tag}"] = sum(x == y for x, y in zip(r["argmax"][:n], base["argmax"][:n]))
            r[f"argmax_n_vs_{tag}"] = n
            r[f"free_same_vs_{tag}"] = r["free"] == base["free"]


def table(rows, errors, ckpt, args) -> str:
    import torch

    from omnilab import Checkpoint

    config, _ = Checkpoint(ckpt).arch
    gb = 1e9
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    head = [f"`{' '.join(['python', *sys.argv])}`", "",
            f"{device}, torch {torch.__version__}, {args.dtype}, batch 1; checkpoint {ckpt.name}: "
            f"{config.num_hidden_layers} layers x {config.num_experts} experts (top {config.num_experts_per_tok}), "
            f"hidden {config.hidden_size}, expert {config.moe_intermediate_size}, vocab {config.vocab_size}", ""]
    if args.suite == "budgets":
        lines = head + ["| setting | expert budget | tokens/s (all) | tokens/s (decode) | peak resident experts | "
                        "peak anon RSS | hit rate | loaded | peak GPU memory |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            gpu = f"{r['peak_gpu_bytes'] / gb:.2f} GB" if r.get("peak_gpu_bytes") else ""
            lines.append(f"| {r['row']} | {r['budget_bytes'] / gb:.2f} GB | {r['tokens_per_s']:.2f} | "
                         f"{r['decode_tokens_per_s']:.2f} | {r['peak_resident_bytes'] / gb:.2f} GB | "
                         f"{r['peak_anon_bytes'] / gb:.2f} GB | {r['hit_rate']:.1%} | {r['loaded_bytes'] / gb:.2f} GB | {gpu} |")
        return "\n".join(lines + [f"- failed: {e}" for e in errors])
    compare(rows)
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    floor_bytes = hbm_bytes_per_token(config, args.prompt_tokens + args.new_tokens // 2, dtype_bytes)
    floor = args.hbm_tb_s * 1e12 / floor_bytes
    hf = [r for r in rows if r["row"].startswith("transformers")]
    best = max(hf, key=lambda r: r["decode_tokens_per_s"]) if hf else None
    lines = head + [
        f"Prompt {args.prompt_tokens} random ids; decode teacher-forced with fixed random ids ({args.new_tokens} steps "
        f"on the fast path, {args.slow_tokens} on the eager rows). HBM floor: {floor_bytes / gb:.2f} GB read per token "
        f"at {args.hbm_tb_s} TB/s = {floor:.0f} tok/s. Logits compared over the first {args.slow_tokens} produced "
        f"tokens (rel err = ||a - b|| / ||b||).", "",
        "| row | decode tok/s | ms/token | x transformers best | x HBM floor | prefill tok/s | peak GPU memory "
        "| logits rel err vs omnilab eager | forced argmax = eager | free greedy = transformers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["decode_tokens_per_s"]
        vs_best = f"{d / best['decode_tokens_per_s']:.2f}x" if best else ""
        gpu = f"{r['peak_gpu_bytes'] / gb:.1f} GB" if r.get("peak_gpu_bytes") else ""
        rel = f"{r['rel_err_vs_eager']:.2e}" if "rel_err_vs_eager" in r else ""
        agree = f"{r['argmax_same_vs_eager']} / {r['argmax_n_vs_eager']}" if "argmax_same_vs_eager" in r else ""
        free = ("yes" if r["free_same_vs_hf"] else "no") if "free_same_vs_hf" in r else ""
        lines.append(f"| {r['row']} | {d:.1f} | {1e3 / d:.2f} | {vs_best} | {d / floor:.1%} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {gpu} | {rel} | {agree} | {free} |")
    extra = [f"- {r['row']}: load {r['load_s']:.0f} s" + (f", capture {r['capture_s']:.1f} s" if "capture_s" in r else "")
             + (f", slot pool {r['pool_bytes'] / gb:.1f} GB, KV {r['kv_bytes'] / gb:.2f} GB, expert compute "
                f"{r['compute']}, CUDA graph {r['graph']}, routing recorded for every layer and position: "
                f"{bool(r['routing_recorded'])}; without the graph {r['no_graph_decode_tokens_per_s']:.1f} tok/s"
                if "pool_bytes" in r else "")
             + (f"; rel err vs transformers {r['rel_err_vs_hf']:.2e}" if "rel_err_vs_hf" in r else "")
             + f"; decode runs {', '.join(f'{x:.1f}' for x in r['decode_runs'])} tok/s"
             + f"; peak anon RSS {r['peak_anon_bytes'] / gb:.1f} GB" for r in rows]
    return "\n".join(lines + [""] + extra + noise_lines(rows) + [f"- failed: {e}" for e in errors])


def noise_lines(rows) -> list[str]:
    """transformers' own bf16 noise: its experts implementations' logits against each other over the same steps
    (two orders of the same arithmetic), the scale the other rows' "rel err" columns are read against."""
    import torch

    hf = [r for r in rows if r["row"].startswith("transformers") and "logits_file" in r]
    out = []
    for i, a in enumerate(hf):
        for b in hf[i + 1:]:
            x, y = torch.load(a["logits_file"]), torch.load(b["logits_file"])
            n = min(len(x), len(y))
            rel = float((x[:n] - y[:n]).norm() / y[:n].norm())
            same = sum(p == q for p, q in zip(a["argmax"][:n], b["argmax"][:n]))
            out.append(f"- transformers' own noise: {a['row']} against {b['row']}, logits rel err {rel:.2e} over "
                       f"{n} steps, forced argmax equal at {same} / {n}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
