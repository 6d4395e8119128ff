"""Routing as an explicit object given to the model (RoutingOptions), the MoE step feeding the cache policy,
TransformerLens's MoE hook aliases, and the cache simulation replaying the cache's own policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilab.experiments import cache_sim, routing
from omnilab.trace import record as routing_trace
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.experts import ExpertCache, LFU, LRU, TrustWeighted, make_policy
from omnilab.model.faults import RouterMask
from omnilab.model.hooks import ALIASES, capture, resolve
from omnilab.model.routing import RoutingOptions
from omnilab.reference.whole import Reference

IDS = [5, 17, 42, 8, 99, 3, 61, 27, 14, 7, 88, 120]


@pytest.fixture(scope="module")
def model(tiny_omni):
    return SelectiveMoE.from_checkpoint(tiny_omni)


def test_resolve_aliases():
    assert resolve("blocks.3.mlp.hook_expert_indices") == "blocks.3.mlp.hook_topk_indices"
    assert resolve("blocks.0.mlp.hook_expert_weights") == "blocks.0.mlp.hook_topk_weights"
    assert resolve("blocks.3.hook_resid_pre") == "blocks.3.hook_resid_pre"
    assert set(ALIASES.values()) <= {"mlp.hook_topk_indices", "mlp.hook_topk_weights"}


@pytest.mark.parametrize("which", ["selective", "reference"])
def test_transformerlens_aliases_capture_the_router_hooks(tiny_omni, model, which):
    m = model if which == "selective" else Reference.from_checkpoint(tiny_omni)
    layer = m.config.moe_layers[-1]
    names = [f"blocks.{layer}.mlp.hook_topk_indices", f"blocks.{layer}.mlp.hook_topk_weights"]
    aliases = [f"blocks.{layer}.mlp.hook_expert_indices", f"blocks.{layer}.mlp.hook_expert_weights"]
    with torch.no_grad(), capture(m, names + aliases) as acts:
        m(torch.tensor([IDS]))
    for name, alias in zip(names, aliases):
        assert acts[alias].shape[0] == len(IDS)
        assert torch.equal(acts[alias], acts[name])
    with pytest.raises(KeyError, match="no hook point"):
        m.add_hook(f"blocks.{layer}.mlp.hook_expert_nothing", lambda x: None)


def test_routing_options_per_call_leave_the_model_alone(model):
    k = model.config.num_experts_per_tok
    plain, _, _ = routing_trace.route(model, IDS)
    wider, weights, _ = routing_trace.route(model, IDS, routing=RoutingOptions(top_k=k + 1))
    assert plain.shape[-1] == k and wider.shape[-1] == k + 1
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)  # norm_topk_prob over the k + 1 picked
    masked, _, _ = routing_trace.route(model, IDS, routing=RoutingOptions(transforms=(RouterMask((0, 2, 5)),)))
    assert set(np.unique(masked)) <= {0, 2, 5} and not set(np.unique(plain)) <= {0, 2, 5}
    assert model.routing.is_plain and model.routing.top_k is None
    again, _, _ = routing_trace.route(model, IDS)
    assert np.array_equal(again, plain)


def test_routing_override_is_part_of_the_routing(model):
    class Forced:
        def choice(self, layer, positions):
            return torch.tensor([[0, 1]]).expand(positions.shape[0], 2)

    model.routing_override = Forced()
    try:
        assert model.routing.override is model.routing_override
        experts, _, _ = routing_trace.route(model, IDS)
        assert (experts[..., :2] == np.array([0, 1])).all()
    finally:
        model.routing_override = None
    assert model.routing.is_plain


def test_moe_step_feeds_trust_weights_without_hooks(model):
    store = model.cache.store
    own = model.cache
    model.cache = ExpertCache(store, policy="trust")
    try:
        with capture(model, [f"blocks.{i}.mlp.hook_topk_{p}" for i in model.config.moe_layers
                             for p in ("indices", "weights")]) as acts:
            with torch.no_grad():
                model(torch.tensor([IDS]))
        policy = model.cache.policy
        assert isinstance(policy, TrustWeighted) and policy.step == 1
        for i in model.config.moe_layers:
            idx, w = acts[f"blocks.{i}.mlp.hook_topk_indices"], acts[f"blocks.{i}.mlp.hook_topk_weights"]
            for e in range(model.config.num_experts):
                expected = float(w[idx == e].sum())
                assert policy.value((i, e)) == pytest.approx(expected, abs=1e-6)
        with torch.no_grad():
            model(torch.tensor([IDS[:4]]))
        assert policy.step == 2  # a second forward pass decays the first one's trust
    finally:
        model.cache = own


def naive_lfu_hits(requests, capacity):
    """LFU by its definition: evict the least requested so far (counts kept across evictions), ties to the
    least recently used."""
    count, last, cache, hits = {}, {}, set(), 0
    for t, key in enumerate(requests):
        count[key] = count.get(key, 0) + 1
        if key in cache:
            hits += 1
        else:
            if len(cache) >= capacity:
                cache.remove(min(cache, key=lambda k: (count[k], last[k])))
            cache.add(key)
        last[key] = t
    return hits


@pytest.mark.parametrize("seed", range(4))
def test_lfu_heap_matches_its_definition(seed):
    requests = (np.random.default_rng(seed).zipf(1.3, 2000) % 30).tolist()
    for capacity in (1, 4, 11, 29):
        assert cache_sim.simulate_cache(requests, capacity, "lfu") == naive_lfu_hits(requests, capacity)


def test_lfu_victim_skips_pinned_and_keeps_them():
    policy = LFU()
    for key in [1, 1, 1, 2, 2, 3]:
        policy.touch(key)
    assert policy.victim(set()) == 3
    assert policy.victim({3}) == 2
    assert policy.victim({2, 3}) == 1
    assert policy.victim({1, 2, 3}) is None
    assert policy.victim(set()) == 3  # pinned entries were put back
    policy.remove(3)
    assert policy.victim(set()) == 2


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_simulation_replays_the_expert_cache(model, policy):
    """The cache simulation and the ExpertCache make the same hits on the same requests (the same policy)."""
    store = model.cache.store
    E = model.config.num_experts
    requests = (np.random.default_rng(1).zipf(1.5, 400) % (E * 2)).tolist()
    keys = [(model.config.moe_layers[r // E], r % E) for r in requests]
    capacity = 5
    cache = ExpertCache(store, capacity * store.expert_bytes, policy=policy)
    for layer, e in keys:
        cache.get(layer, e)
    assert cache.stats.hits == cache_sim.simulate_cache(requests, capacity, policy)
    assert 0 < cache.stats.hits < len(requests)


def test_make_policy():
    assert isinstance(make_policy("lru"), LRU) and isinstance(make_policy("trust"), TrustWeighted)
    p = LFU()
    assert make_policy(p) is p
    with pytest.raises(ValueError, match="fifo"):
        make_policy("fifo")
