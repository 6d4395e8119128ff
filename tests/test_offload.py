"""Offloaded decoding (omnilab.gpu.offload) on CPU, fp32, tiny checkpoints: every slot budget, with and without
prefetch, from either host tier, under every eviction policy, yields the all-resident path's tokens, with routing
forced by a trace too; the statistics add up; the slots evict as the eager cache's policies would per layer, and
TrustWeighted sees the routing weights. (Copies on a side stream and the per-layer CUDA graphs need a GPU:
bench/offload.py, tests/gpu/; on CPU the same segmented step runs uncaptured.)"""

from __future__ import annotations

import random
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from omnilab.gpu.fast import FastDecoder
from omnilab.gpu.host import HostTier
from omnilab.gpu.offload import OffloadDecoder
from omnilab.gpu.slot_cache import SlotCache
from omnilab.model.experts import LFU, LRU, POLICIES, ExpertCache, ExpertWeights, TrustWeighted
from omnilab.model.routing import RoutingOverride
from omnilab.testing.traces import locality_trace
from omnilab.model.decoder import SelectiveMoE

PROMPT = [3, 17, 42, 5, 99, 7, 64, 12]
N = 12


@pytest.fixture(scope="module")
def model(tiny_omni):
    return SelectiveMoE.from_checkpoint(tiny_omni, tokenizer=False)


@pytest.fixture(scope="module")
def tiers(model):
    config, layout = model.checkpoint.arch
    return {"copy": HostTier.copy(model.checkpoint, config, layout, model.dtype, pin=False),
            "mapped": HostTier.mapped(model.checkpoint, config, layout, register=False)}


