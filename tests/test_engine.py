"""The decode fast path (omnilab.gpu.fast) on CPU, fp32, tiny checkpoints: the same greedy tokens as the eager path
and as transformers, the same logits and routing along a teacher-forced sequence, the slot map, the eager
fallback for hooked models, and the routing override on both paths. (The CUDA graph itself needs a GPU:
bench/decode.py exercises it; here the same step function runs uncaptured.)"""

from __future__ import annotations

import pytest
import torch

from omnilab.gpu.fast import FastDecoder, FastGeneration, fast_path_refusal, generate
from omnilab.gpu.slots import SlotPool
from omnilab.model.routing import RoutingOverride
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.faults import Fault, RouterMask
from omnilab.model.routing import RoutingOptions
from omnilab.model.hooks import capture
from omnilab.reference.whole import Reference

PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 250, 31]


@pytest.fixture(scope="module", params=["omni", "moe"])
def model(request, make_checkpoint):
    return SelectiveMoE.from_checkpoint(make_checkpoint(request.param), tokenizer=False)


def forced_ids(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_greedy_tokens_equal_eager_and_transformers(model):
    fast = FastDecoder(model, max_len=64).generate(PROMPT, 24)
    eager = model.generate(PROMPT, 24, vocab_limit=None)
    ref = Reference.from_checkpoint(model.checkpoint).generate(torch.tensor([PROMPT]), 24)[0].tolist()
    assert fast.new_token_ids == eager.new_token_ids == [ref]


def test_teacher_forced_logits_and_routing_equal_eager(model):
    n = 20
    forced = forced_ids(n, model.config.vocab_size)
    fast = FastDecoder(model, max_len=64).generate(PROMPT, n, forced=forced, record_logits=True)
    seq = torch.tensor([PROMPT + forced.tolist()])  # [1, P + n]
    layers = model.config.moe_layers
    with capture(model, [f"blocks.{i}.mlp.hook_topk_indices" for i in layers]) as acts:
        ref = model(seq[:, :-1])[0]  # [P + n - 1, V]: the eager logits at every input
    want = ref[len(PROMPT) - 1:]  # the n positions whose next token the fast path produced
    got = fast.logits[:, 0]  # [n, V]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert fast.new_token_ids[0] == want.argmax(-1).tolist()
    for j, i in enumerate(layers):  # routing buffer: the same expert sets at every position of every layer
        eager_sets = acts[f"blocks.{i}.mlp.hook_topk_indices"].sort(-1).values
        assert torch.equal(fast.routing[j, 0].sort(-1).values, eager_sets)


def test_gather_compute_equals_grouped_mm(model):
    forced = forced_ids(12, model.config.vocab_size, seed=1)
    a = FastDecoder(model, max_len=32, compute="grouped_mm").generate(PROMPT, 12, forced=forced, record_logits=True)
    b = FastDecoder(model, max_len=32, compute="gather").generate(PROMPT, 12, forced=forced, record_logits=True)
    assert torch.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)


def test_permuted_slots_give_the_same_tokens(model):
    """Experts in a shuffled slot order (the offloading layout): slot_of maps each routed expert to its slot."""
    cfg = model.config
    config, layout = model.checkpoint.arch
    pool = SlotPool(cfg, cfg.num_experts, model.dtype, model.device)
    perm = torch.randperm(cfg.num_experts, generator=torch.Generator().manual_seed(3)).tolist()
    resident = SlotPool.all_resident(model.checkpoint, config, layout, model.dtype, model.device)
    I = cfg.moe_intermediate_size
    for layer in pool.layers:
        for e in range(cfg.num_experts):
            gu = resident.gate_up[layer][e]
            pool.put(layer, e, perm[e], gu[:I], gu[I:], resident.down[layer][e])
    fast = FastDecoder(model, max_len=32, pool=pool)
    assert not fast.identity_slots
    assert fast.generate(PROMPT, 12).new_token_ids == FastDecoder(model, max_len=32).generate(PROMPT, 12).new_token_ids


def test_batch_of_equal_length_prompts(model):
    other = [p + 1 for p in PROMPT]
    fast = FastDecoder(model, max_len=32, batch=2).generate([PROMPT, other], 10)
    assert fast.new_token_ids == [model.generate(p, 10, vocab_limit=None).new_token_ids[0] for p in (PROMPT, other)]


def test_hooked_model_takes_the_eager_path(model):
    seen = []
    handle = model.add_hook("blocks.0.hook_resid_post", lambda x: seen.append(x.shape))
    try:
        assert "hooks" in fast_path_refusal(model)
        with pytest.raises(ValueError, match="fast path unavailable: hooks"):
            FastDecoder(model)
        out = generate(model, PROMPT, 5, vocab_limit=None)
        assert len(seen) == 5  # the hook ran at every step: the eager path
    finally:
        handle.remove()
    assert fast_path_refusal(model) is None
    assert generate(model, PROMPT, 5).new_token_ids == out.new_token_ids


