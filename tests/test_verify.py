"""verify: each way a checkpoint breaks, in its own broken copy of a tiny checkpoint, named by kind, tensor and shard.

Every test checks three things: the kind of problem, that its line names the right tensor and/or shard file,
and that `omnilab verify` exits 1 with one line per problem and no traceback. Nothing is reported twice: a
tensor lost with its shard is not also listed as missing.
"""

import json

import pytest
import torch

from omnilab import Checkpoint
from omnilab.cli import main
from omnilab.inventory import verify
from omnilab.testing import breakage

P = "thinker.model.layers."


shard_of = breakage.shard_of  # the shard file the index names for a tensor


def cli_verify(capsys, path):
    """Run `omnilab verify PATH`; return (exit code, stdout lines). Asserts no traceback."""
    code = main(["verify", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out.splitlines()


def only(problems, kind):
    """The problems of one kind, asserting there are no others (no double reports)."""
    assert {p.kind for p in problems} == {kind}, [str(p) for p in problems]
    return problems


def test_sound_checkpoint_exits_0(capsys, tiny_omni):
    assert verify(tiny_omni) == []
    code, lines = cli_verify(capsys, tiny_omni)
    assert (code, lines) == (0, [])


def test_missing_tensors_one_layers_norms(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    names = [P + "1.input_layernorm.weight", P + "1.post_attention_layernorm.weight"]
    breakage.drop_tensors(path, names)
    problems = only(verify(path), "missing")
    assert sorted(p.tensor for p in problems) == sorted(names)
    assert all(p.tensor in p.message for p in problems)
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 2
    assert all(line.startswith("missing: ") for line in lines)
    assert {n for n in names if any(n in line for line in lines)} == set(names)


def test_whole_missing_expert_is_one_line(tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    breakage.drop_tensors(path, [f"{P}2.mlp.experts.6.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")])
    (problem,) = only(verify(path), "missing")
    assert f"{P}2.mlp.experts.6." in problem.message and problem.tensor.startswith(f"{P}2.mlp.experts.6.")


def test_unexpected_tensor(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    cfg, _ = Checkpoint(tiny_omni).arch
    name = f"{P}0.mlp.experts.{cfg.num_experts}.gate_proj.weight"  # one expert past num_experts
    shard = breakage.add_tensor(path, name, torch.zeros(cfg.moe_intermediate_size, cfg.hidden_size))
    (problem,) = only(verify(path), "unexpected")
    assert (problem.tensor, problem.shard) == (name, shard)
    assert name in problem.message and shard in problem.message and "num_experts" in problem.message
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and name in lines[0] and shard in lines[0]


def test_partial_expert(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    stem = f"{P}2.mlp.experts.5."
    gate_shard = shard_of(path, stem + "gate_proj.weight")
    breakage.drop_tensors(path, [stem + "up_proj.weight", stem + "down_proj.weight"])
    (problem,) = only(verify(path), "partial_expert")
    assert problem.shard == gate_shard and problem.tensor == stem + "up_proj.weight"
    assert "expert 5 of layer 2" in problem.message and gate_shard in problem.message
    has, lacks = problem.message.split(" but not ")
    assert "gate_proj" in has and "up_proj" in lacks and "down_proj" in lacks and "up_proj" not in has
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("partial_expert: ")


def test_wrong_shape(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    name = P + "0.self_attn.q_norm.weight"
    cfg, _ = Checkpoint(tiny_omni).arch
    shard = breakage.replace_tensor(path, name, torch.ones(cfg.head_dim - 8))
    (problem,) = only(verify(path), "shape")
    assert (problem.tensor, problem.shard) == (name, shard)
    assert f"[{cfg.head_dim - 8}]" in problem.message and f"[{cfg.head_dim}]" in problem.message
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and name in lines[0] and shard in lines[0]


def test_mixed_dtype(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    name = P + "1.mlp.experts.3.down_proj.weight"
    original = Checkpoint(tiny_omni).read(name)
    shard = breakage.replace_tensor(path, name, original.to(torch.float16))
    (problem,) = only(verify(path), "dtype")
    assert (problem.tensor, problem.shard) == (name, shard)
    assert "F16" in problem.message and "F32" in problem.message
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and name in lines[0] and shard in lines[0]


def test_index_names_a_missing_shard_file(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    shard = shard_of(path, P + "1.input_layernorm.weight")
    lost = [n for n, s in json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].items()
            if s == shard]
    breakage.remove_shard(path, shard)
    (problem,) = only(verify(path), "missing_shard")  # one line for the shard, not one per lost tensor
    assert problem.shard == shard and shard in problem.message and str(len(lost)) in problem.message
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and shard in lines[0]


def test_index_names_a_tensor_the_shard_does_not_hold(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    name = P + "1.input_layernorm.weight"
    real = shard_of(path, name)
    wrong = next(s for s in Checkpoint(path).shards if s != real)
    breakage.repoint_index(path, name, wrong)
    (problem,) = only(verify(path), "not_in_shard")
    assert (problem.tensor, problem.shard) == (name, wrong)
    assert name in problem.message and wrong in problem.message and real in problem.message
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and name in lines[0] and wrong in lines[0]


def test_truncated_shard(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    ckpt = Checkpoint(tiny_omni)
    shard = ckpt.shards[3]
    last = ckpt.tensors[ckpt.tensors.shard == shard].sort_values("end").name.iloc[-1]  # the tensor cut short
    breakage.truncate_shard(path, shard, cut_bytes=8)
    (problem,) = only(verify(path), "truncated")
    assert (problem.tensor, problem.shard) == (last, shard)
    assert shard in problem.message and last in problem.message
    with pytest.raises(KeyError, match=shard):
        Checkpoint(path).read(last)
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and shard in lines[0]


def test_unreadable_header(capsys, tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    shard = shard_of(path, P + "2.mlp.gate.weight")
    breakage.corrupt_header(path, shard)
    (problem,) = only(verify(path), "bad_header")  # its tensors are not also listed as missing
    assert problem.shard == shard and shard in problem.message
    code, lines = cli_verify(capsys, path)
    assert code == 1 and len(lines) == 1 and shard in lines[0]


def test_header_length_past_end_of_file(tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    shard = Checkpoint(path).shards[0]
    with open(path / shard, "r+b") as f:
        f.write((10**9).to_bytes(8, "little"))
    (problem,) = only(verify(path), "bad_header")
    assert problem.shard == shard and "does not fit" in problem.message


def test_missing_tower(tiny_omni, copy_checkpoint):
    path = copy_checkpoint(tiny_omni)
    code2wav = [n for n in Checkpoint(path).tensors.name if n.startswith("code2wav.")]
    breakage.drop_tensors(path, code2wav)
    (problem,) = only(verify(path), "missing")
    assert "code2wav" in problem.message and problem.tensor == "code2wav.*"


def test_unindexed_tensor(tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    shard = breakage.add_tensor(path, "model.layers.0.mlp.gate.weight_extra", torch.zeros(2))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.mlp.gate.weight_extra"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    kinds = sorted(p.kind for p in verify(path))
    assert kinds == ["unexpected", "unindexed"]  # not in the index, and not implied by the config either
    assert all(p.shard == shard for p in verify(path))


@pytest.mark.parametrize("make", ["nothing", "bad_index", "not_safetensors"])
def test_unreadable_path_exits_2_with_one_line(capsys, tmp_path, make):
    path = tmp_path / "ckpt"
    if make == "bad_index":
        path.mkdir()
        (path / "model.safetensors.index.json").write_text("{not json")
    elif make == "not_safetensors":
        path = tmp_path / "weights.bin"
        path.write_bytes(b"\0" * 16)
    assert main(["verify", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(path) in err
