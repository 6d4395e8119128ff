"""Tokenizer check: padding (tokenizer smaller, every id fits) vs mismatch (an id past the last row); special tokens."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from omnilab import Checkpoint
from omnilab.cli import main
from omnilab.inventory import inventory
from omnilab.testing import breakage
from omnilab.tokenizer import tokenizer_files
from omnilab.vocab import check_checkpoint_tokenizer, check_tokenizer


@pytest.fixture(scope="module")
def reference(tiny_moe):
    return AutoTokenizer.from_pretrained(str(tiny_moe))


def test_padding_match_mismatch_by_rows(tiny_moe, reference):
    n, top = len(reference), max(reference.get_vocab().values())
    padding = check_tokenizer(tiny_moe, embedding_rows=n + 100)
    assert (padding.verdict, padding.padding_rows, padding.size, padding.max_id) == ("padding", 100, n, top)
    assert padding.problem() is None and "padding" in padding.line()
    assert check_tokenizer(tiny_moe, embedding_rows=n).verdict == "match"
    mismatch = check_tokenizer(tiny_moe, embedding_rows=top - 1, embedding_tensor="model.embed_tokens.weight")
    assert mismatch.verdict == "mismatch"
    assert sorted(mismatch.out_of_range.values()) == [top - 1, top]
    problem = mismatch.problem()
    assert problem.kind == "tokenizer" and problem.tensor == "model.embed_tokens.weight"
    assert str(top - 1) in problem.message and "model.embed_tokens.weight" in problem.message


def test_special_tokens_with_their_ids(tiny_moe, reference):
    report = check_tokenizer(tiny_moe, embedding_rows=10_000)
    assert set(report.special_tokens) == set(reference.all_special_tokens)
    assert report.special_tokens == {t: reference.convert_tokens_to_ids(t) for t in reference.all_special_tokens}


@pytest.mark.parametrize("kind", ["omni", "moe"])
def test_checkpoint_embedding_rows_come_from_the_embed_tensor(make_checkpoint, kind):
    path = make_checkpoint(kind)
    inv = inventory(path)
    report = check_checkpoint_tokenizer(inv)
    embed = f"{inv.layout.prefix}embed_tokens.weight"
    assert report.embedding_tensor == embed
    assert report.embedding_rows == Checkpoint(path).tensors.at[embed, "shape"][0] == inv.config.vocab_size
    assert report.verdict == "padding" and report.padding_rows == inv.config.vocab_size - report.size


def test_no_tokenizer_files(tmp_path, tiny_moe):
    assert tokenizer_files(tmp_path) == [] and check_tokenizer(tmp_path, 100) is None
    (tmp_path / "vocab.json").write_text("{}")  # vocab.json alone cannot make a BPE tokenizer
    assert tokenizer_files(tmp_path) == []


def test_unreadable_tokenizer_is_one_problem(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    report = check_tokenizer(tmp_path, 100)
    assert report.verdict == "unreadable" and report.problem().kind == "tokenizer"
    assert str(tmp_path) in report.problem().message and "\n" not in report.problem().message


def test_verify_reports_a_tokenizer_bigger_than_the_embedding(capsys, tiny_moe, copy_checkpoint):
    """The tokenizer of a bigger model beside a smaller embedding: ids past the last row."""
    path = copy_checkpoint(tiny_moe)
    top = max(AutoTokenizer.from_pretrained(str(path)).get_vocab().values())
    rows = top - 10
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = rows
    (path / "config.json").write_text(json.dumps(config))
    hidden = config["hidden_size"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        breakage.replace_tensor(path, name, torch.zeros(rows, hidden))
    assert main(["verify", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    (line,) = out.splitlines()
    assert line.startswith("tokenizer: ") and "model.embed_tokens.weight" in line and str(rows) in line
    assert main(["inspect", str(path)]) == 0
    assert "mismatch" in capsys.readouterr().out