@pytest.mark.parametrize("tier", ["copy", "mapped"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_every_budget_gives_the_resident_tokens(model, tiers, tier, prefetch):
    cfg = model.config
    want = FastDecoder(model, max_len=64).generate(PROMPT, N).new_token_ids
    forced = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(0))
    want_forced = FastDecoder(model, max_len=64).generate(PROMPT, N, forced=forced).new_token_ids
    for slots in sorted({cfg.num_experts_per_tok, (cfg.num_experts_per_tok + cfg.num_experts) // 2, cfg.num_experts}):
        decoder = OffloadDecoder(model, tiers[tier], slots=slots, max_len=64, prefetch=prefetch)
        assert decoder.generate(PROMPT, N).new_token_ids == want, slots
        st = decoder.stats
        assert st.hits + st.prefetch_hits + st.misses == (N - 1) * len(cfg.moe_layers) * cfg.num_experts_per_tok
        assert st.bytes_moved == (st.misses + st.prefetched) * decoder.pool.expert_bytes
        assert decoder.generate(PROMPT, N, forced=forced).new_token_ids == want_forced, slots
    assert (st.prefetched > 0) == prefetch


def test_forced_trace_gives_the_same_tokens_at_every_budget(model, tiers):
    cfg = model.config
    trace = locality_trace(len(cfg.moe_layers), len(PROMPT) + N, cfg.num_experts, cfg.num_experts_per_tok, seed=4)
    override = RoutingOverride.from_trace(trace, cfg.moe_layers)
    want = FastDecoder(model, max_len=64, override=override).generate(PROMPT, N)
    for slots in (cfg.num_experts_per_tok, cfg.num_experts):
        decoder = OffloadDecoder(model, tiers["copy"], slots=slots, max_len=64, override=override)
        got = decoder.generate(PROMPT, N)
        assert got.new_token_ids == want.new_token_ids
        routed = torch.stack([r[:, 0] for r in decoder.routing[1:]], dim=1)  # decode steps: [moe layers, N - 1, k]
        assert torch.equal(routed, trace[:, len(PROMPT):len(PROMPT) + N - 1])


def test_all_slots_never_miss_after_warm_up(model, tiers):
    cfg = model.config
    decoder = OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts, max_len=64, prefetch=False)
    for e in range(cfg.num_experts):  # every expert resident
        for layer in cfg.moe_layers:
            decoder.cache.fetch(layer, e, set(), prefetch=False)
    decoder.generate(PROMPT, N)
    assert decoder.stats.misses == 0 and decoder.stats.hit_rate == 1.0


def test_too_few_slots_is_a_one_line_error(model, tiers):
    with pytest.raises(ValueError, match="fewer than top-"):
        OffloadDecoder(model, tiers["copy"], slots=model.config.num_experts_per_tok - 1)


@pytest.mark.parametrize("tier", ["copy", "mapped"])
def test_host_spans_hold_the_expert_bytes(model, tiers, tier):
    """The byte spans a miss copies (HostTier.spans), read back from their host addresses in offset order, are
    the expert's down|gate|up (a slot's layout); the copy tier holds each expert in one span (one copy). (The tiny
    checkpoint's shards are so small that its experts straddle shards: several spans from the shard maps.)"""
    import ctypes

    from omnilab.arch import EXPERT_PROJECTIONS, expert_tensor
    from omnilab.gpu.slots import SLOT_ORDER

    config, layout = model.checkpoint.arch
    host = tiers[tier]
    for layer in config.moe_layers:
        for e in (0, config.num_experts - 1):
            spans = host.spans(layer, e)
            got = b"".join(ctypes.string_at(ptr, n) for ptr, n, _ in sorted(spans, key=lambda s: s[2]))
            dtype = host.expert(layer, e)[0].dtype
            want = b"".join(model.checkpoint.read(expert_tensor(layout, layer, e, p)).to(dtype).contiguous()
                            .view(torch.uint8).numpy().tobytes() for p in (EXPERT_PROJECTIONS[j] for j in SLOT_ORDER))
            assert got == want, (tier, layer, e)
            offsets = [off for _, _, off in spans]
            assert offsets == sorted(offsets) and offsets[0] == 0
            if tier == "copy":
                assert len(spans) == 1, spans


def test_profile_times_every_phase_and_changes_nothing(model, tiers):
    cfg = model.config
    from omnilab.gpu.phases import PHASES

    decoder = OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts_per_tok, max_len=64, prefetch=False)
    want = decoder.generate(PROMPT, N).new_token_ids
    assert decoder.generate(PROMPT, N, profile=True).new_token_ids == want
    phases = decoder.profile["phase_ms"]
    assert set(PHASES) <= set(phases) and all(phases[p] >= 0 for p in PHASES)
    # the phases tile the step: their sum is the whole step
    assert sum(phases[p] for p in PHASES) == pytest.approx(phases["whole step"], rel=1e-6)
    assert phases["attention + router"] > 0 and phases["experts after the last copy"] > 0


def test_driver_copies_need_cuda(model, tiers):
    with pytest.raises(ValueError, match="driver"):
        OffloadDecoder(model, tiers["copy"], slots=model.config.num_experts, issue="driver")


def test_one_choice_at_a_time_equals_the_grouped_mix():
    """A decode step computes each routed choice on its own (expert_choice, on a SlabPool's slab) and sums them as
    step.expert_mix does; in fp32 on CPU that is bitwise the grouped mix over the slab's strided views, which
    is itself bitwise the mix over contiguous copies."""
    from types import SimpleNamespace

    from omnilab.gpu.segments import expert_choice
    from omnilab.gpu.slots import SlabPool
    from omnilab.gpu.step import expert_mix

    cfg = SimpleNamespace(num_experts=6, hidden_size=64, moe_intermediate_size=32, moe_layers=[0])
    pool = SlabPool(cfg, 5, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    pool.slab[0].copy_(torch.randn(pool.slab[0].shape, generator=gen))
    x = torch.randn(1, 64, generator=gen)
    slots = torch.tensor([[3, 0, 4, 1]])
    weights = torch.rand(1, 4, generator=gen)
    grouped = expert_mix(x, slots, weights, pool.gate_up[0], pool.down[0], torch.arange(5), "grouped_mm")
    contiguous = expert_mix(x, slots, weights, pool.gate_up[0].contiguous(), pool.down[0].contiguous(),
                            torch.arange(5), "grouped_mm")
    rows = torch.cat([expert_choice(x, slots[0, c:c + 1], weights[:, c:c + 1], pool.slab[0], 64, 32)
                      for c in range(4)])  # [k, H]
    assert torch.equal(grouped, contiguous)
    assert torch.equal(rows.view(1, 4, 64).sum(dim=1), grouped)
    assert not torch.equal(rows[0], rows[1])  # the choices really are different experts


def test_prefill_logits_do_not_depend_on_the_budget(model, tiers):
    """A prompt routing to more experts than a layer's slots is mixed in chunks of resident experts; the chunks
    must not change the arithmetic: the prefill logits are bitwise those of the all-slots budget."""
    cfg = model.config
    prompt = torch.tensor([PROMPT * 3])  # [1, 24]: many distinct experts per layer
    logits = {}
    for slots in (cfg.num_experts_per_tok, cfg.num_experts):
        decoder = OffloadDecoder(model, tiers["copy"], slots=slots, max_len=64, prefetch=False)
        with torch.no_grad():
            logits[slots] = decoder.forward(prompt, torch.arange(prompt.shape[1]))
    assert torch.equal(logits[cfg.num_experts_per_tok], logits[cfg.num_experts])


@pytest.mark.parametrize("tier", ["copy", "mapped"])
def test_slot_step_gives_the_resident_tokens_at_every_budget(model, tiers, tier):
    """step="slot" (per-slot expert segments, the sum folded into the next layer's attention segment, the last
    miss computed in two halves) yields the all-resident tokens at every budget, unforced and teacher-forced,
    with the routing forced by a trace too, and the same statistics as step="choice"."""
    cfg = model.config
    forced = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(0))
    trace = locality_trace(len(cfg.moe_layers), len(PROMPT) + N, cfg.num_experts, cfg.num_experts_per_tok, seed=4)
    override = RoutingOverride.from_trace(trace, cfg.moe_layers)
    want = FastDecoder(model, max_len=64).generate(PROMPT, N).new_token_ids
    want_forced = FastDecoder(model, max_len=64).generate(PROMPT, N, forced=forced).new_token_ids
    want_trace = FastDecoder(model, max_len=64, override=override).generate(PROMPT, N).new_token_ids
    k, E = cfg.num_experts_per_tok, cfg.num_experts
    for slots in sorted({k, (k + E) // 2, E}):
        decoder = OffloadDecoder(model, tiers[tier], slots=slots, max_len=64, prefetch=False, step="slot")
        assert decoder.generate(PROMPT, N).new_token_ids == want, slots
        assert decoder.generate(PROMPT, N, forced=forced).new_token_ids == want_forced, slots
        traced = OffloadDecoder(model, tiers[tier], slots=slots, max_len=64, prefetch=False, step="slot",
                                override=override)
        assert traced.generate(PROMPT, N).new_token_ids == want_trace, slots
        before = OffloadDecoder(model, tiers[tier], slots=slots, max_len=64, prefetch=False, override=override)
        before.generate(PROMPT, N)
        assert traced.stats.to_dict() == before.stats.to_dict()
        if slots == k:
            assert traced.stats.misses > 0  # the split last miss really ran


def test_slot_step_profile_and_refusals(model, tiers):
    cfg = model.config
    decoder = OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts_per_tok, max_len=64, prefetch=False,
                             step="slot")
    want = decoder.generate(PROMPT, N).new_token_ids
    assert decoder.generate(PROMPT, N, profile=True).new_token_ids == want
    from omnilab.gpu.phases import PHASES

    phases = decoder.profile["phase_ms"]
    assert sum(phases[p] for p in PHASES) == pytest.approx(phases["whole step"], rel=1e-6)
    with pytest.raises(ValueError, match="prefetch"):
        OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts, step="slot", prefetch=True)
    with pytest.raises(ValueError, match="step="):
        OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts, step="layer")


