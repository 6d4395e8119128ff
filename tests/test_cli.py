"""The inspect, verify and synth verbs: the JSON contract of docs/DESIGN.md, exit codes, one line per error."""

import json
import subprocess
import sys

import pytest

from omnilab import Checkpoint
from omnilab.cli import main
from omnilab.inventory import inventory
from omnilab.testing import breakage


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_inspect_json_contract(capsys, tiny_omni):
    code, out, _ = run(capsys, "inspect", str(tiny_omni), "--json")
    report = json.loads(out)
    assert code == 0
    assert {"shards", "tensors", "total_bytes", "components", "problems", "experts", "tokenizer"} <= set(report)
    ckpt = Checkpoint(tiny_omni)
    assert (report["shards"], report["tensors"], report["total_bytes"]) == (len(ckpt.shards), len(ckpt), ckpt.total_bytes)
    assert all(set(c) >= {"tensors", "bytes"} for c in report["components"].values())
    assert sum(c["bytes"] for c in report["components"].values()) == ckpt.total_bytes
    assert report["problems"] == [] and report["tokenizer"]["verdict"] == "padding"
    assert set(report["shard_map"]) == set(ckpt.shards)


def test_inspect_text_names_every_component(capsys, tiny_omni):
    code, out, _ = run(capsys, "inspect", str(tiny_omni))
    assert code == 0
    for label in inventory(tiny_omni).components.index:
        assert f"  {label} " in out
    assert "problems: none" in out and "tokenizer:" in out and "<|im_start|>=" in out


def test_inspect_lists_problems_and_exits_0(capsys, tiny_moe, copy_checkpoint):
    path = copy_checkpoint(tiny_moe)
    breakage.drop_tensors(path, ["model.layers.0.input_layernorm.weight"])
    code, out, _ = run(capsys, "inspect", str(path), "--json")
    problems = json.loads(out)["problems"]
    assert code == 0 and [(p["kind"], p["tensor"]) for p in problems] == [("missing", "model.layers.0.input_layernorm.weight")]


def test_verify_json(capsys, tiny_moe, copy_checkpoint):
    code, out, _ = run(capsys, "verify", str(tiny_moe), "--json")
    report = json.loads(out)
    assert code == 0 and report["sound"] is True and report["problems"] == [] and report["checked_against_config"]
    path = copy_checkpoint(tiny_moe)
    shard = Checkpoint(path).shards[1]
    breakage.truncate_shard(path, shard)
    code, out, _ = run(capsys, "verify", str(path), "--json", "--source", str(tiny_moe))
    report = json.loads(out)
    assert code == 1 and report["sound"] is False and report["counts"] == {"truncated": 1}
    assert report["problems"][0]["shard"] == shard and any("--source" in n for n in report["notes"])


def test_synth_tiny_moe_writes_a_sound_checkpoint(capsys, tmp_path):
    out = tmp_path / "tiny"
    code, stdout, _ = run(capsys, "synth", "tiny-moe", str(out), "--seed", "3")
    assert code == 0 and str(out) in stdout
    assert inventory(out).problems == [] and not list(tmp_path.glob(".tiny.tmp-*"))
    code, _, err = run(capsys, "synth", "tiny-moe", str(out))  # never over an existing checkpoint
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(out) in err


def test_synth_sparse_needs_a_config(capsys, tmp_path):
    code, _, err = run(capsys, "synth", "sparse", str(tmp_path / "x"))
    assert code == 2 and "--config" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("broken", [True, False])
def test_console_exit_codes_without_traceback(tiny_moe, tmp_path, broken):
    """Through a real process: 1 for problems, 2 for a path that holds no checkpoint."""
    path = tmp_path / "absent"
    if broken:
        path = breakage.copy_checkpoint(tiny_moe, tmp_path / "broken")
        for f in path.glob("tokenizer*"):
            f.unlink()  # keep the process fast: no transformers import
        breakage.corrupt_header(path, Checkpoint(path).shards[0])
    proc = subprocess.run([sys.executable, "-m", "omnilab", "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == (1 if broken else 2)
    assert "Traceback" not in proc.stderr
    if broken:
        assert proc.stdout.startswith("bad_header: ") and len(proc.stdout.splitlines()) == 1
    else:
        assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and str(path) in proc.stderr
