"""Routing traces at corpus scale: documents in, every layer's router top-k ids and weights out, as Parquet.

`trace_corpus(checkpoint, corpus, out)` (the `omnilab trace` command) reads documents from JSONL, text,
Parquet files or a local `datasets` folder (`save_to_disk`), tokenizes them, batches them by length,
prefills each batch through the selective model (omnilab.model.decoder.SelectiveMoE, no generation, experts under
the cache's byte budget as everywhere) and records the routing of every MoE layer through its hooks
(`blocks.{i}.mlp.hook_topk_indices / hook_topk_weights / hook_router_logits`). The rows are the trace
columns of omnilab.experiments.routing (doc, domain, position, token_id, layer, rank, expert, weight, entropy).
On CUDA the batches take the grouped prefill instead when nothing refuses it (omnilab.gpu.prefill: every expert
resident, one grouped GEMM per projection per layer, the routing recorded into device buffers; `--prefill`
chooses, the manifest's run says which path ran and why the other was refused); its trace has the same rows,
expert ids equal and weights equal to rounding (tests/test_trace.py, fp32 on CPU).

Under torchrun (`torchrun --nproc-per-node N -m omnilab trace ...`) every rank builds the same plan and
takes every N-th batch not yet written; gloo on CPU, NCCL on GPUs; rank 0 writes the manifest once all
ranks are done. It follows the data-parallel evaluation loops of torch.distributed users (one process per
device, a deterministic split, collectives only to agree on when to start and stop).

On disk, a trace folder holds:
    plan.json            the batches (document numbers), the settings and a fingerprint of the token ids
    shards/batch-NNNNNN.parquet   one per batch, one row group per layer; rows in (doc, position, rank)
                                  order inside each row group
    documents.parquet    doc, domain, source, row, tokens for every document of the corpus
    manifest.json        written last: attrs (num_experts, top_k, num_layers), layers, shards, totals

Exact by construction: the plan (which documents form which batch, padded how) depends only on the corpus,
the tokenizer and the settings, never on the number of processes, so a batch computes the same numbers
whichever rank runs it. Resumable: a shard is written under a temporary name and renamed, so a batch whose
shard exists is done and is skipped when the command runs again with the same arguments.

The writing overlaps the prefill: shards go to background writer threads (omnilab.experiments.trace_writer,
bounded; the first failure stops the trace with one line naming the shard, and leaves no half shard). On the
grouped prefill a shard is written row group by row group as each layer's routing reaches the host
(write_routing_shard: the same bytes as routing_table + write_shard).

`TraceDataset(folder)` reads a finished trace lazily (pyarrow): one layer at a time from that layer's row
groups, or whole as the DataFrame omnilab.experiments.routing's statistics take; those statistics accept it in place of
a DataFrame and read it layer by layer, so they work on traces larger than memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from omnilab.experiments.routing import TRACE_COLUMNS
from omnilab.experiments.trace_writer import ShardWriter
from omnilab.jsonio import write_json

TEXT_FIELDS = ("text", "prompt", "content")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PLAN_NAME, MANIFEST_NAME, DOCUMENTS_NAME, SHARDS_DIR = "plan.json", "manifest.json", "documents.parquet", "shards"
FORMAT = "omnilab-trace/1"
PREFILLS = ("auto", "eager", "grouped_mm")


# ---------------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Documents in corpus order (doc = the row number here) and the files they came from."""

    documents: pd.DataFrame  # doc, domain, source, row, text
    files: list[dict]  # {path, sha256, documents}


def read_corpus(paths, *, text_field: str | None = None, domain_field: str = "domain") -> Corpus:
    """Documents from JSONL (one JSON object a line), text files (one document each), Parquet files (one row
    each) and local `datasets` folders (`save_to_disk`: the Arrow files its state.json lists); a folder that is
    none of these is read file by file (sorted). The domain is the `domain_field` value where there is one,
    else the file's stem (the folder's name for a datasets folder). The text is `text_field`, default the first
    of text / prompt / content present."""
    sources: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such corpus file or folder")
        sources += _expand(p)
    if not sources:
        raise ValueError(f"--corpus {' '.join(map(str, paths))}: no documents (no .jsonl, .txt, .md, .parquet or "
                         f"datasets folder found)")
    frames, files = [], []
    for path, kind in sources:
        if kind == "jsonl":
            rows = _jsonl_rows(path)
        elif kind == "text":
            try:
                rows = [{"text": path.read_text(encoding="utf-8")}]
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        else:  # parquet / arrow (a datasets folder's file)
            rows = _table_rows(path, kind)
        frames.append(_documents(path, rows, text_field, domain_field))
        files.append({"path": str(path), "sha256": _sha256(path), "documents": len(rows)})
    docs = pd.concat(frames, ignore_index=True)
    docs.insert(0, "doc", np.arange(len(docs), dtype=np.int64))
    return Corpus(docs, files)


