"""omnilab.gpu.step_kernels on cuda at the Qwen3-Omni thinker's shapes (hidden 2048; q_proj 4096, k_proj and v_proj
512, o_proj 2048 x 4096, a router of 128 experts, top 8): linear and linear_qkv equal F.linear (fp32 to 1e-5, bf16
within one bf16 rounding of the fp32 product), route_topk equals step.route (experts equal, weights to 1e-6
relative), for 1 and 2 rows (tl.sum) and 8, 32 and 64 (tl.dot); the four replay from a CUDA graph at 1 and 8 rows;
FastDecoder(compute="triton") in bf16 takes them in every step of at most 64 tokens and, compiled and graphed at
batch 1 and 8, gives the forced-input argmax of the torch projections (step.GEMV_MAX_TOKENS = 0) and of
compute="grouped_mm" within bf16 noise, on the tiny checkpoint and on one of the real attention and router shapes.
(In Triton's CPU interpreter: tests/test_step_kernels.py.)"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import omnilab.gpu.step as step  # noqa: E402
import omnilab.gpu.step_kernels as sk  # noqa: E402
from omnilab.gpu.fast import FastDecoder  # noqa: E402
from omnilab.model.decoder import SelectiveMoE  # noqa: E402
from omnilab.testing import synth  # noqa: E402

H, NH, NKV, HD, E, K = 2048, 32, 4, 128, 128, 8  # the Qwen3-Omni thinker's attention and router
SHAPES = {"q_proj": (NH * HD, H), "k_proj": (NKV * HD, H), "v_proj": (NKV * HD, H), "o_proj": (H, NH * HD),
          "router": (E, H)}
PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 250, 31]


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/gpu/conftest.py: fp32 references without tf32


@pytest.fixture(scope="module")
def weights():
    """Per dtype: name -> weight [M, K] (N(0, 1 / K): unit-variance outputs)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = {name: torch.randn(m, k, device="cuda", generator=gen) / k ** 0.5 for name, (m, k) in SHAPES.items()}
    return {torch.float32: w, torch.bfloat16: {name: t.bfloat16() for name, t in w.items()}}


