"""Fuzz: thousands of generated safetensors headers and index files through the parsers, in-process.

Whatever the bytes, the header parser either refuses with ValueError (one line) or returns entries that are
all sound: known dtype, span equal to the shape's bytes, inside the data region, no two overlapping. An index
either opens (every shard it names inside the folder or an unsafe_path problem) or raises CheckpointError."""

from __future__ import annotations

import json
import random
import struct

import pytest

from omnilab.checkpoint import DTYPE_BYTES, Checkpoint, CheckpointError, header_entries, pack_header, read_header

DTYPES = list(DTYPE_BYTES) + ["Q7", "", None, 3, "bf16"]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 2 else 5)
    return [lambda: rng.randint(-5, 2**40), lambda: rng.random() * rng.choice([1, -1, 1e300]), lambda: None,
            lambda: rng.choice(["", "x", "../../etc/passwd", "/dev/zero", "F32"]), lambda: rng.choice([True, False]),
            lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
            lambda: {str(rng.randrange(9)): random_value(rng, depth + 1) for _ in range(rng.randrange(3))},
            lambda: float("nan")][kind]()


def random_header(rng: random.Random) -> tuple[dict, int]:
    header, at = {}, 0
    for i in range(rng.randrange(6)):
        dtype = rng.choice(DTYPES)
        shape = [rng.randrange(5) for _ in range(rng.randrange(4))]
        size = (DTYPE_BYTES.get(dtype, 1) if isinstance(dtype, str) else 1) * (1 if not shape else
                                                                              __import__("math").prod(shape))
        begin = at if rng.random() < 0.7 else rng.randrange(0, at + 9)  # sometimes overlapping
        end = begin + size if rng.random() < 0.8 else begin + rng.randrange(-3, 9)
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if rng.random() < 0.15:  # mangle one field
            entry[rng.choice(["dtype", "shape", "data_offsets"])] = random_value(rng)
        if rng.random() < 0.05:
            entry = random_value(rng)
        header[f"t{i}"] = entry
        at = max(at, end if isinstance(end, int) else at)
    if rng.random() < 0.3:
        header["__metadata__"] = random_value(rng) if rng.random() < 0.5 else {"format": "pt"}
    return header, at + rng.randrange(-4, 5)


def check_sound(rows, data_bytes):
    spans = []
    for name, dtype, shape, numel, nbytes, begin, end in rows:
        assert dtype in DTYPE_BYTES and end - begin == nbytes == numel * DTYPE_BYTES[dtype]
        assert 0 <= begin <= end <= data_bytes
        if nbytes:
            spans.append((begin, end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_header_entries_fuzz():
    rng = random.Random(20240611)
    refused = accepted = 0
    for _ in range(3000):
        header, data_bytes = random_header(rng)
        data_bytes = max(0, data_bytes)
        rows, problems = header_entries(header, data_bytes)
        check_sound(rows, data_bytes)
        assert all(isinstance(m, str) and "\n" not in m for _, m in problems)
        refused += bool(problems)
        accepted += not problems
    assert refused > 300 and accepted > 300  # both sides were exercised


def test_read_header_on_random_bytes(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "x.safetensors"
    for i in range(600):
        if i % 3 == 0:
            header, data_bytes = random_header(rng)
            try:
                blob = pack_header(header)
            except (ValueError, TypeError):
                continue
            blob += bytes(max(0, data_bytes))
            if rng.random() < 0.3:  # flip a byte of the header
                j = rng.randrange(len(blob))
                blob = blob[:j] + bytes([rng.randrange(256)]) + blob[j + 1:]
        elif i % 3 == 1:
            blob = struct.pack("<Q", rng.choice([0, 2, 2**63, 2**20, rng.randrange(64)])) + rng.randbytes(rng.randrange(64))
        else:
            blob = rng.randbytes(rng.randrange(16))
        path.write_bytes(blob)
        try:
            header, start = read_header(path)
        except ValueError as e:
            assert "\n" not in str(e)
            continue
        rows, _ = header_entries(header, len(blob) - start)
        check_sound(rows, len(blob) - start)


def test_index_fuzz(tmp_path):
    rng = random.Random(11)
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(pack_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
                                           + bytes(8))
    (tmp_path / "outside.safetensors").write_bytes((folder / "a.safetensors").read_bytes())
    names = ["a.safetensors", "../outside.safetensors", "/etc/passwd", "", ".", "sub/../a.safetensors",
             "a.safetensors\x00", "missing.safetensors", str(tmp_path / "outside.safetensors")]
    opened = 0
    for _ in range(400):
        if rng.random() < 0.2:
            index = random_value(rng)
        else:
            index = {"weight_map": {f"t{i}": rng.choice(names) if rng.random() < 0.9 else random_value(rng)
                                    for i in range(rng.randrange(4))}}
        try:
            text = json.dumps(index)
        except ValueError:
            continue
        (folder / "model.safetensors.index.json").write_text(text)
        try:
            ck = Checkpoint(folder)
        except CheckpointError as e:
            assert "\n" not in str(e) and "model.safetensors.index.json" in str(e)
            continue
        opened += 1
        for shard, info in ck.shard_info.items():
            if info["status"] not in ("missing", "unsafe"):
                assert (folder / shard).resolve().parent == folder.resolve(), shard
    assert opened > 50
