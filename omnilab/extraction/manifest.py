"""The manifest of an extraction folder: reading it, and its table of tensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from omnilab.checkpoint import CheckpointError
from omnilab.extraction.stream import CHECKSUM


MANIFEST_NAME = "manifest.json"


JOURNAL_NAME = ".extract-journal.jsonl"


FORMAT = "omnilab.extraction/1"


def read_manifest_if_any(out: Path) -> dict | None:
    path = out / MANIFEST_NAME
    return read_manifest(out) if path.exists() else None


def is_extraction(path: str | os.PathLike) -> bool:
    """True for a folder that holds an extraction's manifest.json."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).exists()


def read_manifest(path: str | os.PathLike) -> dict:
    """manifest.json of an extraction folder. Raises CheckpointError (one line) when it is unreadable."""
    file = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read ({e.__class__.__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{file}: not an omnilab extraction manifest ({FORMAT})")
    _check_names(file, manifest)
    return manifest


def _check_names(file: Path, manifest: dict) -> None:
    """Every file a manifest names is a plain name inside its folder (a hostile manifest must not make verify
    read /dev/zero or ../../secret): CheckpointError naming the entry otherwise."""
    from omnilab.checkpoint import member

    extras = manifest.get("extras", {})
    source = manifest.get("source", {})
    if not isinstance(extras, dict) or not isinstance(source, dict):
        raise CheckpointError(f"{file}: 'extras' and 'source' must be objects")
    for name, entry in manifest["tensors"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise CheckpointError(f"{file}: tensor {name}'s entry has no file name")
        _, unsafe = member(file.parent, entry["file"])
        if unsafe is not None:
            raise CheckpointError(f"{file}: tensor {name}: file {unsafe}")
    for name, entry in extras.items():
        _, unsafe = member(file.parent, name)
        if unsafe is not None or not isinstance(entry, dict):
            raise CheckpointError(f"{file}: extra file {unsafe or repr(name) + ' has no checksum'}")


def manifest_table(path: str | os.PathLike) -> pd.DataFrame:
    """One row per extracted tensor: name, file, component, layer, expert, source_shard, dtype, shape, bytes, sha256."""
    manifest = read_manifest(path)
    rows = [{"name": n, **e} for n, e in manifest["tensors"].items()]
    cols = ["name", "file", "component", "layer", "expert", "source_shard", "dtype", "shape", "bytes", CHECKSUM]
    table = pd.DataFrame(rows, columns=cols)
    table["shape"] = table["shape"].map(tuple)
    for c in ("layer", "expert"):
        table[c] = table[c].astype("Int64")
    return table
