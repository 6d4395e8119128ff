"""Run the numbered notebooks on the embedded model and hold their headline metrics to baselines.

Each notebook has a papermill `parameters` cell with `checkpoint` (default: the embedded model) and
`out_dir` (default None: `runs/interactive/NN_name/`, so an interactive run never touches the regression
run's folder); relative paths are read from the repository root, whatever the working directory. A notebook
calls omnilab.notebook's `save_metrics(out_dir, {...})` and `save_figure(fig, out_dir, name)`. `run_notebooks` executes
every `notebooks/NN_*.ipynb` with papermill into `OUT/NN_name/` (one progress line per cell), gathers the
metrics into `OUT/metrics.json`, and compares them with `notebooks/baselines.json`, failing loudly on drift.

A baseline spec is `{"value": v}` plus, for floats, `{rel_tol, abs_tol}`; integers, booleans and strings are
exact. "min" / "max" add bounds, either a number or relative to another metric of the same notebook measured in
the same run: `{"metric": NAME, "times": a, "plus": b}` means a * NAME + b. A spec with `"bounds_only": true`
is judged by its bounds alone (its value is a record): that is how bf16 quantities are held, against
transformers' own bf16 noise measured in the same run, never with a float tolerance meant for fp32.

At scale (`checkpoint`: `omnilab regress --checkpoint PATH [--device cuda]`) every notebook runs on that checkpoint
(papermill `-p checkpoint PATH`, and `-p device` for the notebooks that load a model), one at a time, torch's
threads left to each kernel; baselines are not checked (they hold the embedded model's numbers). Every run writes
OUT/resources.md and OUT/resources.json: per notebook its status, seconds, peak anonymous RSS and peak GPU memory
(measured inside the kernel: omnilab.notebook's sampler, OUT/NN_name/resources.json) and the figures it wrote.

An error inside a widget callback (captured by an ipywidgets Output) fails the run like an error in a cell, and
`--publish` copies the executed notebooks, figures included, to `docs/notebooks/` (see tests/test_notebooks.py:
a published copy whose code differs from its source fails the tests).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from omnilab.jsonio import write_json
from omnilab.outdir import atomic_write
from omnilab.notebook import REPO

NOTEBOOKS = REPO / "notebooks"
BASELINES = NOTEBOOKS / "baselines.json"
PUBLISHED = REPO / "docs" / "notebooks"


def numbered_notebooks(only: list[str] | None = None) -> list[Path]:
    books = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        books = [b for b in books if any(b.name.startswith(o) or b.stem == o for o in only)]
    return books


def code_cells(nb) -> list[str]:
    """The sources of a notebook's code cells, without the cell papermill injects: what a published copy and its
    source must share."""
    return [c.source for c in nb.cells
            if c.cell_type == "code" and "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def widget_errors(nb) -> list[str]:
    """Errors an ipywidgets Output captured (a widget callback that raised): nbclient keeps them in the
    notebook's widget state, out of every cell's outputs, where papermill would not see them."""
    state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    errors = []
    for model in state.get("state", {}).values():
        for out in model.get("state", {}).get("outputs", []) or []:
            if out.get("output_type") == "error":
                errors.append(f"{out.get('ename', 'Error')}: {out.get('evalue', '')}")
    return errors


def _progress_engine():
    """papermill's nbclient engine, printing one line per code cell when it completes: the notebook's number, the
    cell's number, first line and duration (whole lines, so that notebooks run side by side stay readable)."""
    from papermill.engines import NBClientEngine

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
            number = Path(nb_man.nb.metadata.papermill.input_path).name[:2]
            started: dict[int, float] = {}
            start, complete = nb_man.cell_start, nb_man.cell_complete

            def cell_start(cell, cell_index=None, **kw):
                if cell.cell_type == "code":
                    started[cell_index] = time.time()
                return start(cell, cell_index, **kw)

            def cell_complete(cell, cell_index=None, **kw):
                if cell_index in started:
                    failed = any(o.get("output_type") == "error" for o in cell.get("outputs", []))
                    first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
                    print(f"[regress]   {number} cell {code.index(cell_index) + 1:>2}/{len(code)}  {first[:64]:<64} "
                          f"{time.time() - started.pop(cell_index):6.1f} s{'  FAILED' if failed else ''}", flush=True)
                return complete(cell, cell_index, **kw)

            nb_man.cell_start, nb_man.cell_complete = cell_start, cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    return ProgressEngine


