"""`omnilab trace`: `trace_corpus(checkpoint, corpus, out)` reads and plans the corpus, prefills each batch (the
grouped prefill of omnilab.gpu.prefill on CUDA, else the eager model through its hooks), writes one shard per
batch in background threads, and a manifest last; resumable, and split over ranks under torchrun (`_Dist`).
Design: docs/DESIGN.md, "Corpus traces".
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from omnilab.jsonio import write_json
from omnilab.outdir import OutDir, commit, remove_own_temporaries, temp_path
from omnilab.runtime.choose import choose_prefill
from omnilab.runtime.hardware import resolve_device
from omnilab.runtime.model import load
from omnilab.trace.corpus import fingerprint, plan_batches, read_corpus, tokenize
from omnilab.trace.record import record_batch
from omnilab.trace.shards import (DOCUMENTS_NAME, FORMAT, MANIFEST_NAME, PLAN_NAME, SHARDS_DIR, TRACE_COLUMNS,
                                  ShardWriter, default_writers, shard_name, write_batch_shard,
                                  write_routing_shard)

PREFILLS = ("auto", "eager", "grouped_mm")

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
    batch_tokens: int | None = None  # padded tokens a batch (what --batch-tokens auto chose, or was given)
    writing_tail_s: float = 0.0  # of `seconds`: the last shards' writing after the last forward (slowest rank)

    @property
    def tokens_per_s(self) -> float:
        return self.traced_tokens / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        skipped = self.batches - self.traced_batches
        size = f" of at most {self.batch_tokens:,} padded tokens" if self.batch_tokens else ""
        return (f"{self.out}: {self.documents:,} documents, {self.tokens:,} tokens in {self.batches} shards{size}"
                f"{f' ({skipped} already traced)' if skipped else ''}; traced {self.traced_tokens:,} tokens in "
                f"{self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s, {self.world_size} "
                f"process{'es' * (self.world_size > 1)}, {self.prefill} prefill"
                f"{f': {self.prefill_refusal}' if self.prefill_refusal else ''})")

class _Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device: str, backend: str | None):
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
            # torch.distributed.nn takes group.WORLD as its functions' default argument when first imported (FSDP,
            # which loading the model imports, imports it): imported after init_process_group, those defaults keep
            # the process group alive past destroy_process_group, its gloo threads then free the last collective's
            # tensors during interpreter exit and the rank aborts ("terminate called without an active exception")
            import torch.distributed.nn  # noqa: F401  (before init: its defaults are None)

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

def trace_corpus(path, corpus, out, *, max_tokens: int = 512, batch_tokens: int | str = "auto", dtype: str = "auto",
                 device: str = "auto", expert_budget="auto", text_field: str | None = None,
                 domain_field: str = "domain", tokenizer=None, backend: str | None = None,
                 progress: bool = True, model=None, prefill="auto", writers: int | None = None) -> TraceResult:
    """Trace the routing of every document of `corpus` (files / folders, see read_corpus) into the folder `out`.

    max_tokens: each document's first tokens; batch_tokens: padded tokens per batch, or "auto" (the default): the
    folder's own when it already holds a trace, else on CUDA with the grouped prefill the largest of
    omnilab.gpu.prefill.AUTO_BATCH_TOKENS whose activations fit in the free GPU memory, else 4096. A folder that
    already holds this trace (same plan) is resumed; one that holds another is refused. Under torchrun every rank
    calls this with the same arguments. `model`: an already-built SelectiveMoE (its checkpoint is `path`).

    prefill: "auto" (the grouped prefill of omnilab.gpu.prefill on CUDA when nothing refuses it, else the eager
    model), "eager", "grouped_mm" (an error when refused), or a built omnilab.gpu.prefill.TracePrefill.
    writers: threads writing the Parquet shards (default: half the cores, at most 8)."""
    if writers is not None and writers < 1:
        raise ValueError(f"writers must be >= 1 (got {writers})")
    if batch_tokens != "auto" and not _is_token_count(batch_tokens):
        raise ValueError(f"--batch-tokens must be a positive number of tokens or auto (got {batch_tokens!r})")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive (got {max_tokens})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    # the folder is this run's (rank 0 holds its lock; a folder trace did not make is refused unless empty)
    lock = OutDir(out, owns=(PLAN_NAME,), what="trace") if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
    dist = _Dist(str(resolve_device(device)) if device == "auto" else device, backend)
    try:
        with lock:
            return _trace(dist, path, corpus, out, max_tokens, batch_tokens, dtype, expert_budget, text_field,
                          domain_field, tokenizer, progress, model, prefill, writers)
    finally:
        dist.close()

def _trace(dist, path, corpus, out, max_tokens, batch_tokens, dtype, expert_budget, text_field, domain_field,
           tokenizer, progress, model, prefill, writers) -> TraceResult:
    if not (isinstance(prefill, str) and prefill in PREFILLS) and not hasattr(prefill, "record"):
        raise ValueError(f"--prefill {prefill!r}: use {', '.join(PREFILLS)}")
    docs = read_corpus(corpus, text_field=text_field, domain_field=domain_field)
    if model is None:
        model = load(path, dtype=dtype, device=dist.device, expert_budget=expert_budget, tokenizer=tokenizer is None)
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
    grouped, refusal = _choose_prefill(dist, model, prefill)
    plan_path = out / PLAN_NAME
    for own in (plan_path, out / MANIFEST_NAME):
        if own.exists() and not isinstance(_read_own_json(own), dict):
            raise ValueError(f"--out {out}: {own.name} is not a trace's (not a JSON object); use a new folder")
    old = _read_own_json(plan_path) if plan_path.exists() else None
    recorder = None  # the grouped prefill, built when there is a batch to trace (or to size one)
    if batch_tokens == "auto":  # a resume keeps the folder's; a new trace asks the prefill what fits
        batch_tokens = _kept_batch_tokens(old)
        if batch_tokens is None:
            recorder = _recorder(model, prefill) if grouped else None  # its experts resident before measuring
            batch_tokens = _auto_batch_tokens(dist, model if grouped else None)
    batches = plan_batches(lengths, batch_tokens)
    settings = {"format": FORMAT, "max_tokens": max_tokens, "batch_tokens": batch_tokens,
                "dtype": str(model.dtype).removeprefix("torch."), "device_type": model.device.type,
                "config": _config_hash(model), "text_field": text_field, "domain_field": domain_field}
    if grouped:  # its numbers differ from the eager path's by rounding: a trace is made by one path or the other
        settings["prefill"] = "grouped_mm"
        glue, attention = _prefill_kernels(model, prefill)
        if glue != "torch":  # and so do the glues' (a trace of the torch glue keeps its fingerprint)
            settings["prefill_glue"] = glue
        if model.device.type == "cuda":  # and the attention kernels'
            settings["prefill_attention"] = attention
    fp = fingerprint(ids, docs.documents["domain"], settings)
    if old is not None:
        if old.get("fingerprint") != fp:
            before = old.get("settings", {})
            changed = [k for k in {**before, **settings} if before.get(k) != settings.get(k)]
            why = f"; the grouped prefill was not taken: {refusal}" if "prefill" in changed and refusal else ""
            kernels = [k for k in ("prefill_glue", "prefill_attention") if k in changed]
            if kernels and "prefill" not in changed:
                why = (f"; its shards were computed with other kernels around the grouped GEMMs ("
                       + ", ".join(f"{k.removeprefix('prefill_')} {before.get(k, 'torch')}, this run "
                                   f"{settings.get(k, 'torch')}" for k in kernels) + "): another bf16 rounding")
            raise ValueError(f"--out {out}: holds a trace of another corpus or settings "
                             f"({'changed: ' + ', '.join(changed) if changed else 'the token ids differ'}{why}); "
                             f"use a new folder")
    shards = out / SHARDS_DIR
    if dist.rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        remove_own_temporaries(shards)  # left by a killed run of ours; nobody writes before the barrier below
        if not plan_path.exists():
            write_json(plan_path, {"format": FORMAT, "fingerprint": fp, "settings": settings,
                                   "checkpoint": str(path), "corpus": docs.files, "batches": batches})
    dist.barrier()
    k = int(model.config.num_experts_per_tok)
    done = {b for b in range(len(batches))  # a shard counts as done when it reads back whole, not because it exists
            if _shard_complete(shards / shard_name(b), int(lengths[batches[b]].sum()) * len(layers) * k)}
    dist.barrier()  # every rank has listed the finished shards before any rank writes a new one
    remaining = [b for b in range(len(batches)) if b not in done]
    # the rank's batches, the most tokens first: the last batch's shard is written after its forward, with nothing
    # left to overlap, so the smallest goes last (the shards' names and contents do not depend on the order)
    mine = sorted(remaining[dist.rank::dist.world], key=lambda b: -int(lengths[batches[b]].sum()))
    domains = docs.documents["domain"].tolist()
    my_tokens = int(sum(lengths[batches[b]].sum() for b in mine))
    bar = None
    if progress and dist.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=my_tokens * dist.world, unit="tok", unit_scale=True, smoothing=0.1,
                   desc=f"trace ({dist.world} process{'es' * (dist.world > 1)})")
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    pad = pad if 0 <= pad < cfg.vocab_size else 0
    if grouped and mine:
        recorder = recorder or _recorder(model, prefill)
        record = getattr(recorder, "record_async", recorder.record)
    start = time.perf_counter()
    # the shards are written by background threads (omnilab.trace.shards: numpy and pyarrow release
    # the GIL) while this thread queues the next batches' forwards; the grouped prefill's routing reaches the host
    # without the host waiting, and a writer writes its shard whole in one pyarrow call once the last layer is there
    writers = writers or default_writers()
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
                write = partial(write_batch_shard, docs=batch, domains=batch_domains, token_ids=batch_ids,
                                layers=layers, routing=routing)
            writer.submit(shards / shard_name(b), write)
            if bar is not None:
                bar.update(int(lengths[batch].sum()) * dist.world)
        if model.device.type == "cuda":
            torch.cuda.synchronize()  # the last forward is done: what the writers take after it is the tail
        forwards = time.perf_counter() - start
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    stats = dist.gather({"batches": len(mine), "tokens": my_tokens, "seconds": seconds, "tail": seconds - forwards})
    dist.barrier()
    traced_tokens = sum(s["tokens"] for s in stats)
    wall = max(s["seconds"] for s in stats)
    tail = max(s["tail"] for s in stats)  # the last shards' writing after the last forward (the slowest rank's)
    if dist.rank == 0:
        _write_documents(out, docs.documents, lengths)
        _write_manifest(out, model, layers, batches, lengths, docs, fp, settings, str(path),
                        {"world_size": dist.world, "traced_batches": sum(s["batches"] for s in stats),
                         "traced_tokens": traced_tokens, "seconds": wall,
                         "tokens_per_s": traced_tokens / wall if wall > 0 else None,
                         "writing_tail_s": tail,  # nothing left to overlap it
                         "prefill": "grouped_mm" if grouped else "eager", "prefill_refusal": refusal,
                         # the grouped prefill's glue (omnilab.gpu.prefill.GLUES) on rank 0; None: eager, or no batch
                         "prefill_glue": getattr(recorder, "glue", None)})
    dist.barrier()
    return TraceResult(out, len(docs.documents), int(lengths.sum()), len(batches),
                       sum(s["batches"] for s in stats), traced_tokens, wall, dist.world,
                       "grouped_mm" if grouped else "eager", refusal, batch_tokens, tail)

def _choose_prefill(dist, model, prefill) -> tuple[bool, str | None]:
    """(take the grouped prefill?, why not), as omnilab.runtime.choose.choose_prefill decides. Every rank takes
    the same path: one rank's refusal refuses all."""
    if not isinstance(prefill, str):  # a built TracePrefill
        return True, None
    choice = choose_prefill(model, prefill)
    refusal = next((r for r in dist.gather(choice.refused.get("grouped_mm")) if r), None)
    if refusal and prefill == "grouped_mm":
        raise ValueError(f"--prefill grouped_mm: {refusal}")
    return refusal is None, refusal

