"""The fast path's research calls on cuda with the decode step captured as a CUDA graph, fp32: ragged batches,
routing interventions, stop tokens and records give the eager path's tokens (eager on cuda, fp32); the warpers equal
transformers' on cuda; sampling is reproducible for a seed; the runtime takes these calls on gpu-resident (bf16:
compiled)."""

import pytest
import torch

import omnilab as ol
from omnilab.gpu import sampling
from omnilab.gpu.fast import FastDecoder
from omnilab.model.generate import logits_warpers
from omnilab.model.hooks import capture
from test_fast_research import RAGGED, interventions  # tests/test_fast_research.py: the same cases as on the CPU


@pytest.fixture(scope="module", params=["omni", "moe"])
def model(request, make_checkpoint):
    return ol.load(make_checkpoint(request.param), device="cuda", dtype="float32")


def graphed(model, prompts, n, routing=None, **options):
    batch = prompts if isinstance(prompts[0], list) else [prompts]
    decoder = FastDecoder(model, max_len=max(map(len, batch)) + n, batch=len(batch), routing=routing)
    assert decoder.graph_enabled
    out = decoder.generate(batch, n, **options)
    assert decoder._graphs  # the decode steps were graph replays
    return out


@pytest.mark.parametrize("prompts", RAGGED)
def test_ragged_batches_give_the_eager_tokens(model, prompts):
    assert graphed(model, prompts, 12, vocab_limit=None).new_token_ids == \
        model.generate(prompts, 12, vocab_limit=None, engine="eager").new_token_ids


def test_every_routing_intervention_gives_the_eager_tokens(model):
    for what, routing in interventions(model.config).items():
        fast = graphed(model, RAGGED[0], 10, routing=routing, vocab_limit=None)
        eager = model.generate(RAGGED[0], 10, vocab_limit=None, routing=routing, engine="eager")
        assert fast.new_token_ids == eager.new_token_ids, what


def test_stop_tokens_give_the_eager_tokens_and_stopped(model):
    prompts = RAGGED[1]
    free = model.generate(prompts, 12, vocab_limit=None, engine="eager").new_token_ids
    for stops in ([free[0][3], free[2][7]], [free[0][1], free[1][2], free[2][0]]):
        fast = graphed(model, prompts, 40, vocab_limit=None, stop_tokens=stops)
        eager = model.generate(prompts, 40, vocab_limit=None, stop_tokens=stops, engine="eager")
        assert fast.new_token_ids == eager.new_token_ids and fast.stopped == eager.stopped


def test_records_equal_the_eager_hooks(model):
    prompt, n = RAGGED[0][0], 6
    fast = graphed(model, prompt, n, vocab_limit=None, record=("resid", "router_logits"))
    L, moe = model.config.num_hidden_layers, model.config.moe_layers
    seq = torch.tensor([prompt + fast.new_token_ids[0][:-1]], device="cuda")
    names = [f"blocks.{i}.hook_resid_post" for i in range(L)] + [f"blocks.{i}.mlp.hook_router_logits" for i in moe]
    with capture(model, names) as acts:
        model(seq)
    at = slice(len(prompt) - 1, None)
    for i in range(L):
        want = acts[f"blocks.{i}.hook_resid_post"][0, at].to(fast.resid.device)
        assert torch.allclose(fast.resid[:, i, 0], want, rtol=1e-4, atol=1e-4)
    for j, i in enumerate(moe):
        want = acts[f"blocks.{i}.mlp.hook_router_logits"].reshape(1, -1, model.config.num_experts)[0, at]
        assert torch.allclose(fast.router_logits[:, j, 0], want.to(fast.router_logits.device), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.6, 40, 0.95),
                                                       (1.0, 0, 1e-6), (2.0, 17, 0.5)])
def test_warpers_equal_transformers_on_cuda(temperature, top_k, top_p):
    scores = torch.randn(6, 200, generator=torch.Generator().manual_seed(0)).cuda() * 3  # [B, V]
    scores[1] = scores[1].round()
    scores[3, 150:] = float("-inf")
    params = sampling.SamplingParams("cuda")
    params.set(temperature, top_k, top_p, vocab=200)
    want = scores.clone()
    for warp in logits_warpers(False, temperature, top_k, top_p):
        want = warp(None, want)
    assert torch.equal(sampling.warp(scores.clone(), params), want)


def test_sampling_is_reproducible_for_a_seed_on_cuda(model):
    options = dict(vocab_limit=None, greedy=False, temperature=1.2, top_k=30, top_p=0.95)
    decoder = FastDecoder(model, max_len=64, batch=2)
    a = decoder.generate(RAGGED[0], 20, seed=5, **options).new_token_ids
    torch.cuda.manual_seed(99)
    torch.rand(10, device="cuda")
    b = decoder.generate(RAGGED[0], 20, seed=5, **options).new_token_ids
    c = decoder.generate(RAGGED[0], 20, seed=6, **options).new_token_ids
    assert set(decoder._graphs) == {True}
    assert a == b and a != c
    greedy = decoder.generate(RAGGED[0], 20, vocab_limit=None).new_token_ids
    assert set(decoder._graphs) == {True, False}
    assert greedy == model.generate(RAGGED[0], 20, vocab_limit=None, engine="eager").new_token_ids


def test_cuda_draws_equal_the_cpu_draws():
    """The hashed noise is integer arithmetic: the same tokens on cuda as on the CPU for the same warped scores."""
    V, N = 300, 512
    scores = torch.randn(N, V, generator=torch.Generator().manual_seed(2))
    out = {}
    for device in ("cpu", "cuda"):
        params = sampling.SamplingParams(device)
        params.set(seed=9, vocab=V)
        out[device] = sampling.draw(scores.to(device), params, torch.tensor([4], device=device),
                                    torch.arange(N, device=device), torch.arange(V, device=device)).cpu()
    assert torch.equal(out["cpu"], out["cuda"])


def test_runtime_takes_research_calls_on_gpu_resident(model):
    routing = interventions(model.config)["all of them"]
    fast = model.generate(RAGGED[1], 10, routing=routing)
    eager = model.generate(RAGGED[1], 10, routing=routing, engine="eager")
    assert fast.engine == "gpu-resident" and fast.refusal is None
    assert fast.new_token_ids == eager.new_token_ids
    sampled = [model.generate(RAGGED[1], 10, greedy=False, top_p=0.9, seed=s).new_token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_runtime_bf16_compiled_research_calls(tiny_moe):
    """bf16 on cuda: ragged, sampled and routed calls run and reproduce; the plain call's decoder is compiled."""
    model = ol.load(tiny_moe, device="cuda", dtype="bfloat16")
    routing = interventions(model.config)["salience"]
    runs = [model.generate(RAGGED[0], 12, greedy=False, seed=3, routing=routing, stop_tokens=[5]) for _ in range(2)]
    assert runs[0].engine == "gpu-resident"
    assert runs[0].new_token_ids == runs[1].new_token_ids
    from omnilab.runtime.choose import engines

    decoder = next(v for k, v in engines(model).items() if k[0] == "fast")
    # an intervention captures the uncompiled step (runtime.generate.compiles: no recompile per setting)
    assert decoder._compiled is None and decoder._graphs
    plain = model.generate(RAGGED[0], 12)
    assert plain.engine == "gpu-resident"
    decoder = next(v for k, v in engines(model).items() if k[0] == "fast")
    assert decoder._compiled is not None and decoder._graphs  # the model's own routing: compiled and captured