def activations(N, K, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(N, K, device="cuda", generator=gen).to(dtype)  # [N, K]


def assert_gemv(got, x, w):
    """fp32: F.linear to 1e-5 relative; bf16: every element within one bf16 rounding (2^-8 relative) of the fp32
    product of the same bf16 inputs, up to fp32 summation noise. Past 2 rows (tl.dot: the tensor cores' sums, whose
    order and intermediate rounding differ from FMA's) as near the exact product as cuBLAS's tensor-core F.linear
    is: its error norm within 1.1x of F.linear's, and no more elements past one rounding than F.linear has plus
    0.1% (run 7 of the GPU suite: o_proj's K = 4096 at 32 and 64 rows put a few past the stricter bound)."""
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    exact = x.double() @ w.double().T  # [N, M]
    rel = float((got.double() - exact).norm() / exact.norm())
    if x.dtype == torch.float32:
        assert rel < 1e-5 and torch.allclose(got, F.linear(x, w), rtol=1e-4, atol=1e-5)
        return
    assert rel < 4e-3

    def past_rounding(y):  # [N, M] bool: elements further from the exact product than one bf16 rounding
        return (y.double() - exact).abs() > 2 ** -8 * exact.abs() + 1e-6 * exact.abs().max()

    if x.shape[0] <= sk.SUM_ROWS:
        assert not bool(past_rounding(got).any())
        return
    cublas = F.linear(x, w)
    rel_cublas = float((cublas.double() - exact).norm() / exact.norm())
    assert rel <= 1.1 * rel_cublas, (rel, rel_cublas)
    assert int(past_rounding(got).sum()) <= int(past_rounding(cublas).sum()) + 1e-3 * got.numel()


def router_logits(N, dtype, seed=0):
    """[N, E] logits without ties (bf16: distinct multiples of 1/16, exact; randn values repeat in bf16)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if dtype == torch.float32:
        return 2 * torch.randn(N, E, device="cuda", generator=gen)
    rows = [torch.randperm(E, device="cuda", generator=gen).float() / 16 - E / 32 for _ in range(N)]  # [E] each
    return torch.stack(rows).to(dtype)  # [N, E]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2, 8, 32, 64])
@pytest.mark.parametrize("name", ["o_proj", "router", "q_proj"])
def test_linear_real_shapes(weights, name, N, dtype):
    w = weights[dtype][name]
    x = activations(N, w.shape[1], dtype)
    assert_gemv(sk.linear(x, w), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2, 8, 32, 64])
def test_linear_qkv_real_shapes(weights, N, dtype):
    ws = [weights[dtype][n] for n in ("q_proj", "k_proj", "v_proj")]
    x = activations(N, H, dtype)
    for got, w in zip(sk.linear_qkv(x, *ws), ws):
        assert_gemv(got, x, w)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2, 64])
def test_route_topk_equals_route(N, dtype, norm):
    logits = router_logits(N, dtype)
    for out in (torch.float32, torch.bfloat16):
        weights, experts = sk.route_topk(logits, K, norm, out)
        want_w, want_e = step.route(logits, K, norm, out)
        assert torch.equal(experts, want_e) and experts.dtype == torch.int64 and weights.dtype == out
        rel = ((weights.double() - want_w.double()).abs() / want_w.double()).max()
        assert rel < (1e-6 if out == torch.float32 else 2 ** -8)  # bf16: the same fp32 weight, or its neighbour


def test_step_route_under_triton_equals_torch_and_keeps_the_override():
    logits = router_logits(2, torch.bfloat16)
    w, e = step.route(logits, K, True, torch.bfloat16, None, "triton")
    assert torch.equal(e, step.route(logits, K, True, torch.bfloat16)[1])
    forced = torch.arange(K, device="cuda").repeat(2, 1)  # the override: a gather in torch, its experts as given
    assert torch.equal(step.route(logits, K, True, torch.bfloat16, forced, "triton")[1], forced)


@pytest.mark.parametrize("N", [1, 8])
def test_replays_from_a_cuda_graph(weights, N):
    w = weights[torch.bfloat16]
    x = activations(N, H, torch.bfloat16)
    o_in = activations(N, NH * HD, torch.bfloat16, seed=1)
    logits = router_logits(N, torch.bfloat16)

    def run():
        return (*sk.linear_qkv(x, w["q_proj"], w["k_proj"], w["v_proj"]), sk.linear(o_in, w["o_proj"]),
                sk.linear(x, w["router"]), *sk.route_topk(logits, K, True, torch.bfloat16))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles) outside the capture
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for seed in (2, 3):  # new inputs in the captured buffers
        for buffer, value in ((x, activations(N, H, torch.bfloat16, seed)),
                              (o_in, activations(N, NH * HD, torch.bfloat16, seed + 10)),
                              (logits, router_logits(N, torch.bfloat16, seed))):
            buffer.copy_(value)
        graph.replay()
        for got, want in zip(outs, run()):
            assert torch.equal(got, want)


@pytest.fixture(scope="module", params=["tiny", "real-attention"])
def bf16_model(request, make_checkpoint, tmp_path_factory):
    """The tiny "moe" checkpoint, or two layers of the thinker's attention and router shapes (small experts)."""
    if request.param == "tiny":
        path = make_checkpoint("moe")
    else:
        path = synth.tiny_qwen3_moe(tmp_path_factory.mktemp("real-attention"), max_shard_size="2GB", tokenizer=False,
                                    hidden_size=H, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=HD,
                                    num_experts=E, num_experts_per_tok=K, moe_intermediate_size=32,
                                    num_hidden_layers=2)
    return SelectiveMoE.from_checkpoint(path, device="cuda", dtype="bfloat16", tokenizer=False)


def test_fast_decoder_bf16_steps_take_the_kernels(bf16_model, monkeypatch):
    """Uncompiled, ungraphed (Python runs each step): every step's layer (the prefill of 10 tokens and each decode
    step) calls linear_qkv once, linear twice (o_proj, router) and route_topk once."""
    calls = {"linear": 0, "linear_qkv": 0, "route_topk": 0}
    for name in calls:
        def counted(*a, _f=getattr(sk, name), _name=name):
            calls[_name] += 1
            return _f(*a)
        monkeypatch.setattr(sk, name, counted)
    decoder = FastDecoder(bf16_model, max_len=64, compute="triton", graph=False)
    decoder.generate(PROMPT, 5)
    steps = 5 * len(decoder.pool.layers)
    assert calls == {"linear": 2 * steps, "linear_qkv": steps, "route_topk": steps}


@pytest.mark.parametrize("batch", [1, 8])
def test_fast_decoder_bf16_compiled_argmax_equals_torch_projections(bf16_model, monkeypatch, batch):
    """bf16, compile=True, CUDA graph, batch 1 (tl.sum GEMVs) and 8 (tl.dot): the forced-input argmax of every step
    and row equals the run with torch's projections (step.GEMV_MAX_TOKENS = 0: the expert mix and top-k in Triton)
    and grouped_mm's, except where that run's top two logits are within bf16 noise of each other."""
    forced = torch.randint(0, bf16_model.config.vocab_size, (batch, 24), generator=torch.Generator().manual_seed(1))
    prompts = PROMPT if batch == 1 else [PROMPT[i % 5:] for i in range(batch)]
    runs = {}
    for name, compute, limit in (("kernels", "triton", 64), ("torch", "triton", 0), ("grouped_mm", "grouped_mm", 64)):
        monkeypatch.setattr(step, "GEMV_MAX_TOKENS", limit)
        decoder = FastDecoder(bf16_model, max_len=64, batch=batch, compute=compute, compile=True)
        teacher = forced[0] if batch == 1 else forced
        logits = decoder.generate(prompts, 24, forced=teacher, record_logits=True).logits  # [n, B, V]
        runs[name] = logits.reshape(-1, logits.shape[-1])  # [n * B, V]
        assert decoder._compiled is not None and decoder._graphs
    got = runs["kernels"]
    for name in ("torch", "grouped_mm"):
        want = runs[name]
        assert float((got - want).norm() / want.norm()) < 3e-2, name
        for j in torch.nonzero(got.argmax(-1) != want.argmax(-1)).flatten().tolist():
            row = want[j]
            assert row.max() - row[got[j].argmax()] <= 2e-2 * (row.max() - row.min()), (name, j)
