"""Block sizes for the fused expert mix (omnilab/gpu/fused_moe.py): at --batch 1-2 its "token" mode (the gate|up and
down GEMVs, TOKEN_GATE_UP / TOKEN_DOWN), at --batch 3-64 its "scan" mode (the per-slot kernels, SLOT_GATE_UP /
SLOT_DOWN); every configuration of each kernel timed in CUDA-graph replays over --layers distinct layers' experts
(so no expert is read from L2 twice, as in a real step), against the HBM floor of the step's distinct experts.

    python bench/tune_token_mix.py --hbm-tb-s 3.35            # H100 SXM, batch 1
    python bench/tune_token_mix.py --hbm-tb-s 3.35 --batch 8 --save slot8.json   # batched decode (bench/batched.py)
    python bench/tune_token_mix.py --hbm-tb-s 4.8 --seconds 120

Prints the grouped_mm row and the current defaults first, then the best configurations of each kernel (the other
at its default), then the best pair together. Real shapes (128 experts, top 8, hidden 2048, expert 768), bf16;
each token routes to 8 random distinct experts.
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
    p.add_argument("--batch", type=int, default=1, help="tokens in the step: 1-2 tune the token mode, 3-64 the scan "
                   "mode")
    p.add_argument("--save", default=None, help="write the best pair as JSON (bench/decode.py and bench/batched.py "
                   "--token-config)")
    args = p.parse_args()
    S, k, H, I, L, B = 128, 8, 2048, 768, args.layers, args.batch
    mode = "token" if B <= fm.TOKEN_MAX_N else "scan"  # as fused_expert_mix picks it
    if B < 1 or B * k > fm.SCAN_MAX_CHOICES:
        p.error(f"--batch {B}: 1 to {fm.SCAN_MAX_CHOICES // k} tokens (the token and scan modes)")
    names = ("TOKEN_GATE_UP", "TOKEN_DOWN") if mode == "token" else ("SLOT_GATE_UP", "SLOT_DOWN")
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = [(torch.randn(S, 2 * I, H, device="cuda", generator=gen) * 0.02).to(dt) for _ in range(L)]
    down = [(torch.randn(S, H, I, device="cuda", generator=gen) * 0.02).to(dt) for _ in range(L)]
    x = torch.randn(B, H, device="cuda", generator=gen).to(dt)  # [B, H]
    routed = [torch.rand(B, S, device="cuda", generator=gen).softmax(-1).topk(k, dim=-1) for _ in range(L)]
    weights = [w.to(dt) for w, _ in routed]  # [B, k] each
    slots = [s for _, s in routed]  # [B, k] each
    slot_range = torch.arange(S, device="cuda")
    distinct = statistics.mean(len(set(s.reshape(-1).tolist())) for s in slots)  # experts a step reads
    floor_us = distinct * 3 * H * I * 2 / (args.hbm_tb_s * 1e12) * 1e6
    gu_floor, dn_floor = floor_us * 2 / 3, floor_us / 3
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {B} ({mode} mode, {distinct:.1f} "
          f"distinct experts); floor {floor_us:.1f} us (gate|up {gu_floor:.1f}, down {dn_floor:.1f}) at "
          f"{args.hbm_tb_s} TB/s; {L} layers cycled")
    ref = [expert_mix(x, slots[i], weights[i], gate_up[i], down[i], slot_range, "grouped_mm") for i in range(L)]
    for compute in ("grouped_mm", "gather", "triton"):
        us = timed(lambda i: expert_mix(x, slots[i], weights[i], gate_up[i], down[i], slot_range, compute), L)
        print(f"{compute}: {us:.1f} us ({us / floor_us:.2f}x floor)", flush=True)
    base_gu, base_dn = dict(getattr(fm, names[0])), dict(getattr(fm, names[1]))

    def trial(gu: dict, dn: dict) -> float | None:
        setattr(fm, names[0], gu)
        setattr(fm, names[1], dn)
        try:
            out = fm.fused_expert_mix(x, slots[0], weights[0], gate_up[0], down[0], mode=mode)
            err = float((out.float() - ref[0].float()).norm() / ref[0].float().norm())
            if err > 2e-2:
                print(f"  {gu} {dn}: rel err {err:.1e}, skipped")
                return None
            return timed(lambda i: fm.fused_expert_mix(x, slots[i], weights[i], gate_up[i], down[i], mode=mode), L)
        except Exception as e:  # a configuration the compiler or the GPU refuses (shared memory, registers)
            print(f"  {gu} {dn}: {type(e).__name__}: {str(e)[:80]}")
            return None

    if mode == "token":
        for acc in (False, True):  # the defaults with the per-tile reduction and with the 2-D accumulator
            us = trial(dict(base_gu, ACC2D=acc), dict(base_dn, ACC2D=acc))
            print(f"defaults, ACC2D={acc}: {us} us" + (f" ({us / floor_us:.2f}x floor)" if us else ""), flush=True)
        grid = lambda ns, ks: [dict(BLOCK_N=n, BLOCK_K=kk, num_warps=w, num_stages=st, ACC2D=acc)  # noqa: E731
                               for acc, n, kk, w, st in itertools.product((True, False), ns, ks, (4, 8, 2), (3, 2, 4))]
        searches = (("gate_up", grid((4, 8, 16, 32), (128, 256, 512))), ("down", grid((2, 4, 8, 16), (64, 128, 256))))
    else:  # the per-slot kernels: BLOCK_M rows of a slot's choices (tl.dot needs 16) per [BLOCK_N, BLOCK_K] tile
        us = trial(base_gu, base_dn)
        print(f"defaults: {us} us" + (f" ({us / floor_us:.2f}x floor)" if us else ""), flush=True)
        grid = lambda ns, ks: [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=kk, num_warps=w, num_stages=st)  # noqa: E731
                               for n, kk, w, st in itertools.product(ns, ks, (4, 8, 2), (3, 2, 4))]
        searches = (("gate_up", grid((16, 32, 64, 128), (64, 128, 256))), ("down", grid((16, 32, 64, 128), (64, 128, 256))))
    results = {}
    for name, configs in searches:
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
            json.dump({names[0]: gu, names[1]: dn, "batch": B, "us": us, "floor_us": floor_us}, f, indent=1)
    print(f"\nbest pair: {us} us ({us / floor_us:.2f}x floor): {names[0]} = {gu}, {names[1]} = {dn}" if us else
          "\nbest pair failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
