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
from dataclasses import dataclass
from pathlib import Path

from omnilab.checkpoint import INDEX_NAME, SINGLE_NAME
from omnilab.jsonio import write_json


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A private copy of a checkpoint folder (replacing `dst` if it exists)."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def linked_copy(src: str | os.PathLike, dst: str | os.PathLike, private=()) -> Path:
    """A copy of folder SRC at DST made of hard links (no bytes copied, at any scale), except the files in
    `private` (paths relative to SRC), which are real copies and safe to break; SRC is never touched through DST's
    private files. Falls back to a real copy where the file system has no hard links."""
    src, dst = Path(src), Path(dst)
    private = {Path(p).as_posix() for p in private}

    def link_or_copy(a, b):
        if Path(a).relative_to(src).as_posix() in private:
            return shutil.copy2(a, b)
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
        return b

    shutil.copytree(src, dst, copy_function=link_or_copy)
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


def flip_bit(path: str | os.PathLike, offset: int = -3, mask: int = 0x10) -> None:
    """Flip the bits `mask` of one byte of a file in place (offset from the end when negative): the smallest
    corruption a checksum must catch."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# -- the three faults of a hand extraction, on a copy ------------------------------------------------------

COPY_LIMIT_BYTES = 200_000_000  # a checkpoint bigger than this is not copied: a tiny synthesized one is broken


@dataclass
class HandBreaks:
    """A copy broken as hand extractions break checkpoints: one layer's norms never copied, an expert left with
    only its gate_proj, a shard cut short. `source` says what was copied."""

    folder: Path
    source: str
    layer: int
    norms: list[str]
    expert: str  # the partial expert's name stem, "<prefix>layers.L.mlp.experts.E"
    shard: str  # the truncated shard

    def named(self, problems) -> dict[str, bool]:
        """Which of the three faults `problems` (verify's) names, each by its tensor or shard."""
        return {
            "norms gone": all(any(p.kind == "missing" and p.tensor == n for p in problems) for n in self.norms),
            "expert with one projection": any(p.kind == "partial_expert" and (p.tensor or "").startswith(self.expert + ".")
                                              for p in problems),
            "truncated shard": any(p.kind == "truncated" and p.shard == self.shard for p in problems),
        }


def break_like_hand_extraction(checkpoint: str | os.PathLike, out: str | os.PathLike) -> HandBreaks:
    """Copy `checkpoint` to OUT (when it is under COPY_LIMIT_BYTES; else write a tiny synthesized Qwen3-Omni
    there, so a 70 GB model is never copied) and make the three faults of HandBreaks: the middle MoE layer's
    norms dropped, its middle expert's up_proj and down_proj dropped, the last shard cut by 16 bytes."""
    from omnilab.arch import expert_tensor
    from omnilab.checkpoint import Checkpoint

    source = Checkpoint(checkpoint)
    out = Path(out)
    if source.file_bytes < COPY_LIMIT_BYTES:
        folder, what = copy_checkpoint(source.root, out), f"a copy of {source.root.name}"
    else:
        from omnilab.testing.synth import tiny_qwen3_omni

        if out.exists():
            shutil.rmtree(out)
        folder = tiny_qwen3_omni(out)
        what = (f"a tiny synthesized Qwen3-Omni ({source.root.name} is {source.file_bytes / 1e9:.1f} GB, over the "
                f"{COPY_LIMIT_BYTES / 1e6:.0f} MB copy limit)")
    config, layout = Checkpoint(folder).arch
    layer = config.moe_layers[len(config.moe_layers) // 2]
    expert = config.num_experts // 2
    norms = [f"{layout.prefix}layers.{layer}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
    drop_tensors(folder, norms)
    drop_tensors(folder, [expert_tensor(layout, layer, expert, p) for p in ("up_proj", "down_proj")])
    shard = Checkpoint(folder).shards[-1]
    truncate_shard(folder, shard, cut_bytes=16)
    stem = expert_tensor(layout, layer, expert, "gate_proj").removesuffix(".gate_proj.weight")
    return HandBreaks(folder, what, layer, norms, stem, shard)
