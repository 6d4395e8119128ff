"""Run the numbered notebooks on the embedded model and hold their headline metrics to baselines.

Each notebook has a papermill `parameters` cell with `checkpoint` (default: the embedded model) and
`out_dir`; it calls `save_metrics(out_dir, {...})` and `save_figure(fig, out_dir, name)`. `run_notebooks`
executes every `notebooks/NN_*.ipynb` with papermill into `OUT/NN_name/`, gathers the metrics into
`OUT/metrics.json`, and compares them with `notebooks/baselines.json`, failing loudly on drift: integers,
booleans and strings exactly, floats within {rel_tol, abs_tol}, and hand-set bounds ("max" / "min", e.g. the
fp32 parity bound rel_err <= 1e-5) on top.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from omnilab.checkpoint import write_json

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
BASELINES = NOTEBOOKS / "baselines.json"


def save_metrics(out_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write a notebook's headline metrics (numbers, strings, lists) to OUT_DIR/metrics.json, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    write_json(path, metrics)
    return path


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> Path:
    """Write a figure as OUT_DIR/NAME.png (temporary name, then rename) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    tmp = out / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def numbered_notebooks(only: list[str] | None = None) -> list[Path]:
    books = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [b for b in books if any(b.name.startswith(o) or b.stem == o for o in only)]
    return books


def run_notebooks(out: str | os.PathLike = "runs/latest", only: list[str] | None = None,
                  update_baselines: bool = False) -> int:
    """Execute the numbered notebooks with papermill; 0 when all ran and all metrics are within baselines."""
    import papermill

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary, failures = {}, []
    for book in numbered_notebooks(only):
        target = out / book.stem
        target.mkdir(parents=True, exist_ok=True)
        start = time.time()
        print(f"[regress] {book.name} ...", flush=True)
        try:
            papermill.execute_notebook(str(book), str(target / book.name), parameters={"out_dir": str(target)},
                                       cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
        except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
            failures.append(f"{book.name}: failed to execute: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
            print(f"[regress] {book.name} FAILED ({time.time() - start:.0f} s)", flush=True)
            continue
        metrics_file = target / "metrics.json"
        summary[book.stem] = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        if not summary[book.stem]:
            failures.append(f"{book.name}: wrote no metrics.json")
        print(f"[regress] {book.name} ok ({time.time() - start:.0f} s)", flush=True)
    write_json(out / "metrics.json", summary)
    if update_baselines:
        write_baselines(summary)
        print(f"[regress] baselines written to {BASELINES}")
    else:
        failures += check_baselines(summary)
    print(f"[regress] metrics summary: {out / 'metrics.json'}")
    for f in failures:
        print(f"[regress] FAIL {f}", file=sys.stderr)
    print(f"[regress] {len(summary)} notebooks, {len(failures)} failures")
    return 1 if failures else 0


def write_baselines(summary: dict, rel_tol: float = 0.05, abs_tol: float = 1e-4) -> None:
    """Write this run's metrics as baselines. Integers, booleans and strings must match exactly; floats get
    {rel_tol, abs_tol}; a metric may also carry a hand-set bound ("max" / "min") that is checked besides.
    Tolerances and bounds already in the file are kept, and so are the baselines of notebooks that did not run
    (`--only`, or one that failed)."""
    old = json.loads(BASELINES.read_text()) if BASELINES.exists() else {}
    new = {book: specs for book, specs in old.items() if book not in summary}
    for book, metrics in summary.items():
        new[book] = {}
        for key, value in metrics.items():
            prev = old.get(book, {}).get(key, {})
            spec = {"value": value}
            if isinstance(value, float):
                spec.update(rel_tol=prev.get("rel_tol", rel_tol), abs_tol=prev.get("abs_tol", abs_tol))
            spec.update({k: prev[k] for k in ("max", "min") if k in prev})
            new[book][key] = spec
    write_json(BASELINES, new)


def check_baselines(summary: dict) -> list[str]:
    if not BASELINES.exists():
        return [f"no baselines at {BASELINES}: run `omnilab regress --update-baselines` once and commit it"]
    baselines = json.loads(BASELINES.read_text())
    failures = []
    for book, expected in baselines.items():
        if book not in summary:
            if numbered_notebooks([book]):
                failures.append(f"{book}: no metrics (did it run?)")
            continue
        for key, spec in expected.items():
            got, want = summary[book].get(key), spec["value"]
            if got is None:
                failures.append(f"{book}.{key}: missing (baseline {want!r})")
                continue
            if "max" in spec and not got <= spec["max"]:
                failures.append(f"{book}.{key}: {got!r} is above its bound {spec['max']!r}")
            if "min" in spec and not got >= spec["min"]:
                failures.append(f"{book}.{key}: {got!r} is below its bound {spec['min']!r}")
            if "rel_tol" in spec:
                if not (isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=spec["rel_tol"], abs_tol=spec["abs_tol"])):
                    failures.append(f"{book}.{key}: {got!r} drifted from baseline {want!r} "
                                    f"(rel_tol {spec['rel_tol']}, abs_tol {spec['abs_tol']})")
            elif got != want:
                failures.append(f"{book}.{key}: {got!r} != baseline {want!r}")
    return failures
