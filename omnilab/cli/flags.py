"""What the verbs share: the flags' value types (argparse `type=` functions, each refusing a bad value in one
line naming the flag) and `print_json`, the `--json` output of every verb (docs/DESIGN.md's command-line contract)."""

from __future__ import annotations

import argparse
import json
import sys

from omnilab.jsonio import jsonable
from omnilab.units import parse_size


def parse_ids(text: str, flag: str = "--input-ids") -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}") from None


MAX_PROMPT_CHARS = 4 * 2**20  # a longer --prompt is cut here before tokenizing (the position check then refuses it)


def parse_seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes an integer, got {text!r}") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be in 0..2**63-1, got {text}")
    return seed


def parse_text(text: str) -> str:
    """--prompt: text that is valid UTF-8 (argv bytes that are not arrive as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"--prompt is not valid UTF-8 (byte {e.start} of the prompt)") from None
    return text


def parse_stop_ids(text: str) -> list[int]:
    """--stop-ids: comma-separated token ids, or 'none' to stop only at --max-new-tokens."""
    return [] if text.strip().lower() == "none" else parse_ids(text, "--stop-ids")


def parse_budget(text: str):
    """--expert-budget: auto, all, or a size (8GB, 512MiB)."""
    return text if text in ("auto", "all") else parse_size(text)


def parse_batch_tokens(text: str):
    """--batch-tokens: auto, or a positive number of padded tokens."""
    if text == "auto":
        return text
    try:
        tokens = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-tokens takes auto or a number of tokens, got {text!r}") from None
    if tokens < 1:
        raise argparse.ArgumentTypeError(f"--batch-tokens must be positive, got {text}")
    return tokens


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=jsonable)
    sys.stdout.write("\n")
