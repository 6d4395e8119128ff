"""Checkpoint: a folder of safetensors shards (or one .safetensors file), read without reading weights.

Opening a checkpoint reads `model.safetensors.index.json`, `config.json` and the header of every shard
(8-byte little-endian length, then JSON) and nothing else, so a 70 GB checkpoint opens in well under a
second. `tensors` is one row per tensor actually found in a shard header. `read(name)` returns one tensor
through safetensors (mmap: only that tensor's pages are touched).

Broken files do not raise here: each becomes a `Problem` in `problems` that `omnilab verify` reports.
Only a path that holds no checkpoint at all (or an unparseable index / config) raises `CheckpointError`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors itself refuses headers over 100 MB
UNREADABLE = ("missing", "bad_header")  # shard statuses whose tensors are unknown

# bytes per element of each safetensors dtype string
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class CheckpointError(Exception):
    """The path holds no readable checkpoint. The message is one line naming the file."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. `message` is one line and names the tensor and/or shard file."""

    kind: str  # missing, unexpected, partial_expert, shape, dtype, missing_shard, not_in_shard, unindexed, truncated, bad_header
    message: str
    tensor: str | None = None
    shard: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "tensor": self.tensor, "shard": self.shard}


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and the offset where its data region starts.

    Raises ValueError with a one-line reason when the header cannot be read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"header length {n} does not fit in a {size}-byte file")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n


