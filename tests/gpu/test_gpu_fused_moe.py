"""compute="triton" (omnilab.gpu.fused_moe) on cuda: the fused kernels equal compute="gather" on the real shapes
(hidden 2048, expert 768, 128 slots, top-8; fp32 to 1e-5 relative, bf16 within bf16 noise) in every mode, and
replay from a CUDA graph; FastDecoder(compute="triton"), its decode step a CUDA graph, gives the gather path's and
the eager path's greedy fp32 tokens; bf16 with compile=True, the grouped_mm path's forced-input argmax;
OffloadDecoder(compute="triton") the resident tokens. (In Triton's CPU interpreter: tests/test_fused_moe.py.)"""

import pytest
import torch

pytest.importorskip("triton")

from omnilab.gpu.fast import FastDecoder  # noqa: E402
from omnilab.gpu.fused_moe import fused_expert_mix  # noqa: E402
from omnilab.gpu.host import HostTier  # noqa: E402
from omnilab.gpu.offload import OffloadDecoder  # noqa: E402
from omnilab.gpu.step import expert_mix  # noqa: E402
from omnilab.model.decoder import SelectiveMoE  # noqa: E402

S, H, I, K = 128, 2048, 768, 8  # the Qwen3-Omni thinker's experts
MODES = (None, "token", "scan", "sorted")  # None: the mode fused_expert_mix picks
PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 250, 31]
RAGGED = [PROMPT, PROMPT[:6], PROMPT[3:]]


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/gpu/conftest.py: fp32 references without tf32


@pytest.fixture(scope="module")
def pools():
    """Per dtype: gate_up [S, 2I, H], down [S, H, I] (random, unit-variance outputs)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.randn(S, 2 * I, H, device="cuda", generator=gen) / H ** 0.5
    down = torch.randn(S, H, I, device="cuda", generator=gen) / I ** 0.5
    return {torch.float32: (gate_up, down), torch.bfloat16: (gate_up.bfloat16(), down.bfloat16())}


def step_inputs(N, dtype, seed=0):
    """x [N, H], slots [N, k] (a token's k distinct, one slot shared by the batch), weights [N, k] (sum 1)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, H, device="cuda", generator=gen)
    slots = torch.rand(N, S, device="cuda", generator=gen).topk(K, dim=-1).indices  # [N, k]
    if N > 1:
        slots[:, 0] = slots[0, 0]
    weights = torch.rand(N, K, device="cuda", generator=gen).softmax(-1)
    return x.to(dtype), slots, weights.to(dtype)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N", [1, 8, 32])
def test_real_shapes_fp32_equal_gather(pools, N, mode):
    gate_up, down = pools[torch.float32]
    x, slots, w = step_inputs(N, torch.float32)
    want = expert_mix(x, slots, w, gate_up, down, torch.arange(S, device="cuda"), "gather")
    assert rel(fused_expert_mix(x, slots, w, gate_up, down, mode=mode), want) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N", [1, 8, 32])
def test_real_shapes_bf16_within_bf16_noise(pools, N, mode):
    gate_up, down = pools[torch.bfloat16]
    x, slots, w = step_inputs(N, torch.bfloat16)
    exact = expert_mix(x.float(), slots, w.float(), gate_up.float(), down.float(), None, "gather")  # fp32 of bf16s
    got = fused_expert_mix(x, slots, w, gate_up, down, mode=mode)
    gather = expert_mix(x, slots, w, gate_up, down, None, "gather")
    assert got.dtype == torch.bfloat16
    assert rel(got, exact) < 1e-2 and rel(got, exact) <= 2 * rel(gather, exact)


@pytest.mark.parametrize("N", [1, 8, 128])  # token, scan, sorted
def test_replays_from_a_cuda_graph(pools, N):
    gate_up, down = pools[torch.bfloat16]
    x, slots, w = step_inputs(N, torch.bfloat16, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles) outside the capture
        fused_expert_mix(x, slots, w, gate_up, down)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_expert_mix(x, slots, w, gate_up, down)
    for seed in (2, 3):  # new inputs in the captured buffers
        x2, slots2, w2 = step_inputs(N, torch.bfloat16, seed=seed)
        for buffer, value in ((x, x2), (slots, slots2), (w, w2)):
            buffer.copy_(value)
        graph.replay()
        assert torch.equal(out, fused_expert_mix(x2, slots2, w2, gate_up, down))


@pytest.fixture(scope="module", params=["omni", "moe"])
def model(request, make_checkpoint):
    return SelectiveMoE.from_checkpoint(make_checkpoint(request.param), device="cuda", dtype="float32",
                                        tokenizer=False)


def test_fast_decoder_fp32_tokens_equal_gather_and_eager(model):
    got = {}
    for compute in ("triton", "gather"):
        decoder = FastDecoder(model, max_len=64, compute=compute)
        got[compute] = decoder.generate(PROMPT, 24).new_token_ids
        assert decoder.graph_enabled and decoder._graphs  # the decode steps were graph replays
    assert got["triton"] == got["gather"] == model.generate(PROMPT, 24, vocab_limit=None).new_token_ids
    forced = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    a, b = (FastDecoder(model, max_len=64, compute=c).generate(PROMPT, 16, forced=forced, record_logits=True)
            for c in ("triton", "gather"))
    assert rel(a.logits, b.logits) < 1e-5


def test_fast_decoder_fp32_batched_tokens_equal_gather_and_eager(model):
    got = {c: FastDecoder(model, max_len=64, batch=3, compute=c).generate(RAGGED, 12).new_token_ids
           for c in ("triton", "gather")}  # three rows a step: the scan mode
    assert got["triton"] == got["gather"] == model.generate(RAGGED, 12, vocab_limit=None).new_token_ids


def test_fast_decoder_bf16_compiled_argmax_equals_grouped_mm(make_checkpoint):
    """bf16, compile=True: the forced-input argmax of every step equals the grouped_mm path's, except where that
    path's top two logits are within bf16 noise of each other."""
    model = SelectiveMoE.from_checkpoint(make_checkpoint("moe"), device="cuda", dtype="bfloat16", tokenizer=False)
    forced = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    runs = {}
    for compute in ("triton", "grouped_mm"):
        decoder = FastDecoder(model, max_len=64, compute=compute, compile=True)
        runs[compute] = decoder.generate(PROMPT, 24, forced=forced, record_logits=True).logits[:, 0]  # [n, V]
        assert decoder._compiled is not None and decoder._graphs
    got, want = runs["triton"], runs["grouped_mm"]
    assert rel(got, want) < 3e-2
    for j in torch.nonzero(got.argmax(-1) != want.argmax(-1)).flatten().tolist():
        row = want[j]
        assert row.max() - row[got[j].argmax()] <= 2e-2 * (row.max() - row.min()), j


def test_offload_decoder_triton_gives_the_resident_tokens(model):
    config, layout = model.checkpoint.arch
    host = HostTier.copy(model.checkpoint, config, layout, model.dtype, pin=True)
    want = FastDecoder(model, max_len=64, compute="gather").generate(PROMPT, 12).new_token_ids
    decoder = OffloadDecoder(model, host, slots=config.num_experts_per_tok, max_len=64, compute="triton")
    assert decoder.generate(PROMPT, 12).new_token_ids == want
    assert decoder.compute == "triton"  # the slab check found the strided views equal
