"""Component extraction: take a checkpoint apart into per-expert and backbone files, and put it back bit-exact.

An extraction folder is itself a checkpoint: safetensors files plus a standard `model.safetensors.index.json`
mapping every original tensor name (unchanged) to the file that holds it, so `Checkpoint(OUT)`, transformers'
`from_pretrained` and every omnilab verb open it as they open the original. Its layout is made for selective
loading, one file per (component, layer, expert):

    embed.safetensors  final_norm.safetensors  lm_head.safetensors
    attention/layer-000.safetensors  norms/layer-000.safetensors  router/layer-000.safetensors
    dense_mlp/layer-000.safetensors                       (layers without experts)
    experts/layer-000/expert-000.safetensors              gate_proj, up_proj, down_proj of one expert
    audio.safetensors  vision.safetensors  talker.safetensors  code2wav.safetensors  unrecognised.safetensors
    model.safetensors.index.json   only what was extracted
    manifest.json                  every tensor: file, source shard, dtype, shape, sha256 of its stored bytes;
                                   the source's identity (sha256 of its index, config and shard headers);
                                   which source tensors were not extracted ("missing"); each run's selection
    config.json, generation_config.json, tokenizer files   copied (and checksummed in the manifest)

How it runs: each source shard is memory-mapped and gone through once, front to back (tensors nobody asked for
are skipped); each tensor's bytes are hashed and written straight to their place in their output file, so an
output file is written once even when its tensors come from several shards. `workers` threads take the shards
in segments of about 256 MB, in file order (sha256 and the writes release the GIL). Outputs are written under
`<name>.tmp` and renamed when complete; each completed file is appended to `.extract-journal.jsonl`. A run
killed at any point (SIGKILL included) leaves only complete files; a rerun removes stale `.tmp` files, keeps
each planned output that is already there and re-hashes to the recorded checksums ("skipped"), and extracts
the rest. Index and manifest are written last, so a folder without them is an unfinished extraction. Reruns
with a different selection into the same folder add to it (the index and manifest then list everything there);
a folder extracted from a different source is refused.

Bytes are never decoded: the stored bytes are copied verbatim (bf16 included) and the files are written by
this module in the safetensors format (8-byte little-endian header length, JSON header padded with spaces to 8
bytes, tensors laid out contiguously, larger element sizes first so every tensor stays aligned).

Public API: `extract`, `verify_extraction`, `availability` (+ `availability_text`), `missing_summary`,
`not_extracted`, `read_manifest`, `manifest_table`, `component_bytes`, `is_extraction`, `parse_range`,
`parse_components`, `output_file`, `hash_file_tensors`.

Hidden option for tests: `pause_after_file` (CLI `--pause-after-file SECONDS`) sleeps after each completed
output file, so a test can kill a run mid-way.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from omnilab.arch import ALL_COMPONENTS, TEXT_COMPONENTS, TOWERS, classify
from omnilab.checkpoint import DTYPE_BYTES, INDEX_NAME, Checkpoint, CheckpointError, Problem, pack_header, read_header
from omnilab.jsonio import write_json
from omnilab.inventory import Inventory, inventory

MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = ".extract-journal.jsonl"
FORMAT = "omnilab.extraction/1"
CHECKSUM = "sha256"  # hashlib's sha256 runs at ~1.7 GB/s per core with SHA extensions, faster than blake2b here
BLOCK_BYTES = 4 * 2**20  # tensors are hashed and written in pieces of at most this size
SEGMENT_BYTES = 256 * 2**20  # workers take a shard in segments of about this many bytes, in file order
COMPONENT_GROUPS = {
    "all": ALL_COMPONENTS,
    "text": TEXT_COMPONENTS,
    "backbone": tuple(c for c in TEXT_COMPONENTS if c != "experts"),
    "towers": TOWERS,
}
# files beside the shards that travel with an extraction (config, generation config, tokenizer, processors)
EXTRA_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken")
FAILING_PROBLEMS = ("missing_shard", "bad_header", "truncated", "duplicate")


# ---------------------------------------------------------------------------------------------------
# selection and plan
# ---------------------------------------------------------------------------------------------------


def parse_range(text: str) -> list[int]:
    """'0-7,12,20-23' -> [0..7, 12, 20..23]. Raises ValueError naming the bad part."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"cannot read range {part!r} in {text!r}: use e.g. 0-7,12") from None
        if b < a or a < 0:
            raise ValueError(f"range {part!r} in {text!r} is empty or negative")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def parse_components(names: list[str] | str | None) -> tuple[str, ...]:
    """Component names and groups ('all', 'text', 'backbone', 'towers') -> component names, in inventory order."""
    if names is None:
        return ALL_COMPONENTS
    if isinstance(names, str):
        names = names.replace(" ", "").split(",")
    chosen: set[str] = set()
    for n in names:
        if n in COMPONENT_GROUPS:
            chosen.update(COMPONENT_GROUPS[n])
        elif n in ALL_COMPONENTS:
            chosen.add(n)
        elif n:
            raise ValueError(f"unknown component {n!r}: choose from {', '.join(ALL_COMPONENTS)} "
                             f"or the groups {', '.join(COMPONENT_GROUPS)}")
    return tuple(c for c in ALL_COMPONENTS if c in chosen)


