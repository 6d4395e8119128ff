"""Sweep settings applied to a loaded selective model, the trust-weighted policy, and the sweep's measurements."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from omnilab.experiments import eval_data, measures, routing, sweeps
from omnilab.trace import record as routing_trace
from omnilab.model.experts import TrustWeighted
from omnilab.model.faults import DefaultNorms, RouterMask

IDS = [5, 17, 42, 8, 99, 3, 61, 27, 14, 7, 88, 120]


@pytest.fixture(scope="module")
def model(tiny_omni):
    from omnilab.model.decoder import SelectiveMoE

    return SelectiveMoE.from_checkpoint(tiny_omni)


def test_applied_changes_routing_and_restores(model):
    config, faults, cache = model.config, model.faults, model.cache
    E, k = config.num_experts, config.num_experts_per_tok
    with sweeps.applied(model, sweeps.Setting("top-3", "top_k", top_k=k + 1)) as options:
        assert options.top_k == k + 1 and model.routing.top_k is None  # passed to calls, the model untouched
        experts, weights, _ = routing_trace.route(model, IDS, routing=options)
        assert experts.shape[-1] == k + 1
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    with sweeps.applied(model, sweeps.Setting("mask", "mask", faults=(RouterMask((0, 2, 5)),))) as options:
        experts, _, _ = routing_trace.route(model, IDS, routing=options)
        assert set(np.unique(experts)) <= {0, 2, 5}
    with sweeps.applied(model, sweeps.Setting("b", "budget", budget_share=0.25, policy="trust")) as options:
        assert model.cache.budget_bytes == int(0.25 * model.cache.store.total_bytes)
        assert isinstance(model.cache.policy, TrustWeighted) and not model.hooks  # fed by the MoE step, no hooks
        routing_trace.route(model, IDS, routing=options)
        assert model.cache.policy.step == 1 and len(model.cache.policy.trust) > 0  # one forward pass observed
        assert model.cache.stats.peak_resident_bytes <= model.cache.budget_bytes
        assert model.cache.stats.evictions > 0
    assert (model.config, model.faults, model.cache) == (config, faults, cache)
    assert model.hooks == {}
    experts, _, _ = routing_trace.route(model, IDS)
    assert experts.shape[-1] == k
    with pytest.raises(ValueError, match="router faults"):
        with sweeps.applied(model, sweeps.Setting("norms", "x", faults=(DefaultNorms(0),))):
            pass


def test_salience_with_full_weight_routes_to_the_most_loaded_experts(model):
    E, k = model.config.num_experts, model.config.num_experts_per_tok
    layers = model.config.moe_layers
    rng = np.random.default_rng(0)
    load = pd.DataFrame(rng.dirichlet(np.ones(E), len(layers)), index=layers)
    with sweeps.applied(model, sweeps.Setting("s", "salience", faults=sweeps.salience_faults(load, alpha=1.0))) as options:
        experts, _, _ = routing_trace.route(model, IDS, routing=options)
    for li, layer in enumerate(layers):
        top = set(np.argsort(-load.loc[layer].to_numpy())[:k])
        assert all(set(row) == top for row in experts[li])


def test_trust_weighted_evicts_the_least_trusted():
    policy = TrustWeighted(decay=0.5)
    policy.step = 1
    policy.observe(0, torch.tensor([[0, 1], [0, 2]]), torch.tensor([[0.6, 0.4], [0.9, 0.1]]))
    for key in [(0, 2), (0, 0), (0, 1)]:
        policy.touch(key)
    assert policy.value((0, 0)) == pytest.approx(1.5)
    assert policy.victim(set()) == (0, 2)  # 0.1 < 0.4 < 1.5
    policy.step = 3  # two passes later: everything decays by 0.25
    policy.observe(0, torch.tensor([[2, 1]]), torch.tensor([[0.7, 0.3]]))
    assert policy.value((0, 0)) == pytest.approx(1.5 * 0.25)
    assert policy.value((0, 2)) == pytest.approx(0.1 * 0.25 + 0.7)
    assert policy.victim(set()) == (0, 0)
    assert policy.victim({(0, 0)}) == (0, 1)  # pinned keys are never chosen
    policy.touch((0, 5))
    assert policy.victim({(0, 1), (0, 2)}) == (0, 5)  # never routed to: no trust
    assert policy.victim({(0, 0), (0, 1), (0, 2), (0, 5)}) is None  # everything resident is pinned


def test_quality_measures():
    torch.manual_seed(0)
    ref = [torch.log_softmax(torch.randn(6, 11), -1), torch.log_softmax(torch.randn(4, 11), -1)]
    evalset = eval_data.EvalSet(docs=[("en", [1, 2, 3, 4, 5, 6]), ("fr", [7, 8, 9, 10])], prompts=[])
    same = measures.quality(ref, ref, evalset)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0
    nll = torch.nn.functional.cross_entropy(ref[0][:-1], torch.tensor([2, 3, 4, 5, 6]))
    assert same["ppl_en"] == pytest.approx(float(nll.exp()), rel=1e-5)
    other = [torch.log_softmax(torch.randn(6, 11), -1), ref[1]]
    q = measures.quality(other, ref, evalset)
    expected = torch.nn.functional.kl_div(other[0], ref[0], log_target=True, reduction="sum") / 10
    assert q["kl"] == pytest.approx(float(expected), rel=1e-5)
    assert 0.4 <= q["top1_agreement"] < 1.0  # fr's 4 of 10 positions agree


def test_run_sweep_rows(model):
    tok = model.tokenizer
    docs = pd.DataFrame({"domain": ["en", "python"], "text": ["The quick brown fox jumps over the lazy dog.",
                                                                "def add(a, b):\n    return a + b\n"]})
    addition = pd.DataFrame({"prompt": ["47 + 38 =", "12 + 30 ="], "answer": ["85", "42"]})
    evalset = eval_data.make_eval_set(tok, docs, docs.rename(columns={"text": "prompt"}), addition, max_tokens=12)
    settings = [sweeps.Setting("full", "full"), sweeps.Setting("top-1", "top_k", value=1, top_k=1),
                sweeps.Setting("budget", "budget", value=0.25, budget_share=0.25, policy="lfu")]
    table = sweeps.run_sweep(model, settings, evalset, max_new_tokens=4, progress=False).set_index("name")
    assert table.loc["full", "kl"] == 0.0 and table.loc["full", "top1_agreement"] == 1.0
    assert table.loc["top-1", "kl"] > 0
    assert bool(table.loc["budget", "cache_exact"])
    assert table.loc["budget", "peak_expert_share"] <= 0.25 + 1e-9
    assert table.loc["budget", "hit_rate"] < table.loc["full", "hit_rate"]
    assert table["addition_accuracy"].between(0, 1).all()
    assert {"ppl_en", "ppl_python", "tokens_per_s", "peak_resident_bytes"} <= set(table.columns)
    metrics = sweeps.summarize(table.reset_index())
    assert metrics["top_1_kl"] == table.loc["top-1", "kl"] and "budget_hit_rate" in metrics
    with pytest.raises(ValueError, match="first setting"):
        sweeps.run_sweep(model, settings[1:], evalset, progress=False)


def test_default_settings_cover_the_issue(model):
    """The settings are notebook 05's specification, spelled out for two shapes (not re-derived)."""
    import dataclasses

    layers = model.config.moe_layers
    load = pd.DataFrame(np.full((len(layers), 32), 1 / 32), index=layers)
    budgets = [f"budget {b} {p}" for p in ("lru", "lfu", "trust") for b in ("12.5%", "25.0%", "50.0%")]
    omni_tiny = dataclasses.replace(model.config, num_experts=32, num_experts_per_tok=4)
    names = [s.name for s in sweeps.default_settings(omni_tiny, load)]
    assert names == ["full", "top-1", "top-2", "top-3", "top-8", "experts 0-7", "salience a=0.5 @25% lru", *budgets]
    small = dataclasses.replace(model.config, num_experts=8, num_experts_per_tok=2)  # no mask below 8 < E
    names = [s.name for s in sweeps.default_settings(small)]
    assert names == ["full", "top-1", "top-4", *budgets]
    settings = {s.name: s for s in sweeps.default_settings(omni_tiny, load)}
    assert settings["top-8"].top_k == 8 and settings["budget 25.0% trust"].policy == "trust"
    assert settings["budget 25.0% trust"].budget_share == 0.25
    assert settings["experts 0-7"].faults[0].experts == tuple(range(8))


