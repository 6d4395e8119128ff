"""Opening the tokenizer beside a checkpoint, through transformers, quietly.

`open_tokenizer` raises what transformers raises (the tokenizer check in omnilab.vocab reports it);
`load_tokenizer` is what the model uses: the tokenizer, or None (with a warning when files are present but
unreadable: prompts can still be given as token ids). `quiet_transformers` silences transformers' info lines
and progress bars while it loads or writes something.
"""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """The tokenizer files present in a folder (empty when there is no tokenizer to check)."""
    folder = Path(folder)
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    usable = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & set(present) or \
        {"vocab.json", "merges.txt"} <= set(present)
    return present if usable else []


class quiet_transformers:
    """Context manager: transformers' logging at error level and its progress bars off; restored on exit. Its
    stdin is empty meanwhile: no loader can ever ask a question on the terminal (omnilab never runs a
    checkpoint's code: every loader gets trust_remote_code=False, and a prompt would read end-of-file)."""

    def __enter__(self):
        import io
        import sys

        from transformers.utils import logging

        self._stdin, sys.stdin = sys.stdin, io.StringIO("")
        self._verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        import sys

        from transformers.utils import logging

        sys.stdin = self._stdin
        logging.set_verbosity(self._verbosity)
        logging.enable_progress_bar()


def error_line(e: Exception) -> str:
    """An exception as one line: its class and the first line of its message."""
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{e.__class__.__name__}: {first_line}"


def open_tokenizer(folder):
    """transformers' AutoTokenizer for a folder, its logging quieted; raises what transformers raises."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def load_tokenizer(folder: Path):
    """The tokenizer beside a checkpoint, or None when there is none (a warning when its files are unreadable)."""
    if not tokenizer_files(folder):
        return None
    try:
        return open_tokenizer(folder)
    except Exception as e:  # a broken tokenizer must not stop the model: prompts can still be given as ids
        import warnings

        warnings.warn(f"{folder}: tokenizer files present but unreadable ({error_line(e)}); give prompts as token ids",
                      stacklevel=2)
        return None


def stream_pieces(tokenizer, ids) -> list[str]:
    """The text each token adds as `ids` is decoded in order (not byte-level BPE pieces such as 'Ġ'); a
    character split over several tokens shows whole at its last one, '…' at the ones before."""
    pieces, done = [], ""
    for j in range(len(ids)):
        text = tokenizer.decode(ids[:j + 1])
        partial = text.endswith("\ufffd")
        pieces.append("…" if partial else text[len(done):])
        done = done if partial else text
    return pieces