def _recorder(model, prefill):
    """The grouped prefill: a built TracePrefill as given, else one over every expert resident (the runtime's
    pool, shared with generate and the eager path: built once per model)."""
    if not isinstance(prefill, str):
        return prefill
    from omnilab.gpu.prefill import ResidentExperts, TracePrefill
    from omnilab.runtime.generate import resident_pool

    pool = resident_pool(model)
    return TracePrefill(model, ResidentExperts(pool.gate_up, pool.down))

def _prefill_kernels(model, prefill) -> tuple[str, str]:
    """(glue, attention) the grouped prefill takes: a built TracePrefill's own, else its defaults here."""
    if not isinstance(prefill, str):
        return getattr(prefill, "glue", "torch"), getattr(prefill, "attention", "torch")
    from omnilab.gpu.prefill import DEFAULT_ATTENTION, prefill_glue

    return prefill_glue(model.dtype, model.device), DEFAULT_ATTENTION

def _kept_batch_tokens(old) -> int | None:
    """The batch size of the trace a folder holds (its plan.json's settings), None when there is none."""
    settings = old.get("settings") if isinstance(old, dict) else None
    kept = settings.get("batch_tokens") if isinstance(settings, dict) else None
    return kept if _is_token_count(kept) else None

def _is_token_count(value) -> bool:
    """A batch size: a positive int (not a bool, not a float, not a string)."""
    return type(value) is int and value >= 1

def _auto_batch_tokens(dist, grouped_model) -> int:
    """--batch-tokens auto for a new trace: the grouped prefill's batch_tokens_for (what fits beside its resident
    experts on the GPU), else 4096 (the eager path). The smallest over the ranks: every rank plans the same
    batches. (A resumed trace keeps its folder's: _kept_batch_tokens.)"""
    from omnilab.gpu.prefill import AUTO_BATCH_TOKENS, batch_tokens_for

    return min(dist.gather(batch_tokens_for(grouped_model) if grouped_model is not None else AUTO_BATCH_TOKENS[-1]))

def _config_hash(model) -> str:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else vars(model.config)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

def _write_documents(out: Path, documents: pd.DataFrame, lengths) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"doc": documents["doc"].to_numpy(np.int32), "domain": documents["domain"].astype(str),
                      "source": documents["source"].astype(str), "row": documents["row"].to_numpy(np.int64),
                      "tokens": np.asarray(lengths, dtype=np.int64)})
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
