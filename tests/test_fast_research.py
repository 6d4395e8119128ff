"""The fast path's research calls on CPU, fp32, tiny checkpoints: ragged batches, routing interventions, stop tokens,
records and sampling against the eager path; the tensor warpers against transformers' own; the device sampler's
distribution against the exact softmax and against the eager sampler. (tests/gpu/test_gpu_fast_research.py runs
the same with the CUDA graph.)"""

from __future__ import annotations

import math

import pytest
import torch

from omnilab.gpu import sampling
from omnilab.gpu.fast import FastDecoder, fast_path_refusal
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.faults import DefaultNorms, RouterMask, SalienceMix
from omnilab.model.generate import logits_warpers
from omnilab.model.hooks import capture
from omnilab.model.routing import RoutingOptions, RoutingOverride

RAGGED = [
    [[3, 17, 42, 5, 99, 7, 64, 12], [250, 31, 9]],
    [[5], [8, 8, 8, 8, 8, 8], [1, 2, 3, 4]],
    [[7, 6, 5, 4], [7, 6, 5, 4]],
]


@pytest.fixture(scope="module", params=["omni", "moe"])
def model(request, make_checkpoint):
    return SelectiveMoE.from_checkpoint(make_checkpoint(request.param), tokenizer=False)


def fast_tokens(model, prompts, n, routing=None, **options):
    batch = prompts if isinstance(prompts[0], list) else [prompts]
    decoder = FastDecoder(model, max_len=max(map(len, batch)) + n, batch=len(batch), routing=routing)
    return decoder.generate(batch, n, **options)


