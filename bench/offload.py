"""Offloaded decode (omnilab.gpu.offload) under a total GPU memory cap, routed by benchmark traces, against
accelerate's offload of the transformers reference at the same GPU memory, in one run.

    python bench/offload.py --device cuda --layers 48                  # 8 GB and 16 GB caps, uniform + locality
    python bench/offload.py --checkpoint DIR --device cpu ...          # any checkpoint; the CPU path

The checkpoint is `omnilab.testing.synth.real_shape_checkpoint` (as bench/decode.py). Routing: a random-weight model
routes the same way at every step, so every row forces the routers' choice with a trace
(`omnilab.gpu.traces.RoutingOverride`): `uniform` (k distinct experts at random: the worst case) and `locality`
(45% of choices repeated from the previous token, 80% within 8: the Qwen3-30B-A3B statistics of issue 13).
Decode inputs are teacher-forced random ids. The cap is enforced with torch.cuda.set_per_process_memory_fraction
and the expert slots are sized from it after the backbone, KV cache and a working reserve. The PCIe floor is
the measured miss bytes per token at the measured pinned host-to-device bandwidth. Speculative prefetch (the
next layer's router on the current hidden state) is measured on and off: under a forced trace the router's
guess is unrelated to the trace, so its precision here is chance (k / E) and it only costs bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import AnonPeak, build_checkpoint  # noqa: E402  (bench/decode.py: the same checkpoint and memory probe)


def pinned_h2d_gb_s(device, nbytes: int = 1 << 30) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - start) / 1e9


def row_omnilab(args) -> list[dict]:
    import torch

    from omnilab.gpu.offload import HostTier, OffloadDecoder
    from omnilab.gpu.traces import RoutingOverride, locality_trace, reuse_stats, uniform_trace
    from omnilab.model.decoder import SelectiveMoE

    dev = args.device
    cuda = dev.startswith("cuda")
    rows = []
    with AnonPeak() as anon:
        start = time.perf_counter()
        model = SelectiveMoE.from_checkpoint(args.checkpoint, dtype=args.dtype, device=dev, tokenizer=False)
        config, layout = model.checkpoint.arch
        host = HostTier.mapped(model.checkpoint, config, layout, register=cuda)
        load_s = time.perf_counter() - start
        cfg = model.config
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=gen)
        forced = torch.randint(0, cfg.vocab_size, (args.new_tokens,), generator=gen)
        S = args.prompt_tokens + args.new_tokens
        L, E, k = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
        traces = {"uniform": uniform_trace(L, S, E, k, seed=2),
                  "locality": locality_trace(L, S, E, k, next=0.45, within8=0.80, seed=2)}
        bandwidth = pinned_h2d_gb_s(dev) if cuda else float("nan")
        backbone = sum(p.numel() * p.element_size() for p in model.parameters())
        total = torch.cuda.get_device_properties(dev).total_memory if cuda else None
        for cap_gb in args.caps:
            cap = cap_gb * 1e9
            for name, trace in traces.items():
                for prefetch in (False, True):
                    torch.cuda.empty_cache() if cuda else None
                    if cuda:
                        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
                        torch.cuda.reset_peak_memory_stats()
                    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * model.dtype.itemsize
                    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 512 * model.dtype.itemsize
                    room = cap - backbone - kv - args.reserve_gb * 1e9
                    slots = args.slots or min(E, int(room // (per_expert * L)))
                    if slots < k:
                        rows.append({"row": f"omnilab {name}", "cap_gb": cap_gb, "error": f"{slots} slots < top-{k}"})
                        continue
                    override = RoutingOverride.from_trace(trace, cfg.moe_layers)
                    decoder = OffloadDecoder(model, host, slots=slots, max_len=S, prefetch=prefetch, override=override)
                    decoder.generate(prompt, 4, forced=forced)  # warm-up (kernels, slots filled)
                    out = decoder.generate(prompt, args.new_tokens, forced=forced)
                    st = decoder.stats.to_dict()
                    miss_bytes = st["misses"] * decoder.pool.expert_bytes / max(1, st["tokens"])
                    floor = bandwidth * 1e9 / st["bytes_per_token"] if st["bytes_per_token"] else float("inf")
                    rows.append({"row": f"omnilab offload, {name} trace" + (", prefetch" if prefetch else ""),
                                 "cap_gb": cap_gb, "slots_per_layer": slots, "trace_stats": reuse_stats(trace),
                                 "decode_tokens_per_s": out.decode_tokens_per_s,
                                 "prefill_tokens_per_s": args.prompt_tokens / out.prefill_seconds, **st,
                                 "miss_bytes_per_token": miss_bytes, "pinned_h2d_gb_s": bandwidth,
                                 "pcie_floor_tokens_per_s": floor, "peak_gpu_bytes": torch.cuda.max_memory_allocated()
                                 if cuda else None, "host_tier": host.how, "load_s": load_s,
                                 "tokens": out.new_token_ids[0]})
                    if os.environ.get("OFFLOAD_PARTIAL"):  # a run cut short keeps the configurations it measured
                        Path(os.environ["OFFLOAD_PARTIAL"]).write_text(json.dumps(rows, indent=2) + "\n")
                    print(f"[offload] {rows[-1]['row']} cap {cap_gb} GB: {out.decode_tokens_per_s:.1f} tok/s, "
                          f"hit {st['hit_rate']:.1%}", file=sys.stderr, flush=True)
                    del decoder
    for r in rows:
        r["peak_anon_bytes"] = anon.peak
    return rows


def row_accelerate(args) -> list[dict]:
    """transformers' thinker with accelerate's offload (device_map="auto", max_memory = the cap)."""
    import torch

    from omnilab import Checkpoint
    from omnilab.dtypes import as_dtype
    from omnilab.tokenizer import quiet_transformers

    rows = []
    checkpoint = Checkpoint(args.checkpoint)
    config, layout = checkpoint.arch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as model_cls

    cap_gb = min(args.caps)
    with AnonPeak() as anon:
        start = time.perf_counter()
        with quiet_transformers():
            hf = model_cls.from_pretrained(str(checkpoint.root), dtype=as_dtype(args.dtype), device_map="auto",
                                           max_memory={0: f"{cap_gb}GB", "cpu": "200GB"},
                                           attn_implementation="sdpa", experts_implementation="batched_mm")
        hf.eval()
        if not hasattr(hf.config, "vision_start_token_id"):
            hf.config.vision_start_token_id = 151652
        load_s = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,), generator=gen)[None].to("cuda")
        forced = torch.randint(0, config.vocab_size, (args.new_tokens,), generator=gen)
        with torch.no_grad():
            from transformers import DynamicCache

            out = hf(input_ids=prompt, past_key_values=DynamicCache(config=hf.config.get_text_config()), use_cache=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = args.accelerate_tokens
            for j in range(n):
                out = hf(input_ids=forced[None, j:j + 1].to("cuda"), past_key_values=out.past_key_values,
                         use_cache=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
    rows.append({"row": "transformers + accelerate offload (batched_mm)", "cap_gb": cap_gb,
                 "decode_tokens_per_s": n / dt, "load_s": load_s, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
                 "peak_anon_bytes": anon.peak})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default="/dev/shm/omnilab-bench")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--caps", default="8,16", help="total GPU memory caps in GB, comma-separated")
    p.add_argument("--reserve-gb", type=float, default=0.6, help="GPU memory kept for activations and workspace")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--accelerate-tokens", type=int, default=2)
    p.add_argument("--slots", type=int, default=0, help="expert slots per layer (default: sized from the cap)")
    p.add_argument("--rows", default="omnilab,accelerate")
    p.add_argument("--row-timeout", type=int, default=400)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.caps = [float(c) for c in str(args.caps).split(",") if c]
    if args.row:
        print(json.dumps({"omnilab": row_omnilab, "accelerate": row_accelerate}[args.row](args)))
        return 0
    ckpt = Path(args.checkpoint) if args.checkpoint else build_checkpoint(args)
    rows, errors = [], []
    for name in [r for r in args.rows.split(",") if r]:
        cmd = [sys.executable, __file__, "--row", name, "--checkpoint", str(ckpt), "--dtype", args.dtype,
               "--device", args.device, "--caps", ",".join(map(str, args.caps)), "--reserve-gb", str(args.reserve_gb),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--accelerate-tokens", str(args.accelerate_tokens), "--slots", str(args.slots)]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
        except subprocess.TimeoutExpired:
            errors.append(f"{name}: over --row-timeout {args.row_timeout} s")
            continue
        print(f"[bench] row {name}: {time.perf_counter() - start:.0f} s, rc {done.returncode}", file=sys.stderr)
        print(done.stderr[-3000:], file=sys.stderr, flush=True)
        if done.returncode != 0:
            errors.append(f"{name}: " + (done.stderr.strip().splitlines() or ["(no output)"])[-1])
            continue
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows, errors, ckpt, args)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    print(text)
    return 1 if errors and not rows else 0


def table(rows, errors, ckpt, args) -> str:
    import torch

    from omnilab import Checkpoint

    config, _ = Checkpoint(ckpt).arch
    gb = 1e9
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    acc = next((r for r in rows if r["row"].startswith("transformers")), None)
    lines = [f"`{' '.join(['python', *sys.argv])}`", "",
             f"{device}, torch {torch.__version__}, {args.dtype}, batch 1; checkpoint {ckpt.name}: "
             f"{config.num_hidden_layers} layers x {config.num_experts} experts (top {config.num_experts_per_tok}); "
             f"prompt {args.prompt_tokens}, {args.new_tokens} teacher-forced decode steps, routing forced by the trace",
             "",
             "| row | GPU cap | slots / layer | decode tok/s | PCIe floor tok/s | x floor | x accelerate | hit rate "
             "| prefetch precision / recall | GB moved / token | pinned H2D GB/s | peak GPU memory |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['cap_gb']:.0f} GB | {r['error']} |")
            continue
        d = r["decode_tokens_per_s"]
        gpu = f"{r['peak_gpu_bytes'] / gb:.2f} GB" if r.get("peak_gpu_bytes") else ""
        if "slots_per_layer" not in r:
            lines.append(f"| {r['row']} | {r['cap_gb']:.0f} GB | | {d:.3f} | | | 1.00x | | | | | {gpu} |")
            continue
        floor = r["pcie_floor_tokens_per_s"]
        vs_acc = f"{d / acc['decode_tokens_per_s']:.0f}x" if acc else ""
        pf = f"{r['prefetch_precision']:.0%} / {r['prefetch_recall']:.0%}" if r["prefetched"] else "off"
        lines.append(f"| {r['row']} | {r['cap_gb']:.0f} GB | {r['slots_per_layer']} | {d:.1f} | {floor:.1f} | "
                     f"{d / floor:.0%} | {vs_acc} | {r['hit_rate']:.1%} | {pf} | {r['bytes_per_token'] / gb:.2f} | "
                     f"{r['pinned_h2d_gb_s']:.1f} | {gpu} |")
    stats = {r["row"].split(",")[1].strip(): r["trace_stats"] for r in rows if "trace_stats" in r}
    lines += [""] + [f"- {name}: measured reuse next {s['next']:.1%}, within 8 {s['within8']:.1%}"
                     for name, s in stats.items()]
    lines += [f"- host tier: {rows[0].get('host_tier')}" if rows else ""] + [f"- failed: {e}" for e in errors]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
