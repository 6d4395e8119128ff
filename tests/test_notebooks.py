"""The notebooks as files: sources without outputs, parameters that do not depend on the working directory, a
wrong checkpoint that stops every notebook, widget errors that are caught, and published executed copies
(docs/notebooks/) whose code is the source's (a stale copy fails here: `omnilab regress --publish` rewrites them).
Executing them is nbval's job (scripts/test.sh runs `pytest --nbval-lax notebooks`) and regress's."""

from __future__ import annotations

import json

import nbformat
import pytest

from omnilab import notebook
from omnilab import regress

BOOKS = regress.numbered_notebooks()


def test_there_are_notebooks():
    assert [b.name[:2] for b in BOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.stem)
def test_source_is_clean_and_parameterised(book):
    nb = nbformat.read(book, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be papermill's parameters"
    assert 'checkpoint = "data/omni-tiny"' in code[0].source
    assert "\nout_dir = None " in "\n" + code[0].source, "an interactive run must not write into runs/latest"
    # committed without outputs, so that running it in JupyterLab shows up in `git status` as a change to undo
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{book.name} is committed with outputs: clear them (JupyterLab: Edit > Clear Outputs of All Cells)"
    assert not any('"../' in c.source or "'../" in c.source for c in code), "paths relative to the notebook folder"
    assert f'notebook_out_dir(out_dir, "{book.stem}")' in "".join(c.source for c in code)


@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.stem)
def test_published_copy_is_current(book):
    published = regress.PUBLISHED / book.name
    assert published.exists(), f"{published} missing: run `omnilab regress --publish`"
    source, copy = nbformat.read(book, as_version=4), nbformat.read(published, as_version=4)
    assert regress.code_cells(copy) == regress.code_cells(source), \
        f"{published} is stale (its code differs from {book.name}): run `omnilab regress --publish`"
    outputs = [o for c in copy.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1, "published without figures"
    assert regress.widget_errors(copy) == []


def test_paths_are_read_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert notebook.repo_path("data/omni-tiny", "checkpoint") == notebook.REPO / "data" / "omni-tiny"
    assert notebook.repo_path(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="checkpoint 'no/such'.*repository root"):
        notebook.repo_path("no/such", "checkpoint")
    assert notebook.notebook_out_dir(None, "01_x") == notebook.REPO / "runs" / "interactive" / "01_x"
    assert notebook.notebook_out_dir("runs/latest/01_x", "01_x") == notebook.REPO / "runs" / "latest" / "01_x"
    assert notebook.notebook_out_dir(tmp_path, "01_x") == tmp_path


@pytest.mark.parametrize("bad", ["no/such/checkpoint", "data/eval"])
@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.stem)
def test_a_wrong_checkpoint_stops_the_notebook(book, bad, tmp_path):
    """No notebook goes on with a stand-in model: the first cell that needs the checkpoint raises, naming it."""
    cells = regress.code_cells(nbformat.read(book, as_version=4))
    namespace: dict = {}
    exec(compile(cells[0], f"{book.name}[parameters]", "exec"), namespace)
    namespace.update(checkpoint=bad, out_dir=str(tmp_path / "out"))
    with pytest.raises(Exception) as raised:
        for i, source in enumerate(cells[1:], 1):
            exec(compile(source, f"{book.name}[{i}]", "exec"), namespace)
    assert bad in str(raised.value), raised.value
    assert i <= 2, f"{book.name} ran {i} cells before noticing"
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_widget_errors_are_found_in_the_widget_state():
    nb = nbformat.v4.new_notebook()
    assert regress.widget_errors(nb) == []
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "a": {"model_name": "OutputModel", "state": {"outputs": [
            {"output_type": "stream", "name": "stdout", "text": "fine"},
            {"output_type": "error", "ename": "TypeError", "evalue": "show() takes 1 positional argument",
             "traceback": []}]}},
        "b": {"model_name": "SliderModel", "state": {"value": 3}}}}}
    assert regress.widget_errors(json.loads(json.dumps(nb))) == ["TypeError: show() takes 1 positional argument"]