def output_file(component: str, layer: int | None = None, expert: int | None = None) -> str:
    """The extraction file (relative path) that holds a tensor of this component / layer / expert."""
    if component == "experts" and layer is not None:
        return f"experts/layer-{layer:03d}/" + (f"expert-{expert:03d}" if expert is not None else "fused") + ".safetensors"
    if layer is not None:
        return f"{component}/layer-{layer:03d}.safetensors"
    return f"{component}.safetensors"


@dataclass
class OutputPlan:
    """One output file: which source tensors go in it, where, and the exact header it gets."""

    rel: str
    component: str
    layer: int | None
    expert: int | None
    rows: list[tuple]  # (name, shard, dtype, shape, bytes, begin, end) in file order
    header: bytes = b""  # 8-byte length + padded JSON
    offsets: dict[str, int] = field(default_factory=dict)  # tensor name -> absolute offset in the output file
    size: int = 0

    def __post_init__(self):
        # larger element sizes first keeps every tensor aligned (as safetensors' own writer does); then source order
        self.rows.sort(key=lambda r: -DTYPE_BYTES.get(r[2], 1))
        spec, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, _, dtype, shape, nbytes, _, _ in self.rows:
            spec[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.header = pack_header(spec)
        start = len(self.header)
        self.offsets = {name: start + spec[name]["data_offsets"][0] for name in spec if name != "__metadata__"}
        self.size = start + offset

    @property
    def data_bytes(self) -> int:
        return self.size - len(self.header)


def plan_extraction(ck: Checkpoint, components=None, layers: list[int] | None = None,
                    experts: list[int] | None = None) -> dict[str, OutputPlan]:
    """Output file -> plan, for the selected components, layers (text decoder) and experts."""
    chosen = parse_components(components)
    cfg, layout = ck.arch
    for what, picked, count in (("layers", layers, cfg.num_hidden_layers), ("experts", experts, cfg.num_experts)):
        outside = sorted(set(picked or ()) - set(range(count)))
        if outside:
            raise ValueError(f"--{what}: {outside[0]} is past this checkpoint's {count} {what} (0..{count - 1})")
    groups: dict[str, list] = {}
    keys: dict[str, tuple] = {}
    shard_order = {s: i for i, s in enumerate(ck.shards)}
    table = ck.tensors.sort_values(["shard", "begin"], key=lambda c: c.map(shard_order) if c.name == "shard" else c)
    for name, shard, dtype, shape, _, nbytes, begin, end in table.itertuples(index=False):
        spec = classify(name, layout)
        if spec.component not in chosen:
            continue
        if layers is not None and spec.layer is not None and spec.layer not in layers:
            continue
        if experts is not None and spec.expert is not None and spec.expert not in experts:
            continue
        rel = output_file(spec.component, spec.layer, spec.expert)
        groups.setdefault(rel, []).append((name, shard, dtype, tuple(shape), int(nbytes), int(begin), int(end)))
        keys[rel] = (spec.component, spec.layer, spec.expert)
    return {rel: OutputPlan(rel, *keys[rel], rows) for rel, rows in groups.items()}


# ---------------------------------------------------------------------------------------------------
# source identity
# ---------------------------------------------------------------------------------------------------


def source_identity(ck: Checkpoint) -> dict:
    """What identifies a source checkpoint: sha256 of its index, config.json and every shard header."""
    def file_hash(p: Path):
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None

    headers = hashlib.sha256()
    for shard in ck.shards:
        info = ck.shard_info.get(shard, {})
        if info.get("status") == "ok":
            with open(ck.root / shard, "rb") as f:
                headers.update(shard.encode() + b"\0" + f.read(info["data_start"]))
    return {
        "path": str(Path(ck.path).resolve()),
        "index_sha256": file_hash(ck.root / INDEX_NAME) if ck.index is not None else None,
        "config_sha256": file_hash(ck.root / "config.json"),
        "headers_sha256": headers.hexdigest(),
        "shards": len(ck.shards),
        "tensors": len(ck.tensors),
        "bytes": ck.total_bytes,
    }


def _identity_key(identity: dict) -> str:
    return hashlib.sha256("|".join(str(identity.get(k)) for k in ("index_sha256", "config_sha256", "headers_sha256"))
                          .encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# reading shards front to back
# ---------------------------------------------------------------------------------------------------


def _stream(path: Path, spans: list[tuple[str, int, int]], on_bytes, on_done=None, bar=None,
            block: int = BLOCK_BYTES) -> dict[str, str]:
    """Go through the byte ranges `spans` [(name, begin, end)] of one file front to back, hash each range
    and call `on_bytes(name, offset_in_tensor, memoryview)` for every piece of at most `block` bytes.

    The file is memory-mapped, so hashing reads the page cache directly and the only copy is `on_bytes`'
    write; the kernel is told the access is sequential and reads ahead. Returns name -> sha256 hex digest."""
    spans = sorted(spans, key=lambda s: s[1])
    digests: dict[str, str] = {}
    if not spans:
        return digests
    size = path.stat().st_size
    if spans[-1][2] > size:
        raise OSError(f"{path}: {size} bytes, but tensor {spans[-1][0]} ends at byte {spans[-1][2]}")
    with open(path, "rb") as f:
        if size == 0:
            view = memoryview(b"")
        else:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mapped, "madvise"):
                mapped.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mapped)
        try:
            for name, begin, end in spans:
                h = hashlib.new(CHECKSUM)
                for lo in range(begin, end, block):
                    piece = view[lo:min(end, lo + block)]
                    h.update(piece)
                    if on_bytes:
                        on_bytes(name, lo - begin, piece)
                    if bar is not None:
                        bar.update(len(piece))
                    piece.release()
                digests[name] = h.hexdigest()
                if on_done:
                    on_done(name, digests[name])
        finally:
            view.release()
            if size:
                mapped.close()
    return digests