def test_split_spans_cut_at_the_down_projection():
    """split_spans: the gate|up part and the down part of a miss's spans cover the slot's bytes exactly once, the
    down part being bytes [0, down) of the slot, whether the expert is one span or straddles several."""
    from omnilab.gpu.host import split_spans

    down, total = 100, 300
    for spans in ([(1000, 300, 0)], [(1000, 60, 0), (5000, 90, 60), (9000, 150, 150)], [(1000, 100, 0), (7, 200, 100)]):
        first, second = split_spans(spans, down)
        assert all(off >= down for _, _, off in first) and all(off + n <= down for _, n, off in second)
        covered = sorted((off, n) for _, n, off in first + second)
        assert sum(n for _, n in covered) == total and covered[0][0] == 0
        for (o1, n1), (o2, _) in zip(covered, covered[1:]):
            assert o1 + n1 == o2
        # each piece still reads the host bytes that belong at its slot offset
        def host_at(off):
            return next(src + off - o for src, n, o in spans if o <= off < o + n)
        assert all(src == host_at(off) for src, _, off in first + second)


@pytest.mark.parametrize("share", [0.05, 0.5, 1.0, "auto"])
def test_hybrid_host_compute_gives_the_resident_tokens(model, tiers, share):
    """Misses computed on the host's cores (host_share) instead of copied: the resident path's tokens, free and
    teacher-forced; every routed choice counted once as a hit, a miss or a host-computed choice."""
    cfg = model.config
    k, L = cfg.num_experts_per_tok, len(cfg.moe_layers)
    forced = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(1))
    want = FastDecoder(model, max_len=64).generate(PROMPT, N, forced=forced).new_token_ids
    decoder = OffloadDecoder(model, tiers["copy"], slots=k, max_len=64, prefetch=False, host_share=share)
    first = decoder.host_share
    assert 0.0 < first <= 1.0
    assert decoder.generate(PROMPT, N, forced=forced).new_token_ids == want
    st = decoder.stats
    assert st.hits + st.prefetch_hits + st.misses + st.host_computed == (N - 1) * L * k
    # the host computes its share of all misses, the fraction a layer leaves over carried to the next: a share
    # below one choice a layer (0.05 of k = 2 here; "auto" on a CPU, where copies are fast) still reaches the host
    missed = st.misses + st.host_computed
    assert st.host_computed > 0
    if share != "auto":
        assert abs(st.host_computed - share * missed) <= 1, (st.host_computed, share * missed)
    assert (decoder.host_share != first) == (share == "auto" and st.host_computed > 0)  # observe_host: auto only
    assert st.bytes_moved == st.misses * decoder.pool.expert_bytes  # the host-computed experts were not copied
    if share == 1.0:
        assert st.misses == 0 and st.bytes_moved == 0
    assert "host_computed" in st.to_dict()


