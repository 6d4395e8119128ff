"""Teach omni-tiny to hear and to read: the multimodal training run, started from the shipped text weights.

What it does, in order:
1. Builds the omni-tiny config (scripts/omni_tiny_common.py:build_config, with the enlarged audio and vision
   towers) and a `Qwen3OmniMoeForConditionalGeneration`; loads every tensor of the shipped checkpoint
   (--init, data/omni-tiny) except the towers, which start from transformers' init at their new sizes (with
   --init-towers the towers too, and --init's preprocessor_config.json: a run continuing an earlier one).
2. Makes its training data (scripts/make_multimodal_data.py): espeak-ng speech of English training-split
   sentences and of spoken sums in 42 voices (7 accents x 6 variants, not the held-out en-029) and
   130-210 words per minute; Pillow images of text lines and sums in three DejaVu fonts, sizes 22-34, on paper
   of a random grey level (--paper), a fraction in light ink on dark paper (--inverted).
   Each item goes through transformers' own Qwen3OmniMoeProcessor exactly as `omnilab generate
   --audio/--image` calls it (omnilab.model.multimodal.prompt_text + process: the placeholders, then the task
   prompt): transcribe / read (no prompt) -> the text; a sum with the prompt " =" -> " 85". The target
   ends with <|endoftext|>, the stop token of generation_config.json. With --image-norm data the image
   processor normalises pixels by the training images' own mean and std (written to preprocessor_config.json)
   instead of CLIP's: under CLIP's the white paper, most of every image, sits at +1.9 in every channel, and the
   vision tower fitted that constant and nothing else (run 2: its output varied 0.02 from token to token against
   a constant of 11; image sums stayed at chance while speech was learned).
3. Trains the thinker (text model, audio tower, vision tower; talker and code2wav untouched) on batches that
   mix both: a text batch of the original corpus mixture (windows of --seq-len from .scratch/tokens, fresh
   additions from AdditionSampler, router load-balancing loss as in train_tiny.py), so that text quality
   holds, and a multimodal batch (loss on the target tokens only) through transformers' thinker forward
   (towers, placeholder scatter, deepstack, M-RoPE positions from get_rope_index). AdamW, warmup + cosine,
   bf16 autocast; a lower peak lr for the already-trained text model than for the new towers (and the vision
   tower's own with --lr-vision). The cosine runs on seconds, not steps: every step reads the seconds trained so
   far against --schedule-s, so it ends when the time does, whatever the step time turns out to be.
   A run longer than one device call (600 s) is two calls: the first with --schedule-s of both, the second with
   --resume pointing at the first's --out (resume.pt: fp32 weights, AdamW's state, step, seconds, log) and a new
   --seed for new data; train_mm_log.json then adds the calls up and keeps each call's arguments.
4. Saves the checkpoint folder (bf16 shards in the per-expert layout, config, tokenizer, generation config,
   preprocessor_config.json from omnilab.model.multimodal.write_processor_files, train_mm_log.json) to --out, and
   with --export DIR also as a tar split into parts of --part-mb (the device run's $OUT), again every
   --export-every seconds while training, so a run stopped early still returns weights.

Run:
  GPU, the shipped omni-tiny: three runs, each continuing the one before (the model card's table has each):
      A="--export $OUT --data-budget 80 --deadline 500 --workers 24 --n-speech-sent 30000 --n-speech-sum 20000 \
         --n-image-line 16000 --n-image-sum 14000 --text-batch 16 --mm-batch 192 --image-norm data \
         --paper 140,255 --inverted 0.15 --eval-every 100000 --log-every 100"
      # run 1: fresh towers, two calls on one warm H200, then the text model mixed back (alpha 0.7)
      R1="$A --time-budget 425 --schedule-s 850 --lr-text 2e-4 --lr-towers 3e-3 --lr-vision 2e-3"
      python scripts/train_multimodal.py $R1 --seed 4321 --out /tmp/mm
      python scripts/train_multimodal.py $R1 --seed 4322 --resume /tmp/mm --out /tmp/mm2
      python scripts/mix_text_weights.py /tmp/mm2 TEXT_ONLY data/omni-tiny --alpha 0.7
      # runs 2 and 3: towers and text model from the result (--init-towers), a new warmup and AdamW state
      R="$A --time-budget 390 --deadline 460 --warmup 100 --lr-text 1.5e-4 --lr-towers 2e-3 --lr-vision 1.5e-3 --init-towers"
      python scripts/train_multimodal.py $R --schedule-s 1170 --seed 5321 --out /tmp/r2    # one call (the machine
      #   was then given back, so run 3 continues from run 2's weights, not from its resume.pt)
      python scripts/train_multimodal.py $R --schedule-s 780 --init /tmp/r2 --seed 5322 --out /tmp/r3
      python scripts/train_multimodal.py $R --schedule-s 780 --init /tmp/r2 --seed 5323 --resume /tmp/r3 --out /tmp/r3b
      python scripts/mix_text_weights.py /tmp/r3b TEXT_ONLY data/omni-tiny --alpha 0.7
  (TEXT_ONLY: the text-only omni-tiny, `git show 521c13f:data/omni-tiny/...`.)
  On a machine without espeak-ng, unpack a minimal copy (the binary, libespeak-ng, libsonic, espeak-ng-data with
  en_dict, phon*, intonations, voices/, lang/gmw, from the Debian packages) and a no-op libpcaudio.so.0 (the
  wav output never opens a sound device), then LD_LIBRARY_PATH=<lib> ESPEAK_DATA_PATH=<dir> ESPEAK_NG=<binary>.
  CPU smoke test:         python scripts/train_multimodal.py --device cpu --steps 3 --text-batch 5 --seq-len 64 \
                              --mm-batch 6 --n-speech-sent 8 --n-speech-sum 8 --n-image-line 8 --n-image-sum 8 \
                              --workers 2 --heldout-limit 4 --out .scratch/mm-smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data workers fork after the tokenizer is used
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_multimodal_data as mmdata  # noqa: E402
from omni_tiny_common import (  # noqa: E402
    DOMAINS,
    EOS,
    EVAL_DIR,
    MODEL_DIR,
    SCRATCH,
    AdditionSampler,
    config_from_tokenizer,
    init_untrained_parts,
    read_jsonl,
    text_position_ids,
    word_errors,
)
from train_tiny import build_eval_batches, evaluate, parse_weights, per_layer_balance_loss, rows_per_domain  # noqa: E402

TOWER_PREFIXES = ("thinker.model.audio_tower.", "thinker.model.visual.")  # in-memory names of the towers
ANSWER_PROMPT = " ="  # after the media: answer the sum


# ---------------------------------------------------------------- data (worker processes)

_W: dict = {}


def _worker_init(folder: str, espeak: str | None, font_dir: str) -> None:
    from transformers.utils import logging as hf_logging

    from omnilab.model import multimodal as mm

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    _W.update(processor=mm.load_processor(folder), config=config_from_tokenizer(Path(folder)).thinker_config,
              espeak=espeak, font_dir=Path(font_dir))


def pair(text: str, flag: str) -> tuple[int, int]:
    """'LO,HI' -> (LO, HI), or exit naming the flag."""
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        sys.exit(f"train_multimodal: {flag} wants LO,HI (two integers), got {text!r}")
    if lo > hi:
        sys.exit(f"train_multimodal: {flag} {text}: LO is above HI")
    return lo, hi


def pixel_stats(specs: list[dict], font_dir: Path) -> tuple[float, float]:
    """Mean and standard deviation of the pixels (0-1) of these rendered training images: the image
    processor's normalisation with --image-norm data, so that the paper, most of every image, sits near zero
    instead of at CLIP's +1.9 (white), which the vision tower's patch embedding would otherwise fit first."""
    px = np.concatenate([np.asarray(mmdata.render_spec(s, font_dir), dtype=np.float32).ravel() for s in specs]) / 255.0
    return round(float(px.mean()), 4), round(float(px.std()), 4)


def tasks_of(spec: dict) -> list[tuple[str, str]]:
    """(task prompt, target text) pairs of one item: transcribe/read always, answer for sums."""
    out = [("", spec["text"])]
    if spec["kind"] == "sum":
        out.append((ANSWER_PROMPT, " " + spec["answer"]))
    return out


def encode_item(spec: dict, processor, config, media) -> dict:
    """One item through the processor as generate calls it -> media tensors and (prompt ids, target ids, task)."""
    from omnilab.model import multimodal as mm

    audio = spec["media"] == "audio"
    out = {"media": spec["media"], "kind": spec["kind"], "examples": []}
    eos = processor.tokenizer.convert_tokens_to_ids(EOS)
    for prompt, target in tasks_of(spec):
        text = mm.prompt_text(prompt or None, audio=audio, image=not audio)
        batch = mm.process(processor, config, text, audio=[media] if audio else None, images=None if audio else [media])
        if "features" not in out:
            if audio:
                out["features"] = batch["input_features"][0].to(torch.float16)  # [mel, frames]
            else:
                out["pixel_values"] = batch["pixel_values"].to(torch.float16)  # [patches, C * t * p * p]
                out["grid"] = batch["image_grid_thw"][0]  # [3]
        target_ids = processor.tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
        task = f"{spec['media']}_{spec['kind']}_{'answer' if prompt else 'text'}"
        out["examples"].append((batch["input_ids"][0].tolist(), target_ids, task))
    return out


def _worker(job: tuple[int, dict, float]) -> dict | None:
    """One item, or None once the wall-clock deadline has passed (the pool then drains quickly and closes
    normally: Pool.terminate() with tasks in flight can deadlock on the task queue's lock, which stalled
    two device runs). Tensors go back as numpy arrays, pickled by value: torch tensors would travel as
    shared-memory file descriptors, one open descriptor per tensor in the parent."""
    order, spec, deadline = job
    if time.time() > deadline:
        return None
    if spec["media"] == "audio":
        media = mmdata.synth(spec["spoken"], spec["voice"], spec["speed"], _W["espeak"], fast=True).astype(np.float32) / 32768.0
    else:
        media = mmdata.render_spec(spec, _W["font_dir"])
    item = encode_item(spec, _W["processor"], _W["config"], media) | {"order": order}
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in item.items()}


def make_items(specs, folder: Path, workers: int, espeak, font_dir, budget_s: float = 1e9) -> list[dict]:
    """Synthesize, render and process `specs` in `workers` processes (spawned: no fork after torch, CUDA or the
    tokenizer's threads). Items not started within budget_s seconds are skipped (the counts are printed)."""
    ctx = mp.get_context("spawn")
    t0 = time.time()
    deadline = t0 + budget_s
    items, skipped = [], 0
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(str(folder), espeak, str(font_dir)))
    for item in pool.imap_unordered(_worker, [(o, s, deadline) for o, s in specs], chunksize=8):
        if item is None:
            skipped += 1
            continue
        items.append({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in item.items()})
        if len(items) % 2000 == 0:
            print(f"  data: {len(items):,}/{len(specs):,} items, {time.time() - t0:.0f} s", flush=True)
    pool.close()
    pool.join()
    if skipped:
        print(f"  data: budget of {budget_s:.0f} s spent, kept {len(items):,} items, skipped {skipped:,}", flush=True)
    print(f"  data: pool closed after {time.time() - t0:.1f} s", flush=True)
    items.sort(key=lambda it: it["order"])  # imap_unordered: back to the specs' (seeded) order
    return items


