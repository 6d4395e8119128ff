"""Measures of one model against another on an eval set: next-token log-probabilities, KL / top-1 agreement /
perplexity, addition accuracy, and the resident bytes of the backbone."""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from omnilab.experiments.eval_data import EvalSet
from omnilab.model.routing import RoutingOptions


@torch.no_grad()
def next_token_logprobs(model, evalset: EvalSet, routing: RoutingOptions | None = None) -> list[torch.Tensor]:
    """log-softmax of the next-token logits, one [T, V] tensor per document (routing: the model's own by default)."""
    return [F.log_softmax(model(torch.tensor([ids], device=model.device), routing=routing)[0].float(), dim=-1).cpu()
            for _, ids in evalset.docs]


def quality(logprobs: list[torch.Tensor], reference: list[torch.Tensor], evalset: EvalSet) -> dict:
    """KL(reference || logprobs) and top-1 agreement over every position; perplexity per domain over the
    documents' actual next tokens."""
    kl, agree, n = 0.0, 0, 0
    nll: dict[str, list[float]] = {}
    for lp, ref, (domain, ids) in zip(logprobs, reference, evalset.docs):
        kl += float((ref.exp() * (ref - lp)).sum())
        agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        n += lp.shape[0]
        target = torch.tensor(ids[1:])
        nll.setdefault(domain, []).extend((-lp[:-1].gather(1, target[:, None])[:, 0]).tolist())  # [T - 1]
    out = {"kl": kl / n, "top1_agreement": agree / n}
    out.update({f"ppl_{d}": math.exp(float(np.mean(v))) for d, v in nll.items()})
    return out


def addition_accuracy(model, evalset: EvalSet, max_new_tokens: int = 5, routing: RoutingOptions | None = None) -> float:
    """Share of addition prompts whose greedy continuation starts with the right number."""
    if not evalset.addition or model.tokenizer is None:
        return float("nan")
    gen = model.generate([p for p, _ in evalset.addition], max_new_tokens=max_new_tokens, greedy=True, routing=routing)
    right = 0
    for new, (_, answer) in zip(gen.new_token_ids, evalset.addition):
        m = re.match(r"\s*(\d+)", model.tokenizer.decode(new))
        right += bool(m and m.group(1) == answer)
    return right / len(evalset.addition)


def backbone_bytes(model) -> int:
    """Bytes of everything resident apart from experts (parameters and buffers, tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