def pack_header(header: dict) -> bytes:
    """A safetensors header as stored: 8-byte little-endian length, then the JSON padded with spaces to 8 bytes."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


class Checkpoint:
    """A safetensors checkpoint on disk: index, config, every shard header; weights only on `read`."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        self.path = path
        self.problems: list[Problem] = []
        self.index: dict | None = None
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: not a .safetensors file or a checkpoint folder")
            self.root = path.parent
            shard_files = [path.name]
        elif (path / INDEX_NAME).exists():
            self.root = path
            self.index = _read_json(path / INDEX_NAME)
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{path / INDEX_NAME}: no 'weight_map' object")
            if not all(isinstance(s, str) for s in weight_map.values()):
                raise CheckpointError(f"{path / INDEX_NAME}: 'weight_map' values must be shard file names")
            shard_files = sorted(set(weight_map.values()))
        elif (path / SINGLE_NAME).exists():
            self.root = path
            shard_files = [SINGLE_NAME]
        else:
            raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} in this folder")
        config_path = self.root / "config.json"
        self.config: dict = _read_json(config_path) if config_path.exists() else {}
        self.shards = shard_files
        self.tensors = self._read_headers(shard_files)
        self._check_index()
        self._handles: dict[str, object] = {}

    # -- reading headers -------------------------------------------------------------------------
    def _read_headers(self, shard_files: list[str]) -> pd.DataFrame:
        rows = []
        self.shard_info: dict[str, dict] = {}
        for shard in shard_files:
            file = self.root / shard
            if not file.exists():
                n = sum(1 for s in (self.index or {}).get("weight_map", {}).values() if s == shard)
                self.problems.append(Problem(
                    "missing_shard", f"shard file {shard} is named by the index for {n} tensors but does not exist",
                    shard=shard))
                self.shard_info[shard] = {"status": "missing", "file_bytes": 0}
                continue
            try:
                header, data_start = read_header(file)
            except ValueError as e:
                self.problems.append(Problem("bad_header", f"{shard}: unreadable header: {e}", shard=shard))
                self.shard_info[shard] = {"status": "bad_header", "file_bytes": file.stat().st_size}
                continue
            file_bytes = file.stat().st_size
            self.shard_info[shard] = {"status": "ok", "file_bytes": file_bytes, "data_start": data_start,
                                      "metadata": header.get("__metadata__") or {}}
            shard_rows = []
            for name, spec in header.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
                    if not all(type(x) is int and x >= 0 for x in (*shape, begin, end)):
                        raise ValueError("shape and data_offsets must be non-negative integers")
                except (KeyError, TypeError, ValueError):
                    self.problems.append(Problem("bad_header", f"{shard}: malformed entry for tensor {name}",
                                                 tensor=name, shard=shard))
                    continue
                numel = math.prod(shape)
                nbytes = numel * DTYPE_BYTES.get(dtype, 0)
                if end - begin != nbytes:
                    self.problems.append(Problem(
                        "bad_header", f"{shard}: tensor {name} spans {end - begin} bytes but {dtype}{list(shape)} needs {nbytes}",
                        tensor=name, shard=shard))
                shard_rows.append((name, shard, dtype, shape, numel, nbytes, data_start + begin, data_start + end))
            data_end = max((r[7] for r in shard_rows), default=data_start)
            if file_bytes < data_end:
                cut = [r[0] for r in shard_rows if r[7] > file_bytes]
                self.problems.append(Problem(
                    "truncated",
                    f"{shard} is truncated: {file_bytes} bytes on disk, header needs {data_end}; "
                    f"{len(cut)} tensors cut short, first {cut[0]}",
                    tensor=cut[0], shard=shard))
                self.shard_info[shard]["status"] = "truncated"
            rows.extend(shard_rows)
        columns = ["name", "shard", "dtype", "shape", "numel", "bytes", "begin", "end"]
        table = pd.DataFrame(rows, columns=columns)
        duplicated = table[table.name.duplicated(keep=False)]
        for name, group in duplicated.groupby("name"):
            self.problems.append(Problem("duplicate", f"tensor {name} is stored in several shards: {', '.join(group.shard)}",
                                         tensor=name, shard=group.shard.iloc[0]))
        return table.drop_duplicates("name").set_index("name", drop=False).rename_axis(None)

    def _check_index(self) -> None:
        if self.index is None:
            return
        weight_map: dict = self.index["weight_map"]
        found = dict(zip(self.tensors.name, self.tensors.shard))
        readable = {s for s, info in self.shard_info.items() if info["status"] not in UNREADABLE}
        for name, shard in weight_map.items():
            if shard in readable and found.get(name) != shard:
                where = f" (it is in {found[name]})" if name in found else ""
                self.problems.append(Problem("not_in_shard", f"index maps tensor {name} to {shard}, which does not hold it{where}",
                                             tensor=name, shard=shard))
        for name, shard in found.items():
            if name not in weight_map:
                self.problems.append(Problem("unindexed", f"tensor {name} is in {shard} but not in {INDEX_NAME}",
                                             tensor=name, shard=shard))

    # -- what the checkpoint is ------------------------------------------------------------------
    @cached_property
    def arch(self):
        """The architecture family and layout for this checkpoint's config (see omnilab.arch).

        Raises CheckpointError naming config.json when it is absent or not a config this package reads."""
        from omnilab.arch import read_config

        if not self.config:
            raise CheckpointError(f"{self.root / 'config.json'}: missing; cannot tell the architecture")
        try:
            return read_config(self.config)
        except ValueError as e:
            raise CheckpointError(f"{self.root / 'config.json'}: {e}") from None

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (what the index calls total_size); headers not counted."""
        return int(self.tensors["bytes"].sum())

    @property
    def file_bytes(self) -> int:
        return int(sum(info["file_bytes"] for info in self.shard_info.values()))

    @cached_property
    def shards_by_name(self) -> dict[str, str]:
        """Tensor name -> the shard holding it (readable shards): a dict, as reading an expert asks it thrice
        per load (a DataFrame lookup costs ~0.4 ms, more than the read)."""
        return dict(zip(self.tensors.index, self.tensors["shard"]))

    def shard_of(self, name: str) -> str:
        if name in self.shards_by_name:
            return self.shards_by_name[name]
        if self.index is not None and name in self.index["weight_map"]:
            return self.index["weight_map"][name]
        raise KeyError(f"tensor {name} is not in checkpoint {self.path}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors.index

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return (f"Checkpoint({str(self.path)!r}: {len(self.shards)} shards, {len(self.tensors):,} tensors, "
                f"{self.total_bytes:,} bytes, {len(self.problems)} problems)")

    # -- reading weights -------------------------------------------------------------------------
    def read(self, name: str):
        """One tensor, read through safetensors (mmap). Raises KeyError naming the tensor and shard."""
        shard = self.shards_by_name.get(name)
        if shard is None:
            raise KeyError(f"tensor {name} is not in any readable shard of {self.path}")
        if self.shard_info[shard]["status"] != "ok":
            raise KeyError(f"tensor {name}: shard {shard} is {self.shard_info[shard]['status']}")
        return self.open_shard(shard).get_tensor(name)

    def open_shard(self, shard: str):
        """The shard's safetensors handle (safe_open, mmap), opened once and kept for every later read."""
        from safetensors import safe_open

        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.root / shard), framework="pt")
        return handle

    def read_raw(self, name: str) -> bytes:
        """The stored bytes of one tensor, exactly as on disk (for checksums and bit-exact copies)."""
        row = self.tensors.loc[name]
        with open(self.root / row.shard, "rb") as f:
            f.seek(int(row.begin))
            return f.read(int(row.end - row.begin))


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e.__class__.__name__}: {e})") from None
