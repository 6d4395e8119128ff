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


def test_every_numbered_notebook_has_a_baseline_and_a_parameters_cell():
    import nbformat

    baselines = json.loads(regress.BASELINES.read_text())
    for book in regress.numbered_notebooks():
        assert book.stem in baselines, book.name
        nb = nbformat.read(book, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), book.name
        assert 'checkpoint = "../data/omni-tiny"' in code[0].source, book.name
        assert all(not c.get("outputs") for c in code), f"{book.name} is committed with outputs"