def heldout_items(folder: Path, processor, config) -> list[dict]:
    """The committed held-out set (data/eval/multimodal), speech and image of every row, for the in-run check."""
    from omnilab.model import multimodal as mm

    out = []
    for r in read_jsonl(mmdata.MULTIMODAL_DIR / "manifest.jsonl"):
        spec = {"kind": r["kind"], "text": r["text"], "answer": r.get("answer")}
        out.append(encode_item({**spec, "media": "audio"}, processor, config,
                               mm.read_wav(mmdata.MULTIMODAL_DIR / r["wav"])) | {"row": r})
        if r["id"].endswith("s"):  # one image per text (the two voices share it)
            out.append(encode_item({**spec, "media": "image"}, processor, config,
                                   mm.read_image(mmdata.MULTIMODAL_DIR / r["png"])) | {"row": r})
    return out


# ---------------------------------------------------------------- batches


def collate(items, picks, eos: int, device, with_targets: bool = True):
    """picks: (item index, example index) -> thinker kwargs (right padding) and labels [B, T] (-100 off target).
    Without targets (greedy decoding) the prompts are left-padded, as the processor pads a batch."""
    seqs, labels, feats, pixels, grids, tasks = [], [], [], [], [], []
    for i, j in picks:
        item = items[i]
        prompt, target, task = item["examples"][j]
        seqs.append(prompt + target if with_targets else prompt)
        labels.append([-100] * len(prompt) + target if with_targets else [])
        tasks.append(task)
        if item["media"] == "audio":
            feats.append(item["features"])
        else:
            pixels.append(item["pixel_values"])
            grids.append(item["grid"])
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), eos, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, (s, lb) in enumerate(zip(seqs, labels)):
        if with_targets:
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
            lab[b, :len(s)] = torch.tensor(lb)
        else:
            ids[b, T - len(s):] = torch.tensor(s)
            mask[b, T - len(s):] = 1
    kw = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if feats:
        frames = max(f.shape[1] for f in feats)
        x = torch.zeros((len(feats), feats[0].shape[0], frames), dtype=torch.float32)  # [A, mel, frames]
        fm = torch.zeros((len(feats), frames), dtype=torch.long)  # [A, frames]
        for a, f in enumerate(feats):
            x[a, :, :f.shape[1]] = f.float()
            fm[a, :f.shape[1]] = 1
        kw.update(input_features=x.to(device), feature_attention_mask=fm.to(device))
    if pixels:
        kw.update(pixel_values=torch.cat(pixels).float().to(device), image_grid_thw=torch.stack(grids).to(device))
    return kw, lab.to(device), tasks


