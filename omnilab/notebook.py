"""What a notebook saves and prints: its paths, figures, metrics and narrative lines.

Each numbered notebook's `parameters` cell gives `checkpoint` (relative paths from the repository root,
whatever the working directory: JupyterLab, papermill and nbval differ) and `out_dir` (None: an interactive
run writes under runs/interactive/NN_name/, never the regression run's runs/latest). Figures go to
OUT_DIR/NAME.png and headline numbers to OUT_DIR/metrics.json, both written atomically; omnilab.regress
gathers the metrics and holds them to notebooks/baselines.json.

What the notebook's process used, for `omnilab regress`'s table: from `notebook_out_dir` on (every notebook's
first cell), a daemon thread samples the kernel's own anonymous RSS (omnilab.memory: RssAnon, every 20 ms) and,
once torch has initialised CUDA, `torch.cuda.max_memory_allocated` (sampled too, since the runtime resets the
peak at each generate call); every `save_metrics` writes the peaks so far to OUT_DIR/resources.json beside
metrics.json (kept out of metrics.json, which the baselines hold).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
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


class _Peaks:
    """The process's peak anonymous RSS and peak CUDA memory allocated, sampled by one daemon thread."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.rss, self.gpu, self.started = interval_s, 0, None, time.time()
        threading.Thread(target=self._watch, daemon=True, name="omnilab-peaks").start()

    def sample(self) -> None:
        from omnilab.memory import status_bytes

        self.rss = max(self.rss, status_bytes("RssAnon"))
        torch = sys.modules.get("torch")  # never imports torch itself
        if torch is not None and torch.cuda.is_initialized():
            peak = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
            self.gpu = max(self.gpu or 0, peak)

    def _watch(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a sampler must never disturb the notebook
                pass
            time.sleep(self.interval_s)

    def to_dict(self) -> dict:
        self.sample()
        return {"peak_rss_anon_bytes": self.rss, "peak_gpu_allocated_bytes": self.gpu,
                "measured": "inside the kernel: RssAnon of /proc/self/status and torch.cuda.max_memory_allocated, "
                            f"sampled every {self.interval_s * 1000:.0f} ms from notebook_out_dir on",
                "seconds_since_first_cell": time.time() - self.started}


_peaks: _Peaks | None = None


def _sampler() -> _Peaks:
    """The process's one sampler, started on first use."""
    global _peaks
    if _peaks is None:
        _peaks = _Peaks()
    return _peaks


def resource_peaks() -> dict:
    """The peaks sampled since the notebook's first cell (notebook_out_dir), as written to resources.json."""
    return _sampler().to_dict()


def notebook_out_dir(out_dir: str | os.PathLike | None, notebook: str) -> Path:
    """Where a notebook writes figures and metrics: OUT_DIR (relative from the repository root), or, when None
    (an interactive run), runs/interactive/NOTEBOOK: never the regression run's runs/latest. Starts the
    sampling of the process's peak memory (resources.json)."""
    _sampler()
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
    write_json(out / "resources.json", resource_peaks())
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
