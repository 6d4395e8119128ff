"""Offloaded decoding (omnilab.gpu.offload) on CPU, fp32, tiny checkpoints: every slot budget, with and without
prefetch, from either host tier, yields the all-resident path's tokens, with routing forced by a trace too; the
statistics add up. (Copies on a side stream and the per-layer CUDA graphs need a GPU: bench/offload.py; on CPU
the same segmented step runs uncaptured.)"""

from __future__ import annotations

import pytest
import torch

from omnilab.gpu.engine import FastDecoder
from omnilab.gpu.offload import HostTier, OffloadDecoder
from omnilab.gpu.traces import RoutingOverride, locality_trace
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
            decoder._fetch(layer, e, set(), prefetch=False)
    decoder.generate(PROMPT, N)
    assert decoder.stats.misses == 0 and decoder.stats.hit_rate == 1.0


def test_too_few_slots_is_a_one_line_error(model, tiers):
    with pytest.raises(ValueError, match="fewer than top-"):
        OffloadDecoder(model, tiers["copy"], slots=model.config.num_experts_per_tok - 1)
