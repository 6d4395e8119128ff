"""Background writing of trace shards: `omnilab trace` hands each batch's shard to writer threads and goes on to
the next batch's forward, so Parquet encoding overlaps the prefill instead of following it.

It follows concurrent.futures' thread pools with a bounded queue (numpy and pyarrow release the GIL while they
encode), with the contract omnilab.experiments.trace needs from a shard on disk:
- a shard is written under a temporary name `NAME.tmp-PID` and renamed when complete, so a shard that exists is
  whole (resumability: a batch whose shard exists is done); a failed write leaves neither the shard nor its
  temporary file;
- at most `depth` shards are pending (queued or being written): `submit` blocks beyond that, which bounds the
  routing held on the host;
- the first error is raised in the caller's thread as a ShardWriteError naming the shard (an OSError: the CLI
  prints it as one line), by the next `submit` or by `close`; shards queued after a failure are not written.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Callable


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
        from omnilab.outdir import temp_path

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
