"""Extraction throughput against a plain `cp` of the same shards on the same disk, in one run.

Synthesizes (once, cached) a Qwen3-MoE checkpoint with the real Qwen3-Omni-30B-A3B text-decoder expert shapes
(hidden 2048, moe_intermediate 768, 128 experts, 32 heads / 4 kv heads of 128) but only a few layers and a
small vocabulary, written by transformers' `save_pretrained` in bf16: 1.2 GB of experts per layer. Then, on
the same disk, in both orders (cp first, then extract; and extract first, then cp):

    cp SRC/*.safetensors DST/                      (GNU cp: copy_file_range in the kernel, no checksums)
    omnilab.extraction.write.extract(SRC, OUT)              (read, sha256 of every tensor, write per-expert files)

By default the source is hot in the page cache for both (a memory-bandwidth race that a checksumming reader
cannot win against the kernel's in-place copy); `--cold` drops the page cache before each timed command (needs
root: /proc/sys/vm/drop_caches), which is the case that matters for a 70 GB checkpoint read from disk.
Outputs are removed before each run. `--sync` adds a `sync` to each timed command, so dirty pages are on disk
before the clock stops.

    python bench/extract.py [--layers 2] [--workers 2] [--scratch /tmp/omnilab-bench/extract] [--sync] [--cold]
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from omnilab.checkpoint import Checkpoint
from omnilab.extraction.write import extract

QWEN3_OMNI_TEXT = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                       num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def synthesize(out: Path, layers: int, vocab: int, shard_size: str) -> Path:
    """A qwen3_moe checkpoint with real Qwen3-Omni expert shapes, written by transformers (cached by folder)."""
    if (out / "model.safetensors.index.json").exists():
        return out
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**QWEN3_OMNI_TEXT, vocab_size=vocab, num_hidden_layers=layers,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=shard_size)
    tmp.rename(out)
    print(f"synthesized {out} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def cpu_seconds(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches: {e}") from None


def time_cp(src: Path, dst: Path, sync: bool, cold: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `cp SRC/*.safetensors DST/`."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    os.sync()  # start clean: no dirty pages of the previous command being written back meanwhile
    if cold:
        drop_page_cache()
    files = sorted(glob.glob(str(src / "*.safetensors")))
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(["cp", *files, str(dst)], check=True)
    if sync:
        os.sync()
    return time.perf_counter() - t, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def time_extract(src: Path, dst: Path, workers: int, sync: bool, cold: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of `extract(SRC, DST)`."""
    shutil.rmtree(dst, ignore_errors=True)
    os.sync()
    if cold:
        drop_page_cache()
    cpu = cpu_seconds(resource.RUSAGE_SELF)
    t = time.perf_counter()
    result = extract(src, dst, workers=workers, progress=False)
    if sync:
        os.sync()
    seconds = time.perf_counter() - t
    assert result.complete and result.skipped == 0
    return seconds, cpu_seconds(resource.RUSAGE_SELF) - cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--shard-size", default="1GB", help="max_shard_size for save_pretrained (the real model: 5GB)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--scratch", default="/tmp/omnilab-bench/extract")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timed command (root)")
    ap.add_argument("--sync", action="store_true", help="include `sync` in each timed command")
    args = ap.parse_args(argv)

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    src = synthesize(scratch / f"qwen3moe-{args.layers}L", args.layers, args.vocab, args.shard_size)
    ck = Checkpoint(src)
    nbytes = ck.total_bytes
    print(f"source: {src}: {len(ck.shards)} shards, {len(ck):,} tensors, {nbytes / 1e9:.2f} GB of tensors "
          f"({ck.file_bytes / 1e9:.2f} GB of files); cpu cores: {os.cpu_count()}; sync: {args.sync}; cold: {args.cold}", flush=True)
    # warm the page cache once so neither command pays the first read
    for f in glob.glob(str(src / "*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass

    rows = []
    for workers in args.workers:
        for _ in range(args.repeats):
            for order in ("cp, extract", "extract, cp"):
                times = {}
                for step in order.split(", "):
                    if step == "cp":
                        times["cp"] = time_cp(src, scratch / "cp-out", args.sync, args.cold)
                    else:
                        times["extract"] = time_extract(src, scratch / "extract-out", workers, args.sync, args.cold)
                (cp_s, cp_cpu), (ex_s, ex_cpu) = times["cp"], times["extract"]
                cp_mb, ex_mb = ck.file_bytes / 1e6 / cp_s, nbytes / 1e6 / ex_s
                rows.append((workers, order, cp_s, cp_mb, cp_cpu, ex_s, ex_mb, ex_cpu, ex_mb / cp_mb))
                print(f"  workers {workers}, {order}: cp {cp_mb:,.0f} MB/s, extract {ex_mb:,.0f} MB/s", flush=True)
    shutil.rmtree(scratch / "cp-out", ignore_errors=True)
    shutil.rmtree(scratch / "extract-out", ignore_errors=True)
    load = os.getloadavg()

    print()
    print(f"load average during the run (other processes share these cores): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| workers | order | cp s | cp MB/s | cp CPU s | extract s | extract MB/s | extract CPU s | extract / cp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w, order, cp_s, cp_mb, cp_cpu, ex_s, ex_mb, ex_cpu, ratio in rows:
        print(f"| {w} | {order} | {cp_s:.2f} | {cp_mb:,.0f} | {cp_cpu:.2f} | {ex_s:.2f} | {ex_mb:,.0f} | {ex_cpu:.2f} | {ratio:.2f} |")
    best = {}
    for w, order, cp_s, cp_mb, cp_cpu, ex_s, ex_mb, ex_cpu, ratio in rows:
        b = best.setdefault(w, [0.0, 0.0])
        b[0], b[1] = max(b[0], cp_mb), max(b[1], ex_mb)
    for w, (cp_mb, ex_mb) in best.items():
        print(f"best of all runs, workers {w}: cp {cp_mb:,.0f} MB/s, extract {ex_mb:,.0f} MB/s, ratio {ex_mb / cp_mb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
