"""One MoE layer's expert mix (omnilab.gpu.step.expert_mix) alone on the GPU, per compute way and decode batch:
microseconds per call (CUDA-graph replays of --calls calls, so no launch overhead), against the HBM floor of the
distinct experts the step routes to (each read once: 3 * H * I * 2 bytes in bf16 at --hbm-tb-s TB/s).

    python bench/expert_mix.py                                   # bf16, real shapes, grouped_mm / gather / triton
    python bench/expert_mix.py --computes triton --batches 1,8,64 --hbm-tb-s 4.8   # H200

Random experts (top-k of uniform router logits per token), so a batch shares experts by chance alone.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from omnilab.gpu.step import expert_mix


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--computes", default="grouped_mm,gather,triton")
    p.add_argument("--batches", default="1,2,4,8,16,32,64")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--calls", type=int, default=20, help="calls per graph replay")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--hbm-tb-s", type=float, default=3.35, help="HBM bandwidth for the floor (H100 SXM: 3.35)")
    args = p.parse_args()
    S, k, H, I, dtype = args.experts, args.top_k, args.hidden, args.intermediate, getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(S, 2 * I, H, device="cuda", generator=gen) * 0.02).to(dtype)  # [S, 2I, H]
    down = (torch.randn(S, H, I, device="cuda", generator=gen) * 0.02).to(dtype)  # [S, H, I]
    slot_range = torch.arange(S, device="cuda")
    expert_bytes = 3 * H * I * gate_up.element_size()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, {S} experts top-{k}, "
          f"hidden {H}, expert {I}; floor at {args.hbm_tb_s} TB/s")
    print("| batch | distinct experts | floor us | " + " | ".join(f"{c} us (x floor)" for c in args.computes.split(","))
          + " |")
    print("|---:|---:|---:|" + "---:|" * len(args.computes.split(",")))
    for B in (int(b) for b in args.batches.split(",")):
        x = torch.randn(B, H, device="cuda", generator=gen).to(dtype)  # [N, H]
        logits = torch.rand(B, S, device="cuda", generator=gen)
        weights, slots = logits.softmax(-1).topk(k, dim=-1)  # [N, k]
        weights = weights.to(dtype)
        distinct = int(slots.unique().numel())
        floor_us = distinct * expert_bytes / (args.hbm_tb_s * 1e12) * 1e6
        cells = []
        for compute in args.computes.split(","):
            run = lambda: expert_mix(x, slots, weights, gate_up, down, slot_range, compute)  # noqa: E731
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run(), run()  # warm-up (Triton compiles) outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(args.calls):
                    run()
            times = []
            for _ in range(args.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / args.calls)
            us = statistics.median(times)
            cells.append(f"{us:.1f} ({us / floor_us:.2f}x)")
        print(f"| {B} | {distinct} | {floor_us:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