def test_hybrid_host_takes_the_misses_routed_longest_ago(model, tiers):
    """The host computes the misses whose experts the layer routed to longest ago (never routed first, then the
    later choices), so the copies, which stay in the slots, are the ones a locality of routing routes to again."""
    cfg = model.config
    k, E, layer = cfg.num_experts_per_tok, cfg.num_experts, int(cfg.moe_layers[0])
    assert k % 2 == 0 and E >= 2 * k
    decoder = OffloadDecoder(model, tiers["copy"], slots=k, max_len=64, prefetch=False, host_share=0.5)
    half = k // 2
    _, _, host = decoder.route_step(layer, list(range(k)))  # k misses, none routed before: the later half
    assert host == list(range(half, k))
    # the host's experts of that step (routed, not resident) again, behind as many never routed: the new ones go to
    # the host, the ones routed a step ago are copied into slots
    again = list(range(half, k))
    new = list(range(k, k + half))
    _, _, host = decoder.route_step(layer, new + again)
    assert host == list(range(half))
    assert set(again) <= set(decoder.cache.where[layer]) and not set(new) & set(decoder.cache.where[layer])


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_recorded_residuals_are_the_eager_paths_at_the_decoded_positions(model, tiers, share):
    """record_residuals: each decode step's residual after each MoE layer, copied or host-computed, equals the
    eager model's blocks.{i}.hook_resid_post over the whole teacher-forced sequence at that position (fp32)."""
    from omnilab.model.hooks import RESID_POST, layer_hook, run_with_cache

    cfg = model.config
    forced = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(3))
    decoder = OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts_per_tok, max_len=64, prefetch=False,
                             host_share=share)
    decoder.generate(PROMPT, N, forced=forced, record_residuals=True)
    assert (decoder.stats.host_computed > 0) == (share > 0)
    ids = torch.tensor([PROMPT + forced[:N - 1].tolist()])  # [1, P + N - 1]: the decode steps' inputs after the prompt
    names = [layer_hook(i, RESID_POST) for i in cfg.moe_layers]
    with torch.no_grad():
        _, acts = run_with_cache(model, ids, names=names)
    assert sorted(decoder.residuals) == sorted(names)
    for name in names:
        got, want = decoder.residuals[name], acts[name][:, len(PROMPT):]  # [1, N - 1, H]
        assert got.shape == want.shape == (1, N - 1, cfg.hidden_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="record_residuals needs the segmented step='choice'"):
        OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts, step="slot", prefetch=False).generate(
            PROMPT, 3, record_residuals=True)


