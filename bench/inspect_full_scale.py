"""Benchmark: `omnilab inspect` / `verify` on the full-scale Qwen3-Omni-30B-A3B-Instruct layout.

Synthesizes the sparse layout (real headers, data regions as holes) from data/reference/'s config.json into a
temporary folder, then times, end to end as a user runs them (new process each time, interpreter start
included): `omnilab inspect PATH --json` and `omnilab verify PATH`; and, in process, Checkpoint + inventory on
a copy that holds only 8 of the 128 experts per layer (5,760 missing experts: the size of verify's worst
ordinary report). Prints median and max of several runs.

    python bench/inspect_full_scale.py [--runs 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "data/reference/qwen3-omni-30b-a3b-instruct.config.json"


def subset_copy(src: Path, dst: Path, keep_experts: int) -> None:
    """The same layout with thinker experts >= keep_experts removed from every header and from the index."""
    from omnilab.checkpoint import INDEX_NAME, pack_header, read_header

    def kept(name):
        return not (name.startswith("thinker.") and ".mlp.experts." in name
                    and int(name.split(".experts.")[1].split(".")[0]) >= keep_experts)

    dst.mkdir()
    for shard in sorted(src.glob("*.safetensors")):
        header, data_start = read_header(shard)
        header = {k: v for k, v in header.items() if k == "__metadata__" or kept(k)}
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        blob = pack_header(header)
        with open(dst / shard.name, "wb") as f:
            f.write(blob)
            f.truncate(len(blob) + end)
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if kept(k)}
    (dst / INDEX_NAME).write_text(json.dumps(index))
    (dst / "config.json").write_text((src / "config.json").read_text())


def timed(cmd: list[str], runs: int) -> tuple[list[float], subprocess.CompletedProcess]:
    times, proc = [], None
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
    return times, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from omnilab.inventory import inventory
    from omnilab.testing import synth

    with tempfile.TemporaryDirectory(prefix="omnilab-bench-inspect-") as tmp:
        full = synth.sparse_from_config(CONFIG, Path(tmp) / "full")
        omnilab = [sys.executable, "-m", "omnilab"]
        times, proc = timed([*omnilab, "inspect", str(full), "--json"], args.runs)
        report = json.loads(proc.stdout)
        print(f"inspect --json (new process): median {statistics.median(times):.2f} s, max {max(times):.2f} s; "
              f"{report['shards']} shards, {report['tensors']:,} tensors, {report['total_bytes']:,} bytes, "
              f"{report['components']['thinker.experts']['tensors']:,} thinker expert tensors, "
              f"{len(report['problems'])} problems")
        times, proc = timed([*omnilab, "verify", str(full)], args.runs)
        print(f"verify (new process): median {statistics.median(times):.2f} s, max {max(times):.2f} s, "
              f"exit {proc.returncode}")
        subset = Path(tmp) / "subset"
        subset_copy(full, subset, keep_experts=8)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            problems = inventory(subset).problems
            times.append(time.perf_counter() - start)
        print(f"inventory of an 8-of-128-experts copy (in process): median {statistics.median(times):.2f} s, "
              f"{len(problems):,} problems ({', '.join(sorted({p.kind for p in problems}))})")
        times, proc = timed([*omnilab, "verify", str(subset)], 1)
        print(f"verify of that copy (new process): {times[0]:.2f} s, exit {proc.returncode}, "
              f"{len(proc.stdout.splitlines()):,} lines")


if __name__ == "__main__":
    main()
