"""Inventory: every tensor in one component, bytes add up, expert completeness per layer; the full-scale layout."""

import json
from pathlib import Path

import numpy as np
import pytest

from omnilab import Checkpoint
from omnilab.arch import TEXT_COMPONENTS, classify
from omnilab.cli import main
from omnilab.inventory import component_label, inventory
from omnilab.testing import breakage, synth

REFERENCE_CONFIG = Path(__file__).resolve().parent.parent / "data/reference/qwen3-omni-30b-a3b-instruct.config.json"


@pytest.mark.parametrize("kind", ["omni", "moe"])
def test_every_tensor_in_one_component_and_bytes_add_up(make_checkpoint, kind):
    inv = inventory(make_checkpoint(kind))
    ckpt, comps = inv.checkpoint, inv.components
    assert comps.tensors.sum() == len(ckpt.tensors) and comps.bytes.sum() == ckpt.total_bytes
    cfg, layout = ckpt.arch
    labels = {component_label(classify(n, layout).component, layout) for n in ckpt.tensors.name}
    assert set(comps.index) == labels and "unrecognised" not in labels
    experts = component_label("experts", layout)
    assert comps.loc[experts, "tensors"] == len(cfg.moe_layers) * cfg.num_experts * 3
    assert (experts == "thinker.experts") == (kind == "omni")
    towers = {"thinker.audio", "thinker.vision", "talker", "code2wav"}
    assert (towers <= labels) == (kind == "omni")
    assert inv.shard_map.to_numpy().sum() == ckpt.total_bytes
    assert list(inv.shard_map.index) == ckpt.shards
    assert (inv.shard_map.sum(axis=0) == comps.bytes).all()


def test_expert_grid_marks_partial_and_missing_experts(tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    stem = "model.layers.{}.mlp.experts.{}.{}.weight"
    breakage.drop_tensors(path, [stem.format(0, 3, "up_proj"), stem.format(0, 3, "down_proj"),
                                 *(stem.format(2, 7, p) for p in ("gate_proj", "up_proj", "down_proj"))])
    inv = inventory(path)
    grid = inv.expert_grid
    assert grid[0, 3] == 1 and grid[2, 7] == 0
    assert (np.delete(grid.ravel(), [3, 2 * grid.shape[1] + 7]) == 3).all()
    layers = inv.expert_layers
    assert layers.loc[0].tolist() == [grid.shape[1] - 1, 1, 0]
    assert layers.loc[2].tolist() == [grid.shape[1] - 1, 0, 1]
    summary = inv.summary()["experts"]
    assert (summary["complete"], summary["partial"], summary["missing"]) == (3 * grid.shape[1] - 2, 1, 1)


def test_dense_layers_are_not_expert_rows(make_checkpoint):
    inv = inventory(make_checkpoint("moe", mlp_only_layers=[1]))
    assert np.isnan(inv.expert_grid[1]).all() and (inv.expert_grid[[0, 2]] == 3).all()
    assert list(inv.expert_layers.index) == [0, 2]
    assert inv.components.loc["dense_mlp", "tensors"] == 3 and inv.problems == []


def test_text_labels_follow_arch_components(tiny_omni, tiny_moe):
    omni, moe = inventory(tiny_omni), inventory(tiny_moe)
    assert [c for c in moe.components.index] == [c for c in TEXT_COMPONENTS if c in moe.components.index]
    assert [c.removeprefix("thinker.") for c in omni.components.index[:len(moe.components)]] == list(moe.components.index)


@pytest.fixture(scope="module")
def full_scale(tmp_path_factory):
    """The real Qwen3-Omni-30B-A3B-Instruct's layout, data regions left as holes (kilobytes of disk)."""
    return synth.sparse_from_config(REFERENCE_CONFIG, tmp_path_factory.mktemp("full-scale"))


def test_full_scale_layout(full_scale, capsys):
    assert main(["inspect", str(full_scale), "--json"]) == 0  # its speed: bench/inspect_full_scale.py, not a test
    report = json.loads(capsys.readouterr().out)
    assert (report["shards"], report["tensors"], report["total_bytes"]) == (15, 28_010, 70_519_637_090)
    assert report["components"]["thinker.experts"]["tensors"] == 18_432
    assert sum(c["tensors"] for c in report["components"].values()) == 28_010
    assert report["problems"] == [] and report["experts"]["complete"] == 48 * 128


def test_checkpoint_with_a_subset_of_experts(tiny_moe, copy_checkpoint):
    """Experts left out on purpose: missing in the map, and verify lists one line per absent expert."""
    path = copy_checkpoint(tiny_moe)
    cfg, _ = Checkpoint(path).arch
    keep = cfg.num_experts // 2
    gone = [n for n in Checkpoint(path).tensors.name
            if ".experts." in n and int(n.split(".experts.")[1].split(".")[0]) >= keep]
    breakage.drop_tensors(path, gone)
    inv = inventory(path)
    assert (inv.expert_grid[:, :keep] == 3).all() and (inv.expert_grid[:, keep:] == 0).all()
    assert {p.kind for p in inv.problems} == {"missing"}
    assert len(inv.problems) == len(cfg.moe_layers) * (cfg.num_experts - keep) == len(gone) // 3
