"""The batch-1 decode step's Triton GEMVs and top-k (omnilab/gpu/step_kernels.py) against torch (F.linear through
cuBLAS, step.route's softmax + torch.topk) at the Qwen3-Omni thinker's shapes, bf16: q|k|v [4096 + 512 + 512, 2048]
(one launch against three F.linear), o_proj [2048, 4096], the router [128, 2048], the top-8 of 128, and the four
together. Each time is CUDA-graph replays over --layers distinct copies of the weights (no weight read from L2 twice,
as in a real step; the H100's L2 is 50 MB, a layer's weights 38 MB), against the HBM floor of the weights' bytes.

    python bench/step_kernels.py --hbm-tb-s 3.35                     # H100 SXM: the table
    python bench/step_kernels.py --hbm-tb-s 3.35 --sweep --seconds 240 --save bench/results/step_config_h100.json
    python bench/step_kernels.py --hbm-tb-s 4.8 --rows 2             # H200, a batch-2 decode step
    python bench/step_kernels.py --hbm-tb-s 3.35 --rows 8 --sweep    # batched decode: the tl.dot tables

--sweep tries a grid of block sizes per table (step_kernels.QKV, WIDE for o_proj, NARROW for the router,
ROUTE_WARPS; past 2 rows DOT_QKV, DOT_WIDE, DOT_NARROW), the most likely first, within --seconds; prints the best
few and the tables to paste (or --save them as JSON: bench/decode.py and bench/batched.py --token-config read its
keys).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

import omnilab.gpu.step_kernels as sk
from omnilab.gpu.step import route
from tune_token_mix import timed  # (bench/tune_token_mix.py: a graph of one call per layer, replayed)

H, Q, KV, E, TOP_K = 2048, 4096, 512, 128, 8  # hidden, q_proj rows, k_proj / v_proj rows, experts, top-k


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Problem:
    """--layers copies of a layer's q, k, v, o_proj and router weights [M, K] (bf16, N(0, 0.02)), the step's
    activations x [N, H] and attention output [N, Q], and router logits [N, E]."""

    def __init__(self, layers: int, rows: int, dtype, device="cuda"):
        gen = torch.Generator(device=device).manual_seed(0)

        def weight(m, k):
            return (torch.randn(m, k, device=device, generator=gen) * 0.02).to(dtype)

        self.layers = [dict(q=weight(Q, H), k=weight(KV, H), v=weight(KV, H), o=weight(H, Q), router=weight(E, H))
                       for _ in range(layers)]
        self.x = torch.randn(rows, H, device=device, generator=gen).to(dtype)  # [N, H]
        self.attn = torch.randn(rows, Q, device=device, generator=gen).to(dtype)  # [N, Q]
        self.logits = torch.randn(rows, E, device=device, generator=gen).to(dtype)  # [N, E]

    def bytes(self, *names) -> int:
        w = self.layers[0]
        return sum(w[n].numel() * w[n].element_size() for n in names)


def kernels(p: Problem) -> dict:
    """name -> (the Triton call, the torch call, the weights it reads), each run(i) on layer i's weights."""
    L = p.layers
    return {
        "q|k|v": (lambda i: sk.linear_qkv(p.x, L[i]["q"], L[i]["k"], L[i]["v"]),
                  lambda i: (F.linear(p.x, L[i]["q"]), F.linear(p.x, L[i]["k"]), F.linear(p.x, L[i]["v"])),
                  ("q", "k", "v")),
        "o_proj": (lambda i: sk.linear(p.attn, L[i]["o"]), lambda i: F.linear(p.attn, L[i]["o"]), ("o",)),
        "router": (lambda i: sk.linear(p.x, L[i]["router"]), lambda i: F.linear(p.x, L[i]["router"]), ("router",)),
        "top-k": (lambda i: sk.route_topk(p.logits, TOP_K, True, p.x.dtype),
                  lambda i: route(p.logits, TOP_K, True, p.x.dtype), ()),
    }


