"""The decode step's Triton GEMVs and top-k (omnilab.gpu.step_kernels) in Triton's CPU interpreter: route_topk
equals step.route (experts equal, fp32 weights to 1e-6 relative; E 128 and 60, k 1, 2, 8, renormalised or not,
fp32 and bf16 logits; ties to the lower id); linear and linear_qkv equal F.linear (fp32 to 1e-5, bf16 within one
rounding of the fp32 product) over ragged M and K, 1 to 64 rows (tl.sum up to 2, tl.dot past) and every
accumulation; torch.compile keeps the ops whole (fullgraph, aot_eager); FastDecoder(compute="triton") in bf16 takes
them in every step of at most 64 tokens (batch 1, 2 and 5; prefills of 10 to 50 tokens; not in fp32) with the
forced-input logits of the torch projections within bf16 noise. Skipped without Triton (CI).

The cases run in one subprocess with TRITON_INTERPRET=1, as tests/test_fused_moe.py's (whose bf16 fixes of the
interpreter they reuse). (The GPU itself: tests/gpu/test_gpu_step_kernels.py.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.interpreted import interpreted_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (not in CI)")

ROUTE_CASES = [f"{d}-E{e}-k{k}-{'norm' if n else 'raw'}" for d in ("float32", "bfloat16") for e in (128, 60)
               for k in (1, 2, 8) for n in (True, False)]
# (N, M, K): ragged M and K (not multiples of the blocks), a K of whole blocks (EVEN_K), NARROW and WIDE row counts
GEMV_SHAPES = [(1, 37, 300), (2, 37, 300), (1, 300, 520), (2, 300, 520), (1, 64, 512), (2, 257, 64),
               # 3 to 64 rows: tl.dot, x padded to 16, 32 and 64 rows; DOT_NARROW and DOT_WIDE, ragged and whole K
               (3, 37, 300), (8, 300, 520), (17, 64, 512), (33, 257, 64), (64, 40, 300)]
GEMV_CASES = [f"{d}-N{n}-M{m}-K{k}" for d in ("float32", "bfloat16") for n, m, k in GEMV_SHAPES]
QKV_SHAPES = [(1, (72, 24, 24), 600), (2, (72, 24, 24), 600), (1, (50, 13, 13), 300), (2, (96, 48, 48), 64),
              (5, (72, 24, 24), 600), (40, (96, 48, 48), 256)]
QKV_CASES = [f"{d}-N{n}-M{'x'.join(map(str, ms))}-K{k}" for d in ("float32", "bfloat16") for n, ms, k in QKV_SHAPES]
# other block tables (the sweep's kind): one row a program, several K blocks, the 2-D accumulator
OTHER_BLOCKS = {"acc2d": dict(BLOCK_M=8, BLOCK_K=64, num_warps=4, num_stages=2, ACC2D=True),
                "one-row": dict(BLOCK_M=1, BLOCK_K=128, num_warps=1, num_stages=1, ACC2D=False),
                "wide-rows": dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=3, ACC2D=False)}
# the tl.dot tables of the same kind (the sweep's): tl.dot's least tile, several K blocks, rows past M clamped
OTHER_DOT_BLOCKS = {"dot-least": dict(BLOCK_M=16, BLOCK_K=16, num_warps=1, num_stages=1),
                    "dot-wide": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3)}
# each kind: (the step_kernels tables it stands in for, its tables, (x's rows for linear_qkv, for linear))
OTHER_TABLES = [(("QKV", "WIDE", "NARROW"), OTHER_BLOCKS, (2, 1)),
                (("DOT_QKV", "DOT_WIDE", "DOT_NARROW"), OTHER_DOT_BLOCKS, (9, 3))]
PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 250, 31]


# -- in the subprocess (TRITON_INTERPRET=1) ------------------------------------------------------------------------


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def logits_for(E: int, N: int, dtype, gen):
    """router logits [N, E] without ties: fp32 Gaussian, or bf16 as distinct multiples of 1/16 (exact in bf16:
    values of a randn row can repeat in bf16, and torch.topk promises no order among ties)."""
    import torch

    if dtype == torch.float32:
        return torch.randn(N, E, generator=gen)
    rows = [torch.randperm(E, generator=gen)[:E].float() / 16 - E / 32 for _ in range(N)]  # [E] each
    return torch.stack(rows).to(torch.bfloat16)  # [N, E]


def gemv_check(got, x, w) -> dict:
    """got against the fp32 (float64) product of the same inputs: relative error, and for bf16 whether every
    element is within one bf16 rounding (2^-8 relative) of it, up to fp32 summation noise."""
    import torch

    exact = x.double() @ w.double().T  # [N, M]
    err = (got.double() - exact).abs()
    slack = 1e-6 * exact.abs().max()
    within = bool((err <= 2 ** -8 * exact.abs() + slack).all()) if got.dtype == torch.bfloat16 else None
    return {"rel": rel(got, exact), "within_rounding": within, "dtype": str(got.dtype), "shape": list(got.shape)}


def run_cases(checkpoint: str) -> dict:
    import torch
    import torch.nn.functional as F
    from test_fused_moe import interpreter_bf16

    import omnilab.gpu.step_kernels as sk
    from omnilab.gpu.step import route

    interpreter_bf16()
    out = {}
    gen = torch.Generator().manual_seed(0)
    for case in ROUTE_CASES:
        dtype, e, k, norm = case.split("-")
        E, k, norm = int(e[1:]), int(k[1:]), norm == "norm"
        logits = logits_for(E, 5, getattr(torch, dtype), gen)  # [5, E]
        weights, experts = sk.route_topk(logits, k, norm, torch.float32)
        want_w, want_e = route(logits, k, norm, torch.float32)
        bf_w, bf_e = sk.route_topk(logits, k, norm, torch.bfloat16)  # weights cast to the model's dtype
        want_bf = route(logits, k, norm, torch.bfloat16)[0]
        out[case] = {"experts_equal": torch.equal(experts, want_e) and torch.equal(bf_e, want_e),
                     "weights_rel": float(((weights.double() - want_w.double()).abs() / want_w.double()).max()),
                     "bf16_ulps": float(((bf_w.float() - want_bf.float()).abs() / want_bf.float()).max() * 2 ** 8),
                     "dtypes": [str(weights.dtype), str(experts.dtype), str(bf_w.dtype)],
                     "shape": list(weights.shape)}
    # ties: equal probabilities go to the lower expert id, also past the masked experts' -inf (probability 0)
    flat = torch.zeros(2, 60)
    flat[1, :50] = float("-inf")  # ten finite logits, k = 12 takes two of the zero probabilities
    out["ties"] = [sk.route_topk(flat[:1], 8, True, torch.float32)[1].tolist(),
                   sk.route_topk(flat[1:], 12, False, torch.float32)[1].tolist()]

    for case in GEMV_CASES:
        dtype, n, m, k = case.split("-")
        x = torch.randn(int(n[1:]), int(k[1:]), generator=gen).to(getattr(torch, dtype))
        w = (torch.randn(int(m[1:]), int(k[1:]), generator=gen) / int(k[1:]) ** 0.5).to(getattr(torch, dtype))
        out[case] = gemv_check(sk.linear(x, w), x, w)
        if dtype == "float32":
            out[case]["vs_linear"] = rel(sk.linear(x, w), F.linear(x, w))
    for case in QKV_CASES:
        dtype, n, ms, k = case.split("-")
        K = int(k[1:])
        x = torch.randn(int(n[1:]), K, generator=gen).to(getattr(torch, dtype))
        ws = [(torch.randn(int(m), K, generator=gen) / K ** 0.5).to(getattr(torch, dtype)) for m in ms[1:].split("x")]
        got = sk.linear_qkv(x, *ws)
        out[case] = [gemv_check(g, x, w) for g, w in zip(got, ws)]
    for tables, others, (rows, one) in OTHER_TABLES:
        saved = [getattr(sk, t) for t in tables]
        for name, blocks in others.items():
            for t in tables:
                setattr(sk, t, blocks)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, 300, generator=gen).to(dtype)
                ws = [(torch.randn(m, 300, generator=gen) / 300 ** 0.5).to(dtype) for m in (50, 13, 13)]
                out[f"blocks-{name}-{dtype}".replace("torch.", "")] = (
                    [gemv_check(g, x, w) for g, w in zip(sk.linear_qkv(x, *ws), ws)]
                    + [gemv_check(sk.linear(x[:one], w), x[:one], w) for w in ws])
        for t, table in zip(tables, saved):
            setattr(sk, t, table)
    out["compiled"] = compiled_cases()
    out.update(decoder_cases(checkpoint))
    return out


def compiled_cases() -> dict:
    """step.project, project_qkv and route under torch.compile(fullgraph=True): the custom ops stay in the graph
    whole (no break, no trace into Triton), with the eager bits (aot_eager)."""
    import torch

    from omnilab.gpu import step

    gen = torch.Generator().manual_seed(1)
    H, E, k = 64, 60, 4
    q, kk, v = (torch.randn(m, H, generator=gen).bfloat16() / 8 for m in (96, 48, 48))  # [M, H] each
    o, router = torch.randn(H, 96, generator=gen).bfloat16() / 10, torch.randn(E, H, generator=gen).bfloat16()
    w = step.LayerWeights(None, q, kk, v, None, None, o, None, router)

    def fn(x):  # x [1, 1, H]
        q, kk, v = step.project_qkv(x, w, "triton")  # [1, 1, M] each
        o = step.project(q, w.o_proj, "triton")  # [1, 1, H]
        logits = step.project(x[0], w.router, "triton")  # [1, E]
        return q, kk, v, o, *step.route(logits, k, True, torch.bfloat16, None, "triton")

    targets = []

    def recording(gm, inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(1, 1, H, generator=gen).bfloat16()
    eager = fn(x)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)(x)
    torch._dynamo.reset()
    torch.compile(fn, backend=recording, fullgraph=True, dynamic=False)(x)
    return {"equal": all(torch.equal(a, b) for a, b in zip(compiled, eager)),
            "ops": sorted({t.split(".")[1] for t in targets if t.startswith("omnilab.")})}


def decoder_cases(checkpoint: str) -> dict:
    """FastDecoder(compute="triton"): bf16 forced-input logits with step_kernels against the torch projections
    (step.GEMV_MAX_TOKENS = step.ROUTE_MAX_TOKENS = 0: only the fused expert mix is Triton) and compute="gather";
    how often each kernel ran (bf16 only: in every step of at most 64 tokens, the prefill's included; not fp32)."""
    import torch

    import omnilab.gpu.step as step
    import omnilab.gpu.step_kernels as sk
    from omnilab.gpu.fast import FastDecoder
    from omnilab.model.decoder import SelectiveMoE

    calls = {"linear": 0, "linear_qkv": 0, "route_topk": 0}
    for name in calls:
        def counted(*a, _f=getattr(sk, name), _name=name, **kw):
            calls[_name] += 1
            return _f(*a, **kw)
        setattr(sk, name, counted)
    # one program a weight (the tiny model's are at most 96 x 96): the interpreter runs programs one by one, and
    # the default tables' are equal to F.linear above
    sk.QKV = sk.WIDE = sk.NARROW = dict(BLOCK_M=128, BLOCK_K=128, num_warps=4, num_stages=1, ACC2D=False)
    sk.DOT_QKV = sk.DOT_WIDE = sk.DOT_NARROW = dict(BLOCK_M=128, BLOCK_K=128, num_warps=4, num_stages=1)
    out = {}
    model = SelectiveMoE.from_checkpoint(checkpoint, tokenizer=False, dtype="bfloat16")
    layers = sum(layer.is_moe for layer in model.model.layers)
    n = 6
    forced = torch.randint(0, model.config.vocab_size, (5, n), generator=torch.Generator().manual_seed(0))
    # a decode step of two rows (N = 2: the tl.sum GEMVs) or five (tl.dot); the prefills' 10, 18 and 40 rows: tl.dot
    batches = {1: PROMPT, 2: [PROMPT, PROMPT[2:]], 5: [PROMPT[i:] for i in range(5)]}
    for rows, prompts in batches.items():
        teacher = forced[0] if rows == 1 else forced[:rows]
        runs = {}
        for name, compute, limit in (("kernels", "triton", 64), ("torch", "triton", 0), ("gather", "gather", 64)):
            step.GEMV_MAX_TOKENS = limit
            step.ROUTE_MAX_TOKENS = 64 if limit else 0
            before = dict(calls)
            decoder = FastDecoder(model, max_len=32, batch=rows, compute=compute)
            runs[name] = decoder.generate(prompts, n, forced=teacher, record_logits=True).logits  # [n, B, V]
            out[f"calls-{name}-B{rows}"] = {c: calls[c] - before[c] for c in calls}
        step.GEMV_MAX_TOKENS, step.ROUTE_MAX_TOKENS = 64, 64
        ref = runs["torch"]
        out[f"decoder-B{rows}"] = {
            "rel_vs_torch": rel(runs["kernels"], ref), "rel_gather_vs_torch": rel(runs["gather"], ref),
            "argmax_kernels": runs["kernels"].argmax(-1).tolist(), "argmax_torch": ref.argmax(-1).tolist(),
            # per step and row: how far below the torch run's best logit the kernels' argmax is, over its range
            "gap": ((ref.max(-1).values - ref.gather(-1, runs["kernels"].argmax(-1, keepdim=True))[..., 0])
                    / (ref.max(-1).values - ref.min(-1).values)).tolist()}
    out["steps"], out["layers"] = n, layers
    fp32 = SelectiveMoE.from_checkpoint(checkpoint, tokenizer=False)
    before = dict(calls)
    FastDecoder(fp32, max_len=32, compute="triton").generate(PROMPT, 4)
    out["calls-fp32"] = {c: calls[c] - before[c] for c in calls}
    return out


# -- the tests -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tiny_moe, tmp_path_factory):
    return interpreted_results(__file__, tiny_moe, tmp_path_factory.mktemp("step_kernels") / "results.json")


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_route_topk_equals_route(results, case):
    r = results[case]
    k = int(case.split("-")[2][1:])
    assert r["experts_equal"]
    assert r["dtypes"] == ["torch.float32", "torch.int64", "torch.bfloat16"] and r["shape"] == [5, k]
    assert r["weights_rel"] < 1e-6
    assert r["bf16_ulps"] <= 1  # the same fp32 weight rounded to bf16, or its neighbour at a rounding boundary


def test_route_topk_ties_go_to_the_lower_id(results):
    assert results["ties"] == [[list(range(8))], [list(range(50, 60)) + [0, 1]]]


def _assert_gemv(r, dtype, rows, cols):
    assert r["dtype"] == f"torch.{dtype}" and r["shape"] == [rows, cols]
    if dtype == "float32":
        assert r["rel"] < 1e-5
    else:  # fp32 accumulation rounded once: every element within one bf16 rounding of the exact product
        assert r["within_rounding"] and r["rel"] < 4e-3


@pytest.mark.parametrize("case", GEMV_CASES)
def test_linear_equals_f_linear(results, case):
    dtype, n, m, _ = case.split("-")
    _assert_gemv(results[case], dtype, int(n[1:]), int(m[1:]))
    if dtype == "float32":
        assert results[case]["vs_linear"] < 1e-5


@pytest.mark.parametrize("case", QKV_CASES)
def test_linear_qkv_equals_three_f_linear(results, case):
    dtype, n, ms, _ = case.split("-")
    for r, m in zip(results[case], ms[1:].split("x")):
        _assert_gemv(r, dtype, int(n[1:]), int(m))


@pytest.mark.parametrize("name", list(OTHER_BLOCKS) + list(OTHER_DOT_BLOCKS))
def test_other_block_tables_equal_f_linear(results, name):
    rows_qkv, rows_one = next(rows for _, others, rows in OTHER_TABLES if name in others)
    for dtype in ("float32", "bfloat16"):
        rs = results[f"blocks-{name}-{dtype}"]
        shapes = [(rows_qkv, 50), (rows_qkv, 13), (rows_qkv, 13), (rows_one, 50), (rows_one, 13), (rows_one, 13)]
        for r, (rows, cols) in zip(rs, shapes, strict=True):
            _assert_gemv(r, dtype, rows, cols)


def test_compile_keeps_the_ops_whole(results):
    assert results["compiled"]["equal"]
    assert results["compiled"]["ops"] == ["gemv", "gemv_qkv", "route_topk"]


def test_fast_decoder_takes_the_kernels_in_bf16_steps_of_at_most_64_tokens(results):
    per_step = results["layers"] * results["steps"]  # the prefill (at most 40 tokens) and the decode steps
    for rows in (1, 2, 5):
        # a step: q|k|v one launch, o_proj and the router two GEMVs, one top-k
        assert results[f"calls-kernels-B{rows}"] == {"linear": 2 * per_step, "linear_qkv": per_step,
                                                     "route_topk": per_step}
        for other in ("torch", "gather"):
            assert results[f"calls-{other}-B{rows}"] == {"linear": 0, "linear_qkv": 0, "route_topk": 0}
    assert results["calls-fp32"] == {"linear": 0, "linear_qkv": 0, "route_topk": 0}


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_fast_decoder_bf16_logits_within_bf16_noise(results, rows):
    """Against the torch projections under the same forced inputs: logits within bf16 noise (no further from them
    than compute="gather" is, give or take), argmax equal except where the torch run's top two are near-tied."""
    d = results[f"decoder-B{rows}"]
    assert d["rel_vs_torch"] < 3e-2 and d["rel_vs_torch"] <= 2 * d["rel_gather_vs_torch"] + 1e-2
    gaps = [g for step in d["gap"] for g in step]
    assert max(gaps) <= 2e-2
    same = sum(a == b for x, y in zip(d["argmax_kernels"], d["argmax_torch"]) for a, b in zip(x, y))
    assert same >= 0.75 * len(gaps)


if __name__ == "__main__":  # the subprocess: python tests/test_step_kernels.py CHECKPOINT OUT.json
    Path(sys.argv[2]).write_text(json.dumps(run_cases(sys.argv[1])))
