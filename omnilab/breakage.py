"""Break a copy of a checkpoint the ways hand extraction breaks it, to show (and test) that `omnilab verify` names each.

Each function changes a checkpoint folder in place, so work on a copy (`copy_checkpoint`). Shards are
rewritten through safetensors under a temporary name and renamed; the index is kept in step unless the fault
is the index itself. Faults: a tensor dropped (e.g. one layer's norms, or two projections of an expert), an
extra tensor, a tensor replaced by one of another shape or dtype, a shard cut short, a shard header made
unreadable, a shard file deleted, an index entry pointing at a shard that does not hold the tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omnilab.checkpoint import INDEX_NAME, SINGLE_NAME


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A private copy of a checkpoint folder (replacing `dst` if it exists)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def drop_tensors(folder: str | os.PathLike, names: list[str]) -> list[str]:
    """Remove tensors from their shards and from the index, as an extraction that forgot them would."""
    folder = Path(folder)
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(_shard_of(folder, name), []).append(name)
    for shard, drop in by_shard.items():
        _rewrite_shard(folder / shard, lambda tensors: [tensors.pop(n) for n in drop])
    _edit_index(folder, lambda wm: [wm.pop(n, None) for n in names])
    return list(names)


def add_tensor(folder: str | os.PathLike, name: str, tensor, shard: str | None = None) -> str:
    """Add a tensor (to `shard`, default the first) and index it. Returns the shard file."""
    folder = Path(folder)
    shard = shard or _shards(folder)[0]
    _rewrite_shard(folder / shard, lambda tensors: tensors.__setitem__(name, tensor))
    _edit_index(folder, lambda wm: wm.__setitem__(name, shard))
    return shard


def replace_tensor(folder: str | os.PathLike, name: str, tensor) -> str:
    """Put another tensor (another shape or dtype) under an existing name. Returns its shard file."""
    folder = Path(folder)
    shard = _shard_of(folder, name)
    _rewrite_shard(folder / shard, lambda tensors: tensors.__setitem__(name, tensor))
    return shard


def truncate_shard(folder: str | os.PathLike, shard: str, cut_bytes: int = 64) -> None:
    """Cut the last `cut_bytes` off a shard file, as an interrupted copy leaves it."""
    path = Path(folder) / shard
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(max(size - cut_bytes, 0))


def corrupt_header(folder: str | os.PathLike, shard: str) -> None:
    """Overwrite the start of a shard's JSON header, so the header no longer parses."""
    with open(Path(folder) / shard, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage\xff")


def remove_shard(folder: str | os.PathLike, shard: str) -> None:
    """Delete a shard file; the index still names it."""
    (Path(folder) / shard).unlink()


def repoint_index(folder: str | os.PathLike, name: str, shard: str) -> None:
    """Make the index say that `name` lives in `shard` (which does not hold it)."""
    _edit_index(Path(folder), lambda wm: wm.__setitem__(name, shard))


# -- plumbing --------------------------------------------------------------------------------------------


def _shards(folder: Path) -> list[str]:
    if (folder / INDEX_NAME).exists():
        return sorted(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values()))
    return [SINGLE_NAME]


def _shard_of(folder: Path, name: str) -> str:
    if (folder / INDEX_NAME).exists():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        if name not in weight_map:
            raise KeyError(f"tensor {name} is not in {folder / INDEX_NAME}")
        return weight_map[name]
    return SINGLE_NAME


def _rewrite_shard(path: Path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def _edit_index(folder: Path, edit) -> None:
    path = folder / INDEX_NAME
    if not path.exists():
        return
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(path)
