"""A corpus for tracing: documents read from JSONL, text, Parquet or a local `datasets` folder (`read_corpus`),
their token ids (`tokenize`), the batches they are prefilled in (`plan_batches`: longest first, the same on every
rank) and the fingerprint of everything that decides a trace's numbers. Design: docs/DESIGN.md, "Corpus traces".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

TEXT_FIELDS = ("text", "prompt", "content")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")

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
        try:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{n}: not a JSON object")
                    rows.append(row)
        except UnicodeDecodeError as e:  # a binary file: say which, not only the codec's complaint
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); a .jsonl corpus is one JSON "
                             f"object per line") from None
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
