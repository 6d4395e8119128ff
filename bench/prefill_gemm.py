"""The trace prefill's gate|up at the real shapes, one MoE layer, two ways in one run: the Triton glue's (the rows
gathered, x[perm // k], torch._grouped_mm over gate|up, prefill_kernels.silu_mul) against the fused glue's one
Triton GEMM (prefill_kernels.gate_up_rows: each sorted row reads its token's row of x inside the GEMM, SiLU * up in
its epilogue) at several block sizes; each timed alone, with the down GEMM beside for scale, TFLOP/s against the
device's peak, and how many of the fused kernel's outputs equal the glue's bit for bit.

    python bench/prefill_gemm.py --tokens 16384 --peak-tflops 989 --save gate_up.json

--save writes the fastest block sizes as {"GATE_UP_ROWS": {...}} (bench/trace.py --gate-up-config takes it).
Routing: each token's top-k of uniform random scores over the experts (a trace's batch, random weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): vLLM's fused_moe H100 configs for large batches are of this kind
CONFIGS = [(64, 64, 64, 4, 4), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3),
           (128, 64, 64, 4, 3), (128, 64, 32, 4, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 128, 4, 3),
           (128, 64, 128, 8, 2), (256, 64, 64, 8, 3)]


def timed(fn, repeats: int) -> float:
    """Median microseconds of fn() by CUDA events, after two warm-up calls (the first compiles)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="real tokens in the batch")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 / H200 SXM: 989)")
    p.add_argument("--save", default=None, help="write the fastest block sizes here as JSON")
    args = p.parse_args()

    from omnilab.gpu import prefill_kernels as pk
    from omnilab.gpu.step import sort_choices

    N, S, k, H, I = args.tokens, args.experts, args.top_k, args.hidden, args.intermediate
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, H, device="cuda", generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(S, 2 * I, H, device="cuda", generator=gen) / H ** 0.5).to(torch.bfloat16)
    down = (torch.randn(S, H, I, device="cuda", generator=gen) / I ** 0.5).to(torch.bfloat16)
    slots = torch.rand(N, S, device="cuda", generator=gen).topk(k, dim=-1).indices  # [N, k]
    perm, offs = sort_choices(slots, torch.arange(S, device="cuda"))
    tok = (perm // k).to(torch.int32)
    M = N * k
    flops = 2 * M * H * 2 * I
    tflops = lambda us: flops / us / 1e6  # noqa: E731

    rows = []
    gather = timed(lambda: x[perm // k], args.repeats)
    xs = x[perm // k]
    gemm = timed(lambda: torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs), args.repeats)
    gu = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    silu = timed(lambda: pk.silu_mul(gu, I), args.repeats)
    want = pk.silu_mul(gu, I)
    glue = timed(lambda: pk.silu_mul(torch._grouped_mm(x[perm // k], gate_up.transpose(1, 2), offs=offs), I),
                 args.repeats)
    down_us = timed(lambda: torch._grouped_mm(want, down.transpose(1, 2), offs=offs), args.repeats)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {N:,} tokens x top-{k} of {S} experts "
          f"({M:,} rows), H {H}, I {I}, bf16; gate|up {flops / 1e9:.0f} GFLOP, peak {args.peak_tflops:g} TFLOP/s")
    print(f"Triton glue: gather {gather:.0f} us + grouped_mm {gemm:.0f} us ({tflops(gemm):.0f} TFLOP/s) + silu_mul "
          f"{silu:.0f} us; the three together {glue:.0f} us ({tflops(glue):.0f} TFLOP/s, "
          f"{tflops(glue) / args.peak_tflops:.1%} of peak); down's grouped_mm beside: {down_us:.0f} us")
    print("\n| BLOCK_M | BLOCK_N | BLOCK_K | warps | stages | us | x the glue's three | TFLOP/s | of peak | equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    default = dict(pk.GATE_UP_ROWS)
    for bm, bn, bk, w, st in CONFIGS:
        pk.GATE_UP_ROWS = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
        try:
            us = timed(lambda: pk.gate_up_rows(x, tok, offs, gate_up), args.repeats)
            equal = float((pk.gate_up_rows(x, tok, offs, gate_up) == want).float().mean())
        except Exception as e:  # e.g. out of shared memory for this tile: the row says so
            print(f"| {bm} | {bn} | {bk} | {w} | {st} | failed: {' '.join(str(e).split())[:80]} |||||")
            continue
        rows.append((us, pk.GATE_UP_ROWS, equal))
        print(f"| {bm} | {bn} | {bk} | {w} | {st} | {us:.0f} | {glue / us:.2f} | {tflops(us):.0f} | "
              f"{tflops(us) / args.peak_tflops:.1%} | {equal:.4f} |", flush=True)
    pk.GATE_UP_ROWS = default
    if rows:
        us, best, equal = min(rows, key=lambda r: r[0])
        print(f"\nfastest: {best}: {us:.0f} us against the glue's {glue:.0f} us ({glue / us:.2f}x), "
              f"bit-equal {equal:.4f}; per batch of 47 MoE layers that is {(glue - us) * 47 / 1e3:+.1f} ms saved")
        if args.save:
            Path(args.save).write_text(json.dumps({"GATE_UP_ROWS": best, "us": us, "glue_us": glue}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
