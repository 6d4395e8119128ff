"""The numbered notebooks without Jupyter, for a machine whose Python has no Jupyter stack (the device tool's GPU
machines): each notebook's code cells run in order in a fresh Python process, in notebooks/ as papermill runs them,
the given parameters assigned right after the parameters cell (papermill's injection). Writes what `omnilab
regress --checkpoint` writes for each notebook (OUT/NN_name/: figures, metrics.json, resources.json) and the table
OUT/resources.md (omnilab.regress.write_resources). Not a substitute for `omnilab regress`: no executed .ipynb, no
widget check, no baselines. Without IPython, `display` and `Markdown` print text.

    python bench/notebooks_plain.py --checkpoint CKPT --device cuda --out OUT [--only 03 05] [-p per_domain=2 ...]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ipython_shim() -> None:
    """IPython.display's display / Markdown / HTML as plain printing, where IPython is not installed."""
    display_mod = types.ModuleType("IPython.display")

    class Markdown(str):
        pass

    def display(*objs, **_):
        for obj in objs:
            print(obj.to_string() if hasattr(obj, "to_string") else obj)

    display_mod.display, display_mod.Markdown, display_mod.HTML = display, Markdown, Markdown
    package = types.ModuleType("IPython")
    package.display, package.get_ipython = display_mod, lambda: None  # not inside a kernel
    package.version_info = (99, 0, 0, "omnilab-shim")  # matplotlib asks a present IPython for its version
    sys.modules.update({"IPython": package, "IPython.display": display_mod})


def run_one(book: Path, params: dict, shim: bool) -> int:
    """Execute one notebook's code cells in this process; 1 with one line on the first failing cell."""
    import importlib.util

    if shim or importlib.util.find_spec("IPython") is None:
        _ipython_shim()
    cells = [c for c in json.loads(book.read_text())["cells"] if c["cell_type"] == "code"]
    from IPython.display import display

    namespace = {"__name__": "__main__", "display": display}  # a kernel's builtin
    for i, cell in enumerate(cells, 1):
        source = "".join(cell["source"])
        start = time.perf_counter()
        try:
            exec(compile(source, f"{book.name}[cell {i}]", "exec"), namespace)
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                namespace.update(params)  # papermill's injected parameters cell
        except Exception as e:  # the notebook's own error, named with its cell
            print(f"[plain] {book.name} cell {i}/{len(cells)} failed: {type(e).__name__}: {e}", flush=True)
            return 1
        first = source.strip().splitlines()[0][:70] if source.strip() else ""
        print(f"[plain] {book.stem[:2]} cell {i:2d}/{len(cells)} {time.perf_counter() - start:7.1f} s  {first}",
              flush=True)
    return 0


def main() -> int:
    from omnilab.regress import declares, numbered_notebooks, resource_row, write_resources

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--only", nargs="*", help="notebook numbers (default: all)")
    p.add_argument("-p", "--parameter", action="append", default=[],
                   help="name=value, the value a Python literal (else a string); given where a notebook declares it")
    p.add_argument("--timeout", type=int, default=600, help="seconds a notebook may take")
    p.add_argument("--no-ipython", action="store_true", help="print instead of IPython's display even where it exists")
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_one:
        return run_one(Path(args.run_one), json.loads(args.params), args.no_ipython)

    extra = {"checkpoint": str(Path(args.checkpoint).resolve()), **({"device": args.device} if args.device else {})}
    for item in args.parameter:
        name, _, value = item.partition("=")
        try:
            extra[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[name] = value
    out = Path(args.out).resolve()
    env = {**os.environ, "MPLBACKEND": "Agg", "OMNILAB_HEADLESS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows, failed = [], 0
    for book in numbered_notebooks(args.only):
        target = out / book.stem
        target.mkdir(parents=True, exist_ok=True)
        given = {"out_dir": str(target), **{k: v for k, v in extra.items() if k == "checkpoint" or declares(book, k)}}
        print(f"[plain] {book.name} started", flush=True)
        start = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--checkpoint", args.checkpoint, "--out", args.out,
               "--run-one", str(book), "--params", json.dumps(given)] + (["--no-ipython"] if args.no_ipython else [])
        try:
            rc = subprocess.run(cmd, cwd=book.parent, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timed out"
        status = "ok" if rc == 0 else ("failed" if rc != "timed out" else f"timed out after {args.timeout} s")
        failed += status != "ok"
        print(f"[plain] {book.name} {status} ({time.time() - start:.0f} s)", flush=True)
        rows.append(resource_row(book, target, time.time() - start, status, given))
    write_resources(out, rows, extra)
    print(f"[plain] resources: {out / 'resources.md'}; {len(rows)} notebooks, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
