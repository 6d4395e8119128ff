"""Checkpoint: the tensor table from headers alone equals what safetensors itself reads; the three ways to open one."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnilab import Checkpoint, CheckpointError
from omnilab.inventory import inventory


def safetensors_view(folder, shards):
    """name -> (shard, dtype string, shape) as safetensors' own reader sees each shard."""
    out = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (shard, s.get_dtype(), tuple(s.get_shape()))
    return out


@pytest.mark.parametrize("kind", ["omni", "moe"])
def test_table_matches_safetensors_and_index(make_checkpoint, kind):
    path = make_checkpoint(kind)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint(path)
    assert ckpt.shards == sorted(set(index["weight_map"].values()))
    assert dict(zip(ckpt.tensors.name, ckpt.tensors.shard)) == index["weight_map"]
    view = safetensors_view(path, ckpt.shards)
    t = ckpt.tensors
    assert {n: (s, d, tuple(sh)) for n, s, d, sh in zip(t.name, t.shard, t["dtype"], t["shape"])} == view
    assert ckpt.total_bytes == index["metadata"]["total_size"]
    assert ckpt.file_bytes == sum((path / s).stat().st_size for s in ckpt.shards)
    assert not ckpt.problems


def test_read_and_read_raw_equal_safetensors(tiny_omni):
    ckpt = Checkpoint(tiny_omni)
    name = "thinker.model.layers.1.mlp.experts.2.down_proj.weight"
    expected = load_file(str(tiny_omni / ckpt.shard_of(name)))[name]
    assert torch.equal(ckpt.read(name), expected)
    assert ckpt.read_raw(name) == expected.numpy().tobytes()
    with pytest.raises(KeyError, match="no.such"):
        ckpt.read("no.such.tensor")


def test_config_nested_for_omni_and_flat_for_moe(tiny_omni, tiny_moe):
    omni_cfg, omni_layout = Checkpoint(tiny_omni).arch
    text = json.loads((tiny_omni / "config.json").read_text())["thinker_config"]["text_config"]
    assert omni_layout.prefix == "thinker.model."
    assert (omni_cfg.hidden_size, omni_cfg.num_experts, omni_cfg.vocab_size) == \
        (text["hidden_size"], text["num_experts"], text["vocab_size"])
    moe_cfg, moe_layout = Checkpoint(tiny_moe).arch
    flat = json.loads((tiny_moe / "config.json").read_text())
    assert moe_layout.prefix == "model."
    assert (moe_cfg.hidden_size, moe_cfg.num_hidden_layers) == (flat["hidden_size"], flat["num_hidden_layers"])


@pytest.fixture
def single_file(tiny_moe, tmp_path):
    """tiny_moe re-saved as one model.safetensors beside its config.json."""
    folder = tmp_path / "single"
    folder.mkdir()
    ckpt = Checkpoint(tiny_moe)
    tensors = {}
    for shard in ckpt.shards:
        tensors.update(load_file(str(tiny_moe / shard)))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(tiny_moe / "config.json", folder / "config.json")
    return folder


def test_folder_with_one_model_safetensors(single_file, tiny_moe):
    ckpt, sharded = Checkpoint(single_file), Checkpoint(tiny_moe)
    assert ckpt.shards == ["model.safetensors"] and ckpt.index is None
    assert set(ckpt.tensors.name) == set(sharded.tensors.name)
    assert ckpt.total_bytes == sharded.total_bytes
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    assert torch.equal(ckpt.read(name), sharded.read(name))
    assert inventory(single_file).problems == []


def test_bare_safetensors_file(single_file, tmp_path):
    ckpt = Checkpoint(single_file / "model.safetensors")  # config.json beside it is found
    assert ckpt.root == single_file and ckpt.config
    assert inventory(ckpt).problems == []
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(single_file / "model.safetensors", lone)
    inv = inventory(lone)  # no config.json: files are checked, the config cannot be
    assert len(inv.checkpoint.tensors) == len(ckpt.tensors) and inv.problems == []
    assert inv.config is None and any("config" in n for n in inv.notes)
    assert inv.components.loc["experts", "tensors"] == (ckpt.tensors.name.str.contains(".experts.")).sum()


def test_bare_file_with_unreadable_header_is_one_problem(single_file):
    with open(single_file / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe")
    inv = inventory(single_file / "model.safetensors")
    assert [p.kind for p in inv.problems] == ["bad_header"]  # and not every expected tensor as missing
    assert any("completeness not checked" in n for n in inv.notes)


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        Checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint(tmp_path)
    (tmp_path / "x.bin").write_bytes(b"1234")
    with pytest.raises(CheckpointError, match="x.bin"):
        Checkpoint(tmp_path / "x.bin")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint(tmp_path)


def test_malformed_header_entry_is_a_problem_not_a_crash(tmp_path, capsys):
    import struct

    from omnilab.cli import main

    header = {"good": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "bad": {"dtype": "F32", "shape": ["two"], "data_offsets": [8, 16]}}
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 16)
    ckpt = Checkpoint(tmp_path)
    assert list(ckpt.tensors.name) == ["good"]
    (problem,) = ckpt.problems
    assert (problem.kind, problem.tensor, problem.shard) == ("bad_header", "bad", "model.safetensors")
    assert main(["verify", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out.startswith("bad_header: ")


def test_unusable_index_and_config_are_one_line_errors(tmp_path):
    from omnilab.arch import read_config

    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": null}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint(tmp_path)
    with pytest.raises(ValueError, match="text_config"):
        read_config({"model_type": "qwen3_omni_moe", "thinker_config": {}})
