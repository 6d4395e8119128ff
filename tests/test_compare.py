"""compare() and the `omnilab compare` / `omnilab generate` verbs against docs/DESIGN.md's command-line contract."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from omnilab.cli import main
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.hooks import capture, compare_activations, hook_names, topk_agreement


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_compare_json_contract(tiny_moe, capsys):
    code, out, _ = run_cli(capsys, "compare", tiny_moe, "--input-ids", "1,2,3,4,5,6", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"hooks", "first_divergence", "top1_agreement", "kl", "local_hooks", "local_first_divergence", "noise",
            "peak_rss_bytes", "routing"} <= set(result)
    config = SelectiveMoE.from_checkpoint(tiny_moe, tokenizer=False).config
    for view in ("hooks", "local_hooks"):
        assert [h["name"] for h in result[view]] == hook_names(config)
        for h in result[view]:
            assert {"name", "max_abs", "rel_err", "cosine", "threshold"} <= set(h)
            assert h["rel_err"] <= 1e-5
    assert result["first_divergence"] is None and result["local_first_divergence"] is None
    assert result["top1_agreement"] == 1.0 and result["kl"] < 1e-8
    assert result["noise"] is None  # fp32: the fixed tolerance
    assert result["peak_rss_bytes"] > 0 and result["expert_budget_bytes"] == 8 * 3 * 32 * 64 * 4
    assert [r["layer"] for r in result["routing"]] == config.moe_layers


def test_cli_compare_prompt_and_bf16(tiny_omni, capsys):
    code, out, _ = run_cli(capsys, "compare", tiny_omni, "--prompt", "The quick brown fox", "--dtype", "bfloat16",
                           "--json")
    assert code == 0
    result = json.loads(out)
    assert 0.0 <= result["top1_agreement"] <= 1.0 and result["kl"] >= 0
    # bf16 is judged against transformers' own bf16-vs-fp32 noise, measured in the same run: every hook's
    # threshold is factor x that noise (floor below), and the first divergence is the first hook above its own
    noise = result["noise"]
    for view, noise_view in (("hooks", "hooks"), ("local_hooks", "local_hooks")):
        hooks, floor = result[view], noise["floor"]
        assert [h["name"] for h in noise[noise_view]] == [h["name"] for h in hooks]
        for h, n in zip(hooks, noise[noise_view]):
            assert h["threshold"] == pytest.approx(max(noise["factor"] * n["rel_err"], floor), rel=1e-6)
        above = [h["name"] for h in hooks if h["rel_err"] is not None and h["rel_err"] > h["threshold"]
                 and not h["name"].endswith("hook_topk_indices")]
        first = result["first_divergence" if view == "hooks" else "local_first_divergence"]
        assert first is None or first in above or first.endswith("hook_topk_indices")  # near-tie flips set aside
    logits_noise = {n["name"]: n["rel_err"] for n in noise["hooks"]}["hook_logits"]
    assert logits_noise > 0  # transformers' bf16 is not its fp32
    assert noise["factor"] == 4.0
    assert max(h["rel_err"] for h in result["hooks"]) > 0  # bf16 rounding is reported, not hidden
    noise = result["noise"]
    assert [h["name"] for h in noise["hooks"]] == [h["name"] for h in result["hooks"]]
    assert max(h["rel_err"] for h in noise["hooks"]) > 0  # transformers' own bf16 is not its fp32
    for h, n in zip(result["hooks"], noise["hooks"]):
        assert h["threshold"] == pytest.approx(max(noise["factor"] * n["rel_err"], noise["floor"]))


def test_cli_compare_reference_names_the_edited_layer(make_checkpoint, tmp_path, capsys):
    """A copy with one layer's post_attention_layernorm reset to ones, as hand extractions left it, against the
    original: both views name that layer, the local view that layer alone."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.testing.breakage import copy_checkpoint, replace_tensor

    src = make_checkpoint("moe", num_hidden_layers=5)
    original = copy_checkpoint(src, tmp_path / "original")
    name = "model.layers.2.post_attention_layernorm.weight"
    shape = Checkpoint(src).read(name).shape
    replace_tensor(original, name, 1.0 + 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    edited = copy_checkpoint(original, tmp_path / "edited")
    replace_tensor(edited, name, torch.ones(shape))
    code, out, _ = run_cli(capsys, "compare", edited, "--reference", original, "--input-ids", "3,17,42,99,7,250,12",
                           "--json")
    assert code == 0
    result = json.loads(out)
    assert result["reference"] == str(original)
    assert result["first_divergence"] == result["local_first_divergence"] == "blocks.2.mlp.hook_router_logits"
    local_divergent = {h["name"].split(".")[1] for h in result["local_hooks"] if h["rel_err"] > h["threshold"]}
    assert local_divergent == {"2"}
    # the same checkpoint on both sides agrees
    code, out, _ = run_cli(capsys, "compare", edited, "--reference", edited, "--input-ids", "3,17,42", "--json")
    assert code == 0 and json.loads(out)["local_first_divergence"] is None


def test_cli_compare_reference_of_another_model_is_one_line(make_checkpoint, capsys):
    code, _, err = run_cli(capsys, "compare", make_checkpoint("moe"), "--reference",
                           make_checkpoint("moe", num_hidden_layers=5), "--input-ids", "1,2")
    assert code == 2 and "num_hidden_layers" in err and len(err.strip().splitlines()) == 1


def test_cli_generate_json_contract(tiny_moe, capsys):
    code, out, _ = run_cli(capsys, "generate", tiny_moe, "--input-ids", "5,6,7", "--max-new-tokens", "6", "--greedy",
                           "--expert-budget", "60KB", "--stop-ids", "", "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["new_token_ids"]) == 6 and isinstance(result["text"], str)
    assert result["tokens_per_s"] > 0
    cache = result["cache"]
    assert cache["budget_bytes"] == 60_000 and cache["peak_resident_bytes"] <= 60_000
    assert cache["misses"] > 0 and cache["loaded_bytes"] == cache["misses"] * 3 * 32 * 64 * 4
    assert {"hits", "misses", "loaded_bytes", "peak_resident_bytes", "budget_bytes"} <= set(cache)


def test_cli_errors_are_one_line(tiny_moe, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", tiny_moe, "--input-ids", "1,2", "--expert-budget", "1KB")
    assert code == 2 and "smaller than one expert" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "compare", tmp_path, "--input-ids", "1,2")
    assert code == 2 and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in tiny_moe.iterdir():  # copies: a symlink out of the folder is refused (omnilab.checkpoint)
        if not f.name.startswith("tokenizer"):
            shutil.copy(f, no_tok / f.name)
    code, _, err = run_cli(capsys, "generate", no_tok, "--prompt", "hello")
    assert code == 2 and "--input-ids" in err
    code, out, _ = run_cli(capsys, "generate", no_tok, "--input-ids", "1,2", "--max-new-tokens", "3", "--greedy", "--json")
    assert code == 0 and json.loads(out)["text"] is None


def test_compare_finds_first_divergence_and_measures_it():
    """compare_activations on hand-made captures: the first hook over rtol is named, set agreement counted."""
    ref = {"hook_embed": torch.ones(1, 4, 8), "blocks.0.mlp.hook_topk_indices": torch.tensor([[0, 1], [2, 3]]),
           "hook_logits": torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])}
    sel = {"hook_embed": torch.ones(1, 4, 8), "blocks.0.mlp.hook_topk_indices": torch.tensor([[1, 0], [2, 5]]),
           "hook_logits": torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])}
    result = compare_activations(ref, sel, rtol=1e-4)
    assert result.first_divergence == "blocks.0.mlp.hook_topk_indices"
    row = result.table.set_index("name").loc["blocks.0.mlp.hook_topk_indices"]
    assert row.topk_agreement == pytest.approx(0.75) and row.max_abs == pytest.approx(0.5)
    assert result.top1_agreement == 0.5 and result.kl > 0
    assert topk_agreement(torch.tensor([[0, 1]]), torch.tensor([[1, 0]])) == 1.0


def test_capture_leaves_no_hooks_behind(tiny_moe):
    sel = SelectiveMoE.from_checkpoint(tiny_moe, tokenizer=False)
    with capture(sel) as acts:
        sel(torch.tensor([[1, 2, 3]]))
    assert set(acts) == set(hook_names(sel.config)) and sel.hooks == {}
    assert acts["blocks.0.mlp.hook_topk_indices"].shape == (3, sel.config.num_experts_per_tok)
    with pytest.raises(KeyError):
        sel.add_hook("blocks.99.hook_resid_pre", print)