def test_compare_decode_puts_each_layer_beside_transformers_bf16_noise(tiny_omni, tiers):
    """compare_decode on a bf16 model: the hybrid decode's residuals (a share of the misses on the host) and the
    copied decode's sit within 4x transformers' own bf16-vs-fp32 error at every layer; a residual stream bent by 5%
    at one layer is caught there; a run of another length is refused."""
    from omnilab.reference.compare import compare_decode
    from omnilab.reference.streamed import StreamedReference

    bf16 = SelectiveMoE.from_checkpoint(tiny_omni, tokenizer=False, dtype=torch.bfloat16)
    cfg = bf16.config
    config, layout = bf16.checkpoint.arch
    tier = HostTier.copy(bf16.checkpoint, config, layout, torch.bfloat16, pin=False)
    forced = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(4))
    decoded = {}
    for label, share in (("copied", 0.0), ("hybrid", 0.5)):
        decoder = OffloadDecoder(bf16, tier, slots=cfg.num_experts_per_tok, max_len=64, prefetch=False,
                                 host_share=share)
        decoder.generate(PROMPT, N, forced=forced, record_residuals=True)
        decoded[label] = decoder.residuals
    layer = cfg.moe_layers[len(cfg.moe_layers) // 2]
    bent = dict(decoded["hybrid"])
    name = f"blocks.{layer}.hook_resid_post"
    bent[name] = bent[name] * 1.05
    decoded["bent"] = bent
    ids = PROMPT + forced[:N - 1].tolist()
    table = compare_decode(decoded, StreamedReference(tiny_omni), ids, len(PROMPT), torch.bfloat16)
    assert list(table.layer) == list(cfg.moe_layers)
    assert (table.noise > 0).all() and (table.threshold >= 4 * table.noise).all()
    assert table["copied within"].all() and table["hybrid within"].all(), table
    assert not table.set_index("layer").loc[layer, "bent within"] and table["bent within"].sum() == len(table) - 1
    with pytest.raises(ValueError, match="outside input_ids"):
        compare_decode(decoded, StreamedReference(tiny_omni), ids[:-1], len(PROMPT), torch.bfloat16)


def test_auto_host_share_follows_the_steps_own_host_time(model, tiers):
    """observe_host: with host_share="auto" a step's host seconds per host-computed choice are averaged into the
    host's time per expert and the share becomes copy / (copy + host); a fixed share stays as given."""
    cfg = model.config
    auto = OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts_per_tok, max_len=64, prefetch=False,
                          host_share="auto")
    auto.host_rates.update(copy_s=1.0, host_s=1.0, share=0.5)
    auto.observe_host(6.0, 2)  # 3 s a choice in the step: the host's time becomes (1 + 3) / 2
    assert auto.host_rates["host_s"] == 2.0 and auto.host_share == pytest.approx(1 / 3)
    auto.observe_host(0.0, 0)  # a step with no host choice changes nothing
    assert auto.host_share == pytest.approx(1 / 3)
    fixed = OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts_per_tok, max_len=64, prefetch=False,
                           host_share=0.5)
    fixed.observe_host(6.0, 2)
    assert fixed.host_share == 0.5 and fixed.host_rates is None