def hash_file_tensors(path: str | os.PathLike, bar=None) -> dict[str, str]:
    """sha256 of every tensor's stored bytes in one safetensors file, read front to back."""
    path = Path(path)
    header, start = read_header(path)
    spans = [(n, start + s["data_offsets"][0], start + s["data_offsets"][1]) for n, s in header.items() if n != "__metadata__"]
    return _stream(path, spans, None, bar=bar)


# ---------------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    out: Path
    written: int  # output files written by this run
    skipped: int  # planned output files already there and verified against their recorded checksums
    written_bytes: int
    skipped_bytes: int
    seconds: float
    complete: bool  # every source tensor is in the extraction
    files: int  # output files in the extraction after this run
    missing: int  # source tensors not extracted

    @property
    def mb_per_s(self) -> float:
        return self.written_bytes / 1e6 / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        state = "complete" if self.complete else f"partial ({self.missing} source tensors not extracted)"
        return (f"{self.out}: wrote {self.written} files ({self.written_bytes / 1e6:,.1f} MB, {self.mb_per_s:,.0f} MB/s), "
                f"skipped {self.skipped} files already extracted and verified ({self.skipped_bytes / 1e6:,.1f} MB); "
                f"{self.files} files, {state}")


class _Writer:
    """Output files being written: opened at their first tensor, renamed and journaled at their last."""

    def __init__(self, out: Path, plans: dict[str, OutputPlan], identity_key: str, pause_after_file: float = 0.0):
        self.out, self.plans, self.identity_key = out, plans, identity_key
        self.pause_after_file = pause_after_file
        self.file_of = {row[0]: rel for rel, p in plans.items() for row in p.rows}
        self.remaining = {rel: len(p.rows) for rel, p in plans.items()}
        self.entries: dict[str, dict] = {rel: {} for rel in plans}
        self.fds: dict[str, int] = {}
        self.lock = threading.Lock()
        self.written = 0

    def _fd(self, rel: str) -> int:
        with self.lock:
            fd = self.fds.get(rel)
            if fd is None:
                tmp = self.out / (rel + ".tmp")
                tmp.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, self.plans[rel].header, 0)
                self.fds[rel] = fd
            return fd

    def write(self, name: str, offset: int, piece: memoryview) -> None:
        rel = self.file_of[name]
        fd = self._fd(rel)
        at = self.plans[rel].offsets[name] + offset
        while len(piece):
            k = os.pwrite(fd, piece, at)
            piece, at = piece[k:], at + k

    def done(self, name: str, digest: str, row: tuple) -> None:
        rel = self.file_of[name]
        _, shard, dtype, shape, nbytes, _, _ = row
        entry = {"file": rel, "source_shard": shard, "dtype": dtype, "shape": list(shape), "bytes": nbytes, CHECKSUM: digest}
        with self.lock:
            self.entries[rel][name] = entry
            self.remaining[rel] -= 1
            finished = self.remaining[rel] == 0
        if finished:
            self._finish(rel)

    def _finish(self, rel: str) -> None:
        plan = self.plans[rel]
        fd = self._fd(rel)  # a file of empty tensors only was never opened by `write`
        with self.lock:
            self.fds.pop(rel)
        size = os.fstat(fd).st_size
        os.close(fd)
        tmp = self.out / (rel + ".tmp")
        if size != plan.size:
            raise OSError(f"{tmp}: wrote {size} bytes, expected {plan.size}")
        tmp.replace(self.out / rel)
        record = {"source": self.identity_key, "file": rel, "size": plan.size,
                  "tensors": {n: self.entries[rel][n] for n, *_ in plan.rows}}
        with self.lock:
            with open(self.out / JOURNAL_NAME, "a") as j:
                j.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.written += 1
        if self.pause_after_file:
            time.sleep(self.pause_after_file)

    def close(self) -> None:
        """Close files left open by a failed run and remove their temporary names."""
        for rel, fd in self.fds.items():
            os.close(fd)
            (self.out / (rel + ".tmp")).unlink(missing_ok=True)
        self.fds.clear()


