"""A trace shard's writing beside a thread that holds the GIL (omnilab.trace.shards.write_routing_shard), on the CPU.

`omnilab trace` writes its Parquet shards in writer threads while the main thread launches the grouped prefill's
kernels: Python that holds the GIL nearly all the time (a launch does not release it). A writer that gives the GIL
up inside numpy / pyarrow and takes it back waits each time for the holder to hit the interpreter's switch interval
(sys.getswitchinterval(), 5 ms). This bench measures one shard (random routing of --tokens tokens x --layers
layers, top-8) written into a temporary folder, whole and by layer, alone and beside a thread that spins in a
Python loop (the stand-in for the launching thread), and what the writer costs that thread: its loop turns per second
while the shard is written against its turns per second alone.

    python bench/gil_writer.py                      # 16,384 tokens x 48 layers, 3 repeats, medians
    python bench/gil_writer.py --switch-ms 0.5      # the same at another switch interval
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from omnilab.gpu.prefill import PendingRouting, Routing  # noqa: E402
from omnilab.trace.shards import write_routing_shard  # noqa: E402


def random_batch(tokens: int, layers: int, k: int = 8, seed: int = 0):
    """A batch's random routing as the grouped prefill gives it (Routing: experts [L, n, k] int32, weights [L, n, k]
    bf16 values in float32, entropy [L, n]) over documents of 512 tokens; returns (routing, docs, domains, ids)."""
    rng = np.random.default_rng(seed)
    routing = Routing(torch.from_numpy(rng.integers(0, 128, (layers, tokens, k), dtype=np.int32)),
                      # bf16 values, as the grouped prefill's bf16 router gives them (then .float())
                      torch.from_numpy(rng.random((layers, tokens, k), dtype=np.float32)).bfloat16().float(),
                      torch.from_numpy(rng.random((layers, tokens), dtype=np.float32)))
    docs = list(range(tokens // 512))
    ids = [rng.integers(0, 150000, 512).tolist() for _ in docs]
    domains = [("en", "fr", "code")[d % 3] for d in docs]
    return routing, docs, domains, ids


def spin(stop: threading.Event, out: list) -> None:
    """Python that holds the GIL until stopped: counts loop turns."""
    turns = 0
    while not stop.is_set():
        turns += 1
    out.append(turns)


def beside_spinner(work) -> tuple[float, float]:
    """Seconds `work` took with the spinner running beside it, and the spinner's loop turns per second meanwhile."""
    stop, out = threading.Event(), []
    thread = threading.Thread(target=spin, args=(stop, out))
    thread.start()
    start = time.perf_counter()
    work()
    took = time.perf_counter() - start
    stop.set()
    thread.join()
    return took, out[0] / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--switch-ms", type=float, default=None, help="sys.setswitchinterval (default: the interpreter's)")
    args = p.parse_args()
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1e3)
    L, n, k = args.layers, args.tokens, 8
    routing, docs, domains, ids = random_batch(n, L, k)
    folder = Path(tempfile.mkdtemp(prefix="omnilab-gil-"))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"switch interval {sys.getswitchinterval() * 1e3:g} ms; one shard of {n:,} tokens x {L} layers x top-{k}; "
          f"medians of {args.repeats}")
    alone_rate = beside_spinner(lambda: time.sleep(1.0))[1]  # the spinner's turns per second with no writer
    print("| writing | alone (s) | beside a GIL-holding thread (s) | that thread's speed meanwhile (x alone) |")
    print("|---|---:|---:|---:|")
    for name, by_layer in (("whole (the default)", False), ("by layer", True)):
        write = partial(write_routing_shard, folder / "shard.parquet", docs, domains, ids, list(range(L)),
                        PendingRouting(routing, None), by_layer=by_layer)
        alone, beside, rates = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            write()
            alone.append(time.perf_counter() - start)
            took, rate = beside_spinner(write)
            beside.append(took)
            rates.append(rate / alone_rate)
        print(f"| {name} | {statistics.median(alone):.2f} | {statistics.median(beside):.2f} | "
              f"{statistics.median(rates):.2f} |", flush=True)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
