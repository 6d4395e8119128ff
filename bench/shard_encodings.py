"""One trace shard's table written under other Parquet settings than the writer's own, on the CPU.

`omnilab trace` writes each batch's routing as one Parquet shard (omnilab.trace.shards: routing_table, then one
pyarrow call with WRITER_OPTIONS). This bench builds one shard's table (random routing of --tokens tokens x --layers
layers, top-8, as bench/gil_writer.py's) and writes it into memory under the writer's options and under each
variant (another codec, another encoding of the columns that repeat per layer), one thread, best of --repeats:
seconds to write, megabytes, seconds to read back whole. Then the writer's own options one column at a time: where
the writing goes.

    python bench/shard_encodings.py                 # 16,384 tokens x 48 layers, best of 5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gil_writer import random_batch  # noqa: E402
from omnilab.trace.shards import WRITER_OPTIONS, routing_table  # noqa: E402

DELTA = "DELTA_BINARY_PACKED"


def variants() -> dict:
    """Label -> ParquetWriter options: the writer's own, then each change from it."""
    own = dict(WRITER_OPTIONS)
    codec = {k: v for k, v in own.items() if k not in ("compression", "compression_level")}
    # column_encoding takes the weights' byte streams too (pyarrow refuses it beside use_byte_stream_split)
    encoded = {k: v for k, v in own.items() if k != "use_byte_stream_split"}
    return {
        "the writer's own (zstd -1, weights in byte streams)": own,
        "zstd level 1 (before the ninth session)": {**own, "compression_level": 1},
        "lz4": {**codec, "compression": "lz4"},
        "snappy": {**codec, "compression": "snappy"},
        "uncompressed": {**codec, "compression": "none"},
        "doc, position, layer delta-encoded": {
            **encoded, "column_encoding": {"doc": DELTA, "position": DELTA, "layer": DELTA,
                                           "weight": "BYTE_STREAM_SPLIT"}},
        "doc, position, layer, rank delta-encoded": {
            **encoded, "column_encoding": {"doc": DELTA, "position": DELTA, "layer": DELTA, "rank": DELTA,
                                           "weight": "BYTE_STREAM_SPLIT"}},
    }


def write(table, rows: int, options: dict, repeats: int) -> tuple[float, bytes]:
    """The best of `repeats` seconds to write `table` (one row group per layer) into memory, and the file's bytes."""
    best = float("inf")
    for _ in range(repeats):
        sink = pa.BufferOutputStream()
        start = time.perf_counter()
        with pq.ParquetWriter(sink, table.schema, **options) as writer:
            writer.write_table(table, row_group_size=rows)
        best = min(best, time.perf_counter() - start)
    return best, sink.getvalue()


def read(data, repeats: int) -> float:
    """The best of `repeats` seconds to read the file back whole."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pq.read_table(pa.BufferReader(data))
        best = min(best, time.perf_counter() - start)
    return best


def column_options(column: str) -> dict:
    """The writer's own options for a table of this one column."""
    own = dict(WRITER_OPTIONS)
    for key in ("use_byte_stream_split", "use_dictionary", "write_statistics"):
        own[key] = [c for c in own[key] if c == column] or False
    return own


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    routing, docs, domains, ids = random_batch(args.tokens, args.layers)
    table, rows = routing_table(docs, domains, ids, list(range(args.layers)), *routing.wait())
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, pyarrow {pa.__version__}; one "
          f"shard of {args.tokens:,} tokens x {args.layers} layers x top-8 ({table.num_rows:,} rows), into memory, "
          f"one thread, best of {args.repeats}\n")
    write(table, rows, WRITER_OPTIONS, 2)  # warm-up: the first writes of a process run slower (page faults)
    print("| settings | write (s) | size (MB) | read back (s) |")
    print("|---|---:|---:|---:|")
    for label, options in variants().items():
        seconds, data = write(table, rows, options, args.repeats)
        print(f"| {label} | {seconds:.3f} | {data.size / 1e6:.1f} | {read(data, args.repeats):.3f} |", flush=True)
    print("\nThe writer's own options, one column at a time:\n")
    print("| column | write (s) | size (MB) |")
    print("|---|---:|---:|")
    for column in table.schema.names:
        seconds, data = write(table.select([column]), rows, column_options(column), args.repeats)
        print(f"| {column} | {seconds:.3f} | {data.size / 1e6:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
