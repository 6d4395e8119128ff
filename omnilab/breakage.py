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

from omnilab.checkpoint import INDEX_NAME, SINGLE_NAME, write_json


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
    index = _read_index(folder)  # read once: for every name's shard, then edited and written back
    weight_map = index["weight_map"] if index is not None else None
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(shard_of(folder, name, weight_map), []).append(name)
    for shard, drop in by_shard.items():
        _rewrite_shard(folder / shard, lambda tensors: [tensors.pop(n) for n in drop])
    _edit_index(folder, lambda wm: [wm.pop(n, None) for n in names], index)
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
    shard = shard_of(folder, name)
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


def shard_of(folder: str | os.PathLike, name: str, weight_map: dict | None = None) -> str:
    """The shard file that holds `name`, as the index says (`weight_map`: the index's, when already read)."""
    folder = Path(folder)
    if weight_map is None:
        weight_map = _weight_map(folder)
    if weight_map is None:
        return SINGLE_NAME
    if name not in weight_map:
        raise KeyError(f"tensor {name} is not in {folder / INDEX_NAME}")
    return weight_map[name]


def _read_index(folder: Path) -> dict | None:
    """model.safetensors.index.json; None for a single-file checkpoint (no index)."""
    path = folder / INDEX_NAME
    return json.loads(path.read_text()) if path.exists() else None


def _weight_map(folder: Path) -> dict | None:
    """The index's weight_map; None for a single-file checkpoint (no index)."""
    index = _read_index(folder)
    return index["weight_map"] if index is not None else None


def _shards(folder: Path) -> list[str]:
    weight_map = _weight_map(folder)
    return sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]


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


def _edit_index(folder: Path, edit, index: dict | None = None) -> None:
    """Apply `edit` to the index's weight_map and write the index back (`index`: as already read)."""
    if index is None:
        index = _read_index(folder)
    if index is None:
        return
    edit(index["weight_map"])
    write_json(folder / INDEX_NAME, index, indent=2)
