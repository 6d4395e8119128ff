"""The trace prefill's Triton glue (omnilab.gpu.prefill_kernels, TracePrefill(glue="triton")) in Triton's CPU
interpreter: each kernel against the torch ops it replaces (fp32 to 1e-6, bf16 equal but for rare one-ulp flips of
an fp32 sum's order), with and without padding rows, sizes off the blocks; and TracePrefill.record's routing with
the Triton glue equal to the torch glue's on a tiny checkpoint, padded and whole batches, fp32 and bf16. Skipped
without Triton (CI). The glue's choice and refusals run without the interpreter, and each kernel is compiled for
sm_90 (Triton's compiler and its ptxas, no GPU needed): what the interpreter accepts and the compiler would not.

The cases run in one subprocess with TRITON_INTERPRET=1 (tests/interpreted.py). (The GPU: tests/gpu/
test_gpu_prefill_kernels.py.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.interpreted import interpreted_results

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (not in CI)")

DTYPES = ("float32", "bfloat16")
NORM_SHAPES = [(1, 64), (37, 40), (130, 200)]  # (rows, D): rows off BLOCK_R, D not a power of two
ROPE_SHAPES = [(1, 1, 1, 8), (2, 5, 3, 24), (3, 9, 2, 20), (2, 33, 4, 128)]  # (B, T, heads, hd); hd / 2 = 12, 10
SILU_SHAPES = [(1, 8), (37, 20), (70, 300)]  # (M, I): M off BLOCK_M, I past one BLOCK_N
COMBINE_SHAPES = [(1, 1, 16), (5, 2, 64), (7, 3, 40), (33, 8, 700)]  # (N, k, H): k not a power of two, H past a block
# (N, k, S, H, I): sizes off the blocks, an empty slot (S > choices), a slot with more rows than BLOCK_M (100 x 2 on 3)
GATE_UP_SHAPES = [(1, 1, 4, 16, 8), (7, 3, 40, 40, 20), (260, 2, 3, 96, 72), (33, 8, 16, 130, 66)]
KERNEL_CASES = ([f"rms_norm-{d}-{r}x{D}" for d in DTYPES for r, D in NORM_SHAPES]
                + [f"add_rms_norm-{d}-{r}x{D}" for d in DTYPES for r, D in NORM_SHAPES]
                + [f"norm_rope-{d}-{'x'.join(map(str, s))}" for d in DTYPES for s in ROPE_SHAPES]
                + [f"silu_mul-{d}-{m}x{i}" for d in DTYPES for m, i in SILU_SHAPES]
                + [f"combine-{d}-{n}x{k}x{h}-{rows}" for d in DTYPES for n, k, h in COMBINE_SHAPES
                   for rows in ("whole", "padded")]
                + [f"gate_up_rows-{d}-{'x'.join(map(str, s))}" for d in DTYPES for s in GATE_UP_SHAPES])
RECORD_CASES = [f"{d}-{b}-{glue}" for d in DTYPES for b in ("padded", "whole") for glue in ("triton", "fused")]
DOCS = [[3, 17, 42, 5, 99, 7, 64, 12, 250, 31, 8], [9, 1, 2], [44, 45, 46, 47, 48, 49], [200, 100]]  # ragged


# -- in the subprocess (TRITON_INTERPRET=1) ------------------------------------------------------------------------


def compare(got, want) -> dict:
    """got against the torch ops' result: relative error, the share of bit-equal elements, and the largest
    difference in units of the dtype's rounding at the value (bf16: 2^-8 relative)."""
    g, w = got.double(), want.double()
    ulp = torch.finfo(want.dtype).eps * w.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return {"rel": float((g - w).norm() / w.norm().clamp_min(1e-30)), "equal": float((g == w).double().mean()),
            "ulps": float(((g - w).abs() / ulp).max()), "dtype": str(got.dtype), "shape": list(got.shape)}


