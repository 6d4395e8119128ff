#!/usr/bin/env python3
"""Git clean filter for the source notebooks (notebooks/*.ipynb, per .gitattributes): outputs stay in the
working copy (run a notebook in JupyterLab, its figures stay on screen and on disk), commits get the notebook
without them. Standard library only, so git can run it before any environment exists.

    python3 scripts/nbclean.py < in.ipynb > out.ipynb   # the filter: stdin -> stdout
    python3 scripts/nbclean.py --install                  # git config filter.nbclean.* (idempotent)

Stripped: code cells' outputs and execution counts, volatile cell metadata (execution times, collapsed/scrolled
state, papermill's), and the notebook's saved widget state, papermill metadata and kernel version details. Kept:
sources, cell ids, tags, the kernelspec. Input that is not a notebook passes through unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FILTER = "nbclean"
CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled", "ExecuteTime", "papermill", "jupyter")
NOTEBOOK_METADATA_DROPPED = ("widgets", "papermill", "toc", "varInspector")


def _lines(source):
    return source if isinstance(source, list) else source.splitlines(keepends=True)


def clean(nb: dict) -> dict:
    """The notebook as committed: outputs, counts and volatile metadata stripped (in place; returned)."""
    for cell in nb.get("cells", []):
        if "source" in cell:
            cell["source"] = _lines(cell["source"])
        meta = cell.get("metadata", {})
        for key in CELL_METADATA_DROPPED:
            meta.pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    meta = nb.get("metadata", {})
    for key in NOTEBOOK_METADATA_DROPPED:
        meta.pop(key, None)
    if isinstance(meta.get("language_info"), dict):  # the kernel's Python version, codemirror mode...: per machine
        meta["language_info"] = {"name": meta["language_info"].get("name", "python")}
    return nb


def dumps(nb: dict) -> str:
    """nbformat's own layout (what JupyterLab writes): one-space indent, sorted keys, UTF-8, final newline."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def clean_text(text: str) -> str:
    try:
        nb = json.loads(text)
    except ValueError:
        return text
    if not isinstance(nb, dict) or "cells" not in nb:
        return text
    return dumps(clean(nb))


def install(repo: Path) -> str:
    """Point git's `nbclean` filter at this script (relative to the working tree's root, where git runs filters).
    Outside a git checkout (e.g. an unpacked archive) it does nothing and says so; already installed, it returns ""."""
    inside = subprocess.run(["git", "-C", str(repo), "rev-parse", "--is-inside-work-tree"], capture_output=True, text=True)
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return "not a git checkout: notebook output filter not installed"
    command = "python3 scripts/nbclean.py"
    current = subprocess.run(["git", "-C", str(repo), "config", "--get", f"filter.{FILTER}.clean"],
                             capture_output=True, text=True).stdout.strip()
    if current == command:
        return ""  # already installed: nothing to say
    for key, value in ((f"filter.{FILTER}.clean", command), (f"filter.{FILTER}.smudge", "cat")):
        subprocess.run(["git", "-C", str(repo), "config", key, value], check=True)
    return f"git filter '{FILTER}' installed: notebooks/*.ipynb are committed without outputs ({command})"


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--install"]:
        said = install(Path(argv[2]) if len(argv) > 2 else Path(__file__).resolve().parent.parent)
        print(said) if said else None
        return 0
    data = sys.stdin.buffer.read().decode("utf-8")
    sys.stdout.buffer.write(clean_text(data).encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
