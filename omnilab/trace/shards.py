"""A trace on disk: the folder's names, the Parquet schema of its rows (TRACE_COLUMNS), one batch's rows as a table
(`routing_table`), shards written whole (`write_shard`, `write_routing_shard`; or row group by row group as the
routing arrives), and the background writer threads (`ShardWriter`: bounded, temporary name then rename,
the first error raised as one line). Design: docs/DESIGN.md, "Corpus traces".
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from omnilab.outdir import temp_path
from omnilab.threads import available_cores

TRACE_COLUMNS = ["doc", "domain", "position", "token_id", "layer", "rank", "expert", "weight", "entropy"]
PLAN_NAME, MANIFEST_NAME, DOCUMENTS_NAME, SHARDS_DIR = "plan.json", "manifest.json", "documents.parquet", "shards"
FORMAT = "omnilab-trace/1"

def shard_name(batch: int) -> str:
    return f"batch-{batch:06d}.parquet"

def batch_table(docs: list[int], domains: list[str], token_ids: list[list[int]], layers: list[int],
                experts, weights, entropy, valid):
    """One batch's rows from its padded routing (experts/weights [L, B, T, k], entropy [L, B, T], valid [B, T],
    rows in the batch's order) as a pyarrow Table; returns (table, rows per layer). See routing_table."""
    order = np.argsort(np.asarray(docs), kind="stable")  # documents ascending inside the batch
    v = valid[order]  # [B, T]
    return routing_table(docs, domains, token_ids, layers, experts[:, order][:, v],  # [L, n_tok, k]
                         weights[:, order][:, v], entropy[:, order][:, v])  # [L, n_tok, k], [L, n_tok]

def routing_table(docs: list[int], domains: list[str], token_ids: list[list[int]], layers: list[int],
                  experts, weights, entropy):
    """One batch's rows as a pyarrow Table with one slice per layer, rows in (layer, doc, position, rank) order;
    returns (table, rows per layer). experts/weights [L, n_tok, k], entropy [L, n_tok]: the routing of the
    batch's real tokens in (doc ascending, position) order. Each column is chunked by layer: the columns that do
    not depend on the layer are built once and shared by every chunk, the others are sliced without a copy; no
    Python loop over rows. (Tiled per layer, a 16,384-token, 48-layer table took 0.28 s on 2 cores against 0.06 s;
    built with a call per layer, 1.8 s beside a GIL-holding thread against 0.19 s: bench/gil_writer.py.)"""
    import pyarrow as pa

    L, n_tok, k = experts.shape
    same, names = _token_columns(docs, domains, token_ids, k, n_tok)
    same["domain"] = _domain_array(same["domain"], names)
    # one numpy and one pyarrow call per column, then zero-copy slices: a writer thread gives the GIL up inside
    # each large numpy or pyarrow call and waits up to the 5 ms switch interval to take it back (bench/gil_writer.py)
    rows = n_tok * k
    flat = {c: pa.array(v) if isinstance(v, np.ndarray) else v for c, v in same.items()}  # one layer's rows
    flat.update({
        "layer": pa.array(np.repeat(np.asarray(layers, dtype=np.int32), rows)),  # [L * rows]
        "expert": pa.array(np.asarray(experts, dtype=np.int32).reshape(-1)),  # [L, n_tok, k] -> [L * n_tok * k]
        "weight": pa.array(np.asarray(weights, dtype=np.float32).reshape(-1)),
        "entropy": pa.array(np.repeat(np.asarray(entropy, dtype=np.float32).reshape(-1), k)),  # one per rank
    })
    schema = trace_schema()
    chunks = {c: [a] * L if c in same else [a.slice(j * rows, rows) for j in range(L)]
              for c, a in flat.items()}  # L chunks a column: one per layer
    return pa.table({c: pa.chunked_array(chunks[c], type=schema.field(c).type) for c in schema.names},
                    schema=schema), rows

