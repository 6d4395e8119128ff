"""Multimodal prompts through the selective thinker against the whole transformers thinker (fp32, every hook).

Fixtures: a tiny Qwen3-Omni with placeholder tokens in its vocabulary and processor files
(synth.tiny_qwen3_omni_multimodal; text-model norms perturbed as in test_model.py), and data/omni-tiny. Inputs:
a synthesized 16 kHz wav (stdlib wave) and a synthesized PNG (Pillow), through transformers' Qwen3OmniMoeProcessor.
"""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from omnilab.checkpoint import Checkpoint
from omnilab.cli import main
from omnilab.model import multimodal as mm
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.rope import mrope_cos_sin, rope_inv_freq
from omnilab.model.hooks import hook_names
from omnilab.reference import multimodal as mm_ref
from omnilab.reference.whole import Reference
from omnilab.testing import synth

OMNI_TINY = Path(__file__).resolve().parent.parent / "data/omni-tiny"
REAL_CONFIG = Path(__file__).resolve().parent.parent / "data/reference/qwen3-omni-30b-a3b-instruct.config.json"
CASES = ("audio", "image", "both")


class Setup:
    """One checkpoint's selective model, towers, processor, reference and synthesized media."""

    def __init__(self, path: Path, media: Path, image_size=(20, 16)):
        self.path = path
        self.sel = SelectiveMoE.from_checkpoint(path)
        self.towers, self.processor = mm.open_multimodal(self.sel)
        self.ref = Reference.from_checkpoint(path)
        self.wav = mm.synth_wav(media / "speech.wav", 0.6)
        self.png = mm.synth_png(media / "picture.png", *image_size)

    def inputs(self, case: str, prompt: str = "The quick brown fox"):
        audio = [mm.read_wav(self.wav)] if case in ("audio", "both") else None
        images = [mm.read_image(self.png)] if case in ("image", "both") else None
        text = mm.prompt_text(prompt, audio=audio is not None, image=images is not None)
        return mm.process(self.processor, self.towers.config, text, audio=audio, images=images)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from test_model import perturb_norms

    path = synth.tiny_qwen3_omni_multimodal(tmp_path_factory.mktemp("mm") / "ckpt")
    return Setup(perturb_norms(path), tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="session")
def omni_tiny(tmp_path_factory):
    return Setup(OMNI_TINY, tmp_path_factory.mktemp("media-omni-tiny"), image_size=(64, 48))


def assert_parity(result, config, label):
    assert list(result.table.name) == hook_names(config)  # every hook point, both sides
    worst = result.table.loc[result.table.rel_err.idxmax()]
    assert result.table.rel_err.max() <= 1e-5, f"{label}: {worst['name']} rel_err {worst.rel_err:.2e}"
    assert result.first_divergence is None and result.top1_agreement == 1.0 and result.kl < 1e-8


@pytest.mark.parametrize("case", CASES)
def test_tiny_parity_at_every_hook(tiny, case):
    inputs = tiny.inputs(case)
    assert_parity(mm_ref.compare(tiny.ref, tiny.sel, tiny.towers, inputs), tiny.sel.config, case)
    prompt = mm.prepare(tiny.sel, tiny.towers, inputs)
    rows_differ = not bool((prompt.position_ids == prompt.position_ids[:1]).all())
    assert rows_differ == (case != "audio")  # image grids get their own height / width rows; audio is 1-D
    assert (prompt.deepstack is not None) == (case != "audio")


@pytest.mark.parametrize("case", CASES)
def test_omni_tiny_parity_at_every_hook(omni_tiny, case):
    inputs = omni_tiny.inputs(case)
    assert (inputs["input_ids"] == omni_tiny.towers.config.audio_token_id).any() == (case != "image")
    assert_parity(mm_ref.compare(omni_tiny.ref, omni_tiny.sel, omni_tiny.towers, inputs), omni_tiny.sel.config, case)


def test_left_padded_batch_parity(tiny):
    """Two prompts of different lengths, each with audio and an image, left-padded by the processor."""
    texts = [mm.prompt_text(p, audio=True, image=True) for p in ("The fox", "Mixture-of-Experts models route each")]
    wav, png = mm.read_wav(tiny.wav), mm.read_image(tiny.png)
    inputs = mm.process(tiny.processor, tiny.towers.config, texts, audio=[wav, wav[::2]], images=[png, png])
    assert not bool(inputs["attention_mask"].all())
    assert_parity(mm_ref.compare(tiny.ref, tiny.sel, tiny.towers, inputs), tiny.sel.config, "padded batch")


def test_video_and_image_parity(tiny):
    """A video (one temporal patch, the image processor's patches reused) beside an image: the video path and
    the joint deepstack rows, against transformers."""
    image = tiny.inputs("image")
    grid = image["image_grid_thw"]
    n = int(grid.prod()) // tiny.towers.spatial_merge_size ** 2
    text = "".join(f"<|vision_start|>{pad * n}<|vision_end|>" for pad in ("<|image_pad|>", "<|video_pad|>")) + " The fox"
    inputs = dict(tiny.processor.tokenizer(text, return_tensors="pt"))
    inputs.update(pixel_values=image["pixel_values"], image_grid_thw=grid,
                  pixel_values_videos=image["pixel_values"].flip(0), video_grid_thw=grid,
                  video_second_per_grid=torch.tensor([2.0]))
    assert_parity(mm_ref.compare(tiny.ref, tiny.sel, tiny.towers, inputs), tiny.sel.config, "image+video")


