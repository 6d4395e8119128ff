"""Mix omni-tiny's text model back toward the text-only weights: weight-space ensembling after fine-tuning.

The multimodal run (scripts/train_multimodal.py) fine-tunes the whole thinker, and the longer it trains the more
its text perplexity drifts from the text-only model it started from (1,331 steps: English 24.18 -> 26.47). WiSE-FT
(Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022) interpolates the fine-tuned and the original
weights: for a fine-tune from a common start the path between them keeps most of both abilities. This script does
that for the text model only:

    text model = alpha * RUN + (1 - alpha) * TEXT_ONLY      (thinker.model.*, thinker.lm_head.*)
    towers (thinker.audio_tower.*, thinker.visual.*), talker, code2wav, config, processor: RUN's, unchanged

RUN's text model must descend from TEXT_ONLY's (same names and shapes; the shipped run started from it). The
result is written shard by shard in RUN's layout into a temporary folder, then renamed to OUT; its
train_mm_log.json records the mix ("text_weight_mix"), which the model card reports.

    python scripts/mix_text_weights.py RUN TEXT_ONLY OUT --alpha 0.7 [--text-only-label "commit 521c13f"]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TEXT_PREFIXES = ("thinker.model.", "thinker.lm_head.")  # the checkpoint's names of the text model (not the towers)
INDEX = "model.safetensors.index.json"


def weight_map(folder: Path) -> dict[str, str]:
    path = folder / INDEX
    if not path.is_file():
        sys.exit(f"mix_text_weights: {path}: not found (a sharded safetensors checkpoint folder is needed)")
    return json.loads(path.read_text())["weight_map"]


def mix(run: Path, text_only: Path, out: Path, alpha: float, label: str) -> int:
    """Writes OUT; returns the number of tensors mixed. On any error no OUT and no temporary folder is left."""
    run_map, old_map = weight_map(run), weight_map(text_only)
    tmp = out.with_name(out.name + ".tmp-mix")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(run, tmp, ignore=shutil.ignore_patterns("*.safetensors", "resume.pt", "eval_results.json"))
    try:
        mixed = write_shards(run, text_only, tmp, sorted(set(run_map.values())), old_map, alpha)
    except BaseException:  # a named mismatch (SystemExit) or anything else
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_path = tmp / "train_mm_log.json"
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        log["text_weight_mix"] = {"alpha": alpha, "text_only": label or str(text_only), "tensors": mixed,
                                  "prefixes": list(TEXT_PREFIXES)}
        log_path.write_text(json.dumps(log, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return mixed


def write_shards(run: Path, text_only: Path, tmp: Path, shards: list[str], old_map: dict, alpha: float) -> int:
    """RUN's shards into tmp with the text model's tensors mixed; returns how many were mixed. Each of
    TEXT_ONLY's shards is opened once."""
    from contextlib import ExitStack

    from safetensors import safe_open
    from safetensors.torch import save_file

    mixed = 0
    with ExitStack() as stack:
        old = {f: stack.enter_context(safe_open(text_only / f, "pt")) for f in sorted(set(old_map.values()))}
        for shard in shards:
            tensors = {}
            with safe_open(run / shard, "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if name.startswith(TEXT_PREFIXES):
                        if name not in old_map:
                            sys.exit(f"mix_text_weights: {name}: in {run} but not in {text_only}")
                        o = old[old_map[name]].get_tensor(name)
                        if o.shape != t.shape:
                            sys.exit(f"mix_text_weights: {name}: shape {tuple(t.shape)} in {run}, "
                                     f"{tuple(o.shape)} in {text_only}")
                        t = (alpha * t.float() + (1 - alpha) * o.float()).to(t.dtype)
                        mixed += 1
                    tensors[name] = t.contiguous()
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
    return mixed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the multimodal run's folder")
    ap.add_argument("text_only", type=Path, help="the text-only omni-tiny it started from")
    ap.add_argument("out", type=Path)
    ap.add_argument("--alpha", type=float, default=0.7, help="weight of the run (1: the run unchanged)")
    ap.add_argument("--text-only-label", default="", help="how the card names the text-only weights")
    args = ap.parse_args()
    if not 0.0 <= args.alpha <= 1.0:
        sys.exit(f"mix_text_weights: --alpha {args.alpha}: must be within [0, 1]")
    for d in (args.run, args.text_only):
        if not d.is_dir():
            sys.exit(f"mix_text_weights: {d}: not a folder")
    n = mix(args.run, args.text_only, args.out, args.alpha, args.text_only_label)
    print(f"mixed {n} text-model tensors at alpha {args.alpha} -> {args.out}")


if __name__ == "__main__":
    main()
