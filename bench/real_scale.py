"""Every verb on a checkpoint larger than this machine's memory, with its time and memory, in one table.

    python bench/real_scale.py                        # 24 layers (about 31 GB bf16) under /tmp/omnilab-bench
    python bench/real_scale.py --layers 48            # the real model's depth (about 63 GB)
    python bench/real_scale.py --tiny                 # dry run of the whole script on a tiny layout (seconds)

The checkpoint is `omnilab.testing.synth.real_shape_checkpoint`: a random-weight Qwen3-Omni thinker with the real
model's shapes and vocabulary (hidden 2048, 128 experts of 768, top 8, 152,064 embedding rows), bf16, written
in place through shard memory maps (never held in memory) and reused when already there. Then, each as
`python -m omnilab VERB ...` in its own process: inspect, verify, compare fp32, compare bf16 (both streamed
against transformers, chained and local views), generate at a 10% expert budget, extract of two layers.

This process samples each child's /proc/PID/status every 20 ms: peak anonymous RSS (RssAnon: what the process
allocated, the project's memory figure) and VmHWM (which also counts the page cache of mmap'd shards it
touched); wall time is from start to exit. The projected peak of the real 48-layer model comes from the
per-layer figures: what grows with depth is the selective model's resident backbone per layer (attention,
norms, router; read off the checkpoint's headers, in the compute dtype) and that layer's recorded activations;
the reference side holds one layer whatever the depth. So peak(48) = peak(L) + (48 - L) x per-layer bytes, an
upper bound (the reference phase, which does not grow, may be the one that sets the peak).

Writes bench/results/real_scale.md (or --results) under a temporary name, then renames it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TOKENS = 16


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_verb(argv: list[str], log_dir: Path, label: str) -> dict:
    """One `python -m omnilab ...` child: wall time, peak RssAnon and last VmHWM (sampled), exit code, JSON."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out_file, err_file = log_dir / f"{label}.json", log_dir / f"{label}.err"
    start = time.perf_counter()
    with open(out_file, "w") as out, open(err_file, "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "omnilab", *argv], stdout=out, stderr=err, env=env)
        anon = hwm = 0
        while child.poll() is None:
            s = _status(child.pid)
            anon, hwm = max(anon, s.get("RssAnon", 0)), max(hwm, s.get("VmHWM", 0))
            time.sleep(0.02)
    wall = time.perf_counter() - start
    try:
        result = json.loads(out_file.read_text())
    except json.JSONDecodeError:
        result = None
    error = err_file.read_text().strip().splitlines()[-1:] if child.returncode not in (0, 1) else []
    print(f"[bench] {label}: exit {child.returncode}, {wall:.1f} s, peak anon {anon / 2**30:.2f} GiB, "
          f"VmHWM {hwm / 2**30:.2f} GiB {error[0] if error else ''}", file=sys.stderr, flush=True)
    record = {"label": label, "argv": argv, "rc": child.returncode, "wall_s": wall, "peak_anon_bytes": anon,
              "vmhwm_bytes": hwm, "error": error[0] if error else None}
    (log_dir / f"{label}.run.json").write_text(json.dumps(record))
    return {**record, "json": result}


def load_run(log_dir: Path, label: str) -> dict | None:
    """A step measured earlier (--report-only): its record and its JSON output, or None."""
    run = log_dir / f"{label}.run.json"
    if not run.exists():
        return None
    out = log_dir / f"{label}.json"
    try:
        result = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        result = None
    return {**json.loads(run.read_text()), "json": result}


def per_layer_bytes(path: Path, itemsize: int) -> tuple[int, int]:
    """(resident backbone bytes of one decoder layer in the compute dtype, bytes of one layer's experts)."""
    from omnilab.checkpoint import Checkpoint

    ck = Checkpoint(path)
    config, layout = ck.arch
    rows = ck.tensors[ck.tensors.name.str.startswith(layout.prefix + "layers.0.")]
    experts = rows.name.str.contains(".mlp.experts.")
    return int(rows[~experts].numel.sum()) * itemsize, int(rows[experts].numel.sum()) * itemsize


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def gib(n) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def summarize(step: dict) -> str:
    r, label = step["json"], step["label"]
    if step["rc"] not in (0, 1) or r is None:
        return f"failed: {step['error']}"
    if label == "inspect":
        return f"{r['shards']} shards, {r['tensors']:,} tensors, {r['total_bytes'] / 1e9:.2f} GB"
    if label == "verify":
        return "sound" if r["sound"] else f"{len(r['problems'])} problems: {', '.join(r['counts'])}"
    if label.startswith("compare"):
        worst = lambda hooks: max(h["rel_err"] for h in hooks if h["rel_err"] is not None)
        text = (f"max rel_err chained {worst(r['hooks']):.2e}, local {worst(r['local_hooks']):.2e}; first divergence "
                f"chained {r['first_divergence'] or 'none'}, local {r['local_first_divergence'] or 'none'}; "
                f"top-1 {fmt(r['top1_agreement'], '.3f')}; expert budget {r['expert_budget_bytes'] / 1e9:.2f} GB")
        if r["noise"] is not None:
            noise = max(h["rel_err"] for h in r["noise"]["hooks"])
            agree = [x["noise_topk_agreement"] for x in r["routing"]]
            flips = [sum(x[k] or 0 for x in r["routing"]) for k in ("near_tie_flips", "local_near_tie_flips")]
            text += (f"; transformers bf16-vs-fp32 max rel_err {noise:.2e}, its top-k agreement "
                     f"{min(agree):.3f}-{max(agree):.3f}; near-tie flips set aside {flips[0]} chained / {flips[1]} local")
        return text
    if label == "generate":
        c = r["cache"]
        return (f"{len(r['new_token_ids'])} tokens, {r['tokens_per_s']:.2f} tok/s; budget {c['budget_bytes'] / 1e9:.2f} GB, "
                f"peak resident {c['peak_resident_bytes'] / 1e9:.2f} GB, {c['misses']:,} misses")
    if label == "extract":
        return f"{r['written_bytes'] / 1e9:.2f} GB written, {r['mb_per_s']:.0f} MB/s"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--out", default=None, help="checkpoint folder (default /tmp/omnilab-bench/real-LAYERS)")
    parser.add_argument("--work", default="/tmp/omnilab-bench/work", help="logs, JSON and the extraction go here")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "real_scale.md"))
    parser.add_argument("--tiny", action="store_true", help="dry run on a tiny thinker layout")
    parser.add_argument("--only", nargs="*", help="steps to run (default: all)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the table from the steps measured earlier in --work")
    args = parser.parse_args()

    import torch

    from omnilab.testing.synth import real_shape_checkpoint, tiny_omni_config

    out = Path(args.out or (f"/tmp/omnilab-bench/tiny-real" if args.tiny else f"/tmp/omnilab-bench/real-{args.layers}"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = None
    if args.tiny:
        config = tiny_omni_config(num_hidden_layers=args.layers if args.layers != 24 else 3)
        config["enable_audio_output"] = False
        config.pop("talker_config")
        config.pop("code2wav_config")
    start = time.perf_counter()
    existed = out.exists()
    real_shape_checkpoint(out, layers=args.layers, config=config, progress=sys.stderr.isatty())
    write_s = None if existed else time.perf_counter() - start

    from omnilab.checkpoint import Checkpoint

    ck = Checkpoint(out)
    text_config, _ = ck.arch
    layers = text_config.num_hidden_layers
    vocab_rows = text_config.vocab_size
    ids = torch.randint(0, min(vocab_rows, 151643), (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1))
    ids = ",".join(map(str, ids.tolist()))
    expert_bf16 = 3 * text_config.moe_intermediate_size * text_config.hidden_size * 2
    budget_10 = int(0.10 * expert_bf16 * text_config.num_experts * len(text_config.moe_layers))
    extract_out = work / "extract"
    if extract_out.exists():
        import shutil

        shutil.rmtree(extract_out)
    steps = {
        "inspect": ["inspect", str(out), "--json"],
        "verify": ["verify", str(out), "--json"],
        "compare-fp32": ["compare", str(out), "--input-ids", ids, "--dtype", "float32", "--json"],
        "compare-bf16": ["compare", str(out), "--input-ids", ids, "--dtype", "bfloat16", "--json"],
        "generate": ["generate", str(out), "--input-ids", ids, "--dtype", "bfloat16", "--max-new-tokens", "8",
                     "--greedy", "--stop-ids", "", "--expert-budget", str(budget_10), "--json"],
        "extract": ["extract", str(out), str(extract_out), "--layers", "0-1", "--json"],
    }
    if args.report_only:
        results = [r for r in (load_run(work, label) for label in steps) if r is not None]
    else:
        results = [run_verb(argv, work, label) for label, argv in steps.items() if not args.only or label in args.only]
    if extract_out.exists():
        import shutil

        shutil.rmtree(extract_out)

    # per-layer figures and the projection to the real depth
    proj = []
    for r in results:
        if r["label"].startswith("compare") and r["rc"] == 0:
            itemsize = 4 if r["label"].endswith("fp32") else 2
            backbone, experts = per_layer_bytes(out, itemsize)
            acts = 10 * PROMPT_TOKENS * text_config.hidden_size * 4 * 4  # ~10 hooks x 4 captures (views, dtypes)
            peak48 = r["peak_anon_bytes"] + (48 - layers) * (backbone + acts)
            proj.append((r["label"], backbone, experts, r["peak_anon_bytes"], peak48))

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    total = ck.total_bytes
    lines = [
        "# Every verb on a checkpoint larger than memory (random weights, real Qwen3-Omni thinker shapes)",
        "",
        f"Command: `python bench/real_scale.py{' --tiny' if args.tiny else ''}"
        f"{f' --layers {args.layers}' if args.layers != 24 else ''}`  ",
        f"Hardware: {cpu}, {os.cpu_count()} cores, {mem / 2**30:.1f} GiB RAM (shared with other jobs while it ran), "
        f"no GPU; torch {torch.__version__}, {platform.python_version()}.  ",
        f"Checkpoint: `omnilab.testing.synth.real_shape_checkpoint`, {layers} layers, vocab {vocab_rows:,}, bf16 on disk, "
        f"{total / 1e9:.2f} GB in {len(ck.shards)} shards"
        + (f" (written in {write_s:.0f} s)" if write_s is not None else " (reused)") + ".  ",
        f"Prompt: {PROMPT_TOKENS} token ids. compare: selective model (expert budget one layer's worth) against the "
        "streamed transformers reference, chained and local views; bf16 beside transformers' own fp32. "
        f"generate: bf16, 8 new tokens, expert budget 10% = {budget_10 / 1e9:.2f} GB. extract: `--layers 0-1`.",
        "",
        "| step | exit | wall s | peak anon RSS GiB | VmHWM GiB | result |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {r['rc']} | {r['wall_s']:.1f} | {gib(r['peak_anon_bytes'])} | "
                     f"{gib(r['vmhwm_bytes'])} | {summarize(r)} |")
    if proj:
        lines += ["", "Per-layer figures and the projection to the real model's 48 layers (peak(48) = "
                  f"peak({layers}) + (48 - {layers}) x per-layer resident bytes; an upper bound):", "",
                  "| compare | backbone per layer GiB | one layer's experts GiB | peak anon at "
                  f"{layers} layers GiB | projected peak at 48 layers GiB |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for label, backbone, experts, peak, peak48 in proj:
            lines.append(f"| {label} | {backbone / 2**30:.3f} | {experts / 2**30:.2f} | {gib(peak)} | {gib(peak48)} |")
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_path.with_name(results_path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(results_path)
    (work / "real_scale.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(lines))
    return 0 if all(r["rc"] in (0, 1) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