def test_hybrid_host_share_refusals(model, tiers):
    cfg = model.config
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="host_share"):
            OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts, host_share=bad)
    with pytest.raises(ValueError, match="host_share needs step='choice'"):
        OffloadDecoder(model, tiers["copy"], slots=cfg.num_experts, step="slot", prefetch=False, host_share=0.5)


def test_hybrid_from_a_tier_in_another_dtype_computes_in_the_models(model):
    """A host tier in bf16 under an fp32 model (the copies cast on the way): the host's experts are computed in
    fp32 too (expert_on_host casts the weights): the all-copied decoder's tokens, and the slot's arithmetic."""
    cfg = model.config
    config, layout = model.checkpoint.arch
    tier = HostTier.copy(model.checkpoint, config, layout, torch.bfloat16, pin=False)
    assert {t.dtype for t in tier.expert(cfg.moe_layers[0], 0)} == {torch.bfloat16} != {model.dtype}
    run = {share: OffloadDecoder(model, tier, slots=cfg.num_experts_per_tok, max_len=64, prefetch=False,
                                 host_share=share) for share in (0.0, 1.0)}
    tokens = {share: d.generate(PROMPT, N).new_token_ids for share, d in run.items()}
    assert tokens[1.0] == tokens[0.0]
    assert run[1.0].stats.host_computed > 0 and run[0.0].stats.host_computed == 0
    # the arithmetic itself: in x's dtype, equal to the slot's (the bf16 weights cast, as the copy casts them)
    from omnilab.gpu.segments import expert_choice, expert_on_host

    gate, up, down = tier.expert(cfg.moe_layers[0], 1)
    x = torch.randn(1, cfg.hidden_size)
    slab = torch.cat([down.float().flatten(), gate.float().flatten(), up.float().flatten()])[None]  # down | gate | up
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    want = expert_choice(x, torch.tensor([0]), torch.ones(1, 1), slab, H, I)
    got = expert_on_host(x, gate, up, down)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_host_copy_blocks_own_whole_pages():
    """cudaHostRegister pins whole pages, so two registered blocks must never share one (small heap blocks did, and
    the second tier of the GPU hybrid tests failed with "already mapped"): each block starts on a page boundary
    and owns the pages up to its padded end."""
    import mmap

    from omnilab.gpu.host import page_aligned_empty

    page = mmap.PAGESIZE
    spans = []
    for shape, dtype in (((3, 5, 7), torch.float32), ((1,), torch.bfloat16), ((8, 3, 96), torch.float16)):
        block, ptr, span = page_aligned_empty(shape, dtype)
        assert block.shape == shape and block.dtype == dtype and block.is_contiguous()
        assert ptr % page == 0 and span % page == 0 and block.data_ptr() == ptr
        assert block.numel() * block.element_size() <= span
        block.fill_(1)
        spans.append((ptr, ptr + span, block))
    for i, (a0, a1, _) in enumerate(spans):
        for b0, b1, _ in spans[i + 1:]:
            assert a1 <= b0 or b1 <= a0  # no page shared


