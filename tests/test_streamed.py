"""The streamed transformers reference (omnilab.reference.streamed) and the chained / local comparison (omnilab.reference.compare).

The streamed reference must be transformers' numbers: bit for bit those of a whole `from_pretrained` model at
every hook, fp32 and bf16, while holding one part at a time. A fault injected at one layer must show in the
chained view from that layer on and in the local view at that layer alone.
"""

from __future__ import annotations

import pytest
import torch

from omnilab.experiments.fault_gallery import standard_faults
from omnilab.model.hooks import DIVERGENCE_RTOL, parse_name, run_with_cache
from omnilab.reference.compare import NOISE_FACTOR, compare_checkpoints
from omnilab.reference.streamed import StreamedReference
from omnilab.reference.whole import Reference

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 12, 64, 5, 180, 33, 71]])
NORMS = ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm")


@pytest.fixture(scope="module")
def six_layers(make_checkpoint, tmp_path_factory):
    """A 6-layer tiny Qwen3-MoE whose norm weights are not all ones (as trained ones are not), so that a norm
    left at its default init is a real change."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.testing.breakage import copy_checkpoint, replace_tensor

    path = copy_checkpoint(make_checkpoint("moe", num_hidden_layers=6), tmp_path_factory.mktemp("norms") / "moe6")
    g = torch.Generator().manual_seed(0)
    checkpoint = Checkpoint(path)
    for i in range(6):
        for norm in NORMS:
            name = f"model.layers.{i}.{norm}.weight"
            w = checkpoint.read(name)
            replace_tensor(path, name, 1.0 + 0.5 * torch.randn(w.shape, generator=g))
    return path


@pytest.mark.parametrize("kind", ["omni", "moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_equals_whole_reference_bit_for_bit(make_checkpoint, kind, dtype):
    path = make_checkpoint(kind)
    whole = Reference.from_checkpoint(path, dtype=dtype)
    _, expected = run_with_cache(whole, IDS)
    streamed = StreamedReference(path)
    run = streamed.run(IDS, [dtype])
    assert set(run.chained[dtype]) == set(expected) == set(whole.hook_names())
    unequal = [n for n in whole.hook_names() if not torch.equal(run.chained[dtype][n], expected[n])]
    assert unequal == []
    assert all(p.is_meta for p in streamed.hf.parameters())  # every part given back after the pass


def test_two_dtypes_in_one_pass_equal_two_whole_references(make_checkpoint):
    """bf16 and fp32 from one load per part (cast after transformers' expert fusion) = two from_pretrained."""
    path = make_checkpoint("moe")
    run = StreamedReference(path).run(IDS, [torch.bfloat16, torch.float32])
    for dtype in (torch.bfloat16, torch.float32):
        _, expected = run_with_cache(Reference.from_checkpoint(path, dtype=dtype), IDS)
        assert all(torch.equal(run.chained[dtype][n], t) for n, t in expected.items())


def test_one_part_resident_at_a_time(make_checkpoint):
    path = make_checkpoint("moe", num_hidden_layers=4)
    streamed = StreamedReference(path)
    seen = []

    def count(module, args, output):  # after a layer ran (the catcher pass stops before layer 0 runs)
        resident = [i for i, layer in enumerate(streamed.text.layers)
                    if not any(p.is_meta for p in layer.parameters())]
        seen.append((resident, streamed.text.embed_tokens.weight.is_meta, streamed.hf.lm_head.weight.is_meta))

    for layer in streamed.text.layers:
        layer.register_forward_hook(count)
    streamed.run(IDS, [torch.float32])
    assert seen == [([i], True, True) for i in range(4)]


def test_local_inputs_feed_each_layer(make_checkpoint):
    """Fed the reference's own chained activations, the local view is the chained view exactly."""
    path = make_checkpoint("omni")
    streamed = StreamedReference(path)
    chained = streamed.run(IDS, [torch.float32]).chained[torch.float32]
    local = streamed.run(IDS, [torch.float32], local_inputs=chained).local[torch.float32]
    assert all(torch.equal(local[n], chained[n]) for n in streamed.hook_names())


def test_missing_reference_tensor_is_named(make_checkpoint, copy_checkpoint):
    from omnilab.testing.breakage import drop_tensors

    path = copy_checkpoint(make_checkpoint("moe"))
    drop_tensors(path, ["model.layers.1.post_attention_layernorm.weight"])
    with pytest.raises(KeyError, match="model.layers.1.post_attention_layernorm.weight"):
        StreamedReference(path).run(IDS, [torch.float32])


@pytest.mark.parametrize("fault_kind", range(5))
def test_fault_at_layer_3_chained_from_3_on_local_at_3_alone(six_layers, fault_kind):
    path = six_layers
    whole = Reference.from_checkpoint(path)
    _, ref_acts = run_with_cache(whole, IDS)
    expert = int(ref_acts["blocks.3.mlp.hook_topk_indices"][0, 0])
    label, fault = list(standard_faults(whole.config, 3, expert).items())[fault_kind]
    result = compare_checkpoints(path, IDS, faults=[fault])
    chained, local = result.chained.table, result.local.table
    assert parse_name(result.first_divergence)[0] == 3, label
    assert parse_name(result.local_first_divergence)[0] == 3, label
    # chained: clean before layer 3, then every layer's output off
    assert not chained[chained.layer < 3].divergent.any(), label
    post = chained[chained.point == "hook_resid_post"].set_index("layer").divergent
    assert post[post.index >= 3].all(), label
    # local: only layer 3 diverges; layers after it agree once fed the selective model's own input
    assert set(local[local.divergent].layer) == {3}, label
    others = local[(local.layer != 3) & (local.point != "mlp.hook_topk_indices")]
    assert others.rel_err.max() <= 1e-5, label


def test_fault_free_fp32_agrees_in_both_views(make_checkpoint):
    result = compare_checkpoints(make_checkpoint("omni"), IDS)
    for view in (result.chained, result.local):
        assert view.first_divergence is None and view.table.rel_err.max() <= 1e-5
    assert result.noise is None and result.peak_rss_bytes > 0
    from omnilab import plots

    assert len(plots.plot_local_vs_chained(result).axes) == 1  # fp32: no noise panel
    assert result.expert_budget_bytes == 8 * 3 * 32 * 64 * 4  # one layer's experts in fp32


def test_bf16_noise_floor_sets_thresholds(make_checkpoint):
    """bf16: each hook's threshold is NOISE_FACTOR x transformers' own bf16-vs-fp32 error (at least the fp32
    tolerance); a wrong layer is still named, far above that floor."""
    path = make_checkpoint("moe", num_hidden_layers=4)
    result = compare_checkpoints(path, IDS, dtype="bfloat16", faults=[standard_faults(
        Reference.from_checkpoint(path).config, 2, 0)["attention at random init"]])
    for view, noise in ((result.chained, result.noise), (result.local, result.local_noise)):
        floor = noise.table.set_index("name").rel_err
        want = (NOISE_FACTOR * floor).clip(lower=DIVERGENCE_RTOL[torch.float32])
        assert view.table.set_index("name").threshold.equals(want.reindex(view.table.name))
    assert result.noise.table.rel_err.max() > 0  # fp32 weights on disk: bf16 is not fp32
    assert result.local_first_divergence == "blocks.2.hook_attn_out"
    assert result.first_divergence == "blocks.2.hook_attn_out"
    routing = result.routing()
    assert [r["layer"] for r in routing] == [0, 1, 2, 3]
    assert all(0.0 <= r["noise_topk_agreement"] <= 1.0 for r in routing)
    from omnilab import plots

    fig = plots.plot_local_vs_chained(result, injected_layer=2)  # bf16: chained/local beside the noise floor
    assert len(fig.axes) == 2 and all(ax.get_xlabel().startswith("layer") and ax.get_ylabel() for ax in fig.axes)
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert any("noise" in label for label in labels)


def test_near_tie_flips_are_set_aside_clear_flips_are_not():
    """Hand-made router logits: token 0's 2nd and 3rd experts are a hair apart (a bf16 rounding can swap
    them), token 1's by a wide margin; the selective model swaps both. Only token 0 is a near-tie."""
    from omnilab.reference.compare import near_tie_flips, set_aside_near_ties

    l32 = torch.tensor([[3.0, 2.0, 1.999, -1.0], [3.0, 2.0, 0.5, -1.0], [3.0, 2.0, 0.5, -1.0]])
    l16 = l32 + torch.tensor([[0.0, -0.004, 0.004, 0.0], [0.0, 0.004, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ref_idx = torch.tensor([[0, 1], [0, 1], [0, 1]])
    sel_idx = torch.tensor([[0, 2], [2, 0], [1, 0]])  # token 2: the same set in another order
    assert near_tie_flips(l32, l16, ref_idx, sel_idx).tolist() == [True, False, False]

    # that token is set aside at its own layer's hooks after the router, and compared again from the next layer
    from types import SimpleNamespace

    names = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.mlp.hook_router_logits",
             "blocks.0.mlp.hook_topk_indices", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
             "blocks.1.hook_resid_pre", "hook_logits"]
    acts = lambda logits, idx: {"hook_embed": torch.zeros(1, 3, 4), "blocks.0.mlp.hook_router_logits": logits,
                                "blocks.0.mlp.hook_topk_indices": idx}
    keep, flips = set_aside_near_ties(SimpleNamespace(), acts(l32, ref_idx), acts(l16, ref_idx), acts(None, sel_idx),
                                      names, 4.0)
    assert flips == {0: 1}
    assert keep["blocks.0.mlp.hook_router_logits"].tolist() == [True, True, True]
    assert keep["blocks.0.hook_mlp_out"].tolist() == [False, True, True]
    assert keep["blocks.0.hook_resid_post"].tolist() == [False, True, True]
    assert keep["blocks.1.hook_resid_pre"].tolist() == [True, True, True]
    assert keep["hook_logits"].tolist() == [True, True, True]


def test_the_streamed_fault_gallery_streams_only_the_layers_around_the_fault(six_layers, monkeypatch):
    """notebook 03's gallery at any scale: one streamed pass over the fault's layer and `window` layers on each side
    (3 of 6 decoder layers here, the final norm and lm_head not at all), shared by the five faults; each fault
    still diverges at the layer it was injected at, and every hook before it keeps fp32 parity."""
    from omnilab.experiments.fault_gallery import fault_gallery, gallery_table

    loaded = []
    real_load = StreamedReference.load
    monkeypatch.setattr(StreamedReference, "load", lambda self, part: loaded.append(part) or real_load(self, part))
    gallery = fault_gallery(six_layers, input_ids=IDS, layer=3, window=1)
    assert [p for p in loaded if isinstance(p, int)] == [2, 3, 4]  # one pass, three decoder layers of six
    assert "final" not in loaded and loaded.count("embed") == 1
    assert gallery.layers == [2, 3, 4] and gallery.peak_rss_bytes > 0
    assert len(gallery) == 5
    for name, (fault, res) in gallery.items():
        assert set(res.table.layer.dropna()) == {2, 3, 4}, name
        assert parse_name(res.first_divergence)[0] == 3, (name, res.first_divergence)
        assert res.table[res.table.layer == 2].rel_err.max() <= 1e-5, name
    table = gallery_table(gallery)
    assert (table["injected at layer"] == 3).all() and table["first divergence"].str.startswith("blocks.3.").all()
    # the window at the model's edge stays inside it
    edge = fault_gallery(six_layers, input_ids=IDS, layer=5, window=2)
    assert edge.layers == [3, 4, 5]


def test_a_loaded_model_is_compared_and_its_experts_dropped(six_layers):
    """compare_checkpoints(selective=model): the notebook's own model is recorded (no second model is loaded),
    its expert cache emptied before the reference streams; the same numbers as a model of its own."""
    from omnilab.runtime.model import load

    model = load(six_layers, device="cpu", dtype="float32", expert_budget="all")
    result = compare_checkpoints(six_layers, IDS, selective=model)
    own = compare_checkpoints(six_layers, IDS)
    assert not model.cache.resident and model.cache.stats.misses > 0
    assert result.chained.table.rel_err.equals(own.chained.table.rel_err)
    assert result.layers == list(range(6)) and result.first_divergence is None
    with pytest.raises(ValueError, match="faults"):
        compare_checkpoints(six_layers, IDS, selective=model, faults=[standard_faults(model.config, 3, 0)[
            "attention at random init"]])


def test_bf16_against_fp32_and_the_reference_continuation(six_layers):
    """bf16's third curve (selective bf16 against transformers fp32) comes from the same streamed pass; the greedy
    check reads the selective continuation teacher-forced and counts the leading tokens transformers agrees on."""
    from omnilab.reference.compare import reference_continuation
    from omnilab.runtime.model import load

    result = compare_checkpoints(six_layers, IDS, dtype="bfloat16")
    assert result.against_fp32 is not None and result.against_fp32.logits_rel_err > 0
    model = load(six_layers, device="cpu", dtype="float32", expert_budget="all")
    out = model.generate(IDS[0].tolist(), 6, vocab_limit=None)
    check = reference_continuation(six_layers, IDS, out.new_token_ids[0])
    assert check["identical"] == 6 and check["reference"] == out.new_token_ids[0]
    wrong = [(t + 1) % 320 for t in out.new_token_ids[0]]
    assert reference_continuation(six_layers, IDS, wrong)["identical"] == 0
