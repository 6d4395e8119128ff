"""Background shard writing (omnilab.trace.shards) and the streamed shards of the grouped prefill:
the bytes on disk are those of the one-table writer, a failed write names its shard and leaves no half shard,
and a trace whose writing failed resumes to the same shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from omnilab import trace
from omnilab.trace.shards import ShardWriteError, ShardWriter

REPO = Path(__file__).resolve().parent.parent

TEXTS = [
    ("en", "The quick brown fox jumps over the lazy dog."),
    ("fr", "Le renard brun saute par-dessus le chien paresseux."),
    ("python", "def add(a, b):\n    return a + b\n"),
    ("arith", "47 + 38 = 85\n12 + 30 = 42\n"),
    ("en", "A router picks the experts; the experts do the work."),
    ("python", "for i in range(3):\n    print(i)\n"),
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"domain": d, "text": t}) + "\n" for d, t in TEXTS))
    return path


def test_streamed_shard_has_the_bytes_of_the_one_table_writer(tiny_omni, tmp_path):
    """write_routing_shard over the grouped prefill's PendingRouting, whole (the default) and row group by row group
    as the layers arrive (by_layer), writes byte for byte the file routing_table + write_shard write from the
    finished routing; for a padded batch out of document order (the gather path) and for an unpadded one in order
    (no gather)."""
    from omnilab.gpu.prefill import PendingRouting, TracePrefill
    from omnilab.model.decoder import SelectiveMoE

    model = SelectiveMoE.from_checkpoint(tiny_omni)
    prefill = TracePrefill(model)
    layers = [int(i) for i in model.config.moe_layers]
    rng = np.random.default_rng(0)
    padded = ([7, 3, 5], [list(rng.integers(1, 200, n)) for n in (9, 4, 6)], ["fr", "en", "fr"])
    whole = ([2, 4], [list(rng.integers(1, 200, 8)) for _ in range(2)], ["arith", "en"])
    for docs, ids, domains in (padded, whole):
        table, rows = trace.routing_table(docs, domains, ids, layers, *prefill.record(ids, docs))
        trace.write_shard(tmp_path / "table.parquet", table, rows)
        for by_layer in (False, True):
            pending = prefill.record_async(ids, docs)
            assert isinstance(pending, PendingRouting)
            trace.write_routing_shard(tmp_path / "streamed.parquet", docs, domains, ids, layers, pending,
                                      by_layer=by_layer)
            assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "table.parquet").read_bytes()
        # and from a finished Routing (TracePrefill.record's)
        trace.write_routing_shard(tmp_path / "done.parquet", docs, domains, ids, layers, prefill.record(ids, docs))
        assert (tmp_path / "done.parquet").read_bytes() == (tmp_path / "table.parquet").read_bytes()
        assert table.num_rows == sum(map(len, ids)) * len(layers) * model.config.num_experts_per_tok
    # the two gather choices route alike: the same documents in the other order through the gather path
    a = prefill.record(whole[1], whole[0])
    b = prefill.record(whole[1][::-1], whole[0][::-1])
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, atol=1e-7)


def test_failed_write_names_its_shard_and_leaves_no_half_shard(tmp_path):
    def good(tmp):
        tmp.write_bytes(b"whole shard")

    go = threading.Event()
    go.set()

    def half_then_fail(tmp):
        go.wait(5)
        tmp.write_bytes(b"half a sh")  # part of the bytes reach the disk, then the encoder fails
        raise RuntimeError("encoder\nfailed")

    go.clear()
    writer = ShardWriter(workers=1, depth=4)
    writer.submit(tmp_path / "a.parquet", good)
    writer.submit(tmp_path / "b.parquet", half_then_fail)
    writer.submit(tmp_path / "c.parquet", good)  # queued behind the failure: never written
    go.set()
    with pytest.raises(ShardWriteError) as e:
        writer.close()
    assert isinstance(e.value, OSError) and isinstance(e.value.__cause__, RuntimeError)
    assert str(e.value) == f"{tmp_path / 'b.parquet'}: writing the shard failed (encoder failed)"
    assert (tmp_path / "a.parquet").read_bytes() == b"whole shard"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]  # no b, no temporary file, no c
    with pytest.raises(RuntimeError, match="after close"):
        writer.submit(tmp_path / "d.parquet", good)

    # the error reaches the caller at its next submit too, and the writer's threads are gone after close
    writer = ShardWriter(workers=2, depth=1)
    writer.submit(tmp_path / "e.parquet", half_then_fail)
    with pytest.raises(ShardWriteError, match="e.parquet: writing the shard failed"):
        writer.submit(tmp_path / "f.parquet", good)  # blocks until e has failed (depth 1), then raises
    writer.close(wait_only=True)
    assert not any(t.is_alive() for t in writer._threads)
    assert not (tmp_path / "e.parquet").exists() and not (tmp_path / "f.parquet").exists()


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_trace_whose_writing_fails_is_one_line_then_resumes(tiny_omni, corpus, tmp_path):
    """A shard that cannot be written (the file size limit, as a full disk would) stops `omnilab trace` with one
    line naming the shard, exit 2, no shard and no temporary file for it; the same command then resumes to the
    shards of an undisturbed run."""
    out = tmp_path / "t"
    args = ["trace", str(tiny_omni), "--corpus", str(corpus), "--out", str(out), "--max-tokens", "12",
            "--batch-tokens", "24", "--prefill", "grouped_mm"]  # the streamed shards
    kw = dict(max_tokens=12, batch_tokens=24, progress=False, prefill="grouped_mm")
    first = trace.trace_corpus(tiny_omni, [corpus], out, **kw)
    assert first.batches > 2
    victim = sorted((out / "shards").iterdir())[1]
    before = victim.read_bytes()
    victim.unlink()
    (out / "manifest.json").unlink()
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.RLIM_INFINITY)); "
               "from omnilab.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("OMNILAB_DEBUG", None)
    run = subprocess.run([sys.executable, "-c", limited, *args], env=env, capture_output=True, text=True,
                         timeout=300)
    err = run.stderr.strip()
    assert run.returncode == 2, err[-2000:]
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{victim}: writing the shard failed" in err
    assert not victim.exists() and not list((out / "shards").glob("*.tmp-*"))
    assert not (out / "manifest.json").exists()
    again = trace.trace_corpus(tiny_omni, [corpus], out, **kw)
    assert again.traced_batches == 1 and victim.read_bytes() == before
    assert trace.TraceDataset(out).manifest["rows"] == first.tokens * 3 * 2


def test_a_trace_resumed_over_older_nullable_shards_reads_whole(tiny_omni, corpus, tmp_path):
    """Shards of an older version (every field nullable) and this one's (none nullable: trace_schema) in one
    folder, as a trace resumed after an upgrade has them: the trace reads back whole, equal to a fresh one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kw = dict(max_tokens=12, batch_tokens=24, progress=False, prefill="grouped_mm")
    fresh = trace.trace_corpus(tiny_omni, [corpus], tmp_path / "fresh", **kw)
    out = tmp_path / "t"
    trace.trace_corpus(tiny_omni, [corpus], out, **kw)
    shards = sorted((out / "shards").iterdir())
    old = pq.read_table(shards[0])
    assert not any(f.nullable for f in old.schema)
    pq.write_table(old.cast(pa.schema([f.with_nullable(True) for f in old.schema])), shards[0])  # as written before
    shards[1].unlink()
    (out / "manifest.json").unlink()
    assert trace.trace_corpus(tiny_omni, [corpus], out, **kw).traced_batches == 1
    assert pq.read_schema(shards[0]).field("weight").nullable and not pq.read_schema(shards[1]).field("weight").nullable
    got, want = trace.TraceDataset(out).to_pandas(), trace.TraceDataset(tmp_path / "fresh").to_pandas()
    assert len(want) == fresh.tokens * 3 * 2
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