def test_resident_cache_stats_count_what_the_eager_cache_counts(tiny_moe):
    """The cache statistics of a sweep row decoded on an all-resident engine are those an unbounded eager
    ExpertCache counts for the same prompts (fp32 on CPU: both engines route alike)."""
    import omnilab as ol
    from omnilab.experiments.sweeps import resident_cache_stats
    from omnilab.model.experts import ExpertCache

    model = ol.load(tiny_moe)
    model.cache = ExpertCache(model.cache.store, None)
    routings = []
    for prompt in ([3, 17, 42, 9], [5, 6, 7, 8, 9, 10], [11]):
        eager = model.generate(prompt, 8, engine="eager")
        fast = model.generate(prompt, 8)
        assert fast.engine == "cpu-resident" and fast.new_token_ids == eager.new_token_ids
        routings.append((fast.routing, len(prompt)))
    stats = model.cache.stats
    derived = resident_cache_stats(routings, model.cache.store.expert_bytes)
    assert stats.misses > 0 and stats.hits > 0
    assert (derived["hits"], derived["misses"], derived["loaded_bytes"]) == (stats.hits, stats.misses,
                                                                             stats.loaded_bytes)


def test_no_setting_holds_more_experts_than_the_model_was_given(tiny_omni):
    """At scale the model's own expert budget is the ceiling: a setting without a share keeps it (not every
    expert), a share above it is capped, and decoding says which engine ran and counts that engine's cache."""
    from omnilab.runtime.model import load

    probe = load(tiny_omni, device="cpu", dtype="float32", expert_budget="all")
    store = probe.cache.store
    own = 4 * store.expert_bytes
    m = load(tiny_omni, device="cpu", dtype="float32", expert_budget=own)
    full, half = sweeps.Setting("full", "full"), sweeps.Setting("b", "budget", budget_share=0.5)
    tiny = sweeps.Setting("t", "budget", budget_share=0.0)
    assert sweeps.setting_budget(m, full) == own and sweeps.setting_budget(m, half) == own < 0.5 * store.total_bytes
    assert sweeps.setting_budget(m, tiny) == store.expert_bytes  # at least one expert
    assert sweeps.setting_budget(probe, full) == store.total_bytes  # a model given every expert keeps them all
    evalset = eval_data.EvalSet(docs=[], prompts=[("p", [3, 17, 42, 99])])
    cost = sweeps.decode_cost(m, evalset, half, max_new_tokens=3)
    assert cost["engine"] == "eager" and m.cache.budget_bytes == own  # under a budget: the eager path's cache
    assert cost["peak_expert_bytes"] <= own and 0 <= cost["hit_rate"] <= 1
    resident = sweeps.decode_cost(probe, evalset, full, max_new_tokens=3)
    assert resident["engine"] == "cpu-resident"  # every expert resident: the cold misses an unbounded cache counts
    assert 0 < resident["loaded_bytes"] <= store.total_bytes and 0 < resident["hit_rate"] < 1
