"""The host side of hybrid offload (omnilab.gpu.offload, host_share): how fast the host's cores compute missed
experts (segments.expert_on_host) from memory, cold (distinct experts, as in a decode step, not one expert again
from the CPU caches as OffloadDecoder.measure_host_share times it), per torch thread count, alone and while the
GPU copies pinned host memory to the device as fast as it can (the copies a hybrid step runs beside).

    python bench/host_rate.py                       # real expert shapes, bf16, 64 distinct experts (600 MB)
    python bench/host_rate.py --threads 1,4,8,16 --experts 128 --out host_rate.json

Prints one row per (thread count, copies running or not): experts/s, GB/s of expert weights read, and the
warm rate (the same expert again) beside it; with CUDA also the copy rate alone and under host compute; --gap-ms: the
experts in a layer's groups with the thread idle between them; --mapped: the experts read through a memory map.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import numpy as np
import torch

from omnilab.gpu.segments import expert_on_host


def cold_rate(experts, x, repeats: int) -> float:
    """Seconds per expert over the distinct experts (each read once per pass), best pass of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for gate, up, down in experts:
            expert_on_host(x, gate, up, down)
        best = min(best, (time.perf_counter() - start) / len(experts))
    return best


def gapped_rate(experts, x, group: int, gap_s: float) -> float:
    """Seconds per expert when they come in groups of `group` (a layer's host choices) with the host's thread busy
    elsewhere for `gap_s` between groups (spinning, as the decode step's thread spins in its stream synchronize
    while the GPU runs the layer's attention): the threads torch's ops run on sit idle between groups, as they do
    in a hybrid step, and may have gone to sleep when the next group comes."""
    total = 0.0
    for g in range(0, len(experts), group):
        until = time.perf_counter() + gap_s
        while time.perf_counter() < until:
            pass
        start = time.perf_counter()
        for gate, up, down in experts[g:g + group]:
            expert_on_host(x, gate, up, down)
        total += time.perf_counter() - start
    return total / len(experts)


def warm_rate(expert, x, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        expert_on_host(x, *expert)
        times.append(time.perf_counter() - start)
    return min(times[1:])


class Copier:
    """Pinned host -> device copies of `nbytes` in a loop on their own stream (a background thread) until stopped."""

    def __init__(self, nbytes: int):
        self.src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop, self.bytes, self.seconds = threading.Event(), 0, 0.0

    def run(self):
        start = time.perf_counter()
        with torch.cuda.stream(self.stream):
            while not self.stop.is_set():
                self.dst.copy_(self.src, non_blocking=True)
                self.stream.synchronize()
                self.bytes += self.src.numel()
        self.seconds = time.perf_counter() - start

    def __enter__(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def gb_s(self) -> float:
        return self.bytes / self.seconds / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=f"1,4,8,{os.cpu_count()}")
    p.add_argument("--experts", type=int, default=64, help="distinct experts per pass")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gap-ms", default="", help="comma-separated gaps: per thread count also the cold rate with "
                   "the experts in groups of --group and the host's thread spinning this long between groups")
    p.add_argument("--group", type=int, default=4, help="experts per group for --gap-ms (a layer's host choices)")
    p.add_argument("--mapped", default=None, help="a file to write the experts to and read them back from through "
                   "a memory map, as HostTier.mapped reads the shards (page cache, 4 KiB pages), instead of the "
                   "process's own memory; e.g. /dev/shm/host_rate.bin (removed at the end)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    H, I = 2048, 768  # the real thinker's hidden and expert sizes
    dt = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    block = (torch.randn(args.experts, 3, I * H, generator=gen) * 0.02).to(dt)  # [E, 3, I*H]: down|gate|up as HostTier
    if args.mapped:  # the same bytes through a memory map of a file, as the shard-mapped host tier reads them
        block.view(torch.uint8).numpy().tofile(args.mapped)
        raw = np.memmap(args.mapped, dtype=np.uint8, mode="r+")
        block = torch.from_numpy(raw).view(dt).view(args.experts, 3, I * H)  # [E, 3, I*H]
        if torch.cuda.is_available():  # page-locked with CUDA, as HostTier.mapped registers each shard's map
            from omnilab.gpu.host import register_host

            print(f"memory map registered page-locked: {register_host(raw.ctypes.data, raw.nbytes)}")
    experts = [(block[e, 1].view(I, H), block[e, 2].view(I, H), block[e, 0].view(H, I)) for e in range(args.experts)]
    x = torch.randn(1, H, generator=gen).to(dt)
    expert_gb = 3 * I * H * block.element_size() / 1e9
    cuda = torch.cuda.is_available()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}
    print(f"{cpu}; {os.cpu_count()} cpus; OpenMP settings {omp or 'default'}; bf16/amx flags: {sorted(f for f in flags if 'bf16' in f or 'amx' in f)}; "
          f"torch {torch.__version__}; {args.dtype}; {args.experts} distinct experts x {expert_gb * 1e3:.1f} MB, "
          f"{'memory-mapped from ' + args.mapped if args.mapped else 'in process memory'}")
    rows = []
    copy_alone = None
    if cuda:
        with Copier(64 << 20) as c:
            time.sleep(1.0)
        copy_alone = c.gb_s
        print(f"pinned -> device copies alone: {copy_alone:.1f} GB/s")
    first = [int(t) for t in args.threads.split(",")][0]
    torch.set_num_threads(first)
    cold_rate(experts[:4], x, 1)  # warm the kernels
    s = cold_rate(experts[4:], x, 1)  # the first time this process reads these pages (faults them in if mapped)
    print(f"threads {first:2d}, first touch: {s * 1e3:.3f} ms/expert ({expert_gb / s:.1f} GB/s)", flush=True)
    rows.append({"threads": first, "first_touch": True, "expert_ms": s * 1e3, "gb_s": expert_gb / s})
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        cold_rate(experts[:4], x, 1)  # warm the kernels
        for copies in ((False, True) if cuda else (False,)):
            if copies:
                with Copier(64 << 20) as c:
                    s = cold_rate(experts, x, args.repeats)
                copy_gb_s = c.gb_s
            else:
                s, copy_gb_s = cold_rate(experts, x, args.repeats), None
            row = {"threads": threads, "copies": copies, "expert_ms": s * 1e3, "experts_per_s": 1 / s,
                   "gb_s": expert_gb / s, "warm_expert_ms": warm_rate(experts[0], x) * 1e3, "copy_gb_s": copy_gb_s}
            rows.append(row)
            print(f"threads {threads:2d}, copies {'on ' if copies else 'off'}: {row['expert_ms']:.3f} ms/expert cold "
                  f"({row['gb_s']:.1f} GB/s), warm {row['warm_expert_ms']:.3f} ms"
                  + (f"; copies meanwhile {copy_gb_s:.1f} GB/s (alone {copy_alone:.1f})" if copies else ""), flush=True)
        for gap in (float(g) for g in args.gap_ms.split(",") if g):
            s = gapped_rate(experts, x, args.group, gap / 1e3)
            rows.append({"threads": threads, "copies": False, "gap_ms": gap, "group": args.group,
                         "expert_ms": s * 1e3, "experts_per_s": 1 / s, "gb_s": expert_gb / s})
            print(f"threads {threads:2d}, groups of {args.group} after {gap:g} ms idle: {s * 1e3:.3f} ms/expert cold "
                  f"({expert_gb / s:.1f} GB/s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu, "omp_env": omp, "mapped": args.mapped, "rows": rows, "copy_alone_gb_s": copy_alone}, f, indent=1)
    if args.mapped:
        del experts, block, raw
        os.remove(args.mapped)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