def test_per_call_routing_takes_the_fast_path_with_the_eager_tokens(model):
    """Routing options given to one generate call (another top-k, a router transform, a mask, an override of the
    call's own) run on the fast path, which follows them: the eager path's tokens; a transform it does not know
    (no router_op) sends the call to the eager path, which follows it."""
    cfg = model.config
    k, E, first = cfg.num_experts_per_tok, cfg.num_experts, cfg.moe_layers[0]
    ok = torch.ones(E, dtype=torch.bool)
    ok[0] = False
    cases = {
        "top-k": RoutingOptions(top_k=k + 1),
        "transforms": RoutingOptions(transforms=(RouterMask(tuple(range(1, E))),)),
        "masked": RoutingOptions(available={i: ok for i in cfg.moe_layers}),
        "override": RoutingOptions(override=RoutingOverride({first: torch.arange(k).flip(0)})),
    }
    plain = generate(model, PROMPT, 6, vocab_limit=None).routing
    for what, options in cases.items():
        assert fast_path_refusal(model, options) is None, what
        out = generate(model, PROMPT, 6, vocab_limit=None, routing=options)
        assert isinstance(out, FastGeneration), what
        eager = model.generate(PROMPT, 6, vocab_limit=None, routing=options).new_token_ids
        assert out.new_token_ids == eager, what
        assert out.routing.shape != plain.shape or not torch.equal(out.routing, plain), what  # it acted

    class Doubled(Fault):
        def on_router_logits(self, layer, logits):
            return 2 * logits

    unknown = RoutingOptions(transforms=(Doubled(),))
    assert "router transforms without a router_op (Doubled)" in fast_path_refusal(model, unknown)
    out = generate(model, PROMPT, 6, vocab_limit=None, routing=unknown)
    assert not isinstance(out, FastGeneration)
    for same in (None, RoutingOptions(), RoutingOptions(top_k=k)):  # the model's own routing: the fast path
        assert fast_path_refusal(model, same) is None
        assert isinstance(generate(model, PROMPT, 3, routing=same), FastGeneration)


def test_limits_are_one_line_errors(model):
    fast = FastDecoder(model, max_len=16)  # rounded up to 64 positions
    with pytest.raises(ValueError, match="exceed the fast path's max_len 64"):
        fast.generate(PROMPT, 60)
    with pytest.raises(ValueError, match="outside the embedding"):
        fast.generate([model.config.vocab_size], 2)
    with pytest.raises(ValueError, match="need 4"):
        fast.generate(PROMPT, 5, forced=[1, 2])


def test_routing_override_on_both_paths(model):
    """Forcing layer 0 to experts (1, 0) at every position: recorded in the routing buffer, the same tokens on the
    eager path (model.routing_override) as on the fast path, and different tokens from the unforced model."""
    k = model.config.num_experts_per_tok
    first = model.config.moe_layers[0]
    override = RoutingOverride({first: torch.arange(k).flip(0)})
    fast = FastDecoder(model, max_len=32, override=override).generate(PROMPT, 12)
    assert (fast.routing[0, 0] == torch.arange(k).flip(0)).all()
    model.routing_override = override
    try:
        eager = model.generate(PROMPT, 12, vocab_limit=None)
        with capture(model, [f"blocks.{first}.mlp.hook_topk_indices"]) as acts:
            model(torch.tensor([PROMPT]))
    finally:
        model.routing_override = None
    assert (acts[f"blocks.{first}.mlp.hook_topk_indices"] == torch.arange(k).flip(0)).all()
    assert fast.new_token_ids == eager.new_token_ids
    free = model.generate(PROMPT, 12, vocab_limit=None)
    plain = FastDecoder(model, max_len=32).generate(PROMPT, 12)
    assert plain.new_token_ids == free.new_token_ids
    assert not torch.equal(plain.routing[0], fast.routing[0])


def test_default_compute_follows_dtype_device_and_triton(monkeypatch):
    import importlib.util

    from omnilab.gpu import step

    assert step.default_compute(torch.bfloat16, "cpu") == "grouped_mm"
    assert step.default_compute(torch.float32, "cpu") == "grouped_mm"
    assert step.default_compute(torch.float32, "cuda") == "gather"
    has_triton = importlib.util.find_spec("triton") is not None
    assert step.default_compute(torch.bfloat16, "cuda") == ("triton" if has_triton else "grouped_mm")
    monkeypatch.setattr(step.importlib.util, "find_spec", lambda name: None)  # a machine without Triton
    assert step.default_compute(torch.bfloat16, "cuda") == "grouped_mm"


def test_triton_compute_hands_prefill_sized_bf16_steps_to_grouped_mm(monkeypatch):
    from omnilab.gpu import step

    S, H, I, k = 6, 16, 8, 2
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(S, 2 * I, H, generator=gen).to(torch.bfloat16)
    down = torch.randn(S, H, I, generator=gen).to(torch.bfloat16)
    N = step.TRITON_MAX_CHOICES // k + 1  # one choice past the limit
    x = torch.randn(N, H, generator=gen).to(torch.bfloat16)
    slots = torch.randint(0, S, (N, k), generator=gen)
    weights = torch.rand(N, k, generator=gen).to(torch.bfloat16)
    slot_range = torch.arange(S)
    out = step.expert_mix(x, slots, weights, gate_up, down, slot_range, "triton")  # never reaches Triton here
    assert torch.equal(out, step.expert_mix(x, slots, weights, gate_up, down, slot_range, "grouped_mm"))
