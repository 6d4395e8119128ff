"""extract(..., link_from=DIR): an earlier extraction of the same source gives its verified files as hard links
instead of copies; a donor file that fails its checksums, or a link the file system refuses, is copied from the
source instead; a donor of another source, or a folder that is no extraction, is refused in one line."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from omnilab import Checkpoint
from omnilab.extraction import write
from omnilab.extraction.manifest import JOURNAL_NAME, MANIFEST_NAME
from omnilab.extraction.verify import verify_extraction
from omnilab.extraction.write import extract
from omnilab.outdir import TEMP_TAG
from omnilab.testing import breakage

SELECTION = dict(components="backbone,experts", experts=[0, 1])


@pytest.fixture(scope="module")
def donor(tiny_moe, tmp_path_factory) -> Path:
    """A full extraction of tiny_moe; never changed by a test (break a linked_copy of it instead)."""
    out = tmp_path_factory.mktemp("donor") / "full"
    extract(tiny_moe, out, progress=False)
    return out


def safetensors_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))


def same_inode(a: Path, b: Path) -> bool:
    return a.stat().st_ino == b.stat().st_ino and a.stat().st_dev == b.stat().st_dev


def assert_clean_and_bit_identical(out: Path, source: Path, donor: Path) -> None:
    assert verify_extraction(out, source=source) == []
    for rel in safetensors_files(out):
        assert (out / rel).read_bytes() == (donor / rel).read_bytes(), rel
    src, got = Checkpoint(source), Checkpoint(out)
    assert not got.problems
    for name in got.tensors.name:
        assert got.read_raw(name) == src.read_raw(name), name
    assert list(out.rglob(f"*{TEMP_TAG}*")) == [] and not (out / JOURNAL_NAME).exists()


def data_bytes(folder: Path, files) -> int:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    return sum(manifest["files"][rel]["bytes"] for rel in files)


def test_linked_files_are_hard_links_of_the_donor_and_verify_clean(tiny_moe, donor, tmp_path):
    out = tmp_path / "partial"
    result = extract(tiny_moe, out, progress=False, link_from=donor, **SELECTION)
    files = safetensors_files(out)
    assert files and all(same_inode(out / rel, donor / rel) for rel in files)
    assert (result.linked, result.written, result.skipped, result.files) == (len(files), 0, 0, len(files))
    assert result.linked_bytes == data_bytes(donor, files) and result.written_bytes == 0
    assert f"linked {len(files)} files" in result.summary() and str(donor) in result.summary()
    assert not result.complete
    assert_clean_and_bit_identical(out, tiny_moe, donor)
    # the manifest records the linked files as a copy would have
    copied = tmp_path / "copied"
    extract(tiny_moe, copied, progress=False, **SELECTION)
    linked_manifest = json.loads((out / MANIFEST_NAME).read_text())
    copied_manifest = json.loads((copied / MANIFEST_NAME).read_text())
    assert linked_manifest["tensors"] == copied_manifest["tensors"]
    assert linked_manifest["files"] == copied_manifest["files"]

    again = extract(tiny_moe, out, progress=False, link_from=donor, **SELECTION)
    assert (again.linked, again.written, again.skipped) == (0, 0, len(files)) and "; linked" not in again.summary()


def test_counts_with_files_already_there(tiny_moe, donor, tmp_path):
    out = tmp_path / "x"
    first = extract(tiny_moe, out, components="router", progress=False)  # copied, not linked
    result = extract(tiny_moe, out, progress=False, link_from=donor, **SELECTION)
    files = safetensors_files(out)
    routers = [rel for rel in files if rel.startswith("router/")]
    assert first.written == len(routers) == 3
    assert (result.skipped, result.linked, result.written) == (3, len(files) - 3, 0)
    assert result.linked_bytes == data_bytes(donor, set(files) - set(routers))
    assert not any(same_inode(out / rel, donor / rel) for rel in routers)
    assert_clean_and_bit_identical(out, tiny_moe, donor)


def test_a_donor_of_another_source_is_refused_in_one_line(tiny_moe, tiny_omni, tmp_path):
    other = tmp_path / "omni"
    extract(tiny_omni, other, components="router", progress=False)
    out = tmp_path / "x"
    with pytest.raises(ValueError) as e:
        extract(tiny_moe, out, progress=False, link_from=other, **SELECTION)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{other}: an extraction of another checkpoint")
    assert "link_from must extract the same source" in message
    assert not out.exists()  # refused before the output folder is made
    with pytest.raises(ValueError) as e:
        extract(tiny_moe, out, progress=False, link_from=tiny_moe, **SELECTION)  # a checkpoint, not an extraction
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{tiny_moe}: not an extraction")


def test_a_donor_file_with_a_flipped_bit_is_copied_from_the_source(tiny_moe, donor, tmp_path):
    victim = "experts/layer-001/expert-001.safetensors"
    broken = breakage.linked_copy(donor, tmp_path / "broken", private=[victim])
    breakage.flip_bit(broken / victim)
    assert (broken / victim).read_bytes() != (donor / victim).read_bytes()
    out = tmp_path / "x"
    result = extract(tiny_moe, out, progress=False, link_from=broken, **SELECTION)
    files = safetensors_files(out)
    assert (result.linked, result.written) == (len(files) - 1, 1)
    assert not same_inode(out / victim, broken / victim) and not same_inode(out / victim, donor / victim)
    assert all(same_inode(out / rel, broken / rel) for rel in files if rel != victim)
    assert_clean_and_bit_identical(out, tiny_moe, donor)


def test_a_refused_link_falls_back_to_a_copy(tiny_moe, donor, tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "x"
    result = extract(tiny_moe, out, progress=False, link_from=donor, **SELECTION)
    files = safetensors_files(out)
    assert (result.linked, result.linked_bytes, result.written) == (0, 0, len(files))
    assert not any(same_inode(out / rel, donor / rel) for rel in files)
    assert "; linked" not in result.summary()
    assert_clean_and_bit_identical(out, tiny_moe, donor)


def test_linked_files_are_journaled_so_a_failed_run_resumes(tiny_moe, donor, tmp_path, monkeypatch):
    """A run that fails after linking (here: the one file it must copy fails) leaves the linked files complete
    and journaled; a rerun without link_from keeps them and copies only the rest."""
    victim = "experts/layer-002/expert-000.safetensors"
    real_link = os.link

    def link(src, dst, **kwargs):
        if str(src).endswith(victim):
            raise OSError(errno.EPERM, "Operation not permitted")
        return real_link(src, dst, **kwargs)

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(write._Writer, "write", fail)
    out = tmp_path / "x"
    with pytest.raises(OSError, match="No space left"):
        extract(tiny_moe, out, progress=False, link_from=donor, **SELECTION)
    monkeypatch.undo()
    assert not (out / MANIFEST_NAME).exists() and list(out.rglob(f"*{TEMP_TAG}*")) == []
    journaled = {json.loads(line)["file"] for line in (out / JOURNAL_NAME).read_text().splitlines()}
    files = safetensors_files(out)
    assert victim not in files and journaled == set(files) and len(files) > 10

    result = extract(tiny_moe, out, progress=False, **SELECTION)
    assert (result.skipped, result.written, result.linked) == (len(files), 1, 0)
    assert_clean_and_bit_identical(out, tiny_moe, donor)


def test_masking_sweep_links_from_the_donor(tiny_moe, donor, tmp_path, monkeypatch):
    from omnilab.experiments import masking

    monkeypatch.setattr(masking, "masking_cost", lambda folder, *a, **k: {"kl": 0.0})
    scratch = tmp_path / "sweep"
    table = masking.masking_sweep(tiny_moe, None, None, [2, 4], scratch, workers=1, link_from=donor)
    assert list(table.experts) == [2, 4]
    files = safetensors_files(scratch)
    assert any(rel.endswith("expert-003.safetensors") for rel in files)
    assert all(same_inode(scratch / rel, donor / rel) for rel in files)
    assert verify_extraction(scratch, source=tiny_moe) == []


def test_cli_link_from(tiny_moe, donor, tmp_path, capsys):
    from omnilab.cli import main

    out = tmp_path / "x"
    argv = ["extract", str(tiny_moe), str(out), "--components", "backbone,experts", "--experts", "0-1"]
    assert main(argv + ["--link-from", str(donor), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["linked"] == report["files"] > 0 and report["link_from"] == str(donor)
    assert verify_extraction(out, source=tiny_moe) == []

    for bad, said in ((tiny_moe, "not an extraction"), (tmp_path / "nowhere", "--link-from")):
        assert main(argv[:2] + [str(tmp_path / "y"), "--link-from", str(bad)]) == 2
        out_text, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out_text == "" and len(lines) == 1 and said in lines[0] and str(bad) in lines[0]
        assert "Traceback" not in err
