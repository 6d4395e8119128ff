"""The README's headline numbers are the recorded run's (notebooks/baselines.json), never typed by hand; and
`omnilab regress --headline` prints the same lines from any run's metrics.json."""

import json

from omnilab import regress
from omnilab.cli import main


def test_readme_headline_is_the_baselines():
    text = (regress.REPO / "README.md").read_text()
    assert text.count(regress.HEADLINE_BEGIN) == 1 and text.count(regress.HEADLINE_END) == 1
    block = text.split(regress.HEADLINE_BEGIN)[1].split(regress.HEADLINE_END)[0].strip()
    assert block == regress.headline(regress.baseline_values()), \
        "README's headline differs from notebooks/baselines.json: paste `omnilab regress --headline` into it"


def test_headline_from_a_run(tmp_path, capsys):
    values = regress.baseline_values()
    (tmp_path / "metrics.json").write_text(json.dumps(values))
    assert main(["regress", "--headline", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == regress.headline(values)
    values["03_activation_comparison"]["bf16_logits_rel_err"] = 0.5
    assert "50.00% from bf16 transformers" in regress.headline(values)
    del values["05_generation_experiments"]
    (tmp_path / "metrics.json").write_text(json.dumps(values))
    assert main(["regress", "--headline", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "05_generation_experiments" in err
    assert main(["regress", "--headline", "--out", str(tmp_path / "none")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
