"""The architecture schema (omnilab.arch) against what transformers' save_pretrained really writes."""

import pytest

from omnilab import Checkpoint
from omnilab.arch import classify, expected_tensors

CONFIGS = [
    ("omni", {}),
    ("moe", {}),
    ("moe", {"tie_word_embeddings": True}),
    ("moe", {"mlp_only_layers": [1]}),
    ("moe", {"decoder_sparse_step": 2}),
    ("omni", {"num_key_value_heads": 1, "norm_topk_prob": False}),
]


@pytest.mark.parametrize("kind,text", CONFIGS, ids=[f"{k}-{t}" for k, t in CONFIGS])
def test_expected_names_and_shapes_equal_save_pretrained(make_checkpoint, kind, text):
    ckpt = Checkpoint(make_checkpoint(kind, **text))
    cfg, layout = ckpt.arch
    expected = expected_tensors(cfg, layout)
    text_tensors = {n for n in ckpt.tensors.name if classify(n, layout).component not in ("audio", "vision", "talker", "code2wav")}
    assert text_tensors == set(expected)
    for name, spec in expected.items():
        assert tuple(ckpt.tensors.at[name, "shape"]) == spec.shape, name
    assert not ckpt.problems


def test_dense_layers_follow_mlp_only_layers_and_sparse_step(make_checkpoint):
    cfg, _ = Checkpoint(make_checkpoint("moe", decoder_sparse_step=2)).arch
    assert cfg.moe_layers == [1]
    cfg, _ = Checkpoint(make_checkpoint("moe", mlp_only_layers=[1])).arch
    assert cfg.moe_layers == [0, 2]


def test_omni_towers_are_classified(tiny_omni):
    ckpt = Checkpoint(tiny_omni)
    _, layout = ckpt.arch
    components = {classify(n, layout).component for n in ckpt.tensors.name}
    assert {"audio", "vision", "talker", "code2wav", "experts", "router", "lm_head"} <= components
    assert "unrecognised" not in components


def test_tiny_fixtures_are_reproducible_from_their_seed(tmp_path):
    """Same seed, same bytes: no tensor left at uninitialized memory (transformers leaves the talker's experts so)."""
    from omnilab.testing import synth

    a = Checkpoint(synth.tiny_qwen3_omni(tmp_path / "a", tokenizer=False))
    b = Checkpoint(synth.tiny_qwen3_omni(tmp_path / "b", tokenizer=False))
    differing = [n for n in a.tensors.name if a.read_raw(n) != b.read_raw(n)]
    assert differing == []
