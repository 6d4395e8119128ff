"""ExpertStore and ExpertCache: reading experts by tensor name, budgets, eviction policies, missing experts."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from omnilab import Checkpoint
from omnilab.arch import EXPERT_PROJECTIONS, expert_tensor
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.experts import ExpertCache, ExpertStore, LFU, MissingExpertError
from omnilab.model.hooks import run_with_cache
from omnilab.testing.breakage import drop_tensors

PROMPT = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 61, 128, 9, 33, 2]])


@pytest.fixture(scope="module")
def store(tiny_moe):
    ck = Checkpoint(tiny_moe)
    config, layout = ck.arch
    return ExpertStore(ck, config, layout)


def test_store_reads_projections_from_different_shards(tiny_omni):
    ck = Checkpoint(tiny_omni)
    config, layout = ck.arch
    store = ExpertStore(ck, config, layout)
    split = [(l, e) for l in config.moe_layers for e in range(config.num_experts)
             if len({ck.shard_of(expert_tensor(layout, l, e, p)) for p in EXPERT_PROJECTIONS}) > 1]
    assert split, "fixture should spread some expert over several shards"
    layer, expert = split[0]
    weights = store.load(layer, expert)
    for proj, got in zip(EXPERT_PROJECTIONS, weights):
        name = expert_tensor(layout, layer, expert, proj)
        with safe_open(str(ck.root / ck.shard_of(name)), "pt") as f:
            assert torch.equal(got, f.get_tensor(name))
    assert weights.nbytes == store.expert_bytes == 3 * 32 * 64 * 4


def test_default_budget_holds_everything(store):
    cache = ExpertCache(store)
    assert cache.budget_bytes == store.total_bytes
    for layer in store.config.moe_layers:
        for e in range(store.config.num_experts):
            cache.get(layer, e)
    assert cache.stats.evictions == 0 and cache.stats.resident_bytes == store.total_bytes


def test_lru_evicts_least_recently_used(store):
    cache = ExpertCache(store, budget_bytes=2 * store.expert_bytes, policy="lru")
    for e in (0, 1, 0, 2):
        cache.get(0, e)
    assert (0, 0) in cache and (0, 2) in cache and (0, 1) not in cache
    s = cache.stats
    assert (s.hits, s.misses, s.evictions) == (1, 3, 1)
    assert s.loaded_bytes == 3 * store.expert_bytes and s.peak_resident_bytes == 2 * store.expert_bytes
    assert s.load_seconds > 0


def test_lfu_evicts_least_frequently_used(store):
    cache = ExpertCache(store, budget_bytes=2 * store.expert_bytes, policy="lfu")
    for e in (0, 0, 0, 1, 2):  # LRU would evict 0 here (used before 1); LFU evicts 1 (used once)
        cache.get(0, e)
    assert (0, 0) in cache and (0, 1) not in cache
    assert isinstance(cache.policy, LFU)


def test_pinned_experts_are_never_evicted(store):
    cache = ExpertCache(store, budget_bytes=2 * store.expert_bytes, pinned=[(0, 5)])
    cache.get(0, 5)
    for e in range(5):
        cache.get(0, e)
    assert (0, 5) in cache
    with pytest.raises(ValueError, match="pinned"):
        ExpertCache(store, budget_bytes=store.expert_bytes, pinned=[(0, 1), (0, 2)])


def test_budget_smaller_than_one_expert_is_refused(store):
    with pytest.raises(ValueError, match="smaller than one expert"):
        ExpertCache(store, budget_bytes=store.expert_bytes - 1)


def test_resident_bytes_never_exceed_budget_during_a_run(tiny_moe):
    budget = 3 * 3 * 32 * 64 * 4  # three experts of the tiny fixture, in fp32
    sel = SelectiveMoE.from_checkpoint(tiny_moe, expert_budget=budget)
    cache, seen = sel.cache, []
    original = cache.get

    def watched(layer, expert):
        out = original(layer, expert)
        seen.append(sum(w.nbytes for w in cache.resident.values()))  # counted here, not by the cache's stats
        return out

    cache.get = watched
    sel.generate(PROMPT[0].tolist(), 8, vocab_limit=None)
    assert seen and max(seen) <= budget
    assert cache.stats.peak_resident_bytes <= budget and cache.stats.evictions > 0


# -- missing experts: refuse by default, mask on request -----------------------------------------------------------


@pytest.fixture(scope="module")
def missing_experts(tiny_moe, tmp_path_factory):
    """The tiny moe with experts 2 and 5 of layer 1 gone (all three projections), and one projection of
    expert 6 of layer 2 (a partial expert)."""
    from omnilab.testing.breakage import copy_checkpoint

    ck = Checkpoint(tiny_moe)
    _, layout = ck.arch
    dst = copy_checkpoint(tiny_moe, tmp_path_factory.mktemp("missing") / "ckpt")
    names = [expert_tensor(layout, 1, e, p) for e in (2, 5) for p in EXPERT_PROJECTIONS]
    drop_tensors(dst, names + [expert_tensor(layout, 2, 6, "down_proj")])
    return dst


def test_missing_experts_are_refused_naming_the_tensor(missing_experts):
    with pytest.raises(MissingExpertError, match=r"model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight"):
        SelectiveMoE.from_checkpoint(missing_experts)


def test_mask_missing_experts_restricts_the_router(missing_experts):
    sel = SelectiveMoE.from_checkpoint(missing_experts, mask_missing_experts=True)
    ids = torch.arange(0, 300, 7)[None]  # 43 tokens: some of them want a missing expert
    _, acts = run_with_cache(sel, ids)
    assert not set(acts["blocks.1.mlp.hook_topk_indices"].unique().tolist()) & {2, 5}
    assert 6 not in acts["blocks.2.mlp.hook_topk_indices"].unique().tolist()
    # the count matches what the unmasked router (same logits) would have picked among the missing experts
    k = sel.config.num_experts_per_tok
    wanted = {i: acts[f"blocks.{i}.mlp.hook_router_logits"].topk(k, dim=-1).indices for i in (1, 2)}
    expected = int(torch.isin(wanted[1], torch.tensor([2, 5])).sum() + (wanted[2] == 6).sum())
    assert expected > 0 and sel.cache.stats.masked_choices == expected