def _relative(path: Path) -> str:
    """PATH relative to the repository root when it lies inside it (what the notebooks resolve), else absolute."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def declares(book: Path, name: str) -> bool:
    """Whether a notebook's parameters cell declares `name` (papermill would inject an unknown one anyway). Reads
    the .ipynb as JSON, so it needs no Jupyter package (bench/notebooks_plain.py runs where there is none)."""
    cell = next((c for c in json.loads(book.read_text())["cells"] if c["cell_type"] == "code"
                 and "parameters" in c.get("metadata", {}).get("tags", [])), None)
    source = "" if cell is None else "".join(cell["source"])  # a list of lines, or one string
    return cell is not None and any(line.split("=")[0].strip() == name for line in source.splitlines()
                                    if "=" in line and not line.startswith((" ", "#")))


def run_notebooks(out: str | os.PathLike = "runs/latest", only: list[str] | None = None,
                  update_baselines: bool = False, publish: bool = False, jobs: int | None = None,
                  checkpoint: str | os.PathLike | None = None, device: str | None = None,
                  parameters: dict | None = None) -> int:
    """Execute the numbered notebooks with papermill; 0 when all ran and all metrics are within baselines.
    With `publish`, a clean run's executed notebooks are copied to docs/notebooks/. jobs: notebooks run side by
    side, each kernel on one intra-op thread (None: one per CPU core, at most 4).

    checkpoint: run every notebook on this checkpoint instead of the embedded model (`-p checkpoint`; `-p device`
    too where a notebook declares it): one notebook at a time unless `jobs`, torch's threads as each kernel
    chooses, no baselines (they are the embedded model's), no publishing. parameters: more papermill parameters,
    given to the notebooks that declare them (e.g. {"expert_budget": "4GiB"}). Every run writes the resources
    table OUT/resources.md and OUT/resources.json."""
    from concurrent.futures import ThreadPoolExecutor

    import nbformat
    import papermill
    from papermill.engines import papermill_engines

    if checkpoint is not None and (update_baselines or publish):
        raise ValueError("--checkpoint: baselines and published notebooks are the embedded model's; run without "
                         "--update-baselines / --publish")
    if device is not None and checkpoint is None:
        raise ValueError("--device goes with --checkpoint (the embedded model's run is the baselines' own)")
    extra = dict(parameters or {})
    if checkpoint is not None:
        path = Path(checkpoint).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"--checkpoint {checkpoint}: {path} does not exist")
        extra = {"checkpoint": str(path), **({"device": device} if device else {}), **extra}
    papermill_engines.register("omnilab-progress", _progress_engine())
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary, failures, executed = {}, [], []
    # Figures inline in the executed notebooks (what a reader of runs/ or docs/notebooks sees), whatever
    # MPLBACKEND the caller set (Agg in scripts/main.sh); save_figure writes the PNGs either way.
    # OMNILAB_HEADLESS: no one moves a slider in an unattended run, so explorers draw their first view and open no
    # widget (omnilab.plots.headless; a token-routing explorer's widget once left nbclient waiting for good).
    kernel_env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONUNBUFFERED": "1",
                  "OMNILAB_HEADLESS": "1"}
    if checkpoint is None:
        # One intra-op thread (unless the caller set OMP_NUM_THREADS): the embedded model's matrices are
        # tiny (hidden 256), so a second thread only adds a barrier per op, and on a shared machine a
        # descheduled thread stalls every op (generate of 32 tokens: 1.5-2 s on one thread, 22-35 s on
        # two, on this 2-core machine under load 12). At scale each kernel chooses (omnilab.threads).
        kernel_env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    saved = {k: os.environ.get(k) for k in kernel_env}
    os.environ.update(kernel_env)
    rows: dict[str, dict] = {}

    def execute(book: Path) -> tuple[list[str], dict | None]:
        """Run one notebook -> (its failures, its metrics or None when it did not run)."""
        target = out / book.stem
        target.mkdir(parents=True, exist_ok=True)
        for stale in ("resources.json", "metrics.json"):
            (target / stale).unlink(missing_ok=True)
        start = time.time()
        given = {"out_dir": _relative(target), **{k: v for k, v in extra.items()
                                                  if k == "checkpoint" or declares(book, k)}}
        print(f"[regress] {book.name} started", flush=True)
        try:
            papermill.execute_notebook(str(book), str(target / book.name),
                                       parameters=given, cwd=str(NOTEBOOKS),
                                       kernel_name="python3", progress_bar=False, engine_name="omnilab-progress",
                                       extra_arguments=["--IPKernelApp.log_level=ERROR"])
        except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
            last = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            print(f"[regress] {book.name} FAILED ({time.time() - start:.0f} s)", flush=True)
            rows[book.stem] = resource_row(book, target, time.time() - start, f"failed: {last}"[:200], given)
            return [f"{book.name}: failed to execute: {last}"], None
        rows[book.stem] = resource_row(book, target, time.time() - start, "ok", given)
        found = [f"{book.name}: a widget callback raised {e}"
                 for e in widget_errors(nbformat.read(target / book.name, as_version=4))]
        metrics_file = target / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        if not metrics:
            found.append(f"{book.name}: wrote no metrics.json")
        print(f"[regress] {book.name} {'ok' if not found else 'FAILED'} ({time.time() - start:.0f} s)", flush=True)
        return found, metrics

    books = numbered_notebooks(only)
    jobs = jobs or (1 if checkpoint is not None else min(4, os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(execute, books))  # in notebook order, whatever order they finish in
        for book, (found, metrics) in zip(books, results):
            failures += found
            if metrics is not None:
                summary[book.stem] = metrics
                executed.append(out / book.stem / book.name)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    write_json(out / "metrics.json", summary)
    write_resources(out, [rows[b.stem] for b in books if b.stem in rows], extra)
    print(f"[regress] resources: {out / 'resources.md'}")
    if checkpoint is not None:
        print(f"[regress] at scale ({extra['checkpoint']}): baselines are the embedded model's, not checked here")
    elif update_baselines:
        write_baselines(summary)
        print(f"[regress] baselines written to {BASELINES}")
    else:
        failures += check_baselines(summary, ran=[b.stem for b in numbered_notebooks(only)])
    print(f"[regress] metrics summary: {out / 'metrics.json'}")
    for f in failures:
        print(f"[regress] FAIL {f}", file=sys.stderr)
    if publish:
        if failures:
            print(f"[regress] not published to {PUBLISHED}: the run has failures", file=sys.stderr)
        else:
            publish_notebooks(executed)
            print(f"[regress] published {len(executed)} executed notebooks to {_relative(PUBLISHED)}/")
    print(f"[regress] {len(summary)} notebooks, {len(failures)} failures")
    return 1 if failures else 0


def resource_row(book: Path, target: Path, seconds: float, status: str, given: dict) -> dict:
    """One notebook's row of the resources table, its peaks read from TARGET/resources.json (written inside
    the kernel by omnilab.notebook; None where the notebook never reached a save_metrics)."""
    peaks_file = target / "resources.json"
    peaks = json.loads(peaks_file.read_text()) if peaks_file.exists() else {}
    return {"notebook": book.stem, "status": status, "seconds": round(seconds, 1),
            "peak_rss_anon_bytes": peaks.get("peak_rss_anon_bytes"),
            "peak_gpu_allocated_bytes": peaks.get("peak_gpu_allocated_bytes"),
            "figures": len(list(target.glob("*.png"))),
            "parameters": {k: v for k, v in given.items() if k != "out_dir"}}


def write_resources(out: Path, rows: list[dict], parameters: dict) -> None:
    """OUT/resources.json and OUT/resources.md: per notebook its status, seconds, peak anonymous RSS, peak GPU
    memory and figures, with how they were measured."""
    from omnilab.units import format_bytes

    how = ("seconds: the notebook's execution in its own process (papermill's kernel, or bench/notebooks_plain.py's "
           "python), its start included; peak RSS: the kernel's peak "
           "anonymous RSS (RssAnon of /proc/self/status, sampled every 20 ms inside the kernel by omnilab.notebook "
           "from the first cell to the last save_metrics; page cache of memory-mapped shards not counted); peak GPU: "
           "torch.cuda.max_memory_allocated inside the kernel, sampled the same way (- : CUDA never initialised)")
    write_json(out / "resources.json", {"parameters": parameters, "measured": how, "notebooks": rows})
    size = lambda b: "-" if b is None else format_bytes(b)  # noqa: E731
    lines = [f"Parameters: {', '.join(f'`{k}={v}`' for k, v in parameters.items()) or 'the notebooks defaults'}.",
             "", f"Measured: {how}.", "",
             "| notebook | status | seconds | peak RSS (anon, kernel) | peak GPU (allocated) | figures |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['notebook']} | {r['status']} | {r['seconds']:.0f} | {size(r['peak_rss_anon_bytes'])} | "
              f"{size(r['peak_gpu_allocated_bytes'])} | {r['figures']} |" for r in rows]
    atomic_write(out / "resources.md", "\n".join(lines) + "\n")


def publish_notebooks(executed: list[Path], folder: Path | None = None) -> list[Path]:
    """Copy executed notebooks (figures inline) to FOLDER (docs/notebooks/), each written atomically."""
    folder = folder or PUBLISHED
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for nb in executed:
        dst = folder / nb.name
        tmp = folder / f".{nb.name}.tmp"
        shutil.copyfile(nb, tmp)
        tmp.replace(dst)
        written.append(dst)
    return written


HEADLINE_BEGIN, HEADLINE_END = "<!-- headline: begin (omnilab regress --headline) -->", "<!-- headline: end -->"


def headline(summary: dict) -> str:
    """The README's headline bullets, every number read from a run's metrics (notebook -> metrics: a run's
    metrics.json, or the values of notebooks/baselines.json, which tests/test_readme.py checks the README against)."""
    a, x, c = summary["03_activation_comparison"], summary["02_component_extraction"], summary["04_router_heatmaps"]
    g = summary["05_generation_experiments"]
    lines = [
        f"- parity with transformers in fp32: max rel_err {a['fp32_max_rel_err']:.2g} over every hook point, top-1 "
        f"agreement {a['fp32_top1_agreement']:.3g}, the same {a['greedy_identical_tokens']} greedy tokens; in bf16 the "
        f"logits are {a['bf16_logits_rel_err']:.2%} from bf16 transformers and {a['selective_bf16_vs_fp32_logits_rel_err']:.2%} "
        f"from fp32 transformers, where transformers' own bf16 is {a['transformers_bf16_vs_fp32_logits_rel_err']:.2%} "
        f"from its fp32 (top-1 over {a['bf16_tokens']} tokens: {a['selective_bf16_vs_fp32_top1_agreement']:.1%} against "
        f"transformers' own {a['transformers_bf16_vs_fp32_top1_agreement']:.1%}; bf16 numbers vary with the CPU);",
        f"- extraction round trip bit-exact ({x['tensors_bit_exact']} of {x['tensors']} tensors), the selective model "
        f"{'bit-identical' if x['selective_bit_identical'] else 'NOT bit-identical'} on the extraction; keeping "
        f"{x['partial_experts']} of each layer's experts and masking the rest costs KL {x['partial_kl']:.2f} "
        f"nats/token and top-1 agreement {x['partial_top1_agreement']:.2f};",
        f"- routers specialise by token more than by domain: I(domain; expert) is {c['mi_bits_mean']:.2f} bits on average "
        f"against {c['mi_baseline_bits_mean']:.2f} with shuffled domains, but given the token id only "
        f"{c['cmi_given_token_bits_mean']:.2f} against a {c['cmi_given_token_baseline_bits_mean']:.2f} baseline is left;",
        f"- top-k 2 instead of 4: KL {g['top_2_kl']:.2f}, addition {g['top_2_addition_accuracy']:.1%} "
        f"({g['full_addition_accuracy']:.1%} at top-4); masking to experts 0-7 (hand extractions): KL "
        f"{g['experts_0_7_kl']:.2f}, addition {g['experts_0_7_addition_accuracy']:.1%}; an expert cache of 25% of the "
        f"experts' bytes changes nothing (KL {g['budget_25_0_lru_kl']:g}, bit-identical) at a "
        f"{g['budget_25_0_lru_hit_rate']:.0%} (LRU) / {g['budget_25_0_lfu_hit_rate']:.0%} (LFU) / "
        f"{g['budget_25_0_trust_hit_rate']:.0%} (trust-weighted) decode hit rate;",
        f"- perplexity of the full model on the first {g['ppl_tokens_per_document']} tokens of "
        f"{g['ppl_documents_per_domain']} held-out documents per domain: "
        + ", ".join(f"{k.removeprefix('full_ppl_')} {v:.1f}" for k, v in g.items() if k.startswith("full_ppl_"))
        + " (the model card's, data/omni-tiny/README.md, are over the whole held-out split in 512-token windows).",
    ]
    return "\n".join(lines)


def baseline_values() -> dict:
    """notebooks/baselines.json as notebook -> {metric: recorded value}."""
    return {book: {k: spec["value"] for k, spec in specs.items()}
            for book, specs in json.loads(BASELINES.read_text()).items()}


def write_baselines(summary: dict, rel_tol: float = 0.05, abs_tol: float = 1e-4) -> None:
    """Write this run's metrics as baselines. Integers, booleans and strings must match exactly; new floats get
    {rel_tol, abs_tol}. Tolerances, bounds and `bounds_only` already in the file are kept, and so are the
    baselines of notebooks that did not run (`--only`, or one that failed)."""
    old = json.loads(BASELINES.read_text()) if BASELINES.exists() else {}
    new = {book: specs for book, specs in old.items() if book not in summary}
    for book, metrics in summary.items():
        new[book] = {}
        for key, value in metrics.items():
            prev = old.get(book, {}).get(key, {})
            spec = {"value": value}
            if isinstance(value, float) and not prev.get("bounds_only"):
                spec.update(rel_tol=prev.get("rel_tol", rel_tol), abs_tol=prev.get("abs_tol", abs_tol))
            spec.update({k: prev[k] for k in ("max", "min", "bounds_only", "why") if k in prev})
            new[book][key] = spec
    write_json(BASELINES, new)


def _bound(bound, metrics: dict):
    """A bound's number: itself, or {"metric", "times", "plus"} read from this run's metrics (None: missing)."""
    if isinstance(bound, dict):
        other = metrics.get(bound["metric"])
        if not isinstance(other, (int, float)):
            return None
        return bound.get("times", 1.0) * other + bound.get("plus", 0.0)
    return bound


def _describe(bound) -> str:
    if not isinstance(bound, dict):
        return repr(bound)
    times, plus = bound.get("times", 1.0), bound.get("plus", 0.0)
    return (f"{'' if times == 1 else f'{times:g} x '}{bound['metric']}"
            f"{'' if not plus else f' {plus:+g}'}")


def check_baselines(summary: dict, ran: list[str] | None = None) -> list[str]:
    """Failures of SUMMARY (notebook -> metrics) against the baselines; `ran`: the notebooks this run executed
    (default: every numbered notebook), each of which must have metrics."""
    if not BASELINES.exists():
        return [f"no baselines at {BASELINES}: run `omnilab regress --update-baselines` once and commit it"]
    baselines = json.loads(BASELINES.read_text())
    failures = []
    for book, expected in baselines.items():
        if book not in summary:
            if (book in ran) if ran is not None else numbered_notebooks([book]):
                failures.append(f"{book}: no metrics (did it run?)")
            continue
        metrics = summary[book]
        for key, spec in expected.items():
            got, want = metrics.get(key), spec["value"]
            if got is None:
                failures.append(f"{book}.{key}: missing (baseline {want!r})")
                continue
            for side in ("max", "min"):
                if side not in spec:
                    continue
                limit = _bound(spec[side], metrics)
                if limit is None:
                    failures.append(f"{book}.{key}: its bound {_describe(spec[side])} is missing from the run")
                elif (side == "max" and not got <= limit) or (side == "min" and not got >= limit):
                    failures.append(f"{book}.{key}: {got!r} is {'above' if side == 'max' else 'below'} its bound "
                                    f"{_describe(spec[side])} = {limit:.6g}")
            if spec.get("bounds_only"):
                continue
            if "rel_tol" in spec:
                if not (isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=spec["rel_tol"], abs_tol=spec["abs_tol"])):
                    failures.append(f"{book}.{key}: {got!r} drifted from baseline {want!r} "
                                    f"(rel_tol {spec['rel_tol']}, abs_tol {spec['abs_tol']})")
            elif got != want:
                failures.append(f"{book}.{key}: {got!r} != baseline {want!r}")
    return failures
