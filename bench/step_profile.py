"""Where a decode step's GPU time goes: the compiled FastDecoder step (one token per row, batch --batch) under
torch.profiler, per expert compute way, kernels grouped by name with microseconds per layer, beside the CUDA-graph
speed.

    python bench/step_profile.py --layers 4 --computes grouped_mm,triton     # a real-shape checkpoint in /dev/shm
    python bench/step_profile.py --checkpoint CKPT --computes triton --batch 8   # batched decode (bench/batched.py)

The step runs without the CUDA graph under the profiler (the kernels are the ones the graph replays); the
table's "us/layer" is a kernel's GPU time per step divided by the layers. Real shapes, random weights; the rows of
a batch get their own random prompts and teacher-forced inputs (seeded), so they route apart as on a corpus.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default="/dev/shm/step-profile")
    p.add_argument("--computes", default="grouped_mm,triton")
    p.add_argument("--tokens", type=int, default=16, help="decode steps under the profiler")
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    args = p.parse_args()
    from omnilab.gpu.fast import FastDecoder
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.testing.synth import real_shape_checkpoint

    ckpt = args.checkpoint or real_shape_checkpoint(Path(args.workdir) / f"thinker-{args.layers}l",
                                                    layers=args.layers, device="cuda", towers=False, progress=False)
    model = SelectiveMoE.from_checkpoint(ckpt, dtype="bfloat16", device="cuda", tokenizer=False)
    layers = sum(1 for layer in model.model.layers if layer.is_moe)
    B, vocab = args.batch, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (B, 16), generator=gen)  # [B, 16]
    forced = torch.randint(0, vocab, (B, 64), generator=gen)  # [B, 64]: teacher-forced inputs
    one = prompt[:, :1].tolist()  # a one-token prompt per row: its prefill is one more decode-sized step
    pool = None
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {layers} MoE layers, bf16, batch {B}")
    for compute in args.computes.split(","):
        dec = FastDecoder(model, batch=B, max_len=128, compile=True, compute=compute, pool=pool)
        pool = dec.pool
        dec.generate(prompt.tolist(), 8, forced=forced[:, :8])  # compile and capture
        graphed = dec.generate(prompt.tolist(), 64, forced=forced)
        dec.graph_enabled = False
        dec.generate(prompt.tolist(), 4, forced=forced[:, :4])  # the uncaptured step warmed
        plain = dec.generate(prompt.tolist(), 64, forced=forced)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            start = time.perf_counter()
            dec.generate(one, args.tokens, forced=forced[:, :args.tokens])
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        dec.graph_enabled = True
        kernels = collections.Counter()
        counts = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name] += e.device_time
                counts[e.name] += 1
        steps = args.tokens  # the one-token prefill and tokens - 1 decode steps
        total = sum(kernels.values())
        step_ms = 1e3 * B / graphed.decode_tokens_per_s
        print(f"\n## {compute}: graph {graphed.decode_tokens_per_s:.1f} tok/s ({step_ms:.2f} ms/step), without the "
              f"graph {plain.decode_tokens_per_s:.1f} tok/s; profiled {args.tokens} tokens in "
              f"{wall:.2f} s wall, GPU kernel time {total / 1e3:.1f} ms ({total / steps / layers:.1f} us/layer/step)")
        print("| kernel | calls/step/layer | us/layer/step | share |")
        print("|---|---:|---:|---:|")
        for name, us in kernels.most_common(args.top):
            print(f"| {name[:90]} | {counts[name] / steps / layers:.2f} | {us / steps / layers:.2f} | "
                  f"{us / total:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
