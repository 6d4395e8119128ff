"""Eval sets: held-out documents scored teacher-forced, prompts decoded, addition problems; the split of a
domain's documents into scored and calibration halves."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch


@dataclass
class EvalSet:
    """docs: (domain, token ids) scored teacher-forced; prompts: (domain, ids) decoded for speed and cache;
    addition: (prompt ids, answer text)."""

    docs: list[tuple[str, list[int]]]
    prompts: list[tuple[str, list[int]]]
    addition: list[tuple[list[int], str]] = field(default_factory=list)


def make_eval_set(tokenizer, docs: pd.DataFrame, prompts: pd.DataFrame, addition: pd.DataFrame | None = None, *,
                  max_tokens: int = 64) -> EvalSet:
    """Tokenize documents (first max_tokens tokens), prompts (a `prompt` or `text` column) and addition
    problems (`prompt`, `answer`)."""
    enc = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    text = "prompt" if "prompt" in prompts.columns else "text"
    return EvalSet(docs=[(d, ids[:max_tokens]) for d, t in zip(docs["domain"], docs["text"])
                         if len(ids := enc(t)) > 1],
                   prompts=[(d, enc(t)) for d, t in zip(prompts["domain"], prompts[text])],
                   addition=[] if addition is None else [(enc(p), str(a)) for p, a in zip(addition["prompt"],
                                                                                          addition["answer"])])


def split_scored(docs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Documents split in two halves per domain, alternating in order: (scored, calibration). Notebook 05 scores
    the first half and traces the second to measure each expert's load (the salience router's calibration)."""
    scored = (docs.groupby("domain", sort=False).cumcount() % 2 == 0).to_numpy()
    return docs[scored], docs[~scored]


def eval_set_for(model, docs: pd.DataFrame, *, max_tokens: int = 64, random_docs: int = 4, seed: int = 0) -> EvalSet:
    """Scored documents for `model`: `docs` through its tokenizer (its first row also as the one decoding prompt),
    or, when the checkpoint has no tokenizer, `random_docs` documents of max_tokens random token ids."""
    if model.tokenizer is not None:
        return make_eval_set(model.tokenizer, docs, docs.head(1), max_tokens=max_tokens)
    g = torch.Generator().manual_seed(seed)
    return EvalSet(docs=[("random", torch.randint(0, model.config.vocab_size, (max_tokens,), generator=g).tolist())
                         for _ in range(random_docs)], prompts=[])