def norm_module(D, dtype, gen):
    from omnilab.model.decoder import RMSNorm

    norm = RMSNorm(D, 1e-6)
    norm.weight.data = (torch.rand(D, generator=gen) + 0.5).to(dtype)
    return norm


def kernel_case(case: str) -> dict:
    import torch.nn.functional as F

    from omnilab.gpu import prefill_kernels as pk
    from omnilab.model.rope import rotate_half

    what, dtype, size = case.split("-")[:3]
    dt = getattr(torch, dtype)
    dims = [int(s) for s in size.split("x")]
    gen = torch.Generator().manual_seed(sum(dims))
    if what in ("rms_norm", "add_rms_norm"):
        R, D = dims
        norm = norm_module(D, dt, gen)
        x = (torch.randn(R, D, generator=gen) * 3).to(dt)
        if what == "rms_norm":
            return compare(pk.rms_norm(x, norm.weight, norm.eps), norm(x))
        a = torch.randn(R, D, generator=gen).to(dt)
        h = x.clone()
        got = pk.add_rms_norm(h, a, norm.weight, norm.eps)
        return {"out": compare(got, norm(x + a)), "h": compare(h, x + a)}
    if what == "norm_rope":
        B, T, heads, hd = dims
        norm = norm_module(hd, dt, gen)
        q = torch.randn(B, T, heads, hd, generator=gen).to(dt)
        angle = torch.rand(B, T, hd // 2, generator=gen) * 6.3
        angle = torch.cat((angle, angle), -1)  # [B, T, hd], as rope_cos_sin's
        cos, sin = angle.cos().to(dt), angle.sin().to(dt)
        want = norm(q).transpose(1, 2)  # [B, heads, T, hd]: the eager Attention's order
        want = want * cos[:, None] + rotate_half(want) * sin[:, None]
        return compare(pk.norm_rope(q, norm.weight, cos, sin, norm.eps).transpose(1, 2), want)
    if what == "silu_mul":
        M, I = dims
        gu = (torch.randn(M, 2 * I, generator=gen) * 3).to(dt)
        return compare(pk.silu_mul(gu, I), F.silu(gu[:, :I]) * gu[:, I:])
    if what == "gate_up_rows":  # the torch glue's x[perm // k], grouped GEMM (fp32 sums, rounded), silu * up
        from omnilab.gpu.step import sort_choices

        N, k, S, H, I = dims
        x = torch.randn(N, H, generator=gen).to(dt)
        gate_up = (torch.randn(S, 2 * I, H, generator=gen) / H ** 0.5).to(dt)
        slots = torch.stack([torch.randperm(S, generator=gen)[:k] for _ in range(N)])  # [N, k], distinct per token
        perm, offs = sort_choices(slots, torch.arange(S))
        rows = x[perm // k].float()  # [M, H]
        slot_of = slots.reshape(-1)[perm]  # [M]
        gu = torch.einsum("mh,mih->mi", rows, gate_up.float()[slot_of]).to(dt)  # [M, 2I]
        got = pk.gate_up_rows(x, (perm // k).to(torch.int32), offs, gate_up)
        return {**compare(got, F.silu(gu[:, :I]) * gu[:, I:]),
                "empty_slots": int((torch.bincount(slots.reshape(-1), minlength=S) == 0).sum()),
                "largest_slot": int(torch.bincount(slots.reshape(-1), minlength=S).max())}
    N, k, H = dims  # combine: the torch glue's y * w, out[perm] = y, sum over k, h + mix at the real rows
    padded = case.endswith("padded")
    M = N * k
    y = torch.randn(M, H, generator=gen).to(dt)  # [M, H] in sorted order
    perm = torch.randperm(M, generator=gen)  # sorted position -> choice
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(M))  # choice -> sorted position
    w = torch.rand(N, k, generator=gen).to(dt)
    R = 2 * N + 3 if padded else N
    h = torch.randn(R, H, generator=gen).to(dt)
    rows = torch.randperm(R, generator=gen)[:N] if padded else None  # the real rows, in token order
    yw = y * w.reshape(-1)[perm][:, None]  # [M, H]: step.expert_mix's grouped_mm
    out = torch.empty_like(yw)
    out[perm] = yw
    mix = out.view(N, k, H).sum(dim=1)  # [N, H]
    want = h.clone()
    if padded:
        want[rows] = want[rows] + mix
    else:
        want = want + mix
    got = h.clone()
    pk.combine_into(got, y, inv, w, rows)
    other = torch.ones(R, dtype=torch.bool)  # the rows no token writes (none without padding)
    other[rows if padded else slice(None)] = False
    return {**compare(got, want), "others_untouched": bool(torch.equal(got[other], h[other]))}


def record_case(checkpoint: str, case: str) -> dict:
    from omnilab.gpu.prefill import TracePrefill
    from omnilab.model.decoder import SelectiveMoE

    dtype, batch, glue = case.split("-")
    model = SelectiveMoE.from_checkpoint(checkpoint, dtype=getattr(torch, dtype), tokenizer=False)
    docs = [2, 0, 3, 1]  # rows out of document order: the padded path gathers the real rows
    ids = DOCS if batch == "padded" else [d[:2] for d in DOCS]  # equal lengths, in order: the whole path
    if batch == "whole":
        docs = [0, 1, 2, 3]
    torch_glue = TracePrefill(model, glue="torch")
    triton_glue = TracePrefill(model, glue=glue, experts=torch_glue.experts)
    a = torch_glue.record(ids, docs, pad_id=0)
    b = triton_glue.record(ids, docs, pad_id=0)
    return {"glues": [torch_glue.glue, triton_glue.glue], "rows": int(a.experts.shape[1]),
            "experts_equal": float((a.experts == b.experts).mean()),
            "weights_diff": float(abs(a.weights - b.weights).max()),
            "entropy_diff": float(abs(a.entropy - b.entropy).max())}


def run_cases(checkpoint: str) -> dict:
    from test_fused_moe import interpreter_bf16  # the interpreter's bf16 shortcuts undone (test-only)

    interpreter_bf16()
    out = {case: kernel_case(case) for case in KERNEL_CASES}
    out.update({f"record-{case}": record_case(checkpoint, case) for case in RECORD_CASES})
    return out


# -- the tests -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tiny_omni, tmp_path_factory):
    return interpreted_results(__file__, tiny_omni, tmp_path_factory.mktemp("prefill_kernels") / "results.json")


def close(r: dict, dtype: str) -> bool:
    """fp32: to 1e-6 relative; bf16: the eager ops' roundings, so equal but for rare flips (an fp32 sum's order
    decides a tie of the rounding): at most one bf16 step (2 ulps at the value's binade edge) anywhere."""
    if dtype == "float32":
        return r["rel"] < 1e-6
    return r["equal"] > 0.99 and r["ulps"] <= 2 and r["rel"] < 1e-3


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_equals_the_torch_ops(results, case):
    r = results[case]
    dtype = case.split("-")[1]
    parts = [r["out"], r["h"]] if case.startswith("add_rms_norm") else [r]
    for part in parts:
        assert part["dtype"] == f"torch.{dtype}", part
        assert close(part, dtype), (case, part)
    if case.startswith("combine"):
        assert r["others_untouched"]  # padding rows (and the rows of other tokens) keep h bit for bit


def test_gate_up_rows_cases_reach_an_empty_slot_and_a_slot_of_several_blocks(results):
    from omnilab.gpu.prefill_kernels import GATE_UP_ROWS

    cases = [results[c] for c in KERNEL_CASES if c.startswith("gate_up_rows")]
    assert any(r["empty_slots"] for r in cases)
    assert any(r["largest_slot"] > GATE_UP_ROWS["BLOCK_M"] for r in cases)


@pytest.mark.parametrize("case", RECORD_CASES)
def test_record_with_triton_glue_equals_torch_glue(results, case):
    r = results[f"record-{case}"]
    assert r["glues"] == ["torch", case.split("-")[2]]
    assert r["rows"] == (sum(map(len, DOCS)) if "-padded" in case else 8)
    assert r["experts_equal"] == 1.0
    if case.startswith("float32"):
        assert r["weights_diff"] < 1e-5 and r["entropy_diff"] < 1e-5
    else:  # bf16 weights: the glues round alike, so the routing is equal up to a rare one-ulp flip
        assert r["weights_diff"] < 1e-2 and r["entropy_diff"] < 1e-2


def test_glue_choice_and_refusals(tiny_omni, monkeypatch):
    """fused for bf16 on CUDA with Triton installed, torch otherwise; glue="triton" or "fused" on the CPU refused
    without the interpreter, an unknown glue refused; the default on the CPU is the torch glue."""
    from omnilab.gpu.prefill import TracePrefill, prefill_glue
    from omnilab.model.decoder import SelectiveMoE

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert prefill_glue(torch.bfloat16, "cuda") == "fused"
    assert prefill_glue(torch.float32, "cuda") == prefill_glue(torch.bfloat16, "cpu") == "torch"
    model = SelectiveMoE.from_checkpoint(tiny_omni, tokenizer=False)
    assert TracePrefill(model).glue == "torch"
    with pytest.raises(ValueError, match="glue 'triton': compute='triton' runs on CUDA"):
        TracePrefill(model, glue="triton")
    with pytest.raises(ValueError, match="glue 'fused': compute='triton' runs on CUDA"):
        TracePrefill(model, glue="fused")
    with pytest.raises(ValueError, match="glue 'cuda', use torch, triton, fused"):
        TracePrefill(model, glue="cuda")


def test_kernels_compile_for_sm90():
    """Each kernel (each compile-time branch) through Triton's compiler to PTX for an H100 / H200, no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnilab.gpu import prefill_kernels as pk

    def types(pointers: str, ints: str, **more) -> dict:
        return {**{n: "*bf16" for n in pointers.split()}, **{n: "i32" for n in ints.split()}, **more}

    builds = [(pk._rms_norm, types("x a w out", "R D sx sa so", eps="fp32"), dict(RESID=resid, BLOCK_R=2, BLOCK_D=2048))
              for resid in (False, True)]
    builds.append((pk._norm_rope, types("x w cos sin out", "R HEADS HALF sx sc so", eps="fp32"),
                   dict(BLOCK_R=64, BLOCK_D=64)))
    builds.append((pk._silu_mul, types("gu act", "M I sg sa"), dict(BLOCK_M=16, BLOCK_N=256)))
    builds += [(pk._combine, {**types("y", ""), "inv": "*i64", **types("w h", ""), "rows": "*i64",
                              **types("", "H sy sw sh")},
                dict(TOP_K=8, KP=8, BLOCK_H=pk.COMBINE_BLOCK_H, ROWS=rows)) for rows in (False, True)]
    block = {c: v for c, v in pk.GATE_UP_ROWS.items() if c.startswith("BLOCK")}
    tables = {n: "*i32" for n in ("tok", "ends", "block_slot", "block_start")}
    builds.append((pk._gate_up_rows, {**types("x", ""), **tables, **types("w act", "I H sx sws swr swc sa")}, block))
    for fn, types, consts in builds:
        src = ASTSource(fn=fn, signature={**types, **dict.fromkeys(consts, "constexpr")}, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=pk.EXACT).asm["ptx"]
        assert ".entry" in ptx, fn
        assert "fma.rn" not in ptx, fn  # no contraction: every rounding of the eager ops stays (pk.EXACT)


if __name__ == "__main__":  # the subprocess: python tests/test_prefill_kernels.py CHECKPOINT OUT.json
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_fused_moe's interpreter_bf16
    Path(sys.argv[2]).write_text(json.dumps(run_cases(sys.argv[1])))
