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
in segments of about 256 MB, in file order (sha256 and the writes release the GIL). The folder is locked for the
run (omnilab.outdir: a second extract into it gets one line, exit 2); a folder that is neither empty nor an
extraction is refused. Outputs are written under unique temporary names (`.NAME.omnilab-tmp-PID-RANDOM`),
fsynced and renamed when complete; each completed file is appended to `.extract-journal.jsonl`. A run
killed at any point (SIGKILL included) leaves only complete files; a rerun removes its own stale temporaries
(no other file), keeps each planned output that is already there and re-hashes to the recorded checksums
("skipped": a corrupt one is rewritten, never trusted because it exists), and extracts the rest. Index and manifest are written last, so a folder without them is an unfinished extraction. Reruns
with a different selection into the same folder add to it (the index and manifest then list everything there);
a folder extracted from a different source is refused.

`link_from=DIR` (CLI `--link-from DIR`): an earlier extraction of the same source (its manifest's identity)
gives its files instead of the source shards. Each planned file that DIR's manifest records with exactly the
planned tensors is hard-linked (`os.link`) to a temporary name in OUT, re-hashed there as a skipped file is
(size, header, every tensor's sha256 against DIR's manifest) and renamed into place, then journaled like a
written file; one that fails the check, or a link the file system refuses (EXDEV across file systems, EPERM),
is copied from the source shards as usual. A linked file shares its inode with DIR's: editing either in place
edits both. Extractions are read-only by design; to break a file in a test, copy the folder with
`omnilab.testing.breakage.linked_copy(..., private=[that file])`.

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
import os
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omnilab.arch import classify
from omnilab.checkpoint import Checkpoint, CheckpointError, INDEX_NAME, member, regular_file
from omnilab.extraction.manifest import (FORMAT, JOURNAL_NAME, MANIFEST_NAME, is_extraction, read_manifest,
                                        read_manifest_if_any)
from omnilab.extraction.plan import OutputPlan, parse_components, plan_extraction
from omnilab.extraction.stream import CHECKSUM, identity_key, source_identity, stream_spans
from omnilab.jsonio import write_json
from omnilab.outdir import OutDir, atomic_write, commit, remove_own_temporaries, temp_path


SEGMENT_BYTES = 256 * 2**20  # workers take a shard in segments of about this many bytes, in file order


# files beside the shards that travel with an extraction (config, generation config, tokenizer, processors)
EXTRA_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken")


FAILING_PROBLEMS = ("missing_shard", "bad_header", "truncated", "duplicate")


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
    linked: int = 0  # output files hard-linked from `link_from`'s verified files instead of copied
    linked_bytes: int = 0
    link_from: Path | None = None

    @property
    def mb_per_s(self) -> float:
        return self.written_bytes / 1e6 / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        state = "complete" if self.complete else f"partial ({self.missing} source tensors not extracted)"
        return (f"{self.out}: wrote {self.written} files ({self.written_bytes / 1e6:,.1f} MB, {self.mb_per_s:,.0f} MB/s), "
                f"skipped {self.skipped} files already extracted and verified ({self.skipped_bytes / 1e6:,.1f} MB); "
                + (f"linked {self.linked} files ({self.linked_bytes / 1e6:,.1f} MB) from {self.link_from}; "
                   if self.linked else "")
                + f"{self.files} files, {state}")


class _Writer:
    """Output files being written: opened at their first tensor, renamed and journaled at their last."""

    def __init__(self, out: Path, plans: dict[str, OutputPlan], identity_key: str, pause_after_file: float = 0.0):
        self.out, self.plans, self.identity_key = out, plans, identity_key
        self.pause_after_file = pause_after_file
        self.file_of = {row[0]: rel for rel, p in plans.items() for row in p.rows}
        self.remaining = {rel: len(p.rows) for rel, p in plans.items()}
        self.entries: dict[str, dict] = {rel: {} for rel in plans}
        self.fds: dict[str, int] = {}
        self.tmps: dict[str, Path] = {}
        self.lock = threading.Lock()
        self.written = 0

    def _fd(self, rel: str) -> int:
        with self.lock:
            fd = self.fds.get(rel)
            if fd is None:
                tmp = temp_path(self.out / rel)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                self.fds[rel], self.tmps[rel] = fd, tmp
                _pwrite_all(fd, memoryview(self.plans[rel].header), 0)
            return fd

    def write(self, name: str, offset: int, piece: memoryview) -> None:
        rel = self.file_of[name]
        fd = self._fd(rel)
        _pwrite_all(fd, piece, self.plans[rel].offsets[name] + offset)

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
        tmp = self.tmps.pop(rel)
        try:
            size = os.fstat(fd).st_size
            if size == plan.size:
                os.fsync(fd)
        finally:
            os.close(fd)
        if size != plan.size:
            tmp.unlink(missing_ok=True)
            raise OSError(f"{self.out / rel}: wrote {size} bytes, expected {plan.size}")
        commit(tmp, self.out / rel, fsync_file=False)
        with self.lock:
            _journal(self.out, self.identity_key, rel, plan, self.entries[rel])
            self.written += 1
        if self.pause_after_file:
            time.sleep(self.pause_after_file)

    def close(self) -> None:
        """Close files left open by a failed run and remove their temporary names."""
        for rel, fd in self.fds.items():
            os.close(fd)
            self.tmps.pop(rel).unlink(missing_ok=True)
        self.fds.clear()


def _journal(out: Path, key: str, rel: str, plan: OutputPlan, entries: dict) -> None:
    """Record the completed (renamed) file `rel` in the journal, durably: a rerun after a crash trusts it once
    re-hashed. Callers serialise the appends."""
    record = {"source": key, "file": rel, "size": plan.size, "tensors": {n: entries[n] for n, *_ in plan.rows}}
    with open(out / JOURNAL_NAME, "a") as j:
        j.write(json.dumps(record, separators=(",", ":")) + "\n")
        j.flush()
        os.fsync(j.fileno())


def _pwrite_all(fd: int, data: memoryview, at: int) -> None:
    """All of `data` at offset `at`; no view of it outlives the call (an ENOSPC must surface as itself, not as a
    BufferError from the mapped shard the view points into)."""
    done, n = 0, len(data)
    while done < n:
        with data[done:] as rest:
            done += os.pwrite(fd, rest, at + done)


def extract(source: str | os.PathLike, out: str | os.PathLike, *, components=None, layers: list[int] | None = None,
            experts: list[int] | None = None, workers: int = 2, progress: bool = True,
            pause_after_file: float = 0.0, link_from: str | os.PathLike | None = None) -> ExtractResult:
    """Extract `components` (names or groups; default all) of the checkpoint at `source` into `out`.

    `layers` limits per-layer text components, `experts` limits experts; both None = all. `workers` source
    shards are read at once (each front to back). Resumes an interrupted run; adds to an earlier extraction of
    the same source. `link_from`: an earlier extraction of the same source whose verified files are hard-linked
    instead of copied (see the module's header). Raises CheckpointError / ValueError with a one-line message for
    bad input."""
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
    key = identity_key(identity)
    donor = _donor(Path(link_from), out, key) if link_from is not None else None
    with OutDir(out, owns=(MANIFEST_NAME, JOURNAL_NAME), what="extract"):
        return _extract_locked(ck, out, plans, identity, key, layout, components, layers, experts, workers,
                               progress, pause_after_file, start_time, donor)


def _donor(folder: Path, out: Path, key: str) -> tuple[Path, dict[str, dict]]:
    """`link_from`'s folder and its recorded tensors by file; ValueError (one line) unless it is an extraction of
    the source with key `key`, other than `out`."""
    if not is_extraction(folder):
        raise ValueError(f"{folder}: not an extraction (no {MANIFEST_NAME}); link_from must be an earlier "
                         f"extraction of the same source")
    if out.exists() and folder.resolve() == out.resolve():
        raise ValueError(f"{folder}: link_from is the output folder itself; give another extraction")
    manifest = read_manifest(folder)  # CheckpointError, one line, when unreadable
    if identity_key(manifest["source"]) != key:
        raise ValueError(f"{folder}: an extraction of another checkpoint ({manifest['source'].get('path')}); "
                         f"link_from must extract the same source")
    by_file: dict[str, dict] = {}
    for name, entry in manifest["tensors"].items():
        by_file.setdefault(entry["file"], {})[name] = entry
    return folder, by_file


def _extract_locked(ck, out, plans, identity, key, layout, components, layers, experts, workers, progress,
                    pause_after_file, start_time, donor) -> ExtractResult:
    from tqdm.auto import tqdm

    old = read_manifest_if_any(out)
    if old is not None and identity_key(old["source"]) != key:
        raise ValueError(f"{out}: holds an extraction of another checkpoint ({old['source'].get('path')}); "
                         f"choose an empty folder or delete it")
    remove_own_temporaries(out)  # half-written files of an interrupted run of ours (we hold the lock)

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
    linked: dict[str, dict] = {}
    if donor is not None:
        linked = _link_files(out, donor, todo, key, workers, bar_kw)
        todo = {rel: p for rel, p in todo.items() if rel not in linked}

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
        stream_spans(ck.root / shard, [(r[0], r[5], r[6]) for r in rows], writer.write,
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
    for entries in linked.values():
        tensors.update(entries)
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
                         time.perf_counter() - start_time, not missing, len(files), len(missing),
                         len(linked), sum(plans[r].data_bytes for r in linked), donor[0] if donor else None)


def _link_files(out: Path, donor: tuple[Path, dict[str, dict]], todo: dict[str, OutputPlan], key: str,
                workers: int, bar_kw: dict) -> dict[str, dict]:
    """Hard-link into OUT each file of `todo` that the donor extraction holds with exactly its planned tensors
    and that re-hashes to the donor's checksums; return the manifest entries of the linked files by file. A file
    that fails either step is left in `todo`'s hands (copied from the source): never an error."""
    from tqdm.auto import tqdm

    folder, recorded = donor
    candidates = [rel for rel, plan in todo.items() if set(recorded.get(rel, ())) == set(plan.offsets)]
    lock = threading.Lock()

    def link(rel: str, bar) -> dict | None:
        plan, source = todo[rel], folder / rel
        try:
            if not stat.S_ISREG(os.lstat(source).st_mode):  # a symlink or stranger is not linked: copied instead
                return None
        except OSError:
            return None
        tmp = temp_path(out / rel)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, tmp, follow_symlinks=False)
        except OSError:  # EXDEV (another file system), EPERM (protected_hardlinks), no hard links at all
            return None
        try:
            # the link, not the donor's name, is checked: what is renamed into place is what was verified
            if not _already_extracted(tmp, plan, recorded[rel], bar):
                tmp.unlink(missing_ok=True)
                return None
            commit(tmp, out / rel)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entries = {name: {"file": rel, "source_shard": shard, "dtype": dtype, "shape": list(shape), "bytes": nbytes,
                          CHECKSUM: recorded[rel][name][CHECKSUM]}
                   for name, shard, dtype, shape, nbytes, _, _ in plan.rows}
        with lock:
            _journal(out, key, rel, plan, entries)
        return entries

    if not candidates:
        return {}
    total = sum(todo[rel].data_bytes for rel in candidates)
    with tqdm(total=total, desc=f"link from {folder}", **bar_kw) as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        done = pool.map(lambda rel: link(rel, bar), candidates)
        return {rel: entries for rel, entries in zip(candidates, done) if entries is not None}


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
        digests = stream_spans(path, spans, None, bar=bar)
    except (OSError, ValueError):
        return False
    return all(digests.get(n) == e.get(CHECKSUM) for n, e in entries.items())


def _copy_extras(src: Path, out: Path) -> dict[str, dict]:
    """Copy config, generation config, tokenizer and processor files beside the shards; return their checksums."""
    extras = {}
    for p in sorted(src.iterdir()):
        if (member(src, p.name)[1] is not None or regular_file(p) is not None or p.suffix not in EXTRA_SUFFIXES or p.name in (INDEX_NAME, MANIFEST_NAME)
                or p.name.startswith(".") or p.name.endswith(".tmp")):
            continue
        data = p.read_bytes()
        target = out / p.name
        if not target.exists() or target.read_bytes() != data:
            atomic_write(target, data)
            shutil.copystat(p, target)
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
