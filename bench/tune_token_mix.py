"""Block sizes for the fused expert mix's batch-1 "token" mode (omnilab/gpu/fused_moe.py): every configuration of
the gate|up GEMV and of the down GEMV timed in CUDA-graph replays over --layers distinct layers' experts (so no
expert is read from L2 twice, as in a real step), against the HBM floor of the 8 routed experts.

    python bench/tune_token_mix.py --hbm-tb-s 3.35            # H100 SXM
    python bench/tune_token_mix.py --hbm-tb-s 4.8 --seconds 120

Prints the grouped_mm row and the current defaults first, then the best configurations of each kernel (the other
at its default), then the best pair together. Real shapes (128 experts, top 8, hidden 2048, expert 768), bf16.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import omnilab.gpu.fused_moe as fm
from omnilab.gpu.step import expert_mix


def timed(run, layers: int, repeats: int = 7) -> float:
    """Median microseconds of one call, replaying a graph of one call per layer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(layers):
            run(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            run(i)
    graph.replay()  # warm
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / layers)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="distinct layers of experts cycled (>= 2 defeats L2)")
    p.add_argument("--hbm-tb-s", type=float, default=3.35)
    p.add_argument("--seconds", type=float, default=150, help="the search's time limit (half per kernel)")
    p.add_argument("--save", default=None, help="write the best pair as JSON (bench/decode.py --token-config)")
    args = p.parse_args()
    S, k, H, I, L = 128, 8, 2048, 768, args.layers
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = [(torch.randn(S, 2 * I, H, device="cuda", generator=gen) * 0.02).to(dt) for _ in range(L)]
    down = [(torch.randn(S, H, I, device="cuda", generator=gen) * 0.02).to(dt) for _ in range(L)]
    x = torch.randn(1, H, device="cuda", generator=gen).to(dt)  # [1, H]
    routed = [torch.rand(1, S, device="cuda", generator=gen).softmax(-1).topk(k, dim=-1) for _ in range(L)]
    weights = [w.to(dt) for w, _ in routed]
    slots = [s for _, s in routed]
    slot_range = torch.arange(S, device="cuda")
    floor_us = k * 3 * H * I * 2 / (args.hbm_tb_s * 1e12) * 1e6
    gu_floor, dn_floor = floor_us * 2 / 3, floor_us / 3
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; floor {floor_us:.1f} us "
          f"(gate|up {gu_floor:.1f}, down {dn_floor:.1f}) at {args.hbm_tb_s} TB/s; {L} layers cycled")
    ref = [expert_mix(x, slots[i], weights[i], gate_up[i], down[i], slot_range, "grouped_mm") for i in range(L)]
    for compute in ("grouped_mm", "gather", "triton"):
        us = timed(lambda i: expert_mix(x, slots[i], weights[i], gate_up[i], down[i], slot_range, compute), L)
        print(f"{compute}: {us:.1f} us ({us / floor_us:.2f}x floor)", flush=True)
    base_gu, base_dn = dict(fm.TOKEN_GATE_UP), dict(fm.TOKEN_DOWN)

    def trial(gu: dict, dn: dict) -> float | None:
        fm.TOKEN_GATE_UP, fm.TOKEN_DOWN = gu, dn
        try:
            out = fm.fused_expert_mix(x, slots[0], weights[0], gate_up[0], down[0], mode="token")
            err = float((out.float() - ref[0].float()).norm() / ref[0].float().norm())
            if err > 2e-2:
                print(f"  {gu} {dn}: rel err {err:.1e}, skipped")
                return None
            return timed(lambda i: fm.fused_expert_mix(x, slots[i], weights[i], gate_up[i], down[i], mode="token"), L)
        except Exception as e:  # a configuration the compiler or the GPU refuses (shared memory, registers)
            print(f"  {gu} {dn}: {type(e).__name__}: {str(e)[:80]}")
            return None

    for acc in (False, True):  # the defaults with the per-tile reduction and with the 2-D accumulator
        us = trial(dict(base_gu, ACC2D=acc), dict(base_dn, ACC2D=acc))
        print(f"defaults, ACC2D={acc}: {us} us" + (f" ({us / floor_us:.2f}x floor)" if us else ""), flush=True)
    grid = lambda ns, ks: [dict(BLOCK_N=n, BLOCK_K=kk, num_warps=w, num_stages=st, ACC2D=acc)  # noqa: E731
                           for acc, n, kk, w, st in itertools.product((True, False), ns, ks, (4, 8, 2), (3, 2, 4))]
    results = {}
    for name, configs in (("gate_up", grid((4, 8, 16, 32), (128, 256, 512))),
                          ("down", grid((2, 4, 8, 16), (64, 128, 256)))):
        rows, deadline = [], time.monotonic() + args.seconds / 2
        for c in configs:
            if time.monotonic() > deadline:
                print(f"{name}: search stopped at the time limit after {len(rows)} configurations")
                break
            us = trial(c, base_dn) if name == "gate_up" else trial(results.get("gate_up", base_gu), c)
            if us is not None:
                rows.append((us, c))
        rows.sort(key=lambda r: r[0])
        print(f"\n{name}: best of {len(rows)} (the other kernel at "
              f"{'its default' if name == 'gate_up' else 'the best gate_up'}), whole token mix us:")
        for us, c in rows[:6]:
            print(f"  {us:.1f} us ({us / floor_us:.2f}x floor)  {c}")
        if rows:
            results[name] = rows[0][1]
    gu, dn = results.get("gate_up", base_gu), results.get("down", base_dn)
    us = trial(gu, dn)
    if args.save and us:
        import json

        with open(args.save, "w") as f:
            json.dump({"TOKEN_GATE_UP": gu, "TOKEN_DOWN": dn, "us": us, "floor_us": floor_us}, f, indent=1)
    print(f"\nbest pair: {us} us ({us / floor_us:.2f}x floor): TOKEN_GATE_UP = {gu}, TOKEN_DOWN = {dn}" if us else
          "\nbest pair failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
