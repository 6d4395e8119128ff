"""Routing traces (omnilab.testing.traces, omnilab.model.routing.RoutingOverride): the generators' stated reuse
statistics, measured; a recorded trace equals the router's own choice; an override from a trace drives the eager
model."""

from __future__ import annotations

import pytest
import torch

from omnilab.model.routing import RoutingOverride
from omnilab.testing.traces import locality_trace, recorded_trace, reuse_stats, uniform_trace
from omnilab.model.decoder import SelectiveMoE


def test_uniform_trace_is_distinct_and_unbiased():
    t = uniform_trace(4, 300, 128, 8, seed=0)
    assert t.shape == (4, 300, 8)
    assert all(len(set(row)) == 8 for row in t.reshape(-1, 8).tolist())
    counts = torch.bincount(t.reshape(-1), minlength=128).float()
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()
    stats = reuse_stats(t)
    assert abs(stats["next"] - 8 / 128) < 0.02  # chance: k / E of a choice was also picked just before
    assert uniform_trace(4, 300, 128, 8, seed=0).equal(t) and not uniform_trace(4, 300, 128, 8, seed=1).equal(t)


@pytest.mark.parametrize("nxt, within8", [(0.45, 0.80), (0.2, 0.5), (0.0, 0.0)])
def test_locality_trace_has_the_stated_reuse(nxt, within8):
    t = locality_trace(3, 200, 128, 8, next=nxt, within8=within8, seed=0)
    assert all(len(set(row)) == 8 for row in t.reshape(-1, 8).tolist())
    stats = reuse_stats(t)
    assert abs(stats["next"] - nxt) < 0.03
    assert abs(stats["within8"] - within8) < 0.03


def test_locality_trace_rejects_bad_statistics():
    with pytest.raises(ValueError, match="next"):
        locality_trace(1, 4, 16, 2, next=0.9, within8=0.5)


def test_recorded_trace_drives_the_same_tokens(tiny_omni):
    """The trace recorded over prompt + generated tokens, forced back in as an override, changes nothing."""
    model = SelectiveMoE.from_checkpoint(tiny_omni, tokenizer=False)
    prompt = [3, 17, 42, 5, 99, 7]
    gen = model.generate(prompt, 10, vocab_limit=None).new_token_ids[0]
    trace = recorded_trace(model, prompt + gen)
    assert trace.shape == (len(model.config.moe_layers), len(prompt) + 10, model.config.num_experts_per_tok)
    model.routing_override = RoutingOverride.from_trace(trace, model.config.moe_layers)
    try:
        assert model.generate(prompt, 10, vocab_limit=None).new_token_ids[0] == gen
        other = uniform_trace(len(model.config.moe_layers), 32, model.config.num_experts,
                              model.config.num_experts_per_tok, seed=5)
        model.routing_override = RoutingOverride.from_trace(other, model.config.moe_layers)
        assert recorded_trace(model, prompt).equal(other[:, :len(prompt)])  # the override is what routes
    finally:
        model.routing_override = None
    with pytest.raises(ValueError, match="moe layers"):
        RoutingOverride.from_trace(trace[:1], model.config.moe_layers)
