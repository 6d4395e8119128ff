"""The pieces that taught omni-tiny to read: the image processor's own pixel normalisation, paper and ink
levels of the rendered training images, and the text-weight mix of scripts/mix_text_weights.py.

The shipped run 2 normalised with CLIP's mean and std: its vision tower's output was one constant vector (its
token-to-token spread 0.02 against 11) and written sums stayed at chance. These tests pin what replaced it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import make_multimodal_data as mmdata  # noqa: E402

from omnilab.model import multimodal as mm  # noqa: E402
from omnilab.testing import synth  # noqa: E402


def _white_pixel(folder: Path) -> list[float]:
    """The processor's values of a plain white image, per colour channel (the image processor alone)."""
    from PIL import Image

    proc = mm.load_processor(folder)
    out = proc.image_processor(images=[Image.new("RGB", (64, 64), (255, 255, 255))], return_tensors="pt")
    values = out["pixel_values"]  # [patches, C * t * p * p], channel first
    per_channel = values.reshape(values.shape[0], 3, -1)  # [patches, C, t * p * p]
    return [float(per_channel[:, c].mean()) for c in range(3)] if torch.allclose(
        per_channel, per_channel[:, :, :1].expand_as(per_channel), atol=1e-5) else []


def test_processor_normalises_with_the_given_mean_and_std(tmp_path):
    ckpt = synth.tiny_qwen3_omni_multimodal(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    from transformers import Qwen3OmniMoeConfig

    thinker = Qwen3OmniMoeConfig(**config).thinker_config
    clip = [(1 - m) / s for m, s in zip([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])]
    assert _white_pixel(ckpt) == pytest.approx(clip, rel=1e-4)  # Qwen's (CLIP's) default, about +1.9
    mm.write_processor_files(ckpt, thinker, image_mean=[0.625] * 3, image_std=[0.283] * 3)
    assert _white_pixel(ckpt) == pytest.approx([(1 - 0.625) / 0.283] * 3, rel=1e-4)
    saved = json.loads((ckpt / mm.PREPROCESSOR_FILE).read_text())
    assert saved["image_mean"] == [0.625] * 3 and saved["image_std"] == [0.283] * 3
    assert saved["feature_size"] == thinker.audio_config.num_mel_bins  # the audio half is untouched


@pytest.mark.skipif(not (mmdata.FONT_DIR / mmdata.EVAL_FONT).is_file(),
                    reason="the DejaVu fonts (Debian fonts-dejavu-core) are not installed")
def test_render_uses_the_paper_and_ink_levels():
    im = np.asarray(mmdata.render("12 + 34", paper=180, ink=10))
    assert im.shape[0] == mmdata.IMAGE_HEIGHT
    levels = set(np.unique(im).tolist())
    assert 180 in levels and min(levels) <= 20 and max(levels) == 180  # paper 180, ink near 10, nothing whiter
    assert (im == 180).mean() > 0.5  # mostly paper


def test_train_specs_keep_the_contrast_and_invert_a_fraction():
    sentences = ["a short training sentence here", "another one for the lines"]
    specs = mmdata.train_specs(sentences, 0, 0, 200, 800, seed=3, paper=(140, 255), inverted=0.25)
    images = [s for s in specs if s["media"] == "image"]
    assert len(images) == 1000
    for s in images:  # the contrast: min(165, the paper's grey level as drawn, before any inversion)
        drawn = s["paper"] if s["paper"] > s["ink"] else 255 - s["paper"]
        assert 140 <= drawn <= 255 and abs(s["paper"] - s["ink"]) >= min(165, drawn), s
    dark = [s for s in images if s["paper"] < s["ink"]]
    assert 0.18 < len(dark) / len(images) < 0.32  # light ink on dark paper, about a quarter
    assert min(s["paper"] for s in images if s["paper"] > s["ink"]) < 160  # grey paper is drawn, not only white
    default = mmdata.train_specs(sentences, 0, 0, 50, 50, seed=3)
    assert all(s["paper"] == 255 and 0 <= s["ink"] <= 90 for s in default)  # the old black-on-white


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in set(index.values()):
        with safe_open(folder / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _mix(run, text_only, out, alpha) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "mix_text_weights.py"), str(run), str(text_only),
                           str(out), "--alpha", str(alpha)], capture_output=True, text=True)


def test_mix_text_weights_interpolates_the_text_model_only(tmp_path):
    run = synth.tiny_qwen3_omni(tmp_path / "run", seed=1)
    old = synth.tiny_qwen3_omni(tmp_path / "old", seed=2)
    (run / "train_mm_log.json").write_text(json.dumps({"summary": {}}))
    r = _mix(run, old, tmp_path / "mixed", 0.7)
    assert r.returncode == 0, r.stderr
    a, b, m = _tensors(run), _tensors(old), _tensors(tmp_path / "mixed")
    assert m.keys() == a.keys()
    text = [k for k in a if k.startswith(("thinker.model.", "thinker.lm_head."))]
    towers = [k for k in a if k.startswith(("thinker.audio_tower.", "thinker.visual."))]
    assert text and towers
    for k in text:
        want = (0.7 * a[k].float() + 0.3 * b[k].float()).to(a[k].dtype)
        assert torch.equal(m[k], want), k
    assert any(not torch.equal(m[k], a[k]) for k in text)
    for k in a.keys() - set(text):
        assert torch.equal(m[k], a[k]), k  # towers, talker, code2wav: the run's
    log = json.loads((tmp_path / "mixed" / "train_mm_log.json").read_text())
    assert log["text_weight_mix"]["alpha"] == 0.7 and log["text_weight_mix"]["tensors"] == len(text)