def test_parity_checks_catch_a_missing_deepstack_and_1d_positions(tiny):
    """The parity above is not vacuous: dropping the deepstack addition or M-RoPE's rows diverges."""
    from omnilab.model.hooks import capture, compare_activations

    inputs = tiny.inputs("image")
    prompt = mm.prepare(tiny.sel, tiny.towers, inputs)
    names = tiny.ref.hook_names()
    with capture(tiny.ref, names) as ref_acts:
        mm_ref.run_reference(tiny.ref, inputs)
    for broken, first in [(dict(deepstack=None), "blocks.1.hook_resid_pre"),
                          (dict(position_ids=prompt.position_ids[0]), "blocks.0.hook_attn_out")]:
        kwargs = dict(inputs_embeds=prompt.inputs_embeds, position_ids=prompt.position_ids, deepstack=prompt.deepstack)
        kwargs.update(broken)
        with capture(tiny.sel, names) as sel_acts:
            tiny.sel(prompt.input_ids, **kwargs)
        result = compare_activations(ref_acts, sel_acts, rtol=1e-5, names=[n for n in names if n != "hook_embed"])
        assert result.first_divergence == first


def test_mrope_matches_transformers_rotary():
    """mrope_cos_sin against transformers' rotary module on distinct temporal / height / width rows."""
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding

    from omnilab.arch import read_config

    for config in (synth.tiny_omni_config(), json.loads(REAL_CONFIG.read_text())):
        rotary = Qwen3OmniMoeThinkerTextRotaryEmbedding(Qwen3OmniMoeConfig.from_dict(config).thinker_config.text_config)
        ours, _ = read_config(config)
        g = torch.Generator().manual_seed(0)
        positions = torch.randint(0, 5000, (3, 2, 7), generator=g)  # [3, B, T]
        cos_ref, sin_ref = rotary(torch.zeros(1), positions)
        cos, sin = mrope_cos_sin(positions, rope_inv_freq(ours), ours.rope_parameters["mrope_section"], torch.float32)
        torch.testing.assert_close(cos, cos_ref, rtol=0, atol=0)
        torch.testing.assert_close(sin, sin_ref, rtol=0, atol=0)


@pytest.mark.parametrize("case", ("audio", "both"))
def test_greedy_generate_equals_transformers(tiny, case):
    """Decoding after a multimodal prefill (positions continue at the rope delta) matches transformers' generate."""
    inputs = tiny.inputs(case)
    ours = mm.generate(tiny.sel, mm.prepare(tiny.sel, tiny.towers, inputs), 8, vocab_limit=None)
    tiny.ref.hf.model.rope_deltas = None
    theirs = tiny.ref.hf.generate(**{k: v for k, v in inputs.items() if k != "num_audio_tokens"}, max_new_tokens=8,
                                  min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.new_token_ids[0] == theirs[0, inputs["input_ids"].shape[1]:].tolist()


def test_placeholder_count_mismatch_is_named(tiny):
    inputs = dict(tiny.inputs("audio"))
    audio = inputs["input_ids"] == tiny.towers.config.audio_token_id
    first = int(audio[0].nonzero()[0])
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][0, first] = 5  # one placeholder fewer than the tower's frames
    with pytest.raises(ValueError, match=r"audio: the prompt has \d+ <\|audio_pad\|> placeholders"):
        mm.prepare(tiny.sel, tiny.towers, inputs)