# -- eviction policies --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["lfu", "trust"])
def test_every_policy_at_every_budget_gives_the_resident_tokens(model, tiers, policy):
    """A policy decides only which expert a slot holds, never the arithmetic: under LFU and trust-weighted
    eviction every budget and step mode gives the all-resident tokens, free and teacher-forced."""
    cfg = model.config
    k, E, L = cfg.num_experts_per_tok, cfg.num_experts, len(cfg.moe_layers)
    forced = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(2))
    want = FastDecoder(model, max_len=64).generate(PROMPT, N).new_token_ids
    want_forced = FastDecoder(model, max_len=64).generate(PROMPT, N, forced=forced).new_token_ids
    for step, prefetch in (("choice", True), ("choice", False), ("slot", False)):
        for slots in sorted({k, (k + E) // 2, E}):
            decoder = OffloadDecoder(model, tiers["copy"], slots=slots, max_len=64, prefetch=prefetch, step=step,
                                     policy=policy)
            assert {type(p) for p in decoder.cache.policy.values()} == {POLICIES[policy]}
            assert decoder.generate(PROMPT, N).new_token_ids == want, (step, slots)
            st = decoder.stats
            assert st.hits + st.prefetch_hits + st.misses == (N - 1) * L * k
            assert st.bytes_moved == (st.misses + st.prefetched) * decoder.pool.expert_bytes
            if slots < E:
                assert st.misses > 0  # the policy evicted (at slots == k it has no choice: the step wants them all)
            assert decoder.generate(PROMPT, N, forced=forced).new_token_ids == want_forced, (step, slots)


def eager_cache(slots: int, policy, num_experts: int):
    """An eager ExpertCache holding `slots` experts of one layer (a store of 12-byte experts, nothing read)."""
    store = SimpleNamespace(expert_bytes=12, total_bytes=12 * num_experts, dtype=torch.float32,
                            config=SimpleNamespace(moe_layers=[0, 1], num_experts=num_experts),
                            load=lambda layer, e: ExpertWeights(*torch.zeros(3, 1)))  # three [1] fp32: 12 bytes
    return ExpertCache(store, slots * 12, policy=policy)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_slots_evict_as_the_eager_cache_would_per_layer(policy):
    """Each layer's slots are an eager ExpertCache of `slots` experts of that layer under the same policy: routed
    one choice at a time (so the slots' never-evict-what-this-step-routes rule does not apply), with random
    routing weights observed first, both hold the same experts after every choice. The policies differ from LRU
    on this sequence, so a slot cache that ignored its policy fails here."""
    E, slots, layers = 8, 3, [0, 1]
    rng = random.Random(0)
    routed = [(rng.choice(layers), rng.choices(range(E), weights=[8, 6, 1, 4, 1, 3, 1, 2])[0], rng.random())
              for _ in range(400)]  # (layer, expert, routing weight), skewed so that counts and trust matter

    def history(name):
        cache = SlotCache(layers, slots, 12, lambda *a, **how: None, policy=name)
        eager = {i: eager_cache(slots, name, E) for i in layers}
        held = []
        for layer, e, w in routed:
            experts, weights = torch.tensor([[e]]), torch.tensor([[w]])  # [N, k] with N = k = 1
            eager[layer].observe(layer, experts, weights)
            eager[layer].get(layer, e)
            cache.observe(layer, experts, weights)
            cache.use(layer, e, {e})
            now = {i: {(i, x) for x in cache.where[i]} for i in layers}
            assert now == {i: set(eager[i].resident) for i in layers}, (name, len(held))
            held.append(now)
        assert cache.stats.misses == sum(c.stats.misses for c in eager.values())
        return held

    got = history(policy)
    if policy != "lru":
        assert got != history("lru")


def test_lfu_and_trust_victims_by_hand():
    """One layer of 3 slots. LFU: expert 1 used three times, 2 and 3 once: a new expert 4 evicts 2 (the least used,
    used longest ago), where LRU evicts 1; then a step routing to [5, 3] evicts 4, not 3, the least used but
    routed now. Trust (decay 0.9): routed 2 (weight .9), 1 (.1), 3 (.5), one pass each: a new expert evicts 1,
    the least trusted, where LRU evicts 2."""
    copied = []
    lfu = SlotCache([0], 3, 12, lambda layer, e, slot, **how: copied.append(e), policy=LFU)
    lru = SlotCache([0], 3, 12, lambda *a, **how: None)
    for e in (1, 1, 1, 2, 3, 4):
        lfu.use(0, e, {e})
        lru.use(0, e, {e})
    assert set(lfu.where[0]) == {1, 3, 4} and set(lru.where[0]) == {2, 3, 4}
    for e in (5, 3):
        lfu.use(0, e, {5, 3})
    assert set(lfu.where[0]) == {1, 3, 5} and copied == [1, 2, 3, 4, 5]

    trust = SlotCache([0], 3, 12, lambda *a, **how: None, policy="trust")
    lru = SlotCache([0], 3, 12, lambda *a, **how: None)
    for e, w in ((2, 0.9), (1, 0.1), (3, 0.5), (4, 0.6)):
        trust.observe(0, torch.tensor([[e]]), torch.tensor([[w]]))
        trust.use(0, e, {e})
        lru.use(0, e, {e})
    assert set(trust.where[0]) == {2, 3, 4} and set(lru.where[0]) == {1, 3, 4}
    p = trust.policy[0]
    assert p.step == 4 and p.value((0, 2)) == pytest.approx(0.9 * 0.9 ** 3)


def test_slot_policy_arguments():
    cache = SlotCache([0, 2], 2, 12, lambda *a, **how: None, policy=partial(TrustWeighted, decay=0.5))
    assert cache.observes and cache.policy[0] is not cache.policy[2] and cache.policy[2].decay == 0.5
    assert not SlotCache([0], 2, 12, None, policy=LFU).observes
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        SlotCache([0], 2, 12, None, policy="mru")
    with pytest.raises(ValueError, match="give its name or class"):
        SlotCache([0], 2, 12, None, policy=LRU())


def eager_trust(model, ids) -> TrustWeighted:
    """The trust an eager forward over `ids` gives each (layer, expert), undecayed: the routing weights summed."""
    trust, own = TrustWeighted(decay=1.0), model.cache
    model.cache = ExpertCache(own.store, None, policy=trust)
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        model.cache = own
    return trust


@pytest.mark.parametrize("how", ["choice", "prefetch", "slot", "hybrid", "dense layer"])
def test_trust_sees_the_routing_weights(model, tiers, make_checkpoint, how):
    """Every routing weight of every layer reaches the slots' TrustWeighted, once: with no decay, each (layer,
    expert)'s trust after a generation is the sum of its routing weights over the prompt and the decoded inputs,
    as an eager forward over them observes (the prefill through OffloadDecoder.forward, the decode steps through
    the segments' h_w, or through forward again for a model with a dense layer)."""
    if how == "dense layer":
        model = SelectiveMoE.from_checkpoint(make_checkpoint("moe", mlp_only_layers=[1]), tokenizer=False)
        config, layout = model.checkpoint.arch
        tier = HostTier.copy(model.checkpoint, config, layout, model.dtype, pin=False)
    else:
        tier = tiers["copy"]
    cfg = model.config
    options = {"choice": dict(prefetch=False), "prefetch": dict(prefetch=True), "hybrid": dict(prefetch=False,
               host_share=0.5), "slot": dict(prefetch=False, step="slot"), "dense layer": dict(prefetch=False)}[how]
    decoder = OffloadDecoder(model, tier, slots=cfg.num_experts_per_tok, max_len=64,
                             policy=partial(TrustWeighted, decay=1.0), **options)
    assert decoder.segmented == (how != "dense layer")
    tokens = decoder.generate(PROMPT, N).new_token_ids[0]
    want = eager_trust(model, PROMPT + tokens[:-1])
    for i in cfg.moe_layers:
        got = decoder.cache.policy[i]
        assert got.step == N  # the prefill and N - 1 decode steps, one observation each
        assert set(got.trust) == {key for key in want.trust if key[0] == i}
        for key, (v, _) in got.trust.items():
            assert v == pytest.approx(want.trust[key][0], rel=1e-5), (how, key)


def test_a_failed_unregister_resets_cudas_last_error(monkeypatch):
    """cudaHostUnregister's failure, like cudaHostRegister's, leaves CUDA's last error for torch's next launch
    check to raise: unregister_host resets it, and only when the call failed (the driver faked here)."""
    from omnilab.gpu import host

    resets, results = [], iter([0, 1])
    monkeypatch.setattr(torch.cuda, "cudart", lambda: SimpleNamespace(cudaHostUnregister=lambda ptr: next(results)))
    monkeypatch.setattr(host, "clear_last_error", lambda: resets.append(1))
    host.unregister_host(4096)  # succeeds: nothing to reset
    assert resets == []
    host.unregister_host(4096)  # fails
    assert resets == [1]
