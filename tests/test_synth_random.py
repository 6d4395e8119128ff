"""synth.real_shape_checkpoint: the benchmarks' random-weight stand-in, checked on a tiny config's layout."""

import json
from pathlib import Path

import pytest
import torch

from omnilab.checkpoint import Checkpoint
from omnilab.model.decoder import SelectiveMoE
from omnilab.testing.synth import real_shape_checkpoint, real_shape_config, tiny_omni_config


def _tiny_thinker_config():
    config = tiny_omni_config()
    config["enable_audio_output"] = False
    config.pop("talker_config")
    config.pop("code2wav_config")
    return config


def test_real_shape_config_is_the_real_thinker():
    config = real_shape_config(24)
    text = config["thinker_config"]["text_config"]
    assert (text["num_hidden_layers"], text["vocab_size"], text["num_experts"], text["hidden_size"]) == (24, 152064, 128, 2048)
    assert "talker_config" not in config and config["enable_audio_output"] is False


def test_filled_layout_is_sound_random_and_loads(tmp_path):
    out = real_shape_checkpoint(tmp_path / "ck", config=_tiny_thinker_config(), dtype=torch.float32, progress=False)
    ck = Checkpoint(out)
    assert not ck.problems
    norm = ck.read("thinker.model.layers.0.post_attention_layernorm.weight")
    assert torch.equal(norm, torch.ones_like(norm))
    gate = ck.read("thinker.model.layers.1.mlp.experts.3.gate_proj.weight")
    assert 0.015 < float(gate.std()) < 0.025 and gate.abs().max() > 0
    other = ck.read("thinker.model.layers.1.mlp.experts.4.gate_proj.weight")
    assert not torch.equal(gate, other)  # every tensor has its own draw
    # the same parameters give the same bytes; the selective model runs on it
    again = real_shape_checkpoint(tmp_path / "ck2", config=_tiny_thinker_config(), dtype=torch.float32, progress=False)
    assert torch.equal(Checkpoint(again).read("thinker.model.layers.1.mlp.experts.3.gate_proj.weight"), gate)
    model = SelectiveMoE.from_checkpoint(out, tokenizer=False)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    assert not list(tmp_path.glob("*.tmp"))


def test_reused_when_same_refused_when_different(tmp_path):
    out = real_shape_checkpoint(tmp_path / "ck", config=_tiny_thinker_config(), progress=False)
    stamp = (out / "model.safetensors.index.json").stat().st_mtime_ns
    assert real_shape_checkpoint(out, config=_tiny_thinker_config(), progress=False) == out
    assert (out / "model.safetensors.index.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="ck"):
        real_shape_checkpoint(out, config=_tiny_thinker_config(), seed=1, progress=False)
    assert json.loads((out / "omnilab-random.json").read_text())["seed"] == 0


def test_without_towers(tmp_path):
    out = real_shape_checkpoint(tmp_path / "ck", config=_tiny_thinker_config(), towers=False, progress=False)
    names = Checkpoint(out).tensors.index
    assert not any(n.startswith(("thinker.audio_tower.", "thinker.visual.")) for n in names)
    assert "thinker.lm_head.weight" in names


def test_attach_tokenizer_points_the_config_at_its_ids(tmp_path):
    import shutil

    from omnilab.testing.synth import attach_tokenizer
    from omnilab.vocab import check_tokenizer, config_token_ids

    config = _tiny_thinker_config()
    config["thinker_config"].update(audio_token_id=151646, image_token_id=151655, video_token_id=151656)
    out = real_shape_checkpoint(tmp_path / "ck", config=config, towers=False, progress=False)
    tiny = Path(__file__).parents[1] / "data" / "omni-tiny"
    shutil.copyfile(tiny / "tokenizer.json", out / "tokenizer.json")  # the files alone: the ids contradict
    shutil.copyfile(tiny / "tokenizer_config.json", out / "tokenizer_config.json")
    assert check_tokenizer(out, config_ids=config_token_ids(config)).special_mismatch

    changed = attach_tokenizer(out, tiny)
    written = json.loads((out / "config.json").read_text())
    assert {"audio_token_id", "image_token_id", "video_token_id"} <= set(changed)
    assert not check_tokenizer(out, config_ids=config_token_ids(written)).special_mismatch
    assert (out / "generation_config.json").is_file() and (out / "preprocessor_config.json").is_file()