def test_read_wav_mixes_channels_and_refuses_other_rates(tmp_path):
    stereo = tmp_path / "stereo.wav"
    pcm = np.array([[16384, -16384], [8192, 8192]], dtype="<i2")  # two frames, two channels
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(mm.SAMPLING_RATE)
        w.writeframes(pcm.tobytes())
    np.testing.assert_allclose(mm.read_wav(stereo), [0.0, 0.25])
    other = tmp_path / "44k.wav"
    with wave.open(str(other), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(44100)
        w.writeframes(b"\0\0" * 10)
    with pytest.raises(ValueError, match="44k.wav: sample rate 44100 Hz"):
        mm.read_wav(other)


def test_processor_files_are_required(tiny, tmp_path):
    folder = tmp_path / "no-processor"
    shutil.copytree(tiny.path, folder)
    (folder / mm.PREPROCESSOR_FILE).unlink()
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        mm.load_processor(folder)


def test_placeholder_ids_must_match_the_config(tiny, tmp_path):
    folder = tmp_path / "wrong-id"
    shutil.copytree(tiny.path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["thinker_config"]["image_token_id"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"<\|image_pad\|> is id \d+ but config.json's image_token_id is 7"):
        mm.open_multimodal(SelectiveMoE.from_checkpoint(folder))


# -- the command line ---------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_compare_audio_and_image_files(tiny, capsys):
    code, out, _ = run_cli(capsys, "compare", tiny.path, "--audio", tiny.wav, "--image", tiny.png, "--prompt", "The",
                           "--json")
    assert code == 0
    result = json.loads(out)
    ids = result["input_ids"]
    assert tiny.towers.config.audio_token_id in ids and tiny.towers.config.image_token_id in ids
    assert [h["name"] for h in result["hooks"]] == hook_names(tiny.sel.config)
    assert result["max_rel_err"] <= 1e-5 and result["first_divergence"] is None and result["image"] == str(tiny.png)


def test_cli_generate_image_file(tiny, capsys):
    code, out, _ = run_cli(capsys, "generate", tiny.path, "--image", tiny.png, "--max-new-tokens", "4", "--greedy",
                           "--stop-ids", "0", "--json")
    assert code == 0
    result = json.loads(out)
    expected = mm.generate(tiny.sel, mm.prepare(tiny.sel, tiny.towers, tiny.inputs("image", prompt="")), 4,
                           stop_tokens=[0])
    assert result["new_token_ids"] == expected.new_token_ids[0] and tiny.towers.config.image_token_id in result["input_ids"]


def test_cli_media_errors_are_one_line(tiny, tiny_moe, tmp_path, capsys):
    bad = tmp_path / "not.wav"
    bad.write_bytes(b"hello")
    cases = [
        (("generate", tiny.path, "--audio", bad), "not.wav: not a readable PCM .wav file"),
        (("compare", tiny.path, "--image", tmp_path / "missing.png"), "missing.png"),
        (("compare", tiny.path, "--audio", tiny.wav, "--input-ids", "1,2"), "--input-ids cannot be combined"),
        (("generate", tiny_moe, "--image", tiny.png), "need a Qwen3-Omni checkpoint"),
        (("compare", tiny.path), "give the prompt"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


# -- against the streamed reference (omnilab.reference.streamed with the towers) ---------------------------------------------


def assert_streamed_parity(result, config, label):
    from omnilab.model.hooks import hook_names as names_of

    for view, table in (("chained", result.chained.table), ("local", result.local.table)):
        assert list(table.name) == names_of(config), f"{label} {view}"
        worst = table.loc[table.rel_err.idxmax()]
        assert table.rel_err.max() <= 1e-5, f"{label} {view}: {worst['name']} rel_err {worst.rel_err:.2e}"
    assert result.first_divergence is None and result.local_first_divergence is None


@pytest.mark.parametrize("case", CASES)
def test_tiny_streamed_parity_at_every_hook(tiny, case):
    from omnilab.reference.streamed import StreamedReference

    result = mm_ref.compare_streamed(StreamedReference(tiny.path), tiny.sel, tiny.towers, tiny.inputs(case))
    assert_streamed_parity(result, tiny.sel.config, case)


@pytest.mark.parametrize("case", CASES)
def test_omni_tiny_streamed_parity_at_every_hook(omni_tiny, case):
    from omnilab.reference.streamed import StreamedReference

    result = mm_ref.compare_streamed(StreamedReference(OMNI_TINY), omni_tiny.sel, omni_tiny.towers, omni_tiny.inputs(case))
    assert_streamed_parity(result, omni_tiny.sel.config, case)


def test_streamed_reference_adds_the_deepstack(tiny, monkeypatch):
    """Not vacuous: without the deepstack addition between streamed layers, the chained view leaves the
    selective model at the first layer after it, while the local view (fed the selective inputs) does not."""
    from omnilab.reference.streamed import StreamedReference

    ref = StreamedReference(tiny.path)
    monkeypatch.setattr(ref.text, "_deepstack_process", lambda h, masks, embeds: h)
    result = mm_ref.compare_streamed(ref, tiny.sel, tiny.towers, tiny.inputs("image"))
    assert result.first_divergence == "blocks.1.hook_resid_pre"
    assert result.local_first_divergence is None


def test_cli_compare_media_streams_the_reference(tiny, capsys):
    """compare --audio / --image: both views against the streamed thinker, in fp32 and in bf16 (beside
    transformers' own bf16 noise), with --reference accepted."""
    code, out, _ = run_cli(capsys, "compare", tiny.path, "--audio", tiny.wav, "--image", tiny.png, "--prompt", "The",
                           "--reference", tiny.path, "--json")
    assert code == 0
    result = json.loads(out)
    assert [h["name"] for h in result["local_hooks"]] == hook_names(tiny.sel.config)
    assert result["local_max_rel_err"] <= 1e-5 and result["local_first_divergence"] is None
    assert result["expert_budget_bytes"] > 0 and result["peak_rss_bytes"] > 0 and result["audio"] == str(tiny.wav)
    code, out, _ = run_cli(capsys, "compare", tiny.path, "--image", tiny.png, "--dtype", "bfloat16", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["noise"] is not None and result["first_divergence"] is None, result["first_divergence"]
    code, out, _ = run_cli(capsys, "compare", tiny.path, "--audio", tiny.wav)
    assert code == 0 and "first divergence" in out and "local none" in out
