"""Corpus tracing, `omnilab trace`: reading and planning a corpus (corpus.py), recording the routing through the
router hooks (record.py), the Parquet trace on disk and its writer threads (shards.py), the command itself with
resume, torchrun ranks and the manifest (run.py), and reading a finished trace lazily (dataset.py).

`ol.trace.trace_corpus`, `ol.trace.TraceDataset` and the other entry points below are imported on first use
(PEP 562, as omnilab's face), so importing one module of the room does not import the others."""

from __future__ import annotations

import importlib

# name -> the module of this room that defines it
_NAMES = {
    **dict.fromkeys(("Corpus", "read_corpus", "tokenize", "plan_batches", "fingerprint"), "omnilab.trace.corpus"),
    **dict.fromkeys(("record_batch", "record_trace", "route", "router_entropy", "trace_rows", "concat_traces"),
                    "omnilab.trace.record"),
    **dict.fromkeys(("TRACE_COLUMNS", "trace_schema", "routing_table", "write_shard", "write_routing_shard",
                     "ShardWriter", "ShardWriteError", "MANIFEST_NAME"), "omnilab.trace.shards"),
    **dict.fromkeys(("trace_corpus", "TraceResult"), "omnilab.trace.run"),
    **dict.fromkeys(("TraceDataset", "open_trace"), "omnilab.trace.dataset"),
}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'omnilab.trace' has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
