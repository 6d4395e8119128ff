"""The offload engine's eviction policies on a GPU (OffloadDecoder(policy=...); the runtime passes the model cache's):
LFU and trust-weighted slots, inside the captured segments, give the resident fast path's fp32 tokens and count
their hits; TrustWeighted gets every layer's routing weights (the pinned h_w the graphs fill); the runtime and
the sweep's decode_cost run lfu and trust settings on the offload engine with hit rates; in bf16 (compiled
segments) a policy changes no token of the LRU decoder's."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import omnilab as ol
from omnilab.gpu.fast import FastDecoder
from omnilab.gpu.host import HostTier
from omnilab.gpu.offload import OffloadDecoder
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.experts import POLICIES, ExpertCache, TrustWeighted

PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 250, 31]
N = 16


@pytest.fixture(scope="module", params=["omni", "moe"])
def model(request, make_checkpoint):
    return SelectiveMoE.from_checkpoint(make_checkpoint(request.param), device="cuda", dtype="float32",
                                        tokenizer=False)


def host_tier(model):
    config, layout = model.checkpoint.arch
    return HostTier.copy(model.checkpoint, config, layout, model.dtype, pin=True)


@pytest.mark.parametrize("policy", ["lfu", "trust"])
@pytest.mark.parametrize("step", ["choice", "slot"])
def test_policies_give_the_resident_tokens_in_fp32(model, policy, step):
    config = model.config
    k, E, L = config.num_experts_per_tok, config.num_experts, len(config.moe_layers)
    host = host_tier(model)
    forced = torch.randint(0, config.vocab_size, (N,), generator=torch.Generator().manual_seed(0))
    want = FastDecoder(model, max_len=64, compute="gather").generate(PROMPT, N, forced=forced).new_token_ids
    for slots in (k, (k + E) // 2):
        decoder = OffloadDecoder(model, host, slots=slots, max_len=64, prefetch=step == "choice", step=step,
                                 policy=policy)
        assert decoder.graphs and decoder.issue == "driver"
        assert {type(p) for p in decoder.cache.policy.values()} == {POLICIES[policy]}
        assert decoder.generate(PROMPT, N, forced=forced).new_token_ids == want, slots
        assert decoder.segmented_step.captured  # the decode steps replayed captured segments
        st = decoder.stats
        assert st.hits + st.prefetch_hits + st.misses == (N - 1) * L * k
        assert st.hits > 0 and st.misses > 0 and 0.0 < st.hit_rate < 1.0
        assert st.bytes_moved == (st.misses + st.prefetched) * decoder.pool.expert_bytes


@pytest.mark.parametrize("step", ["choice", "slot"])
def test_trust_sees_the_routing_weights_from_the_graphs(model, step):
    """With no decay, each (layer, expert)'s trust is the sum of its routing weights over the prompt and the decoded
    inputs: as an eager forward over them observes (fp32, to rounding)."""
    config = model.config
    decoder = OffloadDecoder(model, host_tier(model), slots=config.num_experts_per_tok, max_len=64,
                             prefetch=step == "choice", step=step, policy=partial(TrustWeighted, decay=1.0))
    tokens = decoder.generate(PROMPT, N).new_token_ids[0]
    want, own = TrustWeighted(decay=1.0), model.cache
    model.cache = ExpertCache(own.store, None, policy=want)
    try:
        with torch.no_grad():
            model(torch.tensor([PROMPT + tokens[:-1]], device="cuda"))
    finally:
        model.cache = own
    for i in config.moe_layers:
        got = decoder.cache.policy[i]
        assert got.step == N
        assert set(got.trust) == {key for key in want.trust if key[0] == i}
        for key, (v, _) in got.trust.items():
            assert v == pytest.approx(want.trust[key][0], rel=1e-4), key


@pytest.mark.parametrize("policy", ["lfu", "trust"])
def test_runtime_and_sweep_take_the_offload_engine(tiny_moe, policy):
    from omnilab.experiments import eval_data, sweeps

    full = ol.load(tiny_moe, device="cuda", dtype="float32")
    budget = full.cache.store.total_bytes // 2
    eager = full.generate(PROMPT, N, engine="eager").new_token_ids
    del full
    model = ol.load(tiny_moe, device="cuda", dtype="float32", expert_budget=budget, policy=policy)
    out = model.generate(PROMPT, N)
    assert out.engine == "gpu-offload" and out.new_token_ids == eager
    assert out.cache["hits"] + out.cache["misses"] > 0 and 0.0 < out.cache["hit_rate"] < 1.0
    setting = sweeps.Setting(f"budget 25% {policy}", "budget", value=0.25, budget_share=0.25, policy=policy)
    cost = sweeps.decode_cost(model, eval_data.EvalSet(docs=[], prompts=[("p", PROMPT)]), setting, max_new_tokens=N)
    assert cost["engine"] == "gpu-offload" and 0.0 < cost["hit_rate"] < 1.0 and cost["loaded_bytes"] > 0


def test_bf16_compiled_policies_change_no_token(make_checkpoint):
    model = SelectiveMoE.from_checkpoint(make_checkpoint("moe"), device="cuda", dtype="bfloat16", tokenizer=False)
    host = host_tier(model)
    forced = torch.randint(0, model.config.vocab_size, (N,), generator=torch.Generator().manual_seed(1))
    got = {policy: OffloadDecoder(model, host, slots=model.config.num_experts_per_tok, max_len=64, compile=True,
                                  policy=policy).generate(PROMPT, N, forced=forced).new_token_ids
           for policy in POLICIES}
    assert got["lfu"] == got["lru"] and got["trust"] == got["lru"]
