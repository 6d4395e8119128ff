"""compute="triton" (omnilab.gpu.fused_moe) in Triton's CPU interpreter: every mode of the fused kernels equals
compute="gather" on tiny random shapes (fp32 to 1e-5, bf16 within bf16 noise), repeated slots and strided slab
views included; torch.compile keeps the op whole (fullgraph, aot_eager); FastDecoder(compute="triton") gives the
gather path's and the eager path's greedy tokens. Skipped without Triton (CI).

The cases run in one subprocess with TRITON_INTERPRET=1: the interpreter must be chosen before the kernels are
defined, and must not leak into a GPU test of the same pytest run. (The GPU itself: tests/gpu/test_gpu_fused_moe.py.)
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

S, H, I = 8, 64, 32
SHAPES = [(1, 1), (1, 2), (1, 4), (3, 1), (3, 3), (8, 2), (8, 4)]  # (N, k); k = 1: the offload prefill's chunks
MODES = ("token", "scan", "sorted")
KERNEL_CASES = [f"{d}-N{n}-k{k}-{m}" for d in ("float32", "bfloat16") for n, k in SHAPES for m in MODES]
PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 250, 31]


# -- in the subprocess (TRITON_INTERPRET=1) ------------------------------------------------------------------------


def interpreter_bf16() -> None:
    """Two bf16 shortcuts of Triton's CPU interpreter (runtime/interpreter.py, Triton 3.9), undone here, test-only:
    tl.dot multiplies bf16 operands as their raw uint16 bits (widened to fp32 first: exact, a bf16 is the top half
    of an fp32), and fp32 -> bf16 casts truncate (rounded to nearest even, as the GPU's default)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *rest):
        return dot(self, widen(a), widen(b), d, *rest)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(bits.numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl


def problem(N, k, dtype, seed=0, S=S, H=H, I=I):
    """x [N, H], slots [N, k] with repeated slots, weights [N, k], gate_up [S, 2I, H], down [S, H, I]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen)
    slots = torch.stack([torch.randperm(S, generator=gen)[:k] for _ in range(N)])  # distinct within a token
    if N > 1:
        slots[:, 0] = slots[0, 0]  # one slot shared by the whole batch
    if N >= 8:
        slots[:5] = 3  # every choice of five tokens on one slot: repeats within a token, > BLOCK_M at larger N
    weights = torch.rand(N, k, generator=gen)
    gate_up = torch.randn(S, 2 * I, H, generator=gen) / H ** 0.5
    down = torch.randn(S, H, I, generator=gen) / I ** 0.5
    return x.to(dtype), slots, weights.to(dtype), gate_up.to(dtype), down.to(dtype)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_cases(checkpoint: str) -> dict:
    from omnilab.gpu.fused_moe import fused_expert_mix
    from omnilab.gpu.step import expert_mix

    interpreter_bf16()
    out = {}
    for case in KERNEL_CASES:
        dtype, n, k, mode = case.split("-")
        x, slots, w, gu, dn = problem(int(n[1:]), int(k[1:]), getattr(torch, dtype))
        got = fused_expert_mix(x, slots, w, gu, dn, mode=mode)
        gather = expert_mix(x, slots, w, gu, dn, torch.arange(S), "gather")
        exact = expert_mix(*(t.double() if t.is_floating_point() else t for t in (x, slots, w, gu, dn)),
                           torch.arange(S), "gather")
        out[case] = {"vs_gather": rel(got, gather), "vs_fp64": rel(got, exact), "gather_vs_fp64": rel(gather, exact),
                     "dtype": str(got.dtype), "shape": list(got.shape)}
    # loops over several I / H / K blocks with ragged edges, a slot with more choices than BLOCK_M (two chunks)
    for n, mode in ((2, "token"), (20, "scan"), (20, "sorted")):
        x, slots, w, gu, dn = problem(n, 4, torch.float32, seed=1, S=6, H=320, I=96)
        slots[:9, 1:] = 2
        got = fused_expert_mix(x, slots, w, gu, dn, mode=mode)
        out[f"blocks-N{n}-{mode}"] = rel(got, expert_mix(x, slots, w, gu, dn, torch.arange(6), "gather"))
    # the token mode's other accumulation (fused_moe.TOKEN_*["ACC2D"] flipped): the same sums in another order
    import omnilab.gpu.fused_moe as fm
    saved = fm.TOKEN_GATE_UP, fm.TOKEN_DOWN
    fm.TOKEN_GATE_UP, fm.TOKEN_DOWN = (dict(c, ACC2D=not c["ACC2D"]) for c in saved)
    for dtype in ("float32", "bfloat16"):
        for n, k in ((1, 1), (1, 4), (2, 4)):
            x, slots, w, gu, dn = problem(n, k, getattr(torch, dtype))
            got = fused_expert_mix(x, slots, w, gu, dn, mode="token")
            out[f"other-acc-{dtype}-N{n}-k{k}"] = rel(got, expert_mix(x, slots, w, gu, dn, torch.arange(S), "gather"))
    x, slots, w, gu, dn = problem(2, 4, torch.float32, seed=1, S=6, H=320, I=96)
    got = fused_expert_mix(x, slots, w, gu, dn, mode="token")
    out["other-acc-blocks"] = rel(got, expert_mix(x, slots, w, gu, dn, torch.arange(6), "gather"))
    fm.TOKEN_GATE_UP, fm.TOKEN_DOWN = saved
    # the offload pool's strided views (step.expert_mix reads them as they are): bit-equal to contiguous copies
    x, slots, w, _, _ = problem(3, 3, torch.float32, seed=2)
    slab = torch.randn(S, 3 * I * H) / H ** 0.5
    down, gate_up = slab[:, :H * I].view(S, H, I), slab[:, H * I:].view(S, 2 * I, H)
    out["strided"] = all(torch.equal(fused_expert_mix(x, slots, w, gate_up, down, mode=m),
                                     fused_expert_mix(x, slots, w, gate_up.contiguous(), down.contiguous(), mode=m))
                         for m in MODES)
    # torch.compile: one opaque op with a fake impl, no graph break; the same bits as eager
    compiled = torch.compile(expert_mix, backend="aot_eager", fullgraph=True, dynamic=False)
    same = []
    for n in (1, 3):
        x, slots, w, gu, dn = problem(n, 2, torch.float32, seed=3)
        same.append(torch.equal(compiled(x, slots, w, gu, dn, torch.arange(S), "triton"),
                                expert_mix(x, slots, w, gu, dn, torch.arange(S), "triton")))
    out["compiled"] = all(same)
    out.update(decoder_cases(checkpoint))
    return out


def decoder_cases(checkpoint: str) -> dict:
    from omnilab.gpu.fast import FastDecoder
    from omnilab.model.decoder import SelectiveMoE

    model = SelectiveMoE.from_checkpoint(checkpoint, tokenizer=False)
    forced = torch.randint(0, model.config.vocab_size, (8,), generator=torch.Generator().manual_seed(0))
    runs = {c: FastDecoder(model, max_len=32, compute=c).generate(PROMPT, 8, forced=forced, record_logits=True)
            for c in ("triton", "gather")}
    greedy = {c: FastDecoder(model, max_len=32, compute=c).generate(PROMPT, 8).new_token_ids for c in ("triton", "gather")}
    batch = [PROMPT, PROMPT[:6], PROMPT[3:]]  # N = 3 per decode step: the scan mode
    batched = {c: FastDecoder(model, max_len=32, batch=3, compute=c).generate(batch, 6).new_token_ids
               for c in ("triton", "gather")}
    return {"decoder": {"logits_rel": rel(runs["triton"].logits, runs["gather"].logits),
                        "greedy": greedy, "eager": model.generate(PROMPT, 8, vocab_limit=None).new_token_ids,
                        "batched": batched,
                        "batched_eager": model.generate(batch, 6, vocab_limit=None).new_token_ids}}


# -- the tests -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tiny_moe, tmp_path_factory):
    return interpreted_results(__file__, tiny_moe, tmp_path_factory.mktemp("fused") / "results.json")


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_equal_gather(results, case):
    r = results[case]
    dtype, n = case.split("-")[:2]
    assert r["dtype"] == f"torch.{dtype}" and r["shape"] == [int(n[1:]), H]
    if dtype == "float32":
        assert r["vs_gather"] < 1e-5
    else:  # bf16: fp32 accumulation, rounded to bf16 once per GEMM (gather rounds after every op)
        assert r["vs_fp64"] < 1e-2 and r["vs_gather"] < 1.5e-2


def test_kernels_over_several_blocks_equal_gather(results):
    for name in ("blocks-N2-token", "blocks-N20-scan", "blocks-N20-sorted"):
        assert results[name] < 1e-5, name


def test_token_mode_other_accumulation_equals_gather(results):
    cases = {k: v for k, v in results.items() if k.startswith("other-acc-")}
    assert len(cases) == 7
    for name, r in cases.items():
        assert r < (1.5e-2 if "bfloat16" in name else 1e-5), name


def test_strided_slab_views_equal_contiguous(results):
    assert results["strided"]


def test_compile_keeps_the_op_whole(results):
    assert results["compiled"]


def test_fast_decoder_tokens_equal_gather_and_eager(results):
    d = results["decoder"]
    assert d["logits_rel"] < 1e-5
    assert d["greedy"]["triton"] == d["greedy"]["gather"] == d["eager"]
    assert d["batched"]["triton"] == d["batched"]["gather"] == d["batched_eager"]


def test_decoders_refuse_triton_on_the_cpu_without_the_interpreter(tiny_moe, monkeypatch):
    """Refused when built, with the reason (also an unknown compute)."""
    from omnilab.gpu.fast import FastDecoder
    from omnilab.gpu.host import HostTier
    from omnilab.gpu.offload import OffloadDecoder
    from omnilab.gpu.step import compute_refusal
    from omnilab.model.decoder import SelectiveMoE

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in compute_refusal("triton", "cpu")
    assert compute_refusal("triton", "cuda") is None and compute_refusal("gather", "cpu") is None
    assert "use grouped_mm, gather, triton" in compute_refusal("bmm", "cpu")
    model = SelectiveMoE.from_checkpoint(tiny_moe, tokenizer=False)
    with pytest.raises(ValueError, match="fast path: compute='triton' runs on CUDA"):
        FastDecoder(model, max_len=32, compute="triton")
    config, layout = model.checkpoint.arch
    host = HostTier.copy(model.checkpoint, config, layout, model.dtype, pin=False)
    with pytest.raises(ValueError, match="offload: compute='triton' runs on CUDA"):
        OffloadDecoder(model, host, max_len=32, compute="triton")
    with pytest.raises(ValueError, match="offload: expert compute 'bmm'"):
        OffloadDecoder(model, host, max_len=32, compute="bmm")


if __name__ == "__main__":  # the subprocess: python tests/test_fused_moe.py CHECKPOINT OUT.json
    Path(sys.argv[2]).write_text(json.dumps(run_cases(sys.argv[1])))