def extract(source: str | os.PathLike, out: str | os.PathLike, *, components=None, layers: list[int] | None = None,
            experts: list[int] | None = None, workers: int = 2, progress: bool = True,
            pause_after_file: float = 0.0) -> ExtractResult:
    """Extract `components` (names or groups; default all) of the checkpoint at `source` into `out`.

    `layers` limits per-layer text components, `experts` limits experts; both None = all. `workers` source
    shards are read at once (each front to back). Resumes an interrupted run; adds to an earlier extraction of
    the same source. Raises CheckpointError / ValueError with a one-line message for bad input."""
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    ck = Checkpoint(source)
    out = Path(out)
    if out.resolve() == ck.root.resolve():
        raise ValueError(f"{out}: the output folder is the source folder; choose another")
    broken = [p for p in ck.problems if p.kind in FAILING_PROBLEMS]
    if broken:
        raise CheckpointError(f"{ck.path}: cannot extract, {len(broken)} problems; first: {broken[0].message}")
    _, layout = ck.arch  # CheckpointError naming config.json when it is not a config this package reads
    plans = plan_extraction(ck, components, layers, experts)
    if not plans:
        raise ValueError(f"{ck.path}: nothing selected (components {', '.join(parse_components(components))}, "
                         f"layers {layers if layers is not None else 'all'}, experts {experts if experts is not None else 'all'})")
    identity = source_identity(ck)
    key = _identity_key(identity)
    out.mkdir(parents=True, exist_ok=True)
    old = _read_manifest_if_any(out)
    if old is not None and _identity_key(old["source"]) != key:
        raise ValueError(f"{out}: holds an extraction of another checkpoint ({old['source'].get('path')}); "
                         f"choose an empty folder or delete it")
    for tmp in out.rglob("*.tmp"):  # half-written files of an interrupted run
        tmp.unlink()

    # what is already there: files of an earlier manifest and of the journal of an interrupted run
    recorded: dict[str, dict] = {}
    if old is not None:
        for name, entry in old["tensors"].items():
            recorded.setdefault(entry["file"], {})[name] = entry
    for record in _read_journal(out):
        if record.get("source") == key:
            recorded[record["file"]] = record["tensors"]

    bar_kw = dict(unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, dynamic_ncols=True)
    candidates = [rel for rel in plans if rel in recorded and (out / rel).exists()]
    skipped = set()
    if candidates:
        total = sum(plans[rel].data_bytes for rel in candidates)
        with tqdm(total=total, desc="verify existing", **bar_kw) as bar, ThreadPoolExecutor(max(1, workers)) as pool:
            ok = pool.map(lambda rel: _already_extracted(out / rel, plans[rel], recorded[rel], bar), candidates)
            skipped = {rel for rel, good in zip(candidates, ok) if good}
    todo = {rel: p for rel, p in plans.items() if rel not in skipped}

    # read every source shard front to back, writing each tensor to its place in its output file
    writer = _Writer(out, todo, key, pause_after_file)
    by_shard: dict[str, list[tuple]] = {}
    for p in todo.values():
        for row in p.rows:
            by_shard.setdefault(row[1], []).append(row)
    total = sum(p.data_bytes for p in todo.values())

    def extract_segment(segment: tuple[str, list[tuple]]) -> None:
        shard, rows = segment
        by_name = {r[0]: r for r in rows}
        _stream(ck.root / shard, [(r[0], r[5], r[6]) for r in rows], writer.write,
                lambda name, digest: writer.done(name, digest, by_name[name]), bar=bar)

    pool = ThreadPoolExecutor(max(1, workers))
    try:
        with tqdm(total=total, desc="extract", **bar_kw) as bar:
            for _ in pool.map(extract_segment, _segments(ck.shards, by_shard)):
                pass
    except BaseException:  # an error or Ctrl-C: start no further segment, then remove the half-written files
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown()
        writer.close()
    if any(writer.remaining.values()):
        left = [rel for rel, n in writer.remaining.items() if n]
        raise OSError(f"{out / left[0]}: {len(left)} output files were not completed")

    # everything recorded for files still on disk, this run's plan overriding older records
    tensors: dict[str, dict] = {}
    for rel, entries in recorded.items():
        if rel not in plans and (out / rel).exists():
            tensors.update(entries)
    for rel in skipped:
        tensors.update(recorded[rel])
    for rel in todo:
        tensors.update(writer.entries[rel])
    for name, entry in tensors.items():
        spec = classify(name, layout)
        entry.update(component=spec.component, layer=spec.layer, expert=spec.expert)
    extras = _copy_extras(ck.root, out)
    missing = sorted(set(ck.tensors.name) - set(tensors))
    files: dict[str, dict] = {}
    for name, entry in tensors.items():
        f = files.setdefault(entry["file"], {"component": entry["component"], "layer": entry["layer"],
                                             "expert": entry["expert"], "tensors": 0, "bytes": 0})
        f["tensors"] += 1
        f["bytes"] += entry["bytes"]
    for rel, f in files.items():
        f["file_bytes"] = (out / rel).stat().st_size
    ordered = dict(sorted(tensors.items()))
    index = {"metadata": {"total_size": sum(e["bytes"] for e in ordered.values()), "format": FORMAT},
             "weight_map": {n: e["file"] for n, e in ordered.items()}}
    manifest = {
        "format": FORMAT,
        "checksum": CHECKSUM,
        "source": identity,
        "selections": (old or {}).get("selections", []) + [
            {"components": list(parse_components(components)), "layers": layers, "experts": experts}],
        "complete": not missing,
        "missing": missing,
        "files": dict(sorted(files.items())),
        "extras": extras,
        "tensors": ordered,
    }
    write_json(out / INDEX_NAME, index, indent=1)
    write_json(out / MANIFEST_NAME, manifest, indent=1)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    return ExtractResult(out, writer.written, len(skipped), total, sum(plans[r].data_bytes for r in skipped),
                         time.perf_counter() - start_time, not missing, len(files), len(missing))