@torch.no_grad()
def greedy_media(thinker, kw: dict, steps: int, eos: int) -> list[list[int]]:
    """Greedy continuation of a left-padded multimodal batch: full forwards (no cache), new tokens are text."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    new = []
    for _ in range(steps):
        logits = thinker(**{**kw, "input_ids": ids, "attention_mask": mask}, use_cache=False).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        new.append(tok)
        ids = torch.cat([ids, tok], dim=1)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
    out = []
    for row in torch.cat(new, dim=1).tolist():
        out.append(row[:row.index(eos)] if eos in row else row)
    return out


def check_heldout(thinker, tokenizer, items, eos: int, device, amp_dtype, steps: int = 40) -> dict:
    """Greedy outputs on the committed held-out set: WER / exact match per (media, kind, task)."""
    thinker.eval()
    res: dict = {}
    picks = [(i, j) for i, it in enumerate(items) for j in range(len(it["examples"]))]
    for start in range(0, len(picks), 32):
        chunk = picks[start:start + 32]
        kw, _, tasks = collate(items, chunk, eos, device, with_targets=False)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            outs = greedy_media(thinker, kw, steps, eos)
        for (i, j), task, out in zip(chunk, tasks, outs):
            target = tokenizer.decode(items[i]["examples"][j][1][:-1])
            got = tokenizer.decode(out)
            e, n = word_errors(target, got)
            voice = items[i]["row"]["voice"] if items[i]["media"] == "audio" else "image"
            key = f"{task}@{voice}"
            r = res.setdefault(key, {"errors": 0, "words": 0, "exact": 0, "n": 0})
            r["errors"] += e
            r["words"] += n
            r["exact"] += got.strip() == target.strip()
            r["n"] += 1
    thinker.train()
    return {k: {"wer": round(v["errors"] / max(1, v["words"]), 4), "exact": round(v["exact"] / v["n"], 4), "n": v["n"]}
            for k, v in sorted(res.items())}


# ---------------------------------------------------------------- model


def load_start(init: Path, config, seed: int, towers: bool = False):
    """A fresh model of the new config with every non-tower tensor of the shipped checkpoint (with towers=True,
    its towers too: a run that continues an earlier multimodal training instead of starting the towers anew)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration(config)
    init_untrained_parts(model, seed=seed)
    shipped = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(init), dtype=torch.float32,
                                                                   trust_remote_code=False, use_kernels=False)
    state = {k: v for k, v in shipped.state_dict().items() if towers or not k.startswith(TOWER_PREFIXES)}
    if towers:
        own = model.state_dict()
        bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if bad:
            sys.exit(f"train_multimodal: --init-towers: {init}'s {bad[0]} is {tuple(state[bad[0]].shape)}, the "
                     f"towers of scripts/omni_tiny_common.build_config want {tuple(own[bad[0]].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:5]
    not_loaded = [k for k in missing if towers or not k.startswith(TOWER_PREFIXES)]
    assert not not_loaded, not_loaded[:5]
    del shipped
    th = model.thinker
    if getattr(th.config, "vision_start_token_id", None) is None:  # get_rope_index reads it (see omnilab.model.multimodal)
        th.config.vision_start_token_id = config.thinker_config.vision_start_token_id
    return model, len(state)


def save(model, thinker_state, out_dir: Path, init: Path, log: dict, shard: str, processor_file: Path) -> None:
    """bf16, per-expert layout, tokenizer + generation config copied from --init, the run's preprocessor_config.json."""
    model.thinker.load_state_dict(thinker_state)
    cpu_model = copy.deepcopy(model).to("cpu").to(torch.bfloat16).eval()
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cpu_model.save_pretrained(tmp, max_shard_size=shard)
    for f in init.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens_map", "added_tokens", "generation_config",
                              "train_log.json")) and f.is_file():  # train_log.json: the text run, for the card
            shutil.copy(f, tmp / f.name)
    shutil.copy(processor_file, tmp / processor_file.name)
    (tmp / "train_mm_log.json").write_text(json.dumps(log, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def export(out_dir: Path, export_dir: Path, part_mb: int) -> list[str]:
    """out_dir as one tar split into parts of part_mb MB (model.tar.part00, ...), each written then renamed."""
    tar = export_dir / "model.tar.tmp"
    with tarfile.open(tar, "w") as t:
        t.add(out_dir, arcname="omni-tiny")
    data = tar.read_bytes()
    tar.unlink()
    names = []
    for k in range(0, len(data), part_mb * 2**20):
        name = f"model.tar.part{k // (part_mb * 2**20):02d}"
        (export_dir / (name + ".tmp")).write_bytes(data[k:k + part_mb * 2**20])
        (export_dir / (name + ".tmp")).replace(export_dir / name)
        names.append(name)
    for old in export_dir.glob("model.tar.part*"):
        if old.name not in names and not old.name.endswith(".tmp"):
            old.unlink()
    return names


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", type=Path, default=MODEL_DIR, help="the shipped text-trained omni-tiny")
    ap.add_argument("--init-towers", action="store_true",
                    help="start the towers from --init too, and keep its preprocessor_config.json: continue an "
                         "earlier multimodal training (new AdamW state, a new warmup) instead of fresh towers")
    ap.add_argument("--tokens-dir", type=Path, default=SCRATCH / "tokens")
    ap.add_argument("--sentences", type=Path, default=SCRATCH / "corpus" / "en.jsonl",
                    help="English training-split documents (build_corpus.py) or a .txt of sentences")
    ap.add_argument("--out", type=Path, default=SCRATCH / "mm")
    ap.add_argument("--export", type=Path, default=None, help="also write the folder as tar parts here")
    ap.add_argument("--export-every", type=float, default=120.0, help="seconds between exports while training")
    ap.add_argument("--part-mb", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--steps", type=int, default=0, help="0: train for --time-budget seconds")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds of training in this call when --steps 0")
    ap.add_argument("--schedule-s", type=float, default=0.0,
                    help="seconds of training the cosine spans over every call of a resumed run (0: --time-budget)")
    ap.add_argument("--resume", type=Path, default=None,
                    help="continue a run: a previous --out folder (its resume.pt has the fp32 weights, AdamW's state, "
                         "the step, the seconds trained and the log); new data is made with this call's --seed")
    ap.add_argument("--deadline", type=float, default=1e9,
                    help="seconds after the script's start by which training stops (data making included)")
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mm-batch", type=int, default=48)
    ap.add_argument("--mm-weight", type=float, default=1.0)
    ap.add_argument("--lr-text", type=float, default=5e-4, help="peak lr of the (already trained) text model")
    ap.add_argument("--lr-towers", type=float, default=2e-3, help="peak lr of the audio and vision towers")
    ap.add_argument("--lr-vision", type=float, default=0.0, help="peak lr of the vision tower (0: --lr-towers)")
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--weights", default="en=4,fr=3,es=2,python=6,arith=49")
    ap.add_argument("--n-speech-sent", type=int, default=10000)
    ap.add_argument("--n-speech-sum", type=int, default=8000)
    ap.add_argument("--n-image-line", type=int, default=6000)
    ap.add_argument("--n-image-sum", type=int, default=5000)
    ap.add_argument("--font-sizes", default="22,34", help="LO,HI pixel sizes of the training images' fonts")
    ap.add_argument("--paper", default="255,255", help="LO,HI grey levels of the training images' paper")
    ap.add_argument("--inverted", type=float, default=0.0, help="fraction of training images in light ink on dark")
    ap.add_argument("--image-norm", choices=["clip", "data"], default="clip",
                    help="the image processor's mean and std: CLIP's (Qwen's) or the training images' own")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--data-budget", type=float, default=1e9, help="seconds for making the data, at most")
    ap.add_argument("--espeak", default=None)
    ap.add_argument("--font-dir", type=Path, default=mmdata.FONT_DIR)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-max-tokens", type=int, default=50_000, help="held-out text tokens per domain")
    ap.add_argument("--heldout-steps", type=int, default=40, help="greedy tokens in the in-run held-out check")
    ap.add_argument("--heldout-limit", type=int, default=0, help="0: every item of data/eval/multimodal")
    ap.add_argument("--max-shard-size", default="5MB")
    args = ap.parse_args()
    font_sizes, paper = pair(args.font_sizes, "--font-sizes"), pair(args.paper, "--paper")
    if args.resume is not None and not (args.resume / "resume.pt").is_file():
        sys.exit(f"train_multimodal: --resume {args.resume}: no resume.pt there (the --out of an earlier call)")

    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    from tokenizers import Tokenizer
    from transformers.utils import logging as hf_logging

    from omnilab.model import multimodal as mm

    hf_logging.set_verbosity_error()
    print(f"start: {platform.node()}, {os.cpu_count()} CPUs, device {device}", flush=True)

    config = config_from_tokenizer(args.init)
    config.thinker_config.text_config.router_aux_loss_coef = args.aux_coef
    t0 = time.time()
    if args.sentences.suffix == ".txt":
        sentences = [s for s in args.sentences.read_text(encoding="utf-8").splitlines() if s.strip()]
    else:
        sentences = mmdata.train_sentences(args.sentences)
    specs = mmdata.train_specs(sentences, args.n_speech_sent, args.n_speech_sum, args.n_image_line,
                               args.n_image_sum, seed=args.seed, sizes=font_sizes,
                               paper=paper, inverted=args.inverted)
    # the processor of the new towers (their mel bins / patch sizes), beside a copy of the tokenizer
    proc_dir = args.out.with_name(args.out.name + "-processor")
    proc_dir.mkdir(parents=True, exist_ok=True)
    for f in args.init.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, proc_dir / f.name)
    if args.resume is not None:  # the first call's processor (its pixel normalisation) throughout
        shutil.copy(args.resume / mm.PREPROCESSOR_FILE, proc_dir / mm.PREPROCESSOR_FILE)
    elif args.init_towers:  # the towers were trained under --init's normalisation: keep it
        if not (args.init / mm.PREPROCESSOR_FILE).is_file():
            sys.exit(f"train_multimodal: --init-towers: {args.init} has no {mm.PREPROCESSOR_FILE}")
        shutil.copy(args.init / mm.PREPROCESSOR_FILE, proc_dir / mm.PREPROCESSOR_FILE)
    elif args.image_norm == "data":
        mean, std = pixel_stats([s for s in specs if s["media"] == "image"][:256], args.font_dir)
        print(f"data: pixel mean {mean:.3f}, std {std:.3f} (256 training images) for the image processor", flush=True)
        mm.write_processor_files(proc_dir, config.thinker_config, image_mean=[mean] * 3, image_std=[std] * 3)
    else:
        mm.write_processor_files(proc_dir, config.thinker_config)
    processor = mm.load_processor(proc_dir)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(EOS)

    # data: synthesize and process (worker processes, before any CUDA use)
    print(f"data: making {len(specs):,} items in {args.workers} processes", flush=True)
    items = make_items(list(enumerate(specs)), proc_dir, args.workers, args.espeak, args.font_dir, args.data_budget)
    if not items:
        sys.exit(f"train_multimodal: no training item was made within --data-budget {args.data_budget:.0f} s")
    held = heldout_items(proc_dir, processor, config.thinker_config)
    held = held[:args.heldout_limit] if args.heldout_limit else held
    print(f"data: {len(held)} held-out items processed", flush=True)
    data_s = time.time() - t0
    picks_all = [(i, j) for i, it in enumerate(items) for j in range(len(it["examples"]))]
    audio_s = sum(it["features"].shape[1] for it in items if it["media"] == "audio") / 100.0
    print(f"data: {len(sentences):,} training sentences; {len(items):,} items ({len(picks_all):,} examples, "
          f"{audio_s:,.0f} s of speech) in {data_s:.1f} s", flush=True)

    model, n_loaded = load_start(args.init, config, args.seed, towers=args.init_towers)
    resume = torch.load(args.resume / "resume.pt", map_location="cpu", weights_only=False) if args.resume else None
    if resume is not None:
        model.thinker.load_state_dict(resume["thinker"])
        print(f"resume: {args.resume} at step {resume['step']}, {resume['trained_s']:.0f} s trained", flush=True)
    thinker = model.thinker
    model.to(device)
    print(f"model: on {device} after {time.time() - t_start:.0f} s", flush=True)
    model.train()
    text_cfg = config.thinker_config.text_config
    audio_tower = [p for n, p in thinker.named_parameters() if n.startswith("model.audio_tower.")]
    vision_tower = [p for n, p in thinker.named_parameters() if n.startswith("model.visual.")]
    towers = audio_tower + vision_tower
    text = [p for n, p in thinker.named_parameters() if n.startswith(("model.language_model.", "lm_head."))]
    trained = towers + text
    ids_trained = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids_trained)
    groups = []
    for params, lr in ((text, args.lr_text), (audio_tower, args.lr_towers), (vision_tower, args.lr_vision or args.lr_towers)):
        groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay, "peak": lr})
        groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "peak": lr})
    opt = torch.optim.AdamW(groups, lr=args.lr_text, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
    print(f"loaded {n_loaded} tensors from {args.init}; trained: {sum(p.numel() for p in text):,} text + "
          f"{sum(p.numel() for p in towers):,} tower parameters", flush=True)

    # text data, as train_tiny.py
    tk = Tokenizer.from_file(str(args.init / "tokenizer.json"))
    arrays = {d: torch.from_numpy(np.load(args.tokens_dir / f"{d}.npy").astype(np.int64)) for d in DOMAINS
              if d != "arith"}  # additions are drawn fresh (AdditionSampler)
    n_rows = rows_per_domain(parse_weights(args.weights), args.text_batch)
    dom_of_row = torch.tensor(sum(([i] * n for i, n in enumerate(n_rows)), []), device=device)
    eval_batches = build_eval_batches(tk, eos, args.seq_len, args.eval_max_tokens)
    sampler = AdditionSampler([(r["a"], r["b"]) for r in read_jsonl(EVAL_DIR / "addition.jsonl")], seed=args.seed + 7)
    sampler.set_token_ids(tk)
    T = args.seq_len
    pos = text_position_ids(args.text_batch, T, device)

    def text_batch() -> torch.Tensor:
        rows = []
        for d, n in zip(DOMAINS, n_rows):
            if d == "arith":
                rows.extend(torch.from_numpy(sampler.rows(n, T + 1)))
                continue
            starts = rng.integers(0, len(arrays[d]) - T - 1, size=n)
            rows.extend(arrays[d][s:s + T + 1] for s in starts)
        return torch.stack(rows).to(device, non_blocking=True)

    step0 = resume["step"] if resume else 0
    trained_before = resume["trained_s"] if resume else 0.0  # seconds of training in the earlier calls
    total = step0 + args.steps if args.steps > 0 else 10**9
    schedule_s = args.schedule_s or args.time_budget
    warm_end_s = [resume["warm_end_s"] if resume else None]  # training seconds at the end of the warmup

    def trained_s() -> float:
        """Seconds of training so far, over every call of the run."""
        return trained_before + time.time() - t_train

    def lr_factor(step: int, trained_s: float) -> float:
        """Linear warmup over --warmup steps, then a cosine to --min-lr-frac: over the steps with --steps, else
        over the seconds of training left of --schedule-s (re-read every step, so the cosine ends when the
        time does whatever the step time turns out to be)."""
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.steps > 0:
            prog = (step - args.warmup) / max(1, total - args.warmup)
        else:
            if warm_end_s[0] is None:
                warm_end_s[0] = trained_s
            prog = (trained_s - warm_end_s[0]) / max(1e-9, schedule_s - warm_end_s[0])
        prog = min(1.0, max(0.0, prog))
        return args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog))

    data = {"sentences": len(sentences), "items": len(items), "examples": len(picks_all),
            "speech_seconds": round(audio_s, 1), "data_wall_s": round(data_s, 1),
            "items_by_media": {m: sum(it["media"] == m for it in items) for m in ("audio", "image")},
            "voices": mmdata.TRAIN_VOICES, "speeds": list(mmdata.TRAIN_SPEEDS), "fonts": mmdata.TRAIN_FONTS}
    call = {"args": {k: str(v) for k, v in vars(args).items()}, "data": data}
    if resume is None:
        log = {"args": call["args"], "steps": [], "evals": [], "data": copy.deepcopy(data), "calls": [call]}
        if args.init_towers and (args.init / "train_mm_log.json").is_file():  # the training this run continues
            log["continues"] = json.loads((args.init / "train_mm_log.json").read_text())
        before = {"text_tokens": 0, "multimodal_tokens": 0, "multimodal_target_tokens": 0, "examples_seen": 0,
                  "eval_wall_s": 0.0, "data_wall_s": 0.0, "script_wall_s": 0.0}
    else:  # one log over the calls: "data" and "summary" add up, "calls" keeps each call's arguments and data
        log = resume["log"]
        log.setdefault("calls", []).append(call)
        for k in ("items", "examples", "speech_seconds", "data_wall_s"):
            log["data"][k] = round(log["data"][k] + data[k], 1)
        for m, n in data["items_by_media"].items():
            log["data"]["items_by_media"][m] += n
        before = {k: log["summary"][k] for k in ("text_tokens", "multimodal_tokens", "multimodal_target_tokens",
                                                 "examples_seen", "eval_wall_s", "data_wall_s", "script_wall_s")}
    acc = {"text": torch.zeros(len(DOMAINS), device=device), "n": 0, "tasks": {}}
    tokens_text = tokens_mm = mm_targets = 0
    t_train = time.time()
    t_export = t_train
    t_eval = 0.0
    step = step0
    perm = rng.permutation(len(picks_all))
    cursor = 0

    def run_eval() -> None:
        nonlocal t_eval
        te = time.time()
        ev = evaluate(thinker, eval_batches, device, amp_dtype, rows=32)
        chk = check_heldout(thinker, tok, held, eos, device, amp_dtype, args.heldout_steps)
        t_eval += time.time() - te
        entry = {"step": step, "elapsed_s": round(trained_s(), 1),
                 "eval_loss": {d: round(v, 4) for d, v in ev.items()}, "heldout_media": chk}
        log["evals"].append(entry)
        print(f"eval @{step}: " + " ".join(f"{d}={v:.3f}" for d, v in ev.items()) + " | " +
              " ".join(f"{k}: wer {v['wer']:.2f} ex {v['exact']:.2f}" for k, v in chk.items()), flush=True)

    def do_export(final: bool) -> None:
        if args.export is None and not final:
            return
        log["summary"] = summary(final)
        state = {k: v.detach().to("cpu", copy=True) for k, v in thinker.state_dict().items()}
        save(model, state, args.out, args.init, log, args.max_shard_size, proc_dir / mm.PREPROCESSOR_FILE)
        if args.export is not None:
            args.export.mkdir(parents=True, exist_ok=True)
            names = export(args.out, args.export, args.part_mb)
            print(f"exported step {step} to {args.export}: {names}", flush=True)
        tmp = args.out / "resume.pt.tmp"  # for --resume, after the export: not part of the shipped folder
        torch.save({"thinker": state, "optimizer": opt.state_dict(), "step": step, "warm_end_s": warm_end_s[0],
                    "trained_s": trained_s(), "log": log}, tmp)
        tmp.replace(args.out / "resume.pt")

    def summary(final: bool) -> dict:
        hw = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__}
        import transformers
        hw["transformers"] = transformers.__version__
        if device.type == "cuda":
            hw["gpu"] = torch.cuda.get_device_name(0)
            hw["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        seen = before["examples_seen"] + (step - step0) * args.mm_batch
        return {"final": final, "steps": step, "calls": len(log["calls"]),
                "text_tokens": before["text_tokens"] + tokens_text,
                "multimodal_tokens": before["multimodal_tokens"] + tokens_mm,
                "multimodal_target_tokens": before["multimodal_target_tokens"] + mm_targets, "examples_seen": seen,
                "epochs_over_examples": round(seen / log["data"]["examples"], 2),
                "train_wall_s": round(trained_s(), 1),
                "eval_wall_s": round(before["eval_wall_s"] + t_eval, 1),
                "data_wall_s": round(before["data_wall_s"] + data_s, 1),
                "script_wall_s": round(before["script_wall_s"] + time.time() - t_start, 1),
                "schedule_s": schedule_s, "hardware": hw,
                "params_text": sum(p.numel() for p in text), "params_towers": sum(p.numel() for p in towers)}

    while step < total:
        for g in opt.param_groups:
            g["lr"] = g["peak"] * lr_factor(step, trained_s())
        # text batch
        x = text_batch()
        inp, tgt = x[:, :-1], x[:, 1:]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            out = thinker(input_ids=inp, position_ids=pos[:, :inp.shape[0]], use_cache=False, output_router_logits=True)
        tok_loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), tgt.reshape(-1), reduction="none")
        row_loss = tok_loss.view(inp.shape[0], -1).mean(dim=1)
        aux = per_layer_balance_loss(out.router_logits, text_cfg.num_experts, text_cfg.num_experts_per_tok)
        loss = row_loss.mean() + args.aux_coef * aux
        del out
        # multimodal batch
        if cursor + args.mm_batch > len(perm):
            perm, cursor = rng.permutation(len(picks_all)), 0
        picks = [picks_all[k] for k in perm[cursor:cursor + args.mm_batch]]
        cursor += args.mm_batch
        kw, labels, tasks = collate(items, picks, eos, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            mo = thinker(**kw, use_cache=False)
        lg = mo.logits[:, :-1].float()  # [B, T - 1, V]
        lab = labels[:, 1:]  # [B, T - 1]
        mm_tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="none")
        mm_tok = mm_tok.view(lab.shape)
        per_ex = mm_tok.sum(1) / (lab != -100).sum(1).clamp(min=1)  # [B]
        loss = loss + args.mm_weight * mm_tok.sum() / (lab != -100).sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)
        opt.step()
        del mo, lg

        with torch.no_grad():
            acc["text"] += torch.zeros(len(DOMAINS), device=device).index_add_(0, dom_of_row, row_loss.detach())
            for t, v in zip(tasks, per_ex.detach()):
                s = acc["tasks"].setdefault(t, [torch.zeros((), device=device), 0])
                s[0] += v
                s[1] += 1
            acc["n"] += 1
        tokens_text += inp.numel()
        tokens_mm += int(kw["attention_mask"].sum())
        mm_targets += int((labels != -100).sum())
        step += 1
        elapsed = time.time() - t_train
        if args.steps == 0:
            if elapsed > args.time_budget or time.time() - t_start > args.deadline:
                total = step
        if step % args.log_every == 0 or step == total:
            text_l = (acc["text"] / torch.tensor(n_rows, device=device).clamp(min=1) / acc["n"]).tolist()
            task_l = {t: round(float(v[0] / v[1]), 4) for t, v in sorted(acc["tasks"].items())}
            entry = {"step": step, "elapsed_s": round(trained_before + elapsed, 1), "lr_factor": round(g["lr"] / g["peak"], 4),
                     "grad_norm": round(float(gnorm), 3), "text_loss": dict(zip(DOMAINS, [round(v, 4) for v in text_l])),
                     "task_loss": task_l}
            log["steps"].append(entry)
            print(f"step {step} {elapsed:.0f}s " + " ".join(f"{d}={v:.3f}" for d, v in zip(DOMAINS, text_l)) + " | "
                  + " ".join(f"{t}={v:.3f}" for t, v in task_l.items()), flush=True)
            acc = {"text": torch.zeros(len(DOMAINS), device=device), "n": 0, "tasks": {}}
        if step % args.eval_every == 0 or step == total:
            run_eval()
        if args.export is not None and time.time() - t_export > args.export_every and step < total:
            do_export(final=False)
            t_export = time.time()

    if device.type == "cuda":
        torch.cuda.synchronize()
    do_export(final=True)
    print(json.dumps(log["summary"], indent=1), flush=True)


if __name__ == "__main__":
    main()
