"""What a notebook saves and prints: its paths, figures, metrics and narrative lines.

Each numbered notebook's `parameters` cell gives `checkpoint` (relative paths from the repository root,
whatever the working directory: JupyterLab, papermill and nbval differ) and `out_dir` (None: an interactive
run writes under runs/interactive/NN_name/, never the regression run's runs/latest). Figures go to
OUT_DIR/NAME.png and headline numbers to OUT_DIR/metrics.json, both written atomically; omnilab.regress
gathers the metrics and holds them to notebooks/baselines.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omnilab.jsonio import write_json

REPO = Path(__file__).resolve().parent.parent
INTERACTIVE = REPO / "runs" / "interactive"


def repo_path(path: str | os.PathLike, what: str = "path") -> Path:
    """A notebook parameter's path: absolute as given, relative from the repository root (never from the working
    directory, which differs between JupyterLab, papermill and nbval). A path that does not exist is an error
    naming the parameter."""
    p = Path(path).expanduser()
    p = p if p.is_absolute() else REPO / p
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(path)!r}: {p} does not exist (relative paths are read from the "
                                f"repository root {REPO})")
    return p


def notebook_out_dir(out_dir: str | os.PathLike | None, notebook: str) -> Path:
    """Where a notebook writes figures and metrics: OUT_DIR (relative from the repository root), or, when None
    (an interactive run), runs/interactive/NOTEBOOK: never the regression run's runs/latest."""
    if out_dir is None:
        return INTERACTIVE / notebook
    p = Path(out_dir).expanduser()
    return p if p.is_absolute() else REPO / p


def save_metrics(out_dir: str | os.PathLike, metrics: dict, update: bool = False) -> Path:
    """Write a notebook's headline metrics (numbers, strings, lists) to OUT_DIR/metrics.json, atomically.
    update=True adds to what an earlier cell of the same run wrote instead of replacing it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    if update and path.exists():
        metrics = {**json.loads(path.read_text()), **metrics}
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


def say(text: str) -> None:
    """Show a line of narrative as Markdown in the notebook (plain text outside one)."""
    from IPython.display import Markdown, display

    display(Markdown(text))
