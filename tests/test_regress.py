"""The notebook regression check: drift is caught, exact values are exact, bounds hold."""

import json

import pytest

from omnilab import regress


@pytest.fixture
def baselines(tmp_path, monkeypatch):
    path = tmp_path / "baselines.json"
    monkeypatch.setattr(regress, "BASELINES", path)
    monkeypatch.setattr(regress, "numbered_notebooks", lambda only=None: [path])
    return path


def test_baselines_round_trip_and_catch_drift(baselines):
    summary = {"01_x": {"tensors": 896, "verdict": "match", "sound": True, "kl": 0.5, "rel_err": 8e-7}}
    regress.write_baselines(summary)
    assert regress.check_baselines(summary) == []
    spec = json.loads(baselines.read_text())
    spec["01_x"]["rel_err"]["max"] = 1e-5
    baselines.write_text(json.dumps(spec))
    regress.write_baselines(summary)  # hand-set bounds survive an update
    assert json.loads(baselines.read_text())["01_x"]["rel_err"]["max"] == 1e-5

    def drift(**changes):
        return regress.check_baselines({"01_x": {**summary["01_x"], **changes}})

    assert drift(tensors=897) and drift(verdict="padding") and drift(sound=False)
    assert drift(kl=0.6) and not drift(kl=0.51)
    assert drift(rel_err=2e-5)
    assert regress.check_baselines({"01_x": {}})  # a metric that went missing
    assert regress.check_baselines({})  # a notebook that wrote nothing

    regress.write_baselines({"04_y": {"hits": 3}})  # an update of one notebook (--only) keeps the others
    assert set(json.loads(baselines.read_text())) == {"01_x", "04_y"}


def test_every_numbered_notebook_has_a_baseline():
    baselines = json.loads(regress.BASELINES.read_text())
    for book in regress.numbered_notebooks():
        assert book.stem in baselines, book.name


def test_bf16_is_judged_against_the_noise_measured_in_the_same_run(baselines):
    """A bounds_only metric is held by bounds relative to another metric of the run, not by its recorded value."""
    spec = {"03_x": {
        "sel_top1": {"value": 1.0, "bounds_only": True,
                     "min": {"metric": "ref_top1", "plus": -0.11}},
        "sel_err": {"value": 0.026, "bounds_only": True, "max": {"metric": "ref_err", "times": 10}},
        "ref_err": {"value": 0.0054, "bounds_only": True, "min": 1e-4, "max": 0.05},
        "ref_top1": {"value": 0.947, "bounds_only": True},
        "fp32_tokens": {"value": 32},
    }}
    baselines.write_text(json.dumps(spec))
    run = {"sel_top1": 0.947, "sel_err": 0.0177, "ref_err": 0.0054, "ref_top1": 0.947, "fp32_tokens": 32}

    def check(**changes):
        return regress.check_baselines({"03_x": {**run, **changes}})

    assert check() == []  # the AVX2 machine's one flipped bf16 token is bf16 noise, not drift
    assert check(sel_top1=0.8, ref_top1=0.947)  # three tokens worse than transformers' own bf16
    assert not check(sel_top1=0.8, ref_top1=0.895)  # ... unless transformers' own bf16 is as noisy here
    assert check(sel_err=0.06) and not check(sel_err=0.06, ref_err=0.007)
    assert check(ref_err=0.0)  # bf16 that did not run as bf16
    assert check(fp32_tokens=31)  # integers stay exact
    failure = check(sel_err=0.06)[0]
    assert "10 x ref_err" in failure and "0.054" in failure
    missing = {k: v for k, v in run.items() if k != "ref_top1"}
    assert any("ref_top1" in f and "missing" in f for f in regress.check_baselines({"03_x": missing}))
    regress.write_baselines({"03_x": {**run, "sel_err": 0.02}})  # an update keeps bounds_only and the bounds
    kept = json.loads(baselines.read_text())["03_x"]["sel_err"]
    assert kept == {"value": 0.02, "bounds_only": True, "max": {"metric": "ref_err", "times": 10}}


def test_only_requires_the_notebooks_that_ran(baselines):
    regress.write_baselines({"01_x": {"n": 1}, "02_y": {"n": 2}})
    assert regress.check_baselines({"01_x": {"n": 1}}, ran=["01_x"]) == []
    assert regress.check_baselines({"01_x": {"n": 1}}, ran=["01_x", "02_y"])


def test_committed_baselines_hold_bf16_by_bounds_only():
    """No bf16 quantity in notebooks/baselines.json carries a float tolerance meant for fp32."""
    for book, specs in json.loads(regress.BASELINES.read_text()).items():
        for key, spec in specs.items():
            if "bf16" in key and isinstance(spec["value"], float):
                assert spec.get("bounds_only") and "rel_tol" not in spec, f"{book}.{key}"


