"""Checkpoint: a folder of safetensors shards (or one .safetensors file), read without reading weights.

Opening a checkpoint reads `model.safetensors.index.json`, `config.json` and the header of every shard
(8-byte little-endian length, then JSON) and nothing else, so a 70 GB checkpoint opens in well under a
second. `tensors` is one row per tensor actually found in a shard header. `read(name)` returns one tensor
through safetensors (mmap: only that tensor's pages are touched).

Broken files do not raise here: each becomes a `Problem` in `problems` that `omnilab verify` reports.
Only a path that holds no checkpoint at all (or an unparseable index / config) raises `CheckpointError`.

A checkpoint is a folder downloaded from strangers, so only regular files inside it are ever opened: a shard
name that is absolute, climbs out with `..`, or is a symlink resolving outside the folder is an `unsafe_path`
problem and never read (set OMNILAB_FOLLOW_SYMLINKS=1, or `omnilab --follow-symlinks`, for a Hugging Face
cache snapshot whose files link to its `blobs/`); a FIFO or device is `not_a_file`. Every tensor's dtype must
be known, its `data_offsets` must match its shape and must not overlap another tensor's.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors itself refuses headers over 100 MB
UNREADABLE = ("missing", "bad_header", "unsafe")  # shard statuses whose tensors are unknown
FOLLOW_SYMLINKS_ENV = "OMNILAB_FOLLOW_SYMLINKS"

# which verbs each kind of problem breaks (verify says so: `breaks` in --json, a suffix on each text line)
MODEL_VERBS = ("generate", "compare", "trace")
BREAKS = {
    "missing_shard": MODEL_VERBS + ("extract",), "bad_header": MODEL_VERBS + ("extract",),
    "truncated": MODEL_VERBS + ("extract",), "duplicate": MODEL_VERBS + ("extract",),
    "unsafe_path": MODEL_VERBS + ("extract",), "not_a_file": MODEL_VERBS + ("extract",),
    "config": MODEL_VERBS + ("extract",), "remote_code": ("tokenizer and processor loading: --prompt, --audio, --image",),
    "tokenizer": ("--prompt", "--audio", "--image", "trace"), "special_tokens": ("--audio", "--image", "--prompt"),
    "missing": MODEL_VERBS, "partial_expert": MODEL_VERBS, "shape": MODEL_VERBS, "not_in_shard": MODEL_VERBS,
    "unexpected": (), "unindexed": (), "dtype": ("compare",),
}

# bytes per element of each safetensors dtype string
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class CheckpointError(Exception):
    """The path holds no readable checkpoint. The message is one line naming the file."""


class ConfigError(CheckpointError):
    """config.json is of the family, but its values cannot describe a working model (verify's `config` problem)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint. `message` is one line and names the tensor and/or shard file."""

    kind: str  # missing, unexpected, partial_expert, shape, dtype, missing_shard, not_in_shard, unindexed, truncated, bad_header
    message: str
    tensor: str | None = None
    shard: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    @property
    def breaks(self) -> tuple[str, ...]:
        """The verbs (or options) this problem breaks."""
        return BREAKS.get(self.kind, MODEL_VERBS)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "tensor": self.tensor, "shard": self.shard,
                "breaks": list(self.breaks)}


def follow_symlinks() -> bool:
    return os.environ.get(FOLLOW_SYMLINKS_ENV, "") not in ("", "0")