def whole(p: Problem, fns: dict, which: int):
    """The four in a row (which 0: Triton, 1: torch), as a decode step's layer runs them."""
    def run(i):
        for f in fns.values():
            f[which](i)
    return run


def check(p: Problem, fns: dict) -> dict:
    """Each Triton output against the fp32 product (GEMVs) or step.route (top-k): relative error / experts equal."""
    out = {}
    for name, (ours, _, names) in fns.items():
        got = ours(0)
        if name == "top-k":
            want = route(p.logits, TOP_K, True, p.x.dtype)
            out[name] = "experts equal" if torch.equal(got[1], want[1]) else "EXPERTS DIFFER"
            continue
        got = got if isinstance(got, tuple) else (got,)
        x = p.attn if name == "o_proj" else p.x
        errs = [rel(g, F.linear(x.float(), p.layers[0][n].float())) for g, n in zip(got, names)]
        out[name] = f"rel err {max(errs):.1e}"
    return out


def table(p: Problem, layers: int, hbm: float) -> list[dict]:
    fns = kernels(p)
    checks = check(p, fns)
    rows = []
    for name, (ours, theirs, names) in fns.items():
        floor = p.bytes(*names) / (hbm * 1e12) * 1e6
        rows.append(dict(name=name, triton=timed(ours, layers), torch=timed(theirs, layers), floor=floor,
                         check=checks[name]))
    floor = p.bytes("q", "k", "v", "o", "router") / (hbm * 1e12) * 1e6
    rows.append(dict(name="all four", triton=timed(whole(p, fns, 0), layers), torch=timed(whole(p, fns, 1), layers),
                     floor=floor, check=""))
    print("| kernel | Triton us | torch us | speed-up | floor us | Triton x floor | torch x floor | check |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        x = (lambda us: f"{us / r['floor']:.2f}x") if r["floor"] else (lambda us: "-")
        print(f"| {r['name']} | {r['triton']:.2f} | {r['torch']:.2f} | {r['torch'] / r['triton']:.2f}x | "
              f"{r['floor']:.2f} | {x(r['triton'])} | {x(r['torch'])} | {r['check']} |", flush=True)
    return rows


def gemv_grid(block_m, block_k, warps, stages):
    """Block tables, ACC2D both ways."""
    return [dict(BLOCK_M=m, BLOCK_K=k, num_warps=w, num_stages=s, ACC2D=a)
            for m, k, w, s, a in itertools.product(block_m, block_k, warps, stages, (False, True))]


def dot_grid(block_m, block_k, warps, stages):
    return [dict(BLOCK_M=m, BLOCK_K=k, num_warps=w, num_stages=s)
            for m, k, w, s in itertools.product(block_m, block_k, warps, stages)]


SWEEPS = {  # table -> (the kernel it times, its grid): 1 or 2 rows
    "QKV": ("q|k|v", gemv_grid((2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 2))),
    "WIDE": ("o_proj", gemv_grid((2, 4, 8, 16), (512, 1024, 2048), (4, 8), (1, 2))),
    "NARROW": ("router", gemv_grid((1, 2, 4), (512, 1024, 2048), (2, 4, 8), (1,))),
}
DOT_SWEEPS = {  # more rows
    "DOT_QKV": ("q|k|v", dot_grid((16, 32, 64), (64, 128, 256), (4, 8), (3, 4, 5))),
    "DOT_WIDE": ("o_proj", dot_grid((16, 32, 64), (64, 128, 256), (4, 8), (3, 4, 5))),
    "DOT_NARROW": ("router", dot_grid((16, 32), (128, 256, 512), (4, 8), (2, 3, 4))),
}


def nearest_first(grid: list[dict], current: dict) -> list[dict]:
    """The current table, then the grid by how many fields differ from it (a local search under the time limit)."""
    others = [c for c in grid if c != current]
    return [current] + sorted(others, key=lambda c: sum(c[k] != current.get(k) for k in c))


def sweep(p: Problem, layers: int, hbm: float, seconds: float) -> dict:
    fns = kernels(p)
    best = {}
    sweeps = SWEEPS if p.x.shape[0] <= sk.SUM_ROWS else DOT_SWEEPS
    budget = seconds / (len(sweeps) + 0.2)
    for table_name, (kernel, grid) in sweeps.items():
        ours, _, names = fns[kernel]
        floor = p.bytes(*names) / (hbm * 1e12) * 1e6
        saved = getattr(sk, table_name)
        configs = nearest_first(grid, saved)
        rows, deadline = [], time.monotonic() + budget
        want = ours(0)
        want = [t.clone() for t in want] if isinstance(want, tuple) else [want.clone()]
        for c in configs:
            if time.monotonic() > deadline:
                print(f"{table_name}: stopped at the time limit after {len(rows)} of {len(configs)} configurations")
                break
            setattr(sk, table_name, c)
            try:
                got = ours(0)
                got = got if isinstance(got, tuple) else (got,)
                err = max(rel(g, w) for g, w in zip(got, want))
                if err > 1e-2:
                    print(f"  {table_name} {c}: rel err {err:.1e} against the current table, skipped")
                    continue
                rows.append((timed(ours, layers), c))
            except Exception as e:  # a configuration the compiler or the GPU refuses (registers, shared memory)
                print(f"  {table_name} {c}: {type(e).__name__}: {str(e)[:80]}")
        setattr(sk, table_name, saved)
        rows.sort(key=lambda r: r[0])
        print(f"\n{table_name} ({kernel}, floor {floor:.2f} us): best of {len(rows)}")
        for us, c in rows[:6]:
            print(f"  {us:.2f} us ({us / floor:.2f}x floor)  {c}")
        if rows:
            best[table_name] = rows[0][1]
            print(f"  current {saved}: {next(us for us, c in rows if c == saved):.2f} us"
                  if any(c == saved for _, c in rows) else "  current: failed")
    results = []
    for w in (1, 2, 4):
        sk.ROUTE_WARPS = w
        results.append((timed(fns["top-k"][0], layers), w))
    sk.ROUTE_WARPS = min(results)[1]
    best["ROUTE_WARPS"] = sk.ROUTE_WARPS
    print("\nROUTE_WARPS: " + ", ".join(f"{w}: {us:.2f} us" for us, w in results))
    print("\nbest tables (omnilab/gpu/step_kernels.py):")
    for name, c in best.items():
        print(f"{name} = {c}")
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hbm-tb-s", type=float, default=3.35, help="HBM bandwidth for the floor (H100 SXM 3.35)")
    p.add_argument("--layers", type=int, default=4, help="distinct weight copies cycled (4 x 38 MB defeats L2)")
    p.add_argument("--rows", type=int, default=1, choices=range(1, sk.MAX_ROWS + 1), metavar="1..64",
                   help="tokens in the step (the batch; past 2 the tl.dot tables)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--sweep", action="store_true", help="search the block tables, then print the table with the best")
    p.add_argument("--seconds", type=float, default=240, help="the sweep's time limit")
    p.add_argument("--save", default=None, help="with --sweep: write the best tables as JSON")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/step_kernels.py runs on CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    prob = Problem(args.layers, args.rows, getattr(torch, args.dtype))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.dtype}, {args.rows} row(s); "
          f"{args.layers} layers cycled; floor at {args.hbm_tb_s} TB/s\n", flush=True)
    table(prob, args.layers, args.hbm_tb_s)
    if args.sweep:
        best = sweep(prob, args.layers, args.hbm_tb_s, args.seconds)
        for name, value in best.items():
            setattr(sk, name, value)
        print("\nwith the best tables:")
        table(prob, args.layers, args.hbm_tb_s)
        if args.save:
            with open(args.save, "w") as f:
                json.dump(best, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
