"""What masking missing experts costs (notebook 02): the selective model on partial extractions, against the full model."""

from __future__ import annotations

import pandas as pd
import torch

from omnilab.experiments.eval_data import EvalSet
from omnilab.experiments.measures import next_token_logprobs, quality
from omnilab.memory import release_memory


def masking_cost(folder, evalset: EvalSet, reference: list[torch.Tensor], **load_options) -> dict:
    """The selective model on a partial extraction FOLDER with its missing experts masked, against `reference`
    (next_token_logprobs of the full model): KL, top-1 agreement, and the routed choices that fell on a missing
    expert (count and share of all choices). load_options: device, dtype, expert_budget of omnilab.runtime's
    `load` ("auto" each by default; give the full model's, so that both sides compute alike)."""
    from omnilab.runtime.model import load

    model = load(folder, mask_missing_experts=True, tokenizer=False, **load_options)
    q = quality(next_token_logprobs(model, evalset), reference, evalset)
    cfg = model.config
    routed = sum(len(ids) for _, ids in evalset.docs) * cfg.num_experts_per_tok * len(cfg.moe_layers)
    masked = model.cache.stats.masked_choices
    del model  # freed now, before a sweep loads the next one
    release_memory()
    return {"kl": q["kl"], "top1_agreement": q["top1_agreement"], "masked_choices": masked,
            "masked_share": masked / routed}


def masking_sweep(checkpoint, evalset: EvalSet, reference: list[torch.Tensor], counts, scratch, *,
                  workers: int = 2, link_from=None, **load_options) -> pd.DataFrame:
    """masking_cost of extractions keeping the first n experts of every layer, for each n in `counts` (at least
    top-k; each extracted into SCRATCH in turn, resumably, and each model freed before the next): one row per n
    (experts, experts_share, kl, ...). `link_from`: an extraction of the same checkpoint whose verified files are
    hard-linked instead of copied (omnilab.extraction.write.extract)."""
    from omnilab.checkpoint import Checkpoint
    from omnilab.extraction.write import extract

    cfg, _ = Checkpoint(checkpoint).arch
    rows = []
    for n in sorted(set(counts)):
        if n < cfg.num_experts_per_tok:
            continue
        extract(checkpoint, scratch, components="backbone,experts", experts=list(range(n)), workers=workers,
                progress=False, link_from=link_from)
        rows.append({"experts": n, "experts_share": n / cfg.num_experts,
                     **masking_cost(scratch, evalset, reference, **load_options)})
    return pd.DataFrame(rows)