def _expand(p: Path) -> list[tuple[Path, str]]:
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return [(p, "jsonl")]
        if suffix == ".parquet":
            return [(p, "parquet")]
        if suffix == ".arrow":
            return [(p, "arrow")]
        return [(p, "text")]
    if (p / "state.json").is_file():  # datasets' save_to_disk: Arrow stream files listed in state.json
        state = json.loads((p / "state.json").read_text())
        return [(p / f["filename"], "arrow") for f in state.get("_data_files", [])]
    if (p / "dataset_dict.json").is_file():  # a DatasetDict: its splits in the order it lists them
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        return [x for s in splits for x in _expand(p / s)]
    out = []
    for child in sorted(p.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() or child.suffix.lower() in (*JSONL_SUFFIXES, *TEXT_SUFFIXES, ".parquet"):
            out += _expand(child)
    return out


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: not a JSON object")
                rows.append(row)
    return rows


def _table_rows(path: Path, kind: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: cannot read as {kind} ({e})") from None
    return table.to_pylist()


def _documents(path: Path, rows: list[dict], text_field: str | None, domain_field: str) -> pd.DataFrame:
    default_domain = path.parent.name if path.suffix == ".arrow" else path.stem
    texts, domains = [], []
    for n, row in enumerate(rows, 1):
        field = text_field or next((f for f in TEXT_FIELDS if f in row), None)
        if field is None or field not in row:
            raise ValueError(f"{path}:{n}: no text field ({text_field or '/'.join(TEXT_FIELDS)}); has {sorted(row)}")
        if not isinstance(row[field], str):
            raise ValueError(f"{path}:{n}: field {field!r} is {type(row[field]).__name__}, not text")
        texts.append(row[field])
        domains.append(str(row.get(domain_field, default_domain)))
    return pd.DataFrame({"domain": domains, "source": str(path), "row": np.arange(len(rows), dtype=np.int64),
                         "text": texts})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# the plan: tokens and batches
# ---------------------------------------------------------------------------------------------------


MAX_CHARS_PER_TOKEN = 64  # a document is cut to max_tokens x this many characters before it is tokenized


def tokenize(tokenizer, texts: list[str], max_tokens: int, vocab_rows: int) -> list[list[int]]:
    """Token ids of each text (the tokenizer's own call, as routing.record_trace makes it), cut to max_tokens."""
    texts = [t[:max_tokens * MAX_CHARS_PER_TOKEN] for t in texts]  # cut before tokenizing: bounded memory
    ids = [list(x)[:max_tokens] for x in tokenizer(texts)["input_ids"]] if len(texts) else []
    for doc, x in enumerate(ids):
        if x and max(x) >= vocab_rows:
            raise ValueError(f"document {doc}: token id {max(x)} is outside the embedding's {vocab_rows} rows")
    return ids


def plan_batches(lengths, batch_tokens: int) -> list[list[int]]:
    """Documents grouped by length: longest first, each batch holding as many documents as fit in
    `batch_tokens` padded tokens (batch size x its longest document); a document longer than that is a batch
    of its own. Empty documents are left out. Depends only on the lengths: the same on every rank."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = sorted((int(d) for d in np.flatnonzero(lengths > 0)), key=lambda d: (-lengths[d], d))
    batches, current, longest = [], [], 0
    for d in order:
        n = int(lengths[d])
        if current and (len(current) + 1) * max(longest, n) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(d)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def fingerprint(token_ids: list[list[int]], domains, settings: dict) -> str:
    """sha256 of everything that decides a trace's numbers: the token ids and domains of every document and the
    settings (batching, dtype, device type, checkpoint config)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for ids, domain in zip(token_ids, domains):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"\x00" + str(domain).encode() + b"\x00")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# recording one batch
# ---------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from the last MoE layer's weights hook: nothing after it is needed for the routing."""


def record_batch(model, token_ids: list[list[int]], layers: list[int], *, pad_id: int = 0):
    """Prefill one batch (right-padded, plain causal attention: a real token never sees a pad) and return its
    routing as numpy arrays: experts [L, B, T, k] (int32), weights [L, B, T, k] (float32), entropy [L, B, T]
    (bits, float32), and valid [B, T] (False on padding). The forward stops after the last MoE layer's router."""
    import torch

    B, T = len(token_ids), max(len(x) for x in token_ids)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T], right padded
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, x in enumerate(token_ids):
        ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        valid[b, : len(x)] = True
    got = {p: [] for p in ("topk_indices", "topk_weights", "router_logits")}
    handles = []

    def recorder(point, last):
        def record(x):
            if point == "router_logits":  # keep the entropy [N] only, not the logits [N, E]
                logp = torch.log_softmax(x.double(), dim=-1)
                x = (-(logp.exp() * logp).sum(-1) / np.log(2)).float()  # bits, as routing.router_entropy
            got[point].append(x)
            if last:
                raise _Stop

        return record

    try:
        for i in layers:
            for point in got:
                last = i == layers[-1] and point == "topk_weights"  # the weights hook comes after the indices
                handles.append(model.add_hook(f"blocks.{i}.mlp.hook_{point}", recorder(point, last)))
        with torch.no_grad():
            try:
                model(ids.to(model.device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(got["topk_weights"]) != len(layers):
        raise RuntimeError(f"recorded {len(got['topk_weights'])} of {len(layers)} MoE layers")
    with torch.no_grad():
        experts = torch.stack(got["topk_indices"]).to(torch.int32)  # [L, B * T, k]
        weights = torch.stack(got["topk_weights"]).float()  # [L, B * T, k]
        entropy = torch.stack(got["router_logits"])  # [L, B * T]
    L, k = len(layers), experts.shape[-1]
    return (experts.cpu().numpy().reshape(L, B, T, k), weights.cpu().numpy().reshape(L, B, T, k),  # [L, B, T, k]
            entropy.cpu().numpy().reshape(L, B, T), valid.numpy())  # [L, B, T], [B, T]


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
    batch's real tokens in (doc ascending, position) order. Vectorised over layers: no Python loop over rows."""
    import pyarrow as pa

    L, n_tok, k = experts.shape
    same, names = _token_columns(docs, domains, token_ids, k, n_tok)
    columns = {c: np.tile(v, L) for c, v in same.items()}  # one layer's rows -> (layer, token, rank) rows
    columns["domain"] = _domain_array(columns["domain"], names)
    columns.update({
        "layer": np.repeat(np.asarray(layers, dtype=np.int32), n_tok * k),
        "expert": np.asarray(experts, dtype=np.int32).reshape(-1),  # [L, n_tok, k] -> [L * n_tok * k]
        "weight": np.asarray(weights, dtype=np.float32).reshape(-1),
        "entropy": np.repeat(np.asarray(entropy, dtype=np.float32).reshape(-1), k),  # [L, n_tok] -> one per rank
    })
    return pa.table(columns, schema=trace_schema()), n_tok * k


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

    return pa.schema([("doc", pa.int32()), ("domain", pa.dictionary(pa.int32(), pa.string())),
                      ("position", pa.int32()), ("token_id", pa.int64()), ("layer", pa.int32()),
                      ("rank", pa.int16()), ("expert", pa.int32()), ("weight", pa.float32()),
                      ("entropy", pa.float32())])


def write_shard(path: Path, table, rows_per_layer: int) -> None:
    """One row group per layer, under a temporary name, then renamed: a shard that exists is complete."""
    tmp = ShardWriter.temporary(path)
    _write_table(tmp, table, rows_per_layer)
    tmp.replace(path)


def _shard_writer(path: Path, schema):
    import pyarrow.parquet as pq

    # dictionary pages only where values repeat across the file (domain, expert); statistics where readers
    # filter (layer: a layer's row groups; doc, rank): encoding the rest plainly halves the write time
    return pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=["domain", "expert"],
                            write_statistics=["layer", "doc", "rank"])


def _write_table(path: Path, table, rows_per_layer: int) -> None:
    with _shard_writer(path, table.schema) as writer:
        writer.write_table(table, row_group_size=max(1, rows_per_layer))


def write_routing_shard(path: Path, docs: list[int], domains: list[str], token_ids: list[list[int]],
                        layers: list[int], routing) -> None:
    """The shard routing_table + write_shard write (the same bytes: tests/test_trace.py), written to `path` as
    the routing arrives: one row group per layer, each as soon as that layer's routing is on the host.

    routing: anything with `.layer(j)` -> (experts [n, k], weights [n, k], entropy [n]) of MoE layer j: an
    omnilab.gpu.prefill.Routing, or a PendingRouting, whose `layer(j)` waits for layer j. The columns that do not
    depend on the layer (doc, domain, position, token_id, rank) are built once for the batch, not once per layer."""
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


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------


@dataclass
class TraceResult:
    out: Path
    documents: int
    tokens: int  # tokens of the whole trace
    batches: int
    traced_batches: int  # batches this run traced (all ranks); the rest were already there
    traced_tokens: int
    seconds: float
    world_size: int
    prefill: str = "eager"  # "grouped_mm" (omnilab.gpu.prefill) or "eager" (the selective model through its hooks)
    prefill_refusal: str | None = None  # why the grouped prefill was not taken, when it was not

    @property
    def tokens_per_s(self) -> float:
        return self.traced_tokens / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        skipped = self.batches - self.traced_batches
        return (f"{self.out}: {self.documents:,} documents, {self.tokens:,} tokens in {self.batches} shards"
                f"{f' ({skipped} already traced)' if skipped else ''}; traced {self.traced_tokens:,} tokens in "
                f"{self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s, {self.world_size} "
                f"process{'es' * (self.world_size > 1)}, {self.prefill} prefill"
                f"{f': {self.prefill_refusal}' if self.prefill_refusal else ''})")


class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device: str, backend: str | None):
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self.dist = dist if self.world > 1 else None
        if self.dist is None:
            return
        if device.startswith("cuda") and ":" not in device:
            self.device = f"cuda:{local}"  # one process per GPU
        backend = backend or ("nccl" if self.device.startswith("cuda") else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        self.backend = backend

    def barrier(self):
        if self.dist is not None:
            self.dist.barrier()

    def gather(self, obj) -> list:
        if self.dist is None:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def trace_corpus(path, corpus, out, *, max_tokens: int = 512, batch_tokens: int = 4096, dtype: str = "float32",
                 device: str = "cpu", expert_budget: int | None = None, text_field: str | None = None,
                 domain_field: str = "domain", tokenizer=None, backend: str | None = None,
                 progress: bool = True, model=None, prefill="auto") -> TraceResult:
    """Trace the routing of every document of `corpus` (files / folders, see read_corpus) into the folder `out`.

    max_tokens: each document's first tokens; batch_tokens: padded tokens per batch. A folder that already
    holds this trace (same plan) is resumed; one that holds another is refused. Under torchrun every rank
    calls this with the same arguments. `model`: an already-built SelectiveMoE (its checkpoint is `path`).

    prefill: "auto" (the grouped prefill of omnilab.gpu.prefill on CUDA when nothing refuses it, else the eager
    model), "eager", "grouped_mm" (an error when refused), or a built omnilab.gpu.prefill.TracePrefill."""
    if max_tokens < 1 or batch_tokens < 1:
        raise ValueError(f"--max-tokens and --batch-tokens must be positive (got {max_tokens}, {batch_tokens})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    from contextlib import nullcontext

    from omnilab.outdir import OutDir

    # the folder is this run's (rank 0 holds its lock; a folder trace did not make is refused unless empty)
    lock = OutDir(out, owns=(PLAN_NAME,), what="trace") if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    dist = _Dist(device, backend)
    try:
        with lock:
            return _trace(dist, path, corpus, out, max_tokens, batch_tokens, dtype, expert_budget, text_field,
                          domain_field, tokenizer, progress, model, prefill)
    finally:
        dist.close()


def _trace(dist, path, corpus, out, max_tokens, batch_tokens, dtype, expert_budget, text_field, domain_field,
           tokenizer, progress, model, prefill) -> TraceResult:
    import torch

    from omnilab.model.decoder import SelectiveMoE

    if not (isinstance(prefill, str) and prefill in PREFILLS) and not hasattr(prefill, "record"):
        raise ValueError(f"--prefill {prefill!r}: use {', '.join(PREFILLS)}")
    docs = read_corpus(corpus, text_field=text_field, domain_field=domain_field)
    if model is None:
        model = SelectiveMoE.from_checkpoint(path, dtype=dtype, device=dist.device, expert_budget=expert_budget,
                                             tokenizer=tokenizer is None)
    if tokenizer is not None and not callable(tokenizer):  # a folder
        from omnilab.tokenizer import error_line, open_tokenizer

        try:
            tokenizer = open_tokenizer(tokenizer)
        except Exception as e:  # transformers raises many kinds; the user gets one line naming the folder
            raise ValueError(f"--tokenizer {tokenizer}: cannot load a tokenizer ({error_line(e)})") from None
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer beside the checkpoint; pass --tokenizer FOLDER")
    cfg = model.config
    layers = [int(i) for i in cfg.moe_layers]
    ids = tokenize(tokenizer, docs.documents["text"].tolist(), max_tokens, cfg.vocab_size)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    if not lengths.any():
        raise ValueError("--corpus: no document has any tokens")
    batches = plan_batches(lengths, batch_tokens)
    grouped, refusal = _choose_prefill(dist, model, prefill)
    settings = {"format": FORMAT, "max_tokens": max_tokens, "batch_tokens": batch_tokens,
                "dtype": str(model.dtype).removeprefix("torch."), "device_type": model.device.type,
                "config": _config_hash(model), "text_field": text_field, "domain_field": domain_field}
    if grouped:  # its numbers differ from the eager path's by rounding: a trace is made by one path or the other
        settings["prefill"] = "grouped_mm"
    fp = fingerprint(ids, docs.documents["domain"], settings)
    plan_path = out / PLAN_NAME
    for own in (plan_path, out / MANIFEST_NAME):
        if own.exists() and not isinstance(_read_own_json(own), dict):
            raise ValueError(f"--out {out}: {own.name} is not a trace's (not a JSON object); use a new folder")
    if plan_path.exists():
        old = _read_own_json(plan_path)
        if old.get("fingerprint") != fp:
            before = old.get("settings", {})
            changed = [k for k in {**before, **settings} if before.get(k) != settings.get(k)]
            why = f"; the grouped prefill was not taken: {refusal}" if "prefill" in changed and refusal else ""
            raise ValueError(f"--out {out}: holds a trace of another corpus or settings "
                             f"({'changed: ' + ', '.join(changed) if changed else 'the token ids differ'}{why}); "
                             f"use a new folder")
    shards = out / SHARDS_DIR
    if dist.rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        from omnilab.outdir import remove_own_temporaries

        remove_own_temporaries(shards)  # left by a killed run of ours; nobody writes before the barrier below
        if not plan_path.exists():
            write_json(plan_path, {"format": FORMAT, "fingerprint": fp, "settings": settings,
                                   "checkpoint": str(path), "corpus": docs.files, "batches": batches})
    dist.barrier()
    k = int(cfg.num_experts_per_tok)
    done = {b for b in range(len(batches))  # a shard counts as done when it reads back whole, not because it exists
            if _shard_complete(shards / shard_name(b), int(lengths[batches[b]].sum()) * len(layers) * k)}
    dist.barrier()  # every rank has listed the finished shards before any rank writes a new one
    remaining = [b for b in range(len(batches)) if b not in done]
    mine = remaining[dist.rank::dist.world]
    domains = docs.documents["domain"].tolist()
    my_tokens = int(sum(lengths[batches[b]].sum() for b in mine))
    bar = None
    if progress and dist.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=my_tokens * dist.world, unit="tok", unit_scale=True, smoothing=0.1,
                   desc=f"trace ({dist.world} process{'es' * (dist.world > 1)})")
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    pad = pad if 0 <= pad < cfg.vocab_size else 0
    recorder = None
    if grouped and mine:
        from omnilab.gpu.prefill import TracePrefill

        recorder = prefill if isinstance(prefill, TracePrefill) else TracePrefill(model)  # every expert resident
        record = getattr(recorder, "record_async", recorder.record)
    start = time.perf_counter()
    # the shards are written by background threads (omnilab.experiments.trace_writer: numpy and pyarrow release
    # the GIL) while this thread queues the next batches' forwards; the grouped prefill's routing reaches the host
    # layer by layer without the host waiting, and its shard is written row group by row group as it arrives
    writers = max(1, min(8, (os.cpu_count() or 2) // 2))
    with ShardWriter(workers=writers, depth=writers + 1) as writer:  # at most writers + 1 batches on the host
        for b in mine:
            batch = batches[b]
            batch_ids, batch_domains = [ids[d] for d in batch], [domains[d] for d in batch]
            if recorder is not None:
                routing = record(batch_ids, batch, pad_id=pad)  # [L, n, k] rows in trace order
                write = partial(write_routing_shard, docs=batch, domains=batch_domains, token_ids=batch_ids,
                                layers=layers, routing=routing)
            else:
                routing = record_batch(model, batch_ids, layers, pad_id=pad)  # padded [L, B, T, k]
                write = partial(_build_and_write, docs=batch, domains=batch_domains, token_ids=batch_ids,
                                layers=layers, routing=routing)
            writer.submit(shards / shard_name(b), write)
            if bar is not None:
                bar.update(int(lengths[batch].sum()) * dist.world)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    stats = dist.gather({"batches": len(mine), "tokens": my_tokens, "seconds": seconds})
    dist.barrier()
    traced_tokens = sum(s["tokens"] for s in stats)
    wall = max(s["seconds"] for s in stats)
    if dist.rank == 0:
        _write_documents(out, docs.documents, lengths)
        _write_manifest(out, model, layers, batches, lengths, docs, fp, settings, str(path),
                        {"world_size": dist.world, "traced_batches": sum(s["batches"] for s in stats),
                         "traced_tokens": traced_tokens, "seconds": wall,
                         "tokens_per_s": traced_tokens / wall if wall > 0 else None,
                         "prefill": "grouped_mm" if grouped else "eager", "prefill_refusal": refusal})
    dist.barrier()
    return TraceResult(out, len(docs.documents), int(lengths.sum()), len(batches),
                       sum(s["batches"] for s in stats), traced_tokens, wall, dist.world,
                       "grouped_mm" if grouped else "eager", refusal)


def _choose_prefill(dist, model, prefill) -> tuple[bool, str | None]:
    """(take the grouped prefill?, why not). Every rank takes the same path: one rank's refusal refuses all."""
    from omnilab.gpu.prefill import prefill_refusal

    if not isinstance(prefill, str):  # a built TracePrefill
        return True, None
    if prefill == "eager":
        return False, "--prefill eager asks for the eager path"
    refusal = prefill_refusal(model)
    if refusal is None and prefill == "auto" and model.device.type != "cuda":
        refusal = "auto takes it on CUDA only (--prefill grouped_mm on CPU)"
    refusal = next((r for r in dist.gather(refusal) if r), None)
    if refusal and prefill == "grouped_mm":
        raise ValueError(f"--prefill grouped_mm: {refusal}")
    return refusal is None, refusal


def _build_and_write(path, docs, domains, token_ids, layers, routing) -> None:
    table, rows = batch_table(docs, domains, token_ids, layers, *routing)
    _write_table(path, table, rows)


def shard_name(batch: int) -> str:
    return f"batch-{batch:06d}.parquet"


def _config_hash(model) -> str:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else vars(model.config)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_documents(out: Path, documents: pd.DataFrame, lengths) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"doc": documents["doc"].to_numpy(np.int32), "domain": documents["domain"].astype(str),
                      "source": documents["source"].astype(str), "row": documents["row"].to_numpy(np.int64),
                      "tokens": np.asarray(lengths, dtype=np.int64)})
    from omnilab.outdir import commit, temp_path

    tmp = temp_path(out / DOCUMENTS_NAME)
    try:
        pq.write_table(table, tmp)
        commit(tmp, out / DOCUMENTS_NAME)
    finally:
        tmp.unlink(missing_ok=True)


def _read_own_json(path: Path):
    """A JSON file of this trace folder, or None when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _shard_complete(path: Path, rows: int) -> bool:
    """True when a shard exists, is a readable Parquet file and holds the rows its batch makes."""
    import pyarrow.parquet as pq

    if not path.is_file():
        return False
    try:
        return pq.read_metadata(path).num_rows == rows
    except Exception:  # pyarrow raises several kinds for a damaged file: then it is written again
        return False


def _write_manifest(out, model, layers, batches, lengths, docs, fp, settings, checkpoint, run) -> None:
    import pyarrow.parquet as pq

    cfg = model.config
    k = int(cfg.num_experts_per_tok)
    shards = []
    for b, batch in enumerate(batches):
        meta = pq.read_metadata(out / SHARDS_DIR / shard_name(b))
        tokens = int(lengths[batch].sum())
        if meta.num_rows != tokens * len(layers) * k:
            raise RuntimeError(f"{out / SHARDS_DIR / shard_name(b)}: {meta.num_rows} rows, expected "
                               f"{tokens * len(layers) * k}")
        shards.append({"file": f"{SHARDS_DIR}/{shard_name(b)}", "documents": len(batch), "tokens": tokens,
                       "rows": meta.num_rows})
    traced = np.flatnonzero(lengths > 0)
    previous = out / MANIFEST_NAME
    runs = (_read_own_json(previous) or {}).get("runs", []) if previous.exists() else []
    write_json(out / MANIFEST_NAME, {
        "format": FORMAT, "fingerprint": fp, "checkpoint": checkpoint, "settings": settings,
        "attrs": {"num_experts": int(cfg.num_experts), "top_k": k, "num_layers": len(layers)},
        "layers": layers, "columns": TRACE_COLUMNS, "documents": int(len(docs.documents)),
        "traced_documents": int(traced.size), "tokens": int(lengths.sum()),
        "rows": int(sum(s["rows"] for s in shards)),
        "domains": sorted(set(docs.documents["domain"].astype(str).iloc[traced])),
        "corpus": docs.files, "shards": shards, "run": run, "runs": runs + [run],
    })


# ---------------------------------------------------------------------------------------------------
# reading a trace lazily
# ---------------------------------------------------------------------------------------------------


class TraceDataset:
    """A finished trace folder, read lazily with pyarrow. `read(layer=..., columns=..., rank=...)` returns those
    rows as a DataFrame in the trace's canonical order (doc, position, layer, rank), the domain a categorical
    with sorted categories, exactly as routing.concat_traces makes it; `to_pandas()` is the whole trace with its
    attrs. omnilab.experiments.routing's statistics take a TraceDataset where they take a trace DataFrame."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            hint = (" (incomplete: run the same `omnilab trace` command again to finish it)"
                    if (self.folder / PLAN_NAME).exists() else "")
            raise FileNotFoundError(f"{self.folder}: no {MANIFEST_NAME}, not a finished trace folder{hint}")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.attrs = dict(self.manifest["attrs"])
        self.layers = [int(x) for x in self.manifest["layers"]]
        self.domains = list(self.manifest["domains"])
        self.files = [self.folder / s["file"] for s in self.manifest["shards"]]
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: shard listed in {path} is missing")

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __repr__(self) -> str:
        m = self.manifest
        return (f"TraceDataset({self.folder}: {m['traced_documents']:,} documents, {m['tokens']:,} tokens, "
                f"{len(self):,} rows, {len(self.layers)} layers x {self.attrs['num_experts']} experts, "
                f"top-{self.attrs['top_k']})")

    def _dataset(self):
        import pyarrow.dataset as ds

        return ds.dataset([str(f) for f in self.files], format="parquet")

    def read(self, layer: int | None = None, columns=None, rank: int | None = None) -> pd.DataFrame:
        """Rows of one layer (only its row groups are read) or of all, optionally of one rank only; `columns`
        a subset of the trace columns (default all)."""
        import pyarrow.compute as pc

        columns = list(TRACE_COLUMNS if columns is None else columns)
        keys = ["doc", "position", "layer", "rank"]
        wanted = columns + [k for k in keys if k not in columns]
        cond = None
        for name, value in (("layer", layer), ("rank", rank)):
            if value is not None:
                c = pc.field(name) == value
                cond = c if cond is None else cond & c
        table = self._dataset().to_table(columns=wanted, filter=cond)
        table = table.sort_by([(k, "ascending") for k in keys])
        frame = table.to_pandas()
        if "domain" in frame:
            frame["domain"] = pd.Categorical(frame["domain"].astype(str), categories=self.domains)
        frame = frame[columns]
        frame.attrs.update(self.attrs)
        return frame

    def to_pandas(self) -> pd.DataFrame:
        """The whole trace as one DataFrame (what routing.record_trace returns for the same documents)."""
        return self.read()

    def documents(self) -> pd.DataFrame:
        """doc, domain, source, row, tokens of every document of the corpus (tokens 0: not in the trace)."""
        return pd.read_parquet(self.folder / DOCUMENTS_NAME)

    def traced_documents(self) -> pd.DataFrame:
        """doc, domain of the documents in the trace, doc ascending; domain categorical as in read()."""
        d = self.documents()
        d = d[d["tokens"] > 0][["doc", "domain"]].reset_index(drop=True)
        d["domain"] = pd.Categorical(d["domain"], categories=self.domains)
        return d


def open_trace(folder) -> TraceDataset:
    return TraceDataset(folder)