def _notebook(path, x, fail=False):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("out_dir = None")
    params.metadata["tags"] = ["parameters"]
    body = "from omnilab.notebook import save_metrics\nsave_metrics(out_dir, {'x': %d})" % x
    nb.cells = [params, nbformat.v4.new_code_cell(body + ("\nraise RuntimeError('boom')" if fail else ""))]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_notebooks_executes_checks_and_publishes(tmp_path, monkeypatch, capsys):
    """The notebook runner itself: a notebook is executed with papermill, its metrics gathered and held to the
    baselines, the executed copy published only from a clean run; drift and a raising cell fail the run."""
    books, published = tmp_path / "notebooks", tmp_path / "published"
    books.mkdir()
    monkeypatch.setattr(regress, "NOTEBOOKS", books)
    monkeypatch.setattr(regress, "BASELINES", books / "baselines.json")
    monkeypatch.setattr(regress, "PUBLISHED", published)
    _notebook(books / "01_tiny.ipynb", 3)
    (books / "baselines.json").write_text(json.dumps({"01_tiny": {"x": {"value": 3}}}))

    assert regress.run_notebooks(tmp_path / "out", publish=True) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"01_tiny": {"x": 3}}
    assert (published / "01_tiny.ipynb").exists()
    assert "cell  3/3" in capsys.readouterr().out  # one progress line per cell (papermill injects one)

    (books / "baselines.json").write_text(json.dumps({"01_tiny": {"x": {"value": 4}}}))
    (published / "01_tiny.ipynb").unlink()
    assert regress.run_notebooks(tmp_path / "out", publish=True) == 1
    assert "01_tiny.x" in capsys.readouterr().err and not (published / "01_tiny.ipynb").exists()

    _notebook(books / "01_tiny.ipynb", 3, fail=True)
    assert regress.run_notebooks(tmp_path / "out") == 1
    assert "failed to execute" in capsys.readouterr().err


def test_run_notebooks_side_by_side_keeps_each_notebooks_own_results(tmp_path, monkeypatch, capsys):
    """jobs=2: two notebooks run at once, each gets its own metrics (not the other's), the summary is in notebook
    order, and one failing notebook fails the run without losing the other's metrics."""
    books = tmp_path / "notebooks"
    books.mkdir()
    monkeypatch.setattr(regress, "NOTEBOOKS", books)
    monkeypatch.setattr(regress, "BASELINES", books / "baselines.json")
    _notebook(books / "01_a.ipynb", 1)
    _notebook(books / "02_b.ipynb", 2)
    (books / "baselines.json").write_text(json.dumps({"01_a": {"x": {"value": 1}}, "02_b": {"x": {"value": 2}}}))
    assert regress.run_notebooks(tmp_path / "out", jobs=2) == 0
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(summary) == ["01_a", "02_b"] and summary == {"01_a": {"x": 1}, "02_b": {"x": 2}}
    out = capsys.readouterr().out
    assert "01 cell  2/3" in out and "02 cell  2/3" in out  # each progress line names its notebook

    _notebook(books / "01_a.ipynb", 1, fail=True)
    assert regress.run_notebooks(tmp_path / "out", jobs=2) == 1
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"02_b": {"x": 2}}
    assert "01_a.ipynb: failed to execute" in capsys.readouterr().err


def test_regress_on_a_checkpoint_writes_the_resources_table(tiny_omni, tmp_path):
    """`omnilab regress --checkpoint PATH --only 01`: the notebook runs on that checkpoint (its metrics are the tiny
    checkpoint's, not the embedded model's: baselines are not checked), and OUT/resources.md / .json hold its row
    with the seconds, the kernel's peak anonymous RSS and the figures it wrote."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.cli import main

    out = tmp_path / "runs"
    assert main(["regress", "--checkpoint", str(tiny_omni), "--only", "01", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["01_shard_inspection"]
    assert metrics["tensors"] == len(Checkpoint(tiny_omni).tensors) != 940  # the tiny checkpoint's, not omni-tiny's
    table = json.loads((out / "resources.json").read_text())
    assert table["parameters"]["checkpoint"] == str(tiny_omni.resolve())
    assert "device" not in table["notebooks"][0]["parameters"]  # 01 loads no model and declares no device
    (row,) = table["notebooks"]
    assert row["notebook"] == "01_shard_inspection" and row["status"] == "ok" and row["seconds"] > 0
    assert 50 * 2**20 < row["peak_rss_anon_bytes"] < 8 * 2**30  # measured inside the kernel: a Python process with pandas
    assert row["peak_gpu_allocated_bytes"] is None and row["figures"] >= 5
    md = (out / "resources.md").read_text()
    assert "| 01_shard_inspection | ok |" in md and "RssAnon" in md and "inside the kernel" in md


def test_regress_at_scale_refuses_what_belongs_to_the_embedded_model(tmp_path):
    with pytest.raises(ValueError, match="--update-baselines"):
        regress.run_notebooks(tmp_path, checkpoint=tmp_path, update_baselines=True)
    with pytest.raises(ValueError, match="--device goes with --checkpoint"):
        regress.run_notebooks(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="does not exist"):
        regress.run_notebooks(tmp_path, checkpoint=tmp_path / "nope")
    book = regress.numbered_notebooks(["03"])[0]
    assert regress.declares(book, "device") and regress.declares(book, "fault_window")
    assert not regress.declares(regress.numbered_notebooks(["01"])[0], "device")