def test_mix_text_weights_names_a_mismatched_tensor_and_writes_nothing(tmp_path):
    run = synth.tiny_qwen3_omni(tmp_path / "run", seed=1)
    other = synth.tiny_qwen3_omni(tmp_path / "other", seed=2, hidden_size=48)
    r = _mix(run, other, tmp_path / "mixed", 0.5)
    assert r.returncode != 0
    assert "shape" in r.stderr and "thinker." in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mixed").exists()
    r = _mix(run, run, tmp_path / "mixed", 1.5)
    assert r.returncode != 0 and "--alpha" in r.stderr


@pytest.mark.skipif(not (mmdata.FONT_DIR / mmdata.EVAL_FONT).is_file(),
                    reason="the DejaVu fonts (Debian fonts-dejavu-core) are not installed")
def test_train_multimodal_resumes_a_run_in_a_second_call(tmp_path):
    """Two CPU calls of scripts/train_multimodal.py (images only, so no espeak-ng): the second resumes the
    first's weights, AdamW state and step, makes new data, keeps the first's processor, and its log adds the
    calls up while each call keeps its own counts."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    rng = np.random.default_rng(0)
    for d in ("en", "fr", "es", "python"):
        np.save(tokens / f"{d}.npy", rng.integers(10, 200, size=4000).astype(np.int32))
    (tmp_path / "sentences.txt").write_text("the first training sentence\na second one to render\n")
    common = [sys.executable, str(REPO / "scripts" / "train_multimodal.py"), "--device", "cpu", "--dtype", "float32",
              "--tokens-dir", str(tokens), "--sentences", str(tmp_path / "sentences.txt"), "--text-batch", "5",
              "--seq-len", "32", "--mm-batch", "4", "--n-speech-sent", "0", "--n-speech-sum", "0",
              "--n-image-line", "3", "--n-image-sum", "3", "--workers", "1", "--eval-max-tokens", "200",
              "--heldout-limit", "2", "--heldout-steps", "2", "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(common + ["--steps", "3", "--out", str(tmp_path / "a"), "--image-norm", "data",
                                     "--paper", "150,255", "--inverted", "0.3"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "a" / "resume.pt").is_file()
    second = subprocess.run(common + ["--steps", "2", "--seed", "7", "--resume", str(tmp_path / "a"),
                                      "--out", str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resume:" in second.stdout and "at step 3" in second.stdout
    log = json.loads((tmp_path / "b" / "train_mm_log.json").read_text())
    assert log["summary"]["steps"] == 5 and log["summary"]["calls"] == 2
    assert [c["data"]["items_by_media"]["image"] for c in log["calls"]] == [6, 6]
    assert log["data"]["items_by_media"]["image"] == 12
    assert [e["step"] for e in log["steps"]] == [3, 5]
    assert log["summary"]["train_wall_s"] > 0 and log["summary"]["examples_seen"] == 5 * 4
    proc_a = json.loads((tmp_path / "a" / "preprocessor_config.json").read_text())
    proc_b = json.loads((tmp_path / "b" / "preprocessor_config.json").read_text())
    assert proc_b["image_mean"] == proc_a["image_mean"] != [0.48145466, 0.4578275, 0.40821073]
    bad = subprocess.run(common + ["--resume", str(tmp_path / "nowhere")], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--resume" in bad.stderr and "Traceback" not in bad.stderr

    # a new run continuing b (--init-towers): b's towers and processor, not fresh ones of its own seed
    third = subprocess.run(common + ["--steps", "1", "--seed", "9", "--init", str(tmp_path / "b"), "--init-towers",
                                     "--lr-towers", "1e-7", "--out", str(tmp_path / "c")],
                           capture_output=True, text=True, env=env)
    assert third.returncode == 0, third.stderr[-2000:]
    log_c = json.loads((tmp_path / "c" / "train_mm_log.json").read_text())
    assert log_c["summary"]["steps"] == 1 and log_c["continues"]["summary"]["steps"] == 5
    assert json.loads((tmp_path / "c" / "preprocessor_config.json").read_text()) == proc_b
    tb, tc = ({k: v.float() for k, v in _tensors(tmp_path / run).items() if k.startswith("thinker.audio_tower.")}
              for run in ("b", "c"))
    assert tb.keys() == tc.keys() and len(tb) > 10
    # a 1e-7 step is below bf16's rounding: b's towers come back as they were (fresh towers of seed 9 would
    # differ at every initialised weight)
    assert max((tb[k] - tc[k]).abs().max().item() for k in tb) < 1e-4
    nop = tmp_path / "no-processor"
    shutil.copytree(tmp_path / "b", nop, ignore=shutil.ignore_patterns("preprocessor_config.json", "resume.pt"))
    bad = subprocess.run(common + ["--init", str(nop), "--init-towers", "--out", str(tmp_path / "d")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--init-towers" in bad.stderr and "preprocessor_config.json" in bad.stderr
    assert "Traceback" not in bad.stderr
