"""Tokenizer check: does the tokenizer beside a checkpoint fit its embedding matrix?

Qwen checkpoints pad the embedding past the tokenizer: Qwen3-Omni-30B-A3B has 152,064 embedding rows and a
tokenizer of about 151,670 tokens. That is padding (rows no token maps to, which a sampler must never emit),
not a mismatch. A mismatch is a token id at or past the last row: that token would index out of range.

The tokenizer is loaded by transformers (`AutoTokenizer.from_pretrained`) when tokenizer files are present;
the embedding rows come from the embed tensor's shape in the checkpoint's headers (no weights are read).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omnilab.checkpoint import Problem
from omnilab.tokenizer import error_line, open_tokenizer, tokenizer_files


@dataclass
class TokenizerReport:
    """A tokenizer against the embedding: sizes, special tokens and the verdict."""

    folder: str
    files: list[str]
    tokenizer_class: str | None = None
    size: int | None = None  # len(tokenizer): regular + added tokens
    max_id: int | None = None  # the highest id any token maps to
    special_tokens: dict[str, int] = field(default_factory=dict)  # token -> id
    embedding_tensor: str | None = None
    embedding_rows: int | None = None  # rows of the embed tensor on disk
    config_vocab_size: int | None = None
    verdict: str = "unknown"  # match | padding | mismatch | unreadable | unknown (no embedding to compare)
    padding_rows: int = 0  # embedding rows no token maps to (when verdict is padding)
    out_of_range: dict[str, int] = field(default_factory=dict)  # tokens whose id >= embedding rows (first 10)
    error: str | None = None
    # config keys whose token id the tokenizer contradicts: key -> {config, token, tokenizer}
    special_mismatch: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One human line, e.g. 'tokenizer: 151,669 tokens (highest id 151,668) vs 152,064 embedding rows: padding'."""
        if self.verdict == "unreadable":
            return f"tokenizer: unreadable ({self.error})"
        head = f"tokenizer: {self.size:,} tokens (highest id {self.max_id:,})"
        if self.embedding_rows is None:
            return f"{head}; no embedding tensor to compare with"
        head += f" vs {self.embedding_rows:,} embedding rows: {self.verdict}"
        if self.verdict == "padding":
            return f"{head} ({self.padding_rows:,} rows no token maps to; never sample them)"
        if self.verdict == "mismatch":
            first = ", ".join(f"{t!r}={i}" for t, i in list(self.out_of_range.items())[:3])
            return f"{head} ({len(self.out_of_range)}+ ids past the last row, e.g. {first})"
        return head

    def problems(self) -> list[Problem]:
        """The tokenizer's problems: `problem()` plus one `special_tokens` problem per config token id the
        tokenizer contradicts (the wrong tokenizer beside a Qwen3-Omni checkpoint: audio and images break)."""
        out = [p] if (p := self.problem()) is not None else []
        for key, m in self.special_mismatch.items():
            found = (f"maps it to id {m['tokenizer']}" if m["tokenizer"] is not None else
                     f"has no such token (id {m['config']} is {m['id_is']!r} there)")
            out.append(Problem("special_tokens", f"config.json's {key} is {m['config']} ({m['token']}), but the "
                                                 f"tokenizer in {self.folder} {found}: the wrong tokenizer for "
                                                 f"this checkpoint"))
        return out

    def problem(self) -> Problem | None:
        """A `tokenizer` Problem when the tokenizer cannot be used with this embedding, else None."""
        if self.verdict == "mismatch":
            token, i = next(iter(self.out_of_range.items()))
            return Problem("tokenizer", f"tokenizer in {self.folder} maps {token!r} to id {i}, but "
                                        f"{self.embedding_tensor} has only {self.embedding_rows} rows "
                                        f"(highest id {self.max_id})", tensor=self.embedding_tensor)
        if self.verdict == "unreadable":
            return Problem("tokenizer", f"tokenizer in {self.folder} cannot be loaded: {self.error}")
        return None


# config.json keys (top level or thinker_config) naming a token id, and the token Qwen3-Omni's tokenizer has there
CONFIG_TOKEN_IDS = {
    "audio_token_id": "<|audio_pad|>", "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
    "audio_start_token_id": "<|audio_start|>", "audio_end_token_id": "<|audio_end|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    "im_start_token_id": "<|im_start|>", "im_end_token_id": "<|im_end|>",
}


def config_token_ids(config: dict) -> dict[str, int]:
    """The token ids config.json names (CONFIG_TOKEN_IDS keys), from its top level and its thinker_config."""
    found = {}
    for d in (config, config.get("thinker_config") if isinstance(config, dict) else None):
        if isinstance(d, dict):
            found.update({k: d[k] for k in CONFIG_TOKEN_IDS if type(d.get(k)) is int})
    return found


def check_tokenizer(folder: str | os.PathLike, embedding_rows: int | None = None,
                    embedding_tensor: str | None = None, config_vocab_size: int | None = None,
                    config_ids: dict[str, int] | None = None) -> TokenizerReport | None:
    """Load the tokenizer in `folder` and compare it with the embedding, and with the token ids config.json
    names (`config_ids`, see `config_token_ids`). None when the folder has no tokenizer."""
    files = tokenizer_files(folder)
    if not files:
        return None
    report = TokenizerReport(str(folder), files, embedding_tensor=embedding_tensor, embedding_rows=embedding_rows,
                             config_vocab_size=config_vocab_size)
    try:
        tok = open_tokenizer(folder)
        vocab = tok.get_vocab()
    except Exception as e:  # tokenizer loading fails in many library-specific ways; report it as one line
        report.verdict, report.error = "unreadable", error_line(e)
        return report
    report.tokenizer_class = type(tok).__name__
    report.size = len(tok)
    report.max_id = max(vocab.values()) if vocab else -1
    specials = {str(a): i for i, a in sorted(tok.added_tokens_decoder.items()) if a.special}
    for t in tok.all_special_tokens:
        if t not in specials and t in vocab:
            specials[t] = vocab[t]
    report.special_tokens = dict(sorted(specials.items(), key=lambda kv: kv[1]))
    by_id = {i: t for t, i in vocab.items()}
    for key, i in (config_ids or {}).items():  # a contradiction: the id is another token, or the token another id
        token = CONFIG_TOKEN_IDS[key]
        have = vocab.get(token)
        if (have is not None and have != i) or (i in by_id and by_id[i] != token):
            report.special_mismatch[key] = {"config": i, "token": token, "tokenizer": have,
                                            "id_is": by_id.get(i)}
    rows = embedding_rows if embedding_rows is not None else config_vocab_size
    if rows is None:
        return report
    report.embedding_rows = rows
    if report.max_id >= rows:
        report.verdict = "mismatch"
        report.out_of_range = dict(sorted(((t, i) for t, i in vocab.items() if i >= rows), key=lambda kv: kv[1])[:10])
    elif report.size == rows:
        report.verdict = "match"
    else:
        report.verdict, report.padding_rows = "padding", rows - report.size
    return report


def check_checkpoint_tokenizer(inv) -> TokenizerReport | None:
    """The tokenizer check for an `omnilab.inventory.Inventory`: its folder, embed tensor and config."""
    ckpt, layout = inv.checkpoint, inv.layout
    name = f"{layout.prefix}embed_tokens.weight"
    rows = int(ckpt.tensors.at[name, "shape"][0]) if name in ckpt.tensors.index and ckpt.tensors.at[name, "shape"] else None
    vocab_size = inv.config.vocab_size if inv.config is not None else None
    return check_tokenizer(ckpt.root, rows, name if rows is not None else None, vocab_size,
                           config_token_ids(ckpt.config))