def _segments(shards: list[str], by_shard: dict[str, list[tuple]]) -> list[tuple[str, list[tuple]]]:
    """Each shard's wanted tensors in file order, cut into runs of about SEGMENT_BYTES: the units of work, so
    that several workers share a large shard while each still reads front to back."""
    out = []
    for shard in shards:
        run, size = [], 0
        for row in sorted(by_shard.get(shard, []), key=lambda r: r[5]):
            if run and size + row[4] > SEGMENT_BYTES:
                out.append((shard, run))
                run, size = [], 0
            run.append(row)
            size += row[4]
        if run:
            out.append((shard, run))
    return out


def _already_extracted(path: Path, plan: OutputPlan, entries: dict, bar) -> bool:
    """True when `path` has exactly the planned header and size and its tensors hash to the recorded checksums."""
    try:
        if path.stat().st_size != plan.size:
            return False
        with open(path, "rb") as f:
            if f.read(len(plan.header)) != plan.header:
                return False
        if set(entries) != set(plan.offsets):
            return False
        # the header is the planned one, so the plan's offsets are where the tensors are
        spans = [(name, plan.offsets[name], plan.offsets[name] + nbytes) for name, _, _, _, nbytes, _, _ in plan.rows]
        digests = _stream(path, spans, None, bar=bar)
    except (OSError, ValueError):
        return False
    return all(digests.get(n) == e.get(CHECKSUM) for n, e in entries.items())


