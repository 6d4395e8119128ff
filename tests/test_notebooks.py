"""The notebooks as committed (git's index, not the working copy, which keeps the outputs of a JupyterLab run: the
`nbclean` git filter, scripts/nbclean.py, strips them on the way in): sources without outputs, parameters that do not depend on the working directory, a
wrong checkpoint that stops every notebook, widget errors that are caught, and published executed copies
(docs/notebooks/) whose code is the source's (a stale copy fails here: `omnilab regress --publish` rewrites them).
Executing them is nbval's job (scripts/test.sh runs `pytest --nbval-lax notebooks`) and regress's."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from omnilab import notebook
from omnilab import regress

BOOKS = regress.numbered_notebooks()
NBCLEAN = runpy.run_path(str(notebook.REPO / "scripts" / "nbclean.py"))


def committed(book: Path):
    """The notebook as git holds it (the index: what the next commit takes), read through nbformat; outside a
    git checkout, the working copy as the clean filter would commit it."""
    rel = book.resolve().relative_to(notebook.REPO).as_posix()
    shown = subprocess.run(["git", "-C", str(notebook.REPO), "show", f":{rel}"], capture_output=True, text=True)
    text = shown.stdout if shown.returncode == 0 else NBCLEAN["clean_text"](book.read_text())
    return nbformat.reads(text, as_version=4)


def _with_outputs(nb: dict) -> dict:
    """NB as JupyterLab saves it after Run All: outputs, counts, timings, widget state, the kernel's version."""
    nb = json.loads(json.dumps(nb))
    for n, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["execution_count"] = n + 1
        cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]},
                           {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBORw0KGgo="}}]
        cell["metadata"]["execution"] = {"iopub.status.busy": "2025-01-01T00:00:00"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.9", "mimetype": "text/x-python"}
    return nb


def test_there_are_notebooks():
    assert [b.name[:2] for b in BOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.stem)
def test_source_is_clean_and_parameterised(book):
    nb = committed(book)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be papermill's parameters"
    assert 'checkpoint = "data/omni-tiny"' in code[0].source
    assert "\nout_dir = None " in "\n" + code[0].source, "an interactive run must not write into runs/latest"
    # committed without outputs (the nbclean filter strips them; without it installed, clear them by hand)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{book.name} is staged with outputs: run `bash scripts/setup.sh` (installs the nbclean git filter), " \
        f"then `git add {book.relative_to(notebook.REPO)}`"
    assert not any('"../' in c.source or "'../" in c.source for c in code), "paths relative to the notebook folder"
    assert f'notebook_out_dir(out_dir, "{book.stem}")' in "".join(c.source for c in code)


@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.stem)
def test_published_copy_is_current(book):
    published = regress.PUBLISHED / book.name
    assert published.exists(), f"{published} missing: run `omnilab regress --publish`"
    source, copy = committed(book), nbformat.read(published, as_version=4)
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
    cells = regress.code_cells(committed(book))
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


# -- the output filter: outputs stay in the working copy, commits get none ---------------------------------


@pytest.mark.parametrize("book", BOOKS, ids=lambda b: b.stem)
def test_the_filter_strips_a_lab_run_back_to_the_committed_form(book):
    text = json.dumps(_with_outputs(json.loads(book.read_text())), indent=1)
    cleaned = NBCLEAN["clean_text"](text)
    nb = json.loads(cleaned)
    assert all(not c.get("outputs") and c.get("execution_count") is None and "execution" not in c["metadata"]
               for c in nb["cells"] if c["cell_type"] == "code")
    assert "widgets" not in nb["metadata"] and nb["metadata"]["language_info"] == {"name": "python"}
    assert nbformat.reads(cleaned, as_version=4) == committed(book)
    assert NBCLEAN["clean_text"](cleaned) == cleaned  # idempotent
    assert NBCLEAN["clean_text"]("not json {") == "not json {"


def test_git_status_after_a_lab_run_shows_no_change(tmp_path):
    """A repository with this one's .gitattributes and filter: a notebook saved with outputs is unchanged to
    git, keeps its outputs on disk, and `git add` stages the clean form; published copies keep theirs."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "docs" / "notebooks").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(notebook.REPO / ".gitattributes", repo)
    shutil.copy(notebook.REPO / "scripts" / "nbclean.py", repo / "scripts")
    book = repo / "notebooks" / BOOKS[0].name
    book.write_text(BOOKS[0].read_text())
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    out = subprocess.run(["python3", str(repo / "scripts" / "nbclean.py"), "--install", str(repo)],
                         capture_output=True, text=True, check=True).stdout
    assert "installed" in out
    assert subprocess.run(["python3", str(repo / "scripts" / "nbclean.py"), "--install", str(repo)],
                          capture_output=True, text=True, check=True).stdout == ""  # idempotent, quiet
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clean")
    book.write_text(json.dumps(_with_outputs(json.loads(book.read_text())), indent=1, sort_keys=True) + "\n")
    git("diff", "--exit-code")  # nothing to commit: the outputs are not part of the committed form
    assert "hello" in book.read_text()  # they stay in the working copy
    git("add", ".")  # (until a `git add`, git's size check alone lists the file in `git status`)
    assert git("status", "--porcelain") == "" and "hello" not in git("show", f":notebooks/{book.name}")
    assert git("check-attr", "filter", "docs/notebooks/x.ipynb").strip().endswith("unspecified")


def test_installing_the_filter_outside_git_does_not_fail(tmp_path):
    out = subprocess.run(["python3", str(notebook.REPO / "scripts" / "nbclean.py"), "--install", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "not a git checkout" in out.stdout


# -- at the real model's scale: the parameters that switch every notebook to a big checkpoint ---------------------

LOADS_A_MODEL = [b for b in BOOKS if b.name[:2] in ("02", "03", "04", "05", "06")]


@pytest.mark.parametrize("book", LOADS_A_MODEL, ids=lambda b: b.stem)
def test_the_scale_parameters_are_there_documented_and_used(book):
    """device, dtype and expert_budget default to "auto", each with its comment in the parameters cell, and every
    model is loaded through ol.load with them and says where it went (placement, threads)."""
    code = [c.source for c in committed(book).cells if c.cell_type == "code"]
    params = {line.split("=", 1)[0].strip(): line.split("=", 1)[1] for line in code[0].splitlines()
              if "=" in line and not line.startswith((" ", "#"))}
    for name in ("device", "dtype", "expert_budget"):
        assert name in params, f"{book.name}: no {name} parameter"
        value, _, comment = params[name].partition("#")
        assert value.strip() == '"auto"', f"{book.name}: {name} = {value.strip()}"
        assert "auto" in comment and len(comment.strip()) > 30, f"{book.name}: {name} is not documented"
    body = "\n".join(code[1:])
    assert "ol.load(" in body and "device=device" in body and "dtype=dtype" in body and "expert_budget=" in body
    assert ".placement" in body and ".threads" in body, f"{book.name} does not say where its model went"
    assert "from_checkpoint(" not in body and "Reference.from_checkpoint" not in body, \
        f"{book.name} loads a model around ol.load (the runtime) or a whole transformers model"