def _token_columns(docs, domains, token_ids, k: int, n_tok: int):
    """The columns that do not depend on the layer, for one layer's n_tok * k rows in (doc ascending, position,
    rank) order: doc, domain (codes into the returned names), position, token_id, rank."""
    order = np.argsort(np.asarray(docs), kind="stable")  # documents ascending inside the batch
    lengths = np.array([len(token_ids[b]) for b in order], dtype=np.int64)
    if int(lengths.sum()) != n_tok:
        raise ValueError(f"routing of {n_tok} tokens for a batch of {int(lengths.sum())}")
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])  # [n_tok]
    tok = np.concatenate([np.asarray(token_ids[b], dtype=np.int64) for b in order])  # [n_tok]
    names, codes = np.unique(np.asarray(domains, dtype=str)[order], return_inverse=True)
    per_rank = lambda x: np.repeat(x, k)  # noqa: E731  token values -> (token, rank) rows
    return {
        "doc": per_rank(np.repeat(np.asarray(docs, dtype=np.int32)[order], lengths)),
        "domain": per_rank(np.repeat(codes.astype(np.int32).reshape(-1), lengths)),
        "position": per_rank(positions), "token_id": per_rank(tok),
        "rank": np.tile(np.arange(k, dtype=np.int16), n_tok),
    }, names

def _domain_array(codes, names):
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(codes, pa.array(names.tolist(), type=pa.string()))

def trace_schema():
    import pyarrow as pa

    # every value is defined: no field is nullable (no definition level per value to write and read; shards of
    # either kind read together, as a trace resumed from an older version has them)
    types = {"doc": pa.int32(), "domain": pa.dictionary(pa.int32(), pa.string()), "position": pa.int32(),
             "token_id": pa.int64(), "layer": pa.int32(), "rank": pa.int16(), "expert": pa.int32(),
             "weight": pa.float32(), "entropy": pa.float32()}
    return pa.schema([pa.field(c, types[c], nullable=False) for c in TRACE_COLUMNS])

def write_shard(path: Path, table, rows_per_layer: int) -> None:
    """One row group per layer, under a temporary name, then renamed: a shard that exists is complete."""
    tmp = ShardWriter.temporary(path)
    _write_table(tmp, table, rows_per_layer)
    tmp.replace(path)

def write_batch_shard(path, docs, domains, token_ids, layers, routing) -> None:
    """A shard from record_batch's padded routing (experts, weights, entropy, valid): batch_table, then one row
    group per layer."""
    table, rows = batch_table(docs, domains, token_ids, layers, *routing)
    _write_table(path, table, rows)

# dictionary pages only where values repeat across the file (domain, expert); statistics where readers filter
# (layer: a layer's row groups; doc, rank): encoding the rest plainly halves the write time. zstd at level -1, the
# weights' bytes split into streams (bf16 values in float32: two of the four bytes are zero): a 16,384-token,
# 48-layer shard in 0.18 s against 0.25 s, 20.6 MB against 22.9, read in 0.053 s against 0.075 (2 AMD EPYC cores;
# bench/results/gil_writer_cpu.md; other codecs and encodings: bench/results/shard_encodings_cpu.md)
WRITER_OPTIONS = {"compression": "zstd", "compression_level": -1, "use_byte_stream_split": ["weight"],
                  "use_dictionary": ["domain", "expert"], "write_statistics": ["layer", "doc", "rank"]}

def _shard_writer(path: Path, schema):
    import pyarrow.parquet as pq

    return pq.ParquetWriter(path, schema, **WRITER_OPTIONS)

def _write_table(path: Path, table, rows_per_layer: int) -> None:
    with _shard_writer(path, table.schema) as writer:
        writer.write_table(table, row_group_size=max(1, rows_per_layer))