def _copy_extras(src: Path, out: Path) -> dict[str, dict]:
    """Copy config, generation config, tokenizer and processor files beside the shards; return their checksums."""
    extras = {}
    for p in sorted(src.iterdir()):
        if (not p.is_file() or p.suffix not in EXTRA_SUFFIXES or p.name in (INDEX_NAME, MANIFEST_NAME)
                or p.name.startswith(".") or p.name.endswith(".tmp")):
            continue
        data = p.read_bytes()
        target = out / p.name
        if not target.exists() or target.read_bytes() != data:
            tmp = out / (p.name + ".tmp")
            tmp.write_bytes(data)
            shutil.copystat(p, tmp)
            tmp.replace(target)
        extras[p.name] = {"bytes": len(data), CHECKSUM: hashlib.sha256(data).hexdigest()}
    return extras


def _read_journal(out: Path) -> list[dict]:
    path = out / JOURNAL_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed while appending
            continue
    return records


def _read_manifest_if_any(out: Path) -> dict | None:
    path = out / MANIFEST_NAME
    return read_manifest(out) if path.exists() else None


# ---------------------------------------------------------------------------------------------------
# reading and verifying an extraction
# ---------------------------------------------------------------------------------------------------


def is_extraction(path: str | os.PathLike) -> bool:
    """True for a folder that holds an extraction's manifest.json."""
    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).exists()


