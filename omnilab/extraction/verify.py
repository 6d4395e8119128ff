"""Verifying an extraction: every file re-hashed against the manifest, and optionally against the source shards."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omnilab.checkpoint import Checkpoint, INDEX_NAME, Problem, read_header, regular_file
from omnilab.outdir import is_temp
from omnilab.extraction.manifest import JOURNAL_NAME, MANIFEST_NAME, read_manifest
from omnilab.extraction.stream import CHECKSUM, source_identity, stream_spans


def verify_extraction(path: str | os.PathLike, source: str | os.PathLike | None = None, *, workers: int = 2,
                      progress: bool = False, manifest: dict | None = None) -> list[Problem]:
    """Check every file of an extraction against manifest.json (and, with `source`, against the source shards).

    Problems (kind: message naming the file and tensor): interrupted, leftover, unexpected, index, missing_file,
    size, bad_header, not_in_file, dtype, shape, checksum, and with a source: source_identity, source_missing,
    source_checksum. Raises CheckpointError only when manifest.json itself is unreadable. `manifest`: the folder's
    manifest.json when already read (read_manifest)."""
    from tqdm.auto import tqdm

    root = Path(path)
    if manifest is None:
        manifest = read_manifest(root)
    problems: list[Problem] = []
    tensors: dict[str, dict] = manifest["tensors"]
    if (root / JOURNAL_NAME).exists():
        problems.append(Problem("interrupted", f"{JOURNAL_NAME}: an extraction run into this folder was interrupted; "
                                               f"rerun `omnilab extract` with the same options to finish it", shard=JOURNAL_NAME))
    for tmp in sorted(p for p in root.rglob("*") if p.name.endswith(".tmp") or is_temp(p.name)):
        rel = tmp.relative_to(root).as_posix()
        problems.append(Problem("leftover", f"{rel}: half-written temporary file of an interrupted run", shard=rel))
    by_file: dict[str, dict[str, dict]] = {}
    for name, entry in tensors.items():
        by_file.setdefault(entry["file"], {})[name] = entry
    for f in sorted(root.rglob("*.safetensors")):
        rel = f.relative_to(root).as_posix()
        if rel not in by_file:
            problems.append(Problem("unexpected", f"{rel}: safetensors file not listed in {MANIFEST_NAME}", shard=rel))
    try:
        weight_map = json.loads((root / INDEX_NAME).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(Problem("index", f"{INDEX_NAME}: unreadable ({e.__class__.__name__}: {e})", shard=INDEX_NAME))
        weight_map = None
    if weight_map is not None:
        for name, entry in tensors.items():
            if weight_map.get(name) != entry["file"]:
                problems.append(Problem("index", f"{INDEX_NAME} maps tensor {name} to {weight_map.get(name)}, "
                                                 f"manifest.json to {entry['file']}", tensor=name, shard=entry["file"]))
        for name in sorted(set(weight_map) - set(tensors)):
            problems.append(Problem("index", f"{INDEX_NAME} lists tensor {name} ({weight_map[name]}), manifest.json does not",
                                    tensor=name, shard=weight_map[name]))
    for name, extra in manifest.get("extras", {}).items():
        p = root / name
        if not p.exists():
            problems.append(Problem("missing_file", f"{name}: listed in {MANIFEST_NAME} but missing", shard=name))
        elif (why := regular_file(p)) is not None:
            problems.append(Problem("not_a_file", f"{name}: {why}; not read", shard=name))
        elif hashlib.sha256(p.read_bytes()).hexdigest() != extra[CHECKSUM]:
            problems.append(Problem("checksum", f"{name}: bytes differ from {MANIFEST_NAME} (sha256): the file changed",
                                    shard=name))

    def check_file(rel: str) -> list[Problem]:
        entries = by_file[rel]
        file = root / rel
        if file.exists() and (why := regular_file(file)) is not None:
            return [Problem("not_a_file", f"{rel}: {why}; not read", shard=rel)]
        if not file.exists():
            return [Problem("missing_file", f"{rel}: listed in {MANIFEST_NAME} with {len(entries)} tensors but missing",
                            tensor=next(iter(entries)), shard=rel)]
        try:
            header, start = read_header(file)
        except ValueError as e:
            bar.update(sum(e_["bytes"] for e_ in entries.values()))
            return [Problem("bad_header", f"{rel}: unreadable header: {e}", shard=rel)]
        found, spans = [], []
        size = file.stat().st_size
        for name, entry in entries.items():
            spec = header.get(name)
            if not isinstance(spec, dict):
                found.append(Problem("not_in_file", f"{rel}: tensor {name} is listed in {MANIFEST_NAME} but not in the file",
                                     tensor=name, shard=rel))
                continue
            if spec.get("dtype") != entry["dtype"]:
                found.append(Problem("dtype", f"{rel}: tensor {name} is {spec.get('dtype')}, manifest says {entry['dtype']}",
                                     tensor=name, shard=rel))
            if list(spec.get("shape", [])) != list(entry["shape"]):
                found.append(Problem("shape", f"{rel}: tensor {name} has shape {spec.get('shape')}, manifest says {entry['shape']}",
                                     tensor=name, shard=rel))
            try:
                b, e = (start + int(x) for x in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                found.append(Problem("bad_header", f"{rel}: malformed entry for tensor {name}", tensor=name, shard=rel))
                continue
            if e - b != entry["bytes"] or e > size:
                found.append(Problem("size", f"{rel}: tensor {name} spans bytes {b}..{e} of a {size}-byte file, "
                                             f"manifest says {entry['bytes']} bytes", tensor=name, shard=rel))
                continue
            spans.append((name, b, e))
        extra_names = set(header) - set(entries) - {"__metadata__"}
        for name in sorted(extra_names):
            found.append(Problem("unexpected", f"{rel}: tensor {name} is in the file but not in {MANIFEST_NAME}",
                                 tensor=name, shard=rel))
        digests = stream_spans(file, spans, None, bar=bar) if spans else {}
        for name, digest in digests.items():
            if digest != entries[name][CHECKSUM]:
                found.append(Problem("checksum", f"{rel}: tensor {name} bytes differ from {MANIFEST_NAME} "
                                                 f"(sha256 {digest[:12]}.. != {entries[name][CHECKSUM][:12]}..): "
                                                 f"the file is corrupted", tensor=name, shard=rel))
        return found

    total = sum(e["bytes"] for e in tensors.values())
    with tqdm(total=total, desc="verify", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        for found in pool.map(check_file, sorted(by_file)):
            problems.extend(found)
    if source is not None:
        problems.extend(_verify_against_source(manifest, Path(source), workers, progress))
    return problems


def _verify_against_source(manifest: dict, source: Path, workers: int, progress: bool) -> list[Problem]:
    from tqdm.auto import tqdm

    ck = Checkpoint(source)
    problems = []
    identity = source_identity(ck)
    for k in ("config_sha256", "index_sha256", "headers_sha256"):
        if identity[k] != manifest["source"].get(k):
            what = {"config_sha256": "config.json", "index_sha256": INDEX_NAME, "headers_sha256": "shard headers"}[k]
            problems.append(Problem("source_identity", f"{source}: its {what} differs from the one this extraction was made from"))
    by_shard: dict[str, list] = {}
    for name, entry in manifest["tensors"].items():
        if name not in ck.tensors.index:
            problems.append(Problem("source_missing", f"tensor {name} is not in the source {source}", tensor=name))
            continue
        row = ck.tensors.loc[name]  # a Series: fields by key (row.dtype is the Series' own dtype)
        shard, dtype, shape = row["shard"], row["dtype"], list(row["shape"])
        if dtype != entry["dtype"] or shape != list(entry["shape"]):
            problems.append(Problem("source_shape", f"tensor {name} is {dtype}{shape} in source shard {shard}, "
                                                    f"{entry['dtype']}{entry['shape']} in {entry['file']}",
                                    tensor=name, shard=shard))
            continue
        by_shard.setdefault(shard, []).append((name, int(row["begin"]), int(row["end"])))
    total = sum(e - b for spans in by_shard.values() for _, b, e in spans)
    with tqdm(total=total, desc="verify source", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        shards = [s for s in ck.shards if s in by_shard]
        for shard, digests in zip(shards, pool.map(lambda s: stream_spans(ck.root / s, by_shard[s], None, bar=bar), shards)):
            for name, digest in digests.items():
                entry = manifest["tensors"][name]
                if digest != entry[CHECKSUM]:
                    problems.append(Problem("source_checksum", f"tensor {name}: bytes in source shard {shard} differ from "
                                                               f"{entry['file']} (sha256 {digest[:12]}.. != {entry[CHECKSUM][:12]}..)",
                                            tensor=name, shard=shard))
    return problems