def member(root: Path, name: str) -> tuple[Path | None, str | None]:
    """(path, None) when `name` is a regular file inside `root` (symlinks resolving inside it allowed), else
    (None, reason) or (path, None) for a name that does not exist (yet)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return None, f"{name!r} is not a file name"
    if os.path.isabs(name) or ".." in Path(name).parts:
        return None, f"{name!r} points outside the checkpoint folder"
    path = root / name
    real_root = root.resolve()
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError) as e:  # a symlink loop
        return None, f"{name!r} cannot be resolved ({e.__class__.__name__})"
    if real != real_root and real_root not in real.parents and not follow_symlinks():
        return None, (f"{name!r} is a symlink to {real}, outside the checkpoint folder (set "
                      f"{FOLLOW_SYMLINKS_ENV}=1 to follow it)")
    return path, None


def regular_file(path: Path) -> str | None:
    """None when `path` is a regular file (after symlinks), else why not (it never opens a FIFO or device)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot stat ({e.strerror})"
    return None if stat.S_ISREG(mode) else "is not a regular file (a FIFO, device or folder)"


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one safetensors file and the offset where its data region starts.

    Raises ValueError with a one-line reason when the header cannot be read."""
    if (why := regular_file(path)) is not None:
        raise ValueError(why)
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


def header_entries(header: dict, data_bytes: int | None = None) -> tuple[list[tuple], list[str]]:
    """A parsed safetensors header -> ([(name, dtype, shape, numel, nbytes, begin, end)], [(tensor, message)]), every
    entry checked: known dtype, non-negative integer shape and offsets, span == numel x element size, no two
    spans overlapping, and (when `data_bytes` is given) every span inside the data region. Entries with a
    problem are left out. Pure: the fuzz test runs it over thousands of generated headers."""
    rows, problems = [], []
    for name, spec in header.items():
        if name == "__metadata__":
            if spec is not None and not isinstance(spec, dict):
                problems.append((None, "__metadata__ is not an object"))
            continue
        try:
            dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
            if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError
            begin, end = offsets
            if not all(type(x) is int and x >= 0 for x in (*shape, begin, end)) or end < begin:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            problems.append((name, f"malformed entry for tensor {name}"))
            continue
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            problems.append((name, f"tensor {name} has unknown dtype {str(dtype)[:40]!r}"))
            continue
        numel = math.prod(shape)
        nbytes = numel * DTYPE_BYTES[dtype]
        if end - begin != nbytes:
            problems.append((name, f"tensor {name} spans {end - begin} bytes but {dtype}{list(shape)} needs {nbytes}"))
            continue
        rows.append((name, dtype, tuple(shape), numel, nbytes, begin, end))
    previous = None
    for row in sorted((r for r in rows if r[4]), key=lambda r: (r[5], r[6])):
        if previous is not None and row[5] < previous[6]:
            problems.append((row[0], f"tensor {row[0]} (bytes {row[5]}-{row[6]}) overlaps tensor {previous[0]} "
                                     f"(bytes {previous[5]}-{previous[6]})"))
        previous = row if previous is None or row[6] > previous[6] else previous
    if data_bytes is not None:
        for r in rows:
            if r[6] > data_bytes:
                problems.append((r[0], f"tensor {r[0]} ends at byte {r[6]} of a {data_bytes}-byte data region"))
    if problems:
        bad = {t for t, _ in problems}
        rows = [r for r in rows if r[0] not in bad]
    return rows, problems


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
        if not path.is_dir() and not path.is_file():
            raise CheckpointError(f"{path}: not a regular file or a folder")
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
            if not weight_map:
                raise CheckpointError(f"{path / INDEX_NAME}: 'weight_map' is empty: the index names no tensor")
            shard_files = sorted(set(weight_map.values()))
        elif (path / SINGLE_NAME).exists():
            self.root = path
            shard_files = [SINGLE_NAME]
        else:
            raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} in this folder")
        config_path = self.root / "config.json"
        self.config: dict = _read_json(config_path) if config_path.exists() else {}
        for where in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
            self._check_remote_code(where)
        self.shards = shard_files
        self.tensors = self._read_headers(shard_files)
        self._check_index()
        self._handles: dict[str, object] = {}

    # -- reading headers -------------------------------------------------------------------------
    def _read_headers(self, shard_files: list[str]) -> pd.DataFrame:
        rows = []
        self.shard_info: dict[str, dict] = {}
        for shard in shard_files:
            file, unsafe = member(self.root, shard)
            if unsafe is not None:
                self.problems.append(Problem("unsafe_path", f"shard {unsafe}; not read", shard=shard))
                self.shard_info[shard] = {"status": "unsafe", "file_bytes": 0}
                continue
            if not file.exists():
                n = sum(1 for s in (self.index or {}).get("weight_map", {}).values() if s == shard)
                self.problems.append(Problem(
                    "missing_shard", f"shard file {shard} is named by the index for {n} tensors but does not exist",
                    shard=shard))
                self.shard_info[shard] = {"status": "missing", "file_bytes": 0}
                continue
            if (why := regular_file(file)) is not None:
                self.problems.append(Problem("not_a_file", f"shard {shard} {why}; not read", shard=shard))
                self.shard_info[shard] = {"status": "unsafe", "file_bytes": 0}
                continue
            try:
                header, data_start = read_header(file)
            except (ValueError, OSError) as e:
                self.problems.append(Problem("bad_header", f"{shard}: unreadable header: {e}", shard=shard))
                self.shard_info[shard] = {"status": "bad_header", "file_bytes": file.stat().st_size}
                continue
            file_bytes = file.stat().st_size
            metadata = header.get("__metadata__")
            self.shard_info[shard] = {"status": "ok", "file_bytes": file_bytes, "data_start": data_start,
                                      "metadata": metadata if isinstance(metadata, dict) else {}}
            entries, entry_problems = header_entries(header)
            for tensor, message in entry_problems:
                self.problems.append(Problem("bad_header", f"{shard}: {message}", tensor=tensor, shard=shard))
            if entry_problems:
                self.shard_info[shard]["status"] = "bad_header"  # generate / extract refuse it: never read a lie
            shard_rows = [(name, shard, dtype, shape, numel, nbytes, data_start + begin, data_start + end)
                          for name, dtype, shape, numel, nbytes, begin, end in entries]
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

    def _check_remote_code(self, name: str) -> None:
        """`auto_map` in a config names Python files transformers would run: omnilab never does; a problem."""
        file, unsafe = member(self.root, name)
        if unsafe is not None or not file.exists() or regular_file(file) is not None:
            return
        data = self.config if name == "config.json" else _read_json(file, strict=False)
        found = []

        def walk(d, where):
            if isinstance(d, dict):
                if "auto_map" in d:
                    found.append(where)
                for k, v in d.items():
                    if isinstance(v, dict):
                        walk(v, f"{where}.{k}")
        walk(data, name)
        if found:
            py = sorted(p.name for p in self.root.glob("*.py"))
            self.problems.append(Problem(
                "remote_code", f"{found[0]} has auto_map (custom code{': ' + ', '.join(py[:3]) if py else ''}); "
                               f"omnilab never runs a checkpoint's code (transformers loaders get trust_remote_code=False)",
                shard=name))

    # -- what the checkpoint is ------------------------------------------------------------------
    @cached_property
    def arch(self):
        """The architecture family and layout for this checkpoint's config (see omnilab.arch).

        Raises CheckpointError naming config.json when it is absent or not a config this package reads."""
        from omnilab.arch import ConfigInsane, read_config

        if not self.config:
            raise CheckpointError(f"{self.root / 'config.json'}: missing; cannot tell the architecture")
        try:
            return read_config(self.config)
        except ConfigInsane as e:
            raise ConfigError(f"{self.root / 'config.json'}: {e}") from None
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


MAX_JSON_BYTES = 256 * 2**20  # an index or config larger than this is not one


def _read_json(path: Path, strict: bool = True) -> dict:
    """A JSON object from a regular file inside the checkpoint (bounded size); CheckpointError naming the file,
    or {} when not strict."""
    try:
        if (why := regular_file(path)) is not None:
            raise CheckpointError(f"{path}: {why}")
        _, unsafe = member(path.parent, path.name)
        if unsafe is not None:
            raise CheckpointError(f"{path}: {unsafe}")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large for a JSON index or config")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read JSON ({e.__class__.__name__}: {e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: not a JSON object (a {type(data).__name__})")
        return data
    except CheckpointError:
        if strict:
            raise
        return {}