def read_manifest(path: str | os.PathLike) -> dict:
    """manifest.json of an extraction folder. Raises CheckpointError (one line) when it is unreadable."""
    file = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read ({e.__class__.__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{file}: not an omnilab extraction manifest ({FORMAT})")
    return manifest


def manifest_table(path: str | os.PathLike) -> pd.DataFrame:
    """One row per extracted tensor: name, file, component, layer, expert, source_shard, dtype, shape, bytes, sha256."""
    manifest = read_manifest(path)
    rows = [{"name": n, **e} for n, e in manifest["tensors"].items()]
    cols = ["name", "file", "component", "layer", "expert", "source_shard", "dtype", "shape", "bytes", CHECKSUM]
    table = pd.DataFrame(rows, columns=cols)
    table["shape"] = table["shape"].map(tuple)
    for c in ("layer", "expert"):
        table[c] = table[c].astype("Int64")
    return table


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
    for tmp in sorted(root.rglob("*.tmp")):
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
        elif hashlib.sha256(p.read_bytes()).hexdigest() != extra[CHECKSUM]:
            problems.append(Problem("checksum", f"{name}: bytes differ from {MANIFEST_NAME} (sha256): the file changed",
                                    shard=name))

    def check_file(rel: str) -> list[Problem]:
        entries = by_file[rel]
        file = root / rel
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
        digests = _stream(file, spans, None, bar=bar) if spans else {}
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
        for shard, digests in zip(shards, pool.map(lambda s: _stream(ck.root / s, by_shard[s], None, bar=bar), shards)):
            for name, digest in digests.items():
                entry = manifest["tensors"][name]
                if digest != entry[CHECKSUM]:
                    problems.append(Problem("source_checksum", f"tensor {name}: bytes in source shard {shard} differ from "
                                                               f"{entry['file']} (sha256 {digest[:12]}.. != {entry[CHECKSUM][:12]}..)",
                                            tensor=name, shard=shard))
    return problems


# ---------------------------------------------------------------------------------------------------
# availability of experts
# ---------------------------------------------------------------------------------------------------


def _inventory_of(path: str | os.PathLike | Checkpoint | Inventory) -> Inventory:
    """An Inventory as given, or one labelling (not checking) the checkpoint at `path`."""
    return path if isinstance(path, Inventory) else inventory(path, check=False)


def availability(path: str | os.PathLike | Checkpoint | Inventory) -> pd.DataFrame:
    """Layers x experts of the text decoder: how many of an expert's three projections are present (0..3).

    Works on any checkpoint folder (an extraction or the original shards), an open Checkpoint or its Inventory
    (its `expert_grid`); rows are the MoE layers. Raises CheckpointError when config.json is unusable."""
    inv = _inventory_of(path)
    cfg = inv.config
    if cfg is None:
        inv.checkpoint.arch  # raises CheckpointError naming config.json
    layers = cfg.moe_layers
    return pd.DataFrame(inv.expert_grid[layers].astype(int), index=pd.Index(layers, name="layer"),
                        columns=pd.Index(range(cfg.num_experts), name="expert"))


def availability_text(avail: pd.DataFrame) -> str:
    """The availability map as text, one line per layer: '#' an expert with all 3 projections, '1'/'2' some,
    '.' none. For `omnilab verify` on a partial extraction."""
    lines = [f"experts 0..{avail.shape[1] - 1} per layer ('#' complete, '1'/'2' projections present, '.' absent):"]
    width = len(str(avail.index.max())) if len(avail) else 1
    for layer, row in avail.iterrows():
        cells = "".join("#" if n >= 3 else "." if n == 0 else str(int(n)) for n in row)
        lines.append(f"  layer {layer:>{width}} {cells}  {int((row >= 3).sum())}/{len(row)}")
    return "\n".join(lines)


def not_extracted(path: str | os.PathLike, manifest: dict | None = None) -> set[str]:
    """Source tensors an extraction left out on purpose (its selection): expected to be absent, not problems.
    `manifest`: the folder's manifest.json when already read."""
    return set((manifest if manifest is not None else read_manifest(path)).get("missing", []))


def missing_summary(path: str | os.PathLike | Checkpoint | Inventory, manifest: dict | None = None) -> str:
    """One line: what an extraction (or any checkpoint folder) lacks, experts by layer and other components.

    `path` may be an open Checkpoint or its Inventory; `manifest`: the extraction's manifest.json when already read."""
    inv = _inventory_of(path)
    ck = inv.checkpoint
    cfg, layout = ck.arch
    avail = availability(inv)
    n = avail.size
    full = int((avail == 3).sum().sum())
    partial = int(((avail > 0) & (avail < 3)).sum().sum())
    parts = []
    if full < n:
        parts.append(f"experts: {full} of {n} (layer x expert) present" + (f", {partial} with missing projections" if partial else ""))
    if manifest is None and is_extraction(ck.path):
        manifest = read_manifest(ck.path)
    if manifest is not None:
        missing = manifest.get("missing", [])
    else:
        from omnilab.arch import expected_tensors

        missing = sorted(set(expected_tensors(cfg, layout)) - set(ck.tensors.name))
    other: dict[str, int] = {}
    for name in missing:
        c = classify(name, layout).component
        if c != "experts":
            other[c] = other.get(c, 0) + 1
    if other:
        parts.append("missing " + ", ".join(f"{c} ({k} tensors)" for c, k in sorted(other.items(), key=lambda kv: ALL_COMPONENTS.index(kv[0]) if kv[0] in ALL_COMPONENTS else 99)))
    if not parts:
        return "complete: every tensor of the source is present"
    return "partial: " + "; ".join(parts)


def component_bytes(path: str | os.PathLike) -> pd.DataFrame:
    """Bytes, tensors and files per component of an extraction, in inventory order."""
    table = manifest_table(path)
    out = table.groupby("component").agg(tensors=("name", "size"), files=("file", "nunique"), bytes=("bytes", "sum"))
    order = [c for c in ALL_COMPONENTS if c in out.index] + [c for c in out.index if c not in ALL_COMPONENTS]
    return out.loc[order]
