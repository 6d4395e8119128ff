"""Component extraction (omnilab.extraction.write): bit-exact round trip on both architectures, partial extractions and
their availability map, resume after SIGKILL, and verify naming a corrupted file.

transformers is the reference for "the same model": `from_pretrained` on the extraction folder must give the
same parameters, bit for bit, as on the original shards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnilab.outdir import TEMP_TAG, temp_path
import torch

from omnilab import Checkpoint
from omnilab.extraction.manifest import JOURNAL_NAME, MANIFEST_NAME, is_extraction, manifest_table
from omnilab.testing import synth
from omnilab.extraction.availability import (availability, availability_text, component_bytes, missing_summary, not_extracted)
from omnilab.extraction.plan import parse_components, parse_range
from omnilab.extraction.verify import verify_extraction
from omnilab.extraction.write import extract

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_moe_bf16(tmp_path_factory):
    return synth.tiny_qwen3_moe(tmp_path_factory.mktemp("moe-bf16"), dtype=torch.bfloat16, seed=3)


@pytest.fixture(scope="module")
def omni_extracted(tiny_omni, tmp_path_factory):
    out = tmp_path_factory.mktemp("x") / "omni"
    extract(tiny_omni, out, progress=False)
    return out


def assert_same_tensors(src: Path, out: Path, names=None):
    a, b = Checkpoint(src), Checkpoint(out)
    names = list(a.tensors.name) if names is None else names
    assert not b.problems, b.problems[:3]
    for name in names:
        assert b.tensors.at[name, "dtype"] == a.tensors.at[name, "dtype"], name
        assert b.tensors.at[name, "shape"] == a.tensors.at[name, "shape"], name
        assert b.read_raw(name) == a.read_raw(name), name


def state_dicts_equal(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k].view(torch.uint8) if sa[k].dtype != torch.bool else sa[k],
                           sb[k].view(torch.uint8) if sb[k].dtype != torch.bool else sb[k]), k


# -- round trip -------------------------------------------------------------------------------------


def test_round_trip_omni_every_tensor_bit_exact(tiny_omni, omni_extracted):
    assert is_extraction(omni_extracted)
    assert_same_tensors(tiny_omni, omni_extracted)
    src, out = Checkpoint(tiny_omni), Checkpoint(omni_extracted)
    assert set(out.tensors.name) == set(src.tensors.name)
    manifest = json.loads((omni_extracted / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["missing"] == []
    # the layout is made for selective loading: one file per expert holding its three projections
    expert_file = out.shard_of("thinker.model.layers.1.mlp.experts.5.up_proj.weight")
    assert expert_file == "experts/layer-001/expert-005.safetensors"
    assert {out.shard_of(f"thinker.model.layers.1.mlp.experts.5.{p}.weight") for p in ("gate_proj", "down_proj")} == {expert_file}
    assert out.shard_of("thinker.audio_tower.conv2d1.weight") == "audio.safetensors"
    for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (omni_extracted / extra).read_bytes() == (tiny_omni / extra).read_bytes()
    assert verify_extraction(omni_extracted, source=tiny_omni) == []


def test_round_trip_omni_transformers_loads_the_same_model(tiny_omni, omni_extracted):
    from transformers import Qwen3OmniMoeForConditionalGeneration

    state_dicts_equal(Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_omni),
                      Qwen3OmniMoeForConditionalGeneration.from_pretrained(omni_extracted))


def test_round_trip_moe_bf16(tiny_moe_bf16, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "x"
    result = extract(tiny_moe_bf16, out, progress=False, workers=1)
    assert result.complete and result.skipped == 0
    assert set(Checkpoint(out).tensors.dtype) == {"BF16"}
    assert_same_tensors(tiny_moe_bf16, out)
    state_dicts_equal(AutoModelForCausalLM.from_pretrained(tiny_moe_bf16), AutoModelForCausalLM.from_pretrained(out))
    assert verify_extraction(out, source=tiny_moe_bf16) == []
    # manifest: source shard, dtype, shape and bytes for every tensor, as the source has them
    table, src = manifest_table(out), Checkpoint(tiny_moe_bf16).tensors
    assert len(table) == len(src)
    for row in table.itertuples():
        assert (row.source_shard, row.dtype, row.shape, row.bytes) == tuple(src.loc[row.name, ["shard", "dtype", "shape", "bytes"]])
    assert component_bytes(out)["bytes"].sum() == Checkpoint(tiny_moe_bf16).total_bytes


def test_rerun_skips_everything_and_changes_nothing(tiny_moe, tmp_path):
    out = tmp_path / "x"
    first = extract(tiny_moe, out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = extract(tiny_moe, out, progress=False)
    assert (again.written, again.skipped) == (0, first.written)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before


# -- partial extractions ------------------------------------------------------------------------------


def test_partial_extraction_availability_and_additive_rerun(tiny_moe, tmp_path):
    out = tmp_path / "x"
    extract(tiny_moe, out, components="experts", layers=[1], experts=[0, 3], progress=False)
    ck = Checkpoint(out)
    assert set(ck.tensors.name) == {f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in (0, 3)
                                    for p in ("gate_proj", "up_proj", "down_proj")}
    avail = availability(out)
    assert avail.shape == (3, 8)
    assert avail.loc[1, 0] == avail.loc[1, 3] == 3 and int(avail.values.sum()) == 6
    assert verify_extraction(out) == []
    summary = missing_summary(out)
    assert "2 of 24" in summary and "embed" in summary and "lm_head" in summary
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert len(manifest["missing"]) == len(Checkpoint(tiny_moe)) - 6 and not manifest["complete"]
    assert not_extracted(out) == set(Checkpoint(tiny_moe).tensors.name) - set(ck.tensors.name)
    assert availability_text(avail).splitlines()[1:] == ["  layer 0 ........  0/8", "  layer 1 #..#....  2/8",
                                                         "  layer 2 ........  0/8"]

    result = extract(tiny_moe, out, components="backbone,experts", experts=[0, 1], progress=False)
    assert result.skipped == 1  # experts/layer-001/expert-000 was there and verified
    avail = availability(out)
    assert (avail[[0, 1]] == 3).all().all() and (avail.loc[1, 3] == 3) and int(avail.values.sum()) == 3 * 7
    assert_same_tensors(tiny_moe, out, names=list(Checkpoint(out).tensors.name))
    assert verify_extraction(out, source=tiny_moe) == []


def test_selection_parsing():
    assert parse_range("0-3,7, 9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert parse_components("backbone") == ("embed", "attention", "norms", "router", "dense_mlp", "final_norm", "lm_head")
    assert parse_components(["experts", "audio"]) == ("experts", "audio")
    with pytest.raises(ValueError, match="5-2"):
        parse_range("5-2")
    with pytest.raises(ValueError, match="foo"):
        parse_components("experts,foo")


def test_refuses_folder_of_another_source(tiny_moe, tiny_omni, tmp_path):
    out = tmp_path / "x"
    extract(tiny_moe, out, components="router", progress=False)
    with pytest.raises(ValueError, match="another checkpoint"):
        extract(tiny_omni, out, components="router", progress=False)


# -- corruption ---------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_verify_names_a_flipped_byte(tiny_omni, omni_extracted, tmp_path):
    import shutil

    out = tmp_path / "x"
    shutil.copytree(omni_extracted, out)
    target = out / "experts" / "layer-002" / "expert-006.safetensors"
    flip_byte(target, target.stat().st_size - 10)  # inside the last tensor's data
    problems = verify_extraction(out)
    assert [p.kind for p in problems] == ["checksum"]
    assert problems[0].shard == "experts/layer-002/expert-006.safetensors"
    assert "experts/layer-002/expert-006.safetensors" in problems[0].message and problems[0].tensor in problems[0].message

    header_target = out / "norms" / "layer-000.safetensors"
    flip_byte(header_target, 3)  # the header length
    kinds = {p.shard: p.kind for p in verify_extraction(out)}
    assert kinds == {"experts/layer-002/expert-006.safetensors": "checksum", "norms/layer-000.safetensors": "bad_header"}


def test_cli_verify_names_the_corrupted_file(omni_extracted, tmp_path, capsys):
    import shutil

    from omnilab.cli import main

    out = tmp_path / "x"
    shutil.copytree(omni_extracted, out)
    assert main(["verify", str(out)]) == 0
    flip_byte(out / "lm_head.safetensors", (out / "lm_head.safetensors").stat().st_size // 2)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("checksum: lm_head.safetensors: tensor thinker.lm_head.weight")


def test_verify_against_source_names_a_changed_source_shard(tiny_moe, copy_checkpoint, tmp_path):
    src = copy_checkpoint(tiny_moe)
    out = tmp_path / "x"
    extract(src, out, progress=False)
    ck = Checkpoint(src)
    row = ck.tensors.loc["model.layers.2.mlp.experts.4.down_proj.weight"]
    flip_byte(src / row["shard"], int(row["begin"]) + 4)
    assert verify_extraction(out) == []  # the extraction itself is intact
    problems = verify_extraction(out, source=src)
    assert [(p.kind, p.tensor, p.shard) for p in problems] == [
        ("source_checksum", "model.layers.2.mlp.experts.4.down_proj.weight", row["shard"])]


def test_verify_reports_missing_file_and_leftovers(omni_extracted, tmp_path):
    import shutil

    out = tmp_path / "x"
    shutil.copytree(omni_extracted, out)
    (out / "router" / "layer-001.safetensors").unlink()
    (out / "stray.safetensors.tmp").write_bytes(b"half")
    problems = {p.kind: p for p in verify_extraction(out)}
    assert set(problems) == {"missing_file", "leftover"}
    assert problems["missing_file"].shard == "router/layer-001.safetensors"


# -- resume after SIGKILL ---------------------------------------------------------------------------


def _journaled(out: Path) -> int:
    journal = out / JOURNAL_NAME
    return len(journal.read_text().splitlines()) if journal.exists() else 0


def test_sigkill_mid_way_then_rerun_completes_and_verifies(tiny_omni, tmp_path):
    out = tmp_path / "x"
    cmd = [sys.executable, "-m", "omnilab", "extract", str(tiny_omni), str(out), "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd + ["--pause-after-file", "0.3"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while _journaled(out) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _journaled(out)
    assert 4 <= done < 40
    assert not (out / MANIFEST_NAME).exists() and not is_extraction(out)
    # a half-written file from the killed run, and one completed file that was damaged since
    (out / "experts" / "layer-002").mkdir(parents=True, exist_ok=True)
    temp_path(out / "experts" / "layer-002" / "expert-007.safetensors").write_bytes(b"\0" * 100)
    first = json.loads((out / JOURNAL_NAME).read_text().splitlines()[0])["file"]
    flip_byte(out / first, (out / first).stat().st_size - 1)

    rerun = subprocess.run(cmd + ["--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["skipped"] == done - 1  # the damaged one was extracted again
    assert result["written"] + result["skipped"] == result["files"] and result["complete"]
    assert list(out.rglob(f"*{TEMP_TAG}*")) == [] and not (out / JOURNAL_NAME).exists()
    assert verify_extraction(out, source=tiny_omni) == []
    assert_same_tensors(tiny_omni, out)


def test_cli_errors_are_one_line(tiny_moe, tmp_path):
    from omnilab.cli import main

    assert main(["extract", str(tiny_moe), str(tmp_path / "x"), "--experts", "40-50", "--components", "experts"]) == 2
    assert not (tmp_path / "x" / MANIFEST_NAME).exists()
    assert main(["extract", str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2


def test_selection_past_the_checkpoint_is_an_error(make_checkpoint, tmp_path):
    """--layers / --experts beyond the config are refused before anything is written."""
    from omnilab.cli import main

    src = make_checkpoint("moe")
    assert main(["extract", str(src), str(tmp_path / "a"), "--layers", "0-99"]) == 2
    assert main(["extract", str(src), str(tmp_path / "b"), "--experts", "6-9"]) == 2
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