def write_routing_shard(path: Path, docs: list[int], domains: list[str], token_ids: list[list[int]],
                        layers: list[int], routing, by_layer: bool = False) -> None:
    """The shard routing_table + write_shard write (the same bytes: tests/test_trace_writer.py) from a batch's
    routing: an omnilab.gpu.prefill.Routing, or a PendingRouting still on its way to the host.

    Written whole once the last layer is on the host (PendingRouting.wait): routing_table, then one pyarrow call
    that writes the 48 row groups without the GIL. by_layer: one row group at a time as each layer arrives
    (routing.layer(j)), the columns that do not depend on the layer built once. That way takes the GIL back some ten
    times a layer, and each time waits up to the interpreter's switch interval (5 ms) while the thread that
    launches the prefill's kernels holds it: on 2 cores beside a thread that holds the GIL, a 16,384-token,
    48-layer shard took 5.1 s by layer against 0.7 s alone, and 0.6-0.7 s whole either way
    (bench/results/gil_writer_cpu.md)."""
    if not by_layer:
        table, rows = routing_table(docs, domains, token_ids, layers, *routing.wait())  # [L, n, k], [L, n, k], [L, n]
        _write_table(path, table, rows)
        return
    import pyarrow as pa

    first = routing.layer(0)[0]  # [n_tok, k]
    n_tok, k = first.shape
    same, names = _token_columns(docs, domains, token_ids, k, n_tok)
    same["domain"] = _domain_array(same["domain"], names)
    schema = trace_schema()
    rows = n_tok * k
    with _shard_writer(path, schema) as writer:
        for j, layer in enumerate(layers):
            experts, weights, entropy = routing.layer(j)  # [n_tok, k], [n_tok, k], [n_tok]
            columns = {**same, "layer": np.full(rows, layer, dtype=np.int32),
                       "expert": np.asarray(experts, dtype=np.int32).reshape(-1),  # [n_tok, k] -> [n_tok * k]
                       "weight": np.asarray(weights, dtype=np.float32).reshape(-1),
                       "entropy": np.repeat(np.asarray(entropy, dtype=np.float32), k)}  # one per rank
            writer.write_table(pa.table({c: columns[c] for c in schema.names}, schema=schema),
                               row_group_size=max(1, rows))

def default_writers() -> int:
    """Writer threads for a trace: half the cores, at most 8. 48 layers, 131k tokens on H100 machines
    (bench/results/trace_h100_bf16.md): on one host 4 threads wrote the shards alone at 103k tokens/s and 4, 8 or 12
    writers ran the trace end to end at 58k; on another 4 wrote at 58k alone, slower than the prefill (69k), and the
    trace ran at 42k. (Shards written by layer, each row group as its layer arrives, were another matter: there 8
    writers took the GIL from the thread that launches the prefill's kernels, 29.4k tokens/s against 53.5k with 4.)"""
    return max(1, min(8, available_cores() // 2))


class ShardWriteError(OSError):
    """A shard could not be written; the message names it. The original error is the __cause__."""

class ShardWriter:
    """`submit(path, write)`: `write(tmp)` writes the shard's bytes to the temporary path `tmp` in a writer thread;
    it is renamed to `path` when `write` returns. Use as a context manager, or call `close()`: it waits for
    every pending shard and raises the first error."""

    def __init__(self, workers: int = 1, depth: int | None = None):
        if workers < 1:
            raise ValueError(f"shard writer: workers must be >= 1 (got {workers})")
        self.depth = depth if depth is not None else workers
        self._slots = threading.BoundedSemaphore(max(1, self.depth))  # pending shards: queued + being written
        self._jobs: queue.Queue = queue.Queue()
        self._error: ShardWriteError | None = None
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"omnilab-shard-writer-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        self._closed = False

    @staticmethod
    def temporary(path: Path) -> Path:
        return temp_path(path)

    def submit(self, path, write: Callable[[Path], None]) -> None:
        if self._closed:
            raise RuntimeError("shard writer: submit after close")
        self.raise_error()
        self._slots.acquire()  # blocks while `depth` shards are pending
        self.raise_error()  # the shard that freed the slot may have failed
        self._jobs.put((Path(path), write))

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            path, write = job
            try:
                if self._error is None:  # after a failure the queued shards are dropped
                    tmp = self.temporary(path)
                    try:
                        write(tmp)
                        tmp.replace(path)
                    except BaseException as e:
                        tmp.unlink(missing_ok=True)
                        with self._lock:
                            if self._error is None:
                                why = " ".join(str(e).split()) or type(e).__name__  # one line
                                self._error = ShardWriteError(f"{path}: writing the shard failed ({why})")
                                self._error.__cause__ = e
            finally:
                self._slots.release()

    def close(self, *, wait_only: bool = False) -> None:
        """Wait for every pending shard; raise the first error (unless wait_only)."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)
            for t in self._threads:
                t.join()
        if not wait_only:
            self.raise_error()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:  # the caller failed: stop writing what is queued, let its error through
            with self._lock:
                if self._error is None:
                    self._error = ShardWriteError("shard writer stopped: the trace failed")
            self.close(wait_only=True)
            return
        self.close()
