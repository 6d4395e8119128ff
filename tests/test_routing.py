"""Routing statistics and the cache simulation on synthetic traces whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from omnilab.experiments import cache_sim, routing
from omnilab.trace import record as routing_trace

E, K, L = 8, 2, 3
DOMAINS = ["en", "fr", "python", "arith"]


def make_trace(choose, *, docs_per_domain=3, tokens=20, layers=L, seed=0, token_ids=None):
    """choose(rng, domain_index, token_id, layer, position) -> K distinct experts (rank order)."""
    rng = np.random.default_rng(seed)
    parts, doc = [], 0
    for d, domain in enumerate(DOMAINS):
        for _ in range(docs_per_domain):
            ids = rng.integers(0, 30, tokens) if token_ids is None else np.asarray(token_ids)
            experts = np.array([[choose(rng, d, ids[t], layer, t) for t in range(len(ids))] for layer in range(layers)])
            parts.append(routing_trace.trace_rows(doc, domain, ids, experts))
            doc += 1
    return routing_trace.concat_traces(parts, num_experts=E, top_k=K, num_layers=layers)


def random_choice(rng, d, tok, layer, pos):
    return rng.choice(E, K, replace=False)


# ------------------------------------------------------------------------------------------------ trace


def test_trace_rows_order_and_values():
    experts = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 0]]])  # [layers 2, tokens 2, k 2]
    weights = experts / 10
    entropy = np.array([[0.1, 0.2], [0.3, 0.4]])
    t = routing_trace.trace_rows(7, "en", [11, 12], experts, weights, entropy)
    assert list(t.columns) == routing.TRACE_COLUMNS
    assert t[["position", "layer", "rank"]].values.tolist() == [
        [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    assert t["expert"].tolist() == [1, 2, 5, 6, 3, 4, 7, 0]
    assert t["token_id"].tolist() == [11, 11, 11, 11, 12, 12, 12, 12]
    np.testing.assert_allclose(t["weight"], t["expert"] / 10, rtol=1e-6)
    np.testing.assert_allclose(t["entropy"], [0.1, 0.1, 0.3, 0.3, 0.2, 0.2, 0.4, 0.4], rtol=1e-6)
    with pytest.raises(ValueError, match="doc 7"):
        routing_trace.trace_rows(7, "en", [11], experts)


def test_router_entropy_bits():
    assert routing_trace.router_entropy(np.zeros(8)) == pytest.approx(3.0)
    assert routing_trace.router_entropy(np.array([0.0, -1e9, -1e9, -1e9])) == pytest.approx(0.0, abs=1e-9)


def test_load_documents(tmp_path):
    path = tmp_path / "eval.jsonl"
    rows = [{"domain": d, "id": f"{d}{i}", "text": f"{d} text {i}"} for d in ("en", "fr") for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = routing.load_documents(path, per_domain=2)
    assert docs["domain"].value_counts().to_dict() == {"en": 2, "fr": 2}
    assert all(t.startswith(d) for d, t in zip(docs["domain"], docs["text"]))
    path.write_text(json.dumps({"lang": "en", "body": "x"}) + "\n")
    with pytest.raises(ValueError, match="eval.jsonl"):
        routing.load_documents(path)


# ------------------------------------------------------------------------------------------------ statistics


def test_expert_load_rows_and_skew():
    trace = make_trace(lambda rng, d, tok, layer, pos: [layer, 7] if pos % 2 else [layer, 6])
    load = routing.expert_load(trace)
    assert load.shape == (L, E)
    np.testing.assert_allclose(load.sum(axis=1), 1.0)
    for layer in range(L):
        assert load.loc[layer, layer] == pytest.approx(0.5)
    assert load.loc[0, 5] == 0.0


def test_domain_determines_expert_gives_mi_equal_to_domain_entropy():
    # domain d always routes to experts {2d, 2d+1}: the expert names the domain
    trace = make_trace(lambda rng, d, tok, layer, pos: [2 * d, 2 * d + 1])
    spec = routing.specialization(trace, shuffles=6)
    np.testing.assert_allclose(spec["mi_bits"], 2.0, rtol=1e-9)  # 4 equal domains
    np.testing.assert_allclose(spec["domain_entropy_bits"], 2.0, rtol=1e-9)
    np.testing.assert_allclose(spec["mi_share"], 1.0, rtol=1e-9)
    assert (spec["baseline_mean"] < spec["mi_bits"]).all()
    table = routing.domain_expert(trace, layer=1)
    assert table.loc["python", 4] == pytest.approx(0.5) and table.loc["python", 0] == 0.0


def test_random_routing_mi_near_its_baseline():
    trace = make_trace(random_choice, docs_per_domain=6, tokens=60)
    spec = routing.specialization(trace, shuffles=8)
    assert (spec["mi_bits"] < 0.05).all()
    assert (spec["mi_bits"] < spec["baseline_mean"] + 5 * spec["baseline_std"] + 1e-3).all()


def test_mutual_information_matches_entropy_identity():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, 5000)
    b = (a + rng.integers(0, 2, 5000)) % 4
    joint = pd.Series(list(zip(a, b)))
    h = routing.entropy_bits
    assert routing.mutual_information(a, b) == pytest.approx(h(a) + h(b) - h(joint.astype(str)), abs=1e-9)


def test_conditional_mi_given_token():
    rng = np.random.default_rng(2)
    tok = rng.integers(0, 6, 20000)
    dom = rng.integers(0, 3, 20000)
    # the expert is a function of the token alone: the domain adds nothing once the token is known
    assert routing.conditional_mutual_information(dom, tok % 4, tok) == pytest.approx(0.0, abs=2e-3)
    # the expert is the domain: given the token (independent of it) the domain still names the expert
    assert routing.conditional_mutual_information(dom, dom, tok) == pytest.approx(routing.entropy_bits(dom), abs=2e-3)
    # with a constant condition it is plain MI
    e = (dom + rng.integers(0, 2, 20000)) % 3
    assert routing.conditional_mutual_information(dom, e, np.zeros_like(dom)) == pytest.approx(
        routing.mutual_information(dom, e), abs=1e-9)


def test_domain_signal_through_tokens_vanishes_given_the_token():
    # each domain has its own tokens and the expert follows the token: MI is high, conditional MI ~ 0
    trace = make_trace(lambda rng, d, tok, layer, pos: [tok % E, (tok + 1) % E], docs_per_domain=4, tokens=40,
                       token_ids=None)
    trace["token_id"] = trace["token_id"] % 4 + 4 * trace["domain"].cat.codes  # disjoint vocabularies
    trace["expert"] = (trace["token_id"] + trace["rank"]) % E
    spec = routing.specialization(trace, shuffles=4)
    assert (spec["mi_bits"] > 0.5).all()
    assert (spec["cmi_bits"] < 1e-9).all()


def test_token_specialization_when_token_determines_expert():
    trace = make_trace(lambda rng, d, tok, layer, pos: [tok % E, (tok + 1) % E], tokens=40)
    tokens = routing.token_specialization(trace, min_count=4)
    np.testing.assert_allclose(tokens["share"], 1.0)
    assert (tokens["baseline"] < 0.8).all()
    assert (tokens["chance"] == K / E).all()
    domains = routing.token_specialization(trace, by="domain", min_count=4)
    assert (domains["share"] < 0.6).all()  # token ids are spread evenly over domains


def test_coactivation_rows():
    trace = make_trace(random_choice, docs_per_domain=4, tokens=50)
    p = routing.coactivation(trace, 0)
    assert p.shape == (E, E)
    np.testing.assert_allclose(np.diag(p), 0.0)
    np.testing.assert_allclose(p.sum(axis=1), K - 1)
    # experts 1 and 3 always together, 0 and 5 always together
    pairs = make_trace(lambda rng, d, tok, layer, pos: [1, 3] if pos % 2 else [5, 0])
    p = routing.coactivation(pairs, 2)
    assert p.loc[1, 3] == 1.0 and p.loc[3, 1] == 1.0 and p.loc[1, 5] == 0.0 and p.loc[2].sum() == 0.0
    top = routing.top_coactivated(pairs, n=4)
    assert set(map(tuple, top[["a", "b"]].values)) == {(1, 3), (3, 1), (0, 5), (5, 0)}
    np.testing.assert_allclose(top["lift"], 2.0)


def test_same_expert_rate_constant_and_alternating():
    const = routing.same_expert_rate(make_trace(lambda rng, d, tok, layer, pos: [4, 1]))
    np.testing.assert_allclose(const[["top1_rate", "top1_chance", "overlap_rate", "overlap_chance"]], 1.0)
    alt = routing.same_expert_rate(make_trace(lambda rng, d, tok, layer, pos: [pos % 2, 2 + pos % 2]))
    np.testing.assert_allclose(alt["top1_rate"], 0.0)
    np.testing.assert_allclose(alt["top1_chance"], 0.5)
    assert (alt["pairs"] == len(DOMAINS) * 3 * 19).all()  # pairs never cross documents


# ------------------------------------------------------------------------------------------------ cache


def brute_force_min_misses(requests, capacity):
    """Fewest misses over every eviction choice (exhaustive, tiny inputs only)."""
    states = {frozenset(): 0}
    for key in requests:
        nxt = {}
        for cache, misses in states.items():
            if key in cache:
                options = [(cache, misses)]
            elif len(cache) < capacity:
                options = [(cache | {key}, misses + 1)]
            else:
                options = [((cache - {v}) | {key}, misses + 1) for v in cache]
            for c, m in options:
                nxt[c] = min(nxt.get(c, math.inf), m)
        states = nxt
    return min(states.values())


def test_cyclic_pattern_lru_zero_belady_optimal():
    m, capacity, rounds = 5, 4, 6
    requests = list(range(m)) * rounds
    assert cache_sim.simulate_cache(requests, capacity, "lru") == 0
    assert cache_sim.simulate_cache(requests, capacity, "lfu") == 0  # equal counts: ties go to LRU
    best = len(requests) - brute_force_min_misses(requests, capacity)
    assert cache_sim.simulate_cache(requests, capacity, "belady") == best
    assert best > 0


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal_on_small_random_sequences(seed):
    rng = np.random.default_rng(seed)
    requests = rng.integers(0, 5, 14).tolist()
    for capacity in (1, 2, 3):
        best = len(requests) - brute_force_min_misses(requests, capacity)
        assert cache_sim.simulate_cache(requests, capacity, "belady") == best


def test_belady_at_least_lru_and_lfu():
    rng = np.random.default_rng(3)
    requests = rng.zipf(1.4, 3000) % 40
    for capacity in (1, 3, 8, 20, 39, 40):
        b = cache_sim.simulate_cache(requests, capacity, "belady")
        assert b >= cache_sim.simulate_cache(requests, capacity, "lru")
        assert b >= cache_sim.simulate_cache(requests, capacity, "lfu")
    assert cache_sim.simulate_cache(requests, 40, "lru") == len(requests) - len(set(requests.tolist()))


def test_lru_and_lfu_by_hand():
    a, b, c = 0, 1, 2
    seq = [a, a, a, b, c, b, c, b, c]
    # LRU(2): a a(hit) a(hit) b c(evict a) b(hit) c(hit) b(hit) c(hit) -> 6 hits
    assert cache_sim.simulate_cache(seq, 2, "lru") == 6
    # LFU(2): a (count 3) stays; b and c evict each other: a a a b c b c b c -> 2 hits
    assert cache_sim.simulate_cache(seq, 2, "lfu") == 2
    assert cache_sim.simulate_cache(seq, 0, "lru") == 0
    with pytest.raises(ValueError, match="policy"):
        cache_sim.simulate_cache(seq, 2, "fifo")


def test_request_sequence_and_hit_rate_curve():
    trace = make_trace(random_choice, docs_per_domain=2, tokens=15)
    req = cache_sim.request_sequence(trace)
    first = trace[(trace["doc"] == 0) & (trace["position"] == 0)]
    assert req[: L * K].tolist() == (first["layer"] * E + first["expert"]).tolist()
    assert len(req) == len(trace)
    curve = cache_sim.hit_rate_curve(trace, sizes=[2, 6, 12, E * L], policies=("lru", "lfu", "belady"))
    wide = curve.pivot(index="size", columns="policy", values="hit_rate")
    assert (wide["belady"] >= wide[["lru", "lfu"]].max(axis=1)).all()
    assert wide["lru"].is_monotonic_increasing and wide["belady"].is_monotonic_increasing
    assert wide.loc[E * L].nunique() == 1  # everything fits: only cold misses, the same for all
    assert curve["share"].max() == 1.0
    spec = routing.specialization(trace, shuffles=2)
    tok = routing.token_specialization(trace, min_count=2)
    dom = routing.token_specialization(trace, by="domain", min_count=2)
    metrics = routing.summarize(spec, tok, dom, routing.same_expert_rate(trace), curve)
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in metrics.values())
    assert metrics["hit_rate_belady_25pct"] >= metrics["hit_rate_lru_25pct"]


# ------------------------------------------------------------------------------------------------ recording


def test_record_trace_matches_transformers_routing(tiny_omni):
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.reference.whole import Reference

    docs = pd.DataFrame({"domain": ["en", "en", "en", "python"],
                         "text": ["The quick brown fox jumps over the lazy dog.", "Mixture-of-Experts models route.",
                                  "never traced: per_domain is 2", "def add(a, b):\n    return a + b\n"]})
    model = SelectiveMoE.from_checkpoint(tiny_omni)
    cfg = model.config
    trace = routing_trace.record_trace(model, None, docs, max_tokens=9, per_domain=2, progress=False)
    lengths = [min(9, len(model.tokenizer(t)["input_ids"])) for t in docs["text"][[0, 1, 3]]]
    assert len(trace) == sum(lengths) * len(cfg.moe_layers) * cfg.num_experts_per_tok
    assert trace.attrs == dict(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                               num_layers=len(cfg.moe_layers))
    assert trace.groupby("doc")["domain"].first().tolist() == ["en", "en", "python"]
    assert trace["entropy"].between(0, math.log2(cfg.num_experts) + 1e-5).all()
    sums = trace.groupby(["doc", "position", "layer"])["weight"].sum()
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)  # norm_topk_prob
    # the same documents through transformers' own model, read at the same hook names
    ref = routing_trace.record_trace(Reference.from_checkpoint(tiny_omni), model.tokenizer, docs, max_tokens=9,
                               per_domain=2, progress=False)
    assert trace["expert"].tolist() == ref["expert"].tolist()
    np.testing.assert_allclose(trace["weight"], ref["weight"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trace["entropy"], ref["entropy"], rtol=1e-4, atol=1e-5)