def interventions(cfg) -> dict:
    """Routing options that change the routing: each one the fast path follows in its step."""
    k, E, layers = cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_layers
    ok = torch.ones(E, dtype=torch.bool)
    ok[torch.tensor([0, 3])] = False
    trace = torch.stack([torch.arange(k) + p % (E - k) for p in range(64)])  # [64, k]: a choice per position
    return {
        "top-k - 1": RoutingOptions(top_k=k - 1),
        "top-k + 2": RoutingOptions(top_k=k + 2),
        "router mask": RoutingOptions(transforms=(RouterMask(tuple(range(2, E))),)),
        "router mask of one layer": RoutingOptions(transforms=(RouterMask((1, 2, 3, 4), layer=layers[-1]),)),
        "salience": RoutingOptions(transforms=(SalienceMix(alpha=0.7),)),
        "salience scores": RoutingOptions(transforms=(SalienceMix(0.5, tuple(float(e % 3) for e in range(E))),)),
        "available": RoutingOptions(available={i: ok for i in layers}),
        "all of them": RoutingOptions(top_k=k + 1, available={i: ok for i in layers},
                                      transforms=(SalienceMix(alpha=0.3, seed=4), RouterMask(tuple(range(1, E))))),
        "override by position": RoutingOptions(override=RoutingOverride({layers[0]: trace})),
        "override and mask": RoutingOptions(override=RoutingOverride({layers[-1]: torch.arange(k).flip(0)}),
                                            transforms=(RouterMask(tuple(range(E // 2))),)),
    }


# -- ragged batches, routing, stop tokens, records: the eager path's tokens ----------------------------------------


@pytest.mark.parametrize("prompts", RAGGED)
def test_ragged_batches_give_the_eager_tokens(model, prompts):
    fast = fast_tokens(model, prompts, 10, vocab_limit=None)
    eager = model.generate(prompts, 10, vocab_limit=None)
    assert fast.new_token_ids == eager.new_token_ids
    assert fast.prompt_lengths == [len(p) for p in prompts]


def test_every_routing_intervention_gives_the_eager_tokens(model):
    prompts = RAGGED[0]
    plain = fast_tokens(model, prompts, 8, vocab_limit=None)
    for what, routing in interventions(model.config).items():
        assert fast_path_refusal(model, routing) is None, what
        fast = fast_tokens(model, prompts, 8, routing=routing, vocab_limit=None)
        eager = model.generate(prompts, 8, vocab_limit=None, routing=routing)
        assert fast.new_token_ids == eager.new_token_ids, what
        assert fast.routing.shape != plain.routing.shape or not torch.equal(fast.routing, plain.routing), what
        one = fast_tokens(model, prompts[0], 8, routing=routing, vocab_limit=None, record_logits=True)
        seq = torch.tensor([prompts[0] + one.new_token_ids[0][:-1]])  # [1, P + 7]: the inputs it saw
        want = model(seq, routing=routing)[0, len(prompts[0]) - 1:]  # [8, V]
        assert torch.allclose(one.logits[:, 0], want, rtol=1e-4, atol=1e-5), what


def test_router_faults_of_the_model_take_the_fast_path(make_checkpoint):
    faulty = SelectiveMoE.from_checkpoint(make_checkpoint("moe"), tokenizer=False, faults=[SalienceMix(alpha=0.6)])
    assert fast_path_refusal(faulty) is None
    assert fast_tokens(faulty, RAGGED[1], 8, vocab_limit=None).new_token_ids == \
        faulty.generate(RAGGED[1], 8, vocab_limit=None).new_token_ids
    broken = SelectiveMoE.from_checkpoint(make_checkpoint("moe"), tokenizer=False, faults=[DefaultNorms(layer=0)])
    assert fast_path_refusal(broken) == "faults act on the weights as loaded (DefaultNorms)"


def test_stop_tokens_give_the_eager_tokens_and_stopped(model):
    prompts = RAGGED[1]
    free = model.generate(prompts, 12, vocab_limit=None).new_token_ids
    stops = [free[0][3], free[2][7]]  # row 0 stops at 3 (or earlier), row 2 at 7 (or earlier)
    fast = fast_tokens(model, prompts, 12, vocab_limit=None, stop_tokens=stops)
    eager = model.generate(prompts, 12, vocab_limit=None, stop_tokens=stops)
    assert fast.new_token_ids == eager.new_token_ids
    assert fast.stopped == eager.stopped and fast.stopped[0] and fast.stopped[2]


def test_every_row_stopped_ends_early(model):
    prompts = RAGGED[0]
    free = model.generate(prompts, 4, vocab_limit=None).new_token_ids
    stops = [free[0][1], free[1][2]]
    fast = fast_tokens(model, prompts, 60, vocab_limit=None, stop_tokens=stops)
    eager = model.generate(prompts, 60, vocab_limit=None, stop_tokens=stops)
    assert fast.new_token_ids == eager.new_token_ids and fast.stopped == [True, True]
    assert fast.routing.shape[2] == len(prompts[0]) + 16 - 1  # the host saw `done` after the first 16 steps


def test_records_equal_the_eager_hooks(model):
    prompt, n = RAGGED[0][0], 6
    fast = fast_tokens(model, prompt, n, vocab_limit=None, record=("resid", "router_logits"))
    cfg = model.config
    L, moe = cfg.num_hidden_layers, cfg.moe_layers
    assert fast.resid.shape == (n, L, 1, cfg.hidden_size)
    assert fast.router_logits.shape == (n, len(moe), 1, cfg.num_experts)
    seq = torch.tensor([prompt + fast.new_token_ids[0][:-1]])  # [1, P + n - 1]
    names = [f"blocks.{i}.hook_resid_post" for i in range(L)] + [f"blocks.{i}.mlp.hook_router_logits" for i in moe]
    with capture(model, names) as acts:
        model(seq)
    at = slice(len(prompt) - 1, None)  # the inputs that produced the n tokens
    for i in range(L):
        assert torch.allclose(fast.resid[:, i, 0], acts[f"blocks.{i}.hook_resid_post"][0, at], rtol=1e-4, atol=1e-5)
    for j, i in enumerate(moe):
        want = acts[f"blocks.{i}.mlp.hook_router_logits"].reshape(1, -1, cfg.num_experts)[0, at]
        assert torch.allclose(fast.router_logits[:, j, 0], want, rtol=1e-4, atol=1e-5)


# -- the warpers: transformers' own results ------------------------------------------------------------------------


def warped_both(scores, temperature, top_k, top_p):
    params = sampling.SamplingParams("cpu")
    params.set(temperature, top_k, top_p, vocab=scores.shape[-1])
    want = scores.clone()
    for warp in logits_warpers(False, temperature, top_k, top_p):
        want = warp(None, want)
    return sampling.warp(scores.clone(), params), want


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 1, 1.0), (1.0, 200, 1.0), (1.0, 1000, 1.0),
    (1.0, 0, 0.9), (0.6, 40, 0.95), (1.0, 0, 1e-6), (1.0, 0, 1 - 1e-7), (2.0, 17, 0.5), (1.0, 0, 0.999999)])
def test_warpers_equal_transformers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 200, generator=g) * 3  # [B, V]
    scores[1, :] = torch.randn(200, generator=g).round()  # many ties, at every boundary
    scores[2, 10:20] = scores[2].max()  # ties at the top
    scores[3, 150:] = float("-inf")  # a vocab limit
    scores[4, :] = 0.0  # all equal
    got, want = warped_both(scores, temperature, top_k, top_p)
    assert torch.equal(got, want)
    assert (got > float("-inf")).any(-1).all()


# -- the draw ------------------------------------------------------------------------------------------------------


def chi2_critical(df: int, z: float = 5.0) -> float:
    """The chi-square quantile with upper tail Phi(-z) (z 5: 3e-7) by Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def counts(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double()


def test_one_step_draws_follow_the_warped_softmax():
    """20000 draws at one step (one row each) against softmax(warped): chi-square over the categories with an
    expected count of at least 5, and no draw where the warped probability is 0."""
    V, N = 60, 20000
    scores = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 2
    params = sampling.SamplingParams("cpu")
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.8, 20, 1.0), (1.5, 0, 0.9)]:
        params.set(temperature, top_k, top_p, seed=7, vocab=V)
        warped = sampling.warp(scores.expand(N, V), params)  # [N, V]
        tokens = sampling.draw(warped, params, torch.tensor([3]), torch.arange(N), torch.arange(V))
        probs = torch.softmax(warped[0].double(), -1)
        seen = counts(tokens, V)
        assert seen[probs == 0].sum() == 0
        expected = probs * N
        big = expected >= 5
        stat = float(((seen[big] - expected[big]) ** 2 / expected[big]).sum())
        assert stat < chi2_critical(int(big.sum()) - 1), (temperature, top_k, top_p, stat)
        assert abs(seen.sum() - N) == 0


def test_draws_across_steps_are_independent_uniform():
    """One row over 4000 steps (the step counter varies, not the row): uniform logits give uniform tokens, and
    successive tokens are not correlated (chi-square of the pair table)."""
    V, n = 8, 4000
    params = sampling.SamplingParams("cpu")
    params.set(seed=11, vocab=V)
    scores = torch.zeros(1, V)
    tokens = torch.cat([sampling.draw(scores, params, torch.tensor([s]), torch.arange(1), torch.arange(V))
                        for s in range(n)])
    seen = counts(tokens, V)
    assert float(((seen - n / V) ** 2 / (n / V)).sum()) < chi2_critical(V - 1)
    pairs = counts(tokens[:-1] * V + tokens[1:], V * V)
    e = (n - 1) / V ** 2
    assert float(((pairs - e) ** 2 / e).sum()) < chi2_critical(V * V - 1)


def test_sampling_is_reproducible_for_a_seed(model):
    prompts = RAGGED[0]
    options = dict(vocab_limit=None, greedy=False, temperature=1.2, top_k=30, top_p=0.95)
    decoder = FastDecoder(model, max_len=32, batch=2)
    a = decoder.generate(prompts, 12, seed=5, **options).new_token_ids
    torch.manual_seed(123)  # torch's RNG state plays no part
    torch.rand(10)
    b = decoder.generate(prompts, 12, seed=5, **options).new_token_ids
    c = decoder.generate(prompts, 12, seed=6, **options).new_token_ids
    greedy = decoder.generate(prompts, 12, vocab_limit=None).new_token_ids
    assert a == b and a != c
    assert greedy == model.generate(prompts, 12, vocab_limit=None).new_token_ids  # the greedy graph after sampling


def test_first_token_distribution_matches_the_eager_sampler(model):
    """The same prompt in N rows, one sampled token each, fast (hashed Gumbel-max) against eager (transformers'
    warpers, torch.multinomial): a two-sample chi-square over the categories both samplers can produce."""
    N, prompt, V = 3000, [3, 17, 42, 5], model.config.vocab_size
    options = dict(vocab_limit=None, greedy=False, temperature=3.0, top_k=40, top_p=0.97, seed=3)
    fast = torch.tensor(fast_tokens(model, [prompt] * N, 1, **options).new_token_ids)[:, 0]
    eager = torch.tensor(model.generate([prompt] * N, 1, **options).new_token_ids)[:, 0]
    a, b = counts(fast, V), counts(eager, V)
    assert ((a > 0) <= ((b > 0) | (a < 5))).all()  # the same support, up to rare tokens
    both = (a + b) >= 10
    pooled = (a + b)[both] / 2  # equal sample sizes: the expected count of each side
    stat = float((((a[both] - pooled) ** 2 + (b[both] - pooled) ** 2) / pooled).sum())
    df = int(both.sum()) - 1
    assert df > 10  # the warped distribution is spread over many tokens
    assert stat < chi2_critical(df), stat
