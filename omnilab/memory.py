"""The process's own memory, as the project reports it: peak anonymous RSS (RssAnon), not VmHWM.

RssAnon counts what the process allocated (weights, activations); VmHWM also counts the page cache of mmap'd
shards it touched, which the kernel can drop at any time. The kernel keeps no high-water mark of RssAnon, so
`AnonPeak` samples it in a thread every 10 ms while its block runs (Linux; elsewhere it reports 0).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path


def status_bytes(field: str) -> int:
    """A /proc/self/status field in bytes (RssAnon, VmHWM, VmRSS, ...); 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class AnonPeak:
    """with AnonPeak() as peak: ...; then peak.peak is the highest RssAnon seen (bytes)."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.peak = 0

    def __enter__(self) -> "AnonPeak":
        self.peak, self._running = status_bytes("RssAnon"), True
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while self._running:
            self.peak = max(self.peak, status_bytes("RssAnon"))
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def release_memory() -> int:
    """Give memory freed by dropped models back to the system: a garbage collection (a module holds reference
    cycles, so `del model` alone frees nothing until the next one), then glibc's malloc_trim, without which the
    freed heap stays in RssAnon (a freed 8-layer real-shape model left 4.1 GiB there, and a notebook that loads
    models in turn grew past the machine's memory). Returns RssAnon afterwards (bytes)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return status_bytes("RssAnon")
