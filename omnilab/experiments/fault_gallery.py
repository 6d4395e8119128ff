"""The fault gallery: each failure of a hand extraction injected at one layer and compared with transformers, hook
by hook, and its table."""

from __future__ import annotations

import torch

from omnilab.checkpoint import Checkpoint
from omnilab.model.faults import DefaultNorms, Fault, RandomAttention, RouterMask, SalienceMix, ZeroedExpert


def standard_faults(config, layer: int, expert: int) -> dict[str, Fault]:
    """The five failures of hand extractions, each injected at `layer` (ZeroedExpert: `expert` of that layer).
    The router mask keeps experts 0-7 (the first half of the experts when a model has 8 or fewer)."""
    keep = tuple(range(8 if config.num_experts > 8 else config.num_experts // 2))
    return {
        "attention at random init": RandomAttention(layer),
        "norms at default init": DefaultNorms(layer),
        f"router masked to experts {keep[0]}-{keep[-1]}": RouterMask(keep, layer),
        "router logits 0.5 x logits + 0.5 x salience": SalienceMix(0.5, layer=layer),
        f"expert {expert} up/down zeroed": ZeroedExpert(layer, expert),
    }


def fault_gallery(checkpoint, reference, input_ids, layer: int | None = None, dtype="float32") -> dict:
    """Run every standard fault against `reference` on `input_ids`: name -> (fault, Comparison).
    layer None: the middle MoE layer. The zeroed expert is the one the reference routes the first token to."""
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.model.hooks import compare_activations, divergence_rtol, run_with_cache

    input_ids = torch.as_tensor(input_ids).reshape(1, -1)
    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)  # opened once
    config = reference.config
    if layer is None:
        layer = config.moe_layers[len(config.moe_layers) // 2]
    if layer not in config.moe_layers:
        raise ValueError(f"layer {layer} has no experts (MoE layers: {config.moe_layers})")
    name = f"blocks.{layer}.mlp.hook_topk_indices"
    _, ref_acts = run_with_cache(reference, input_ids)  # every hook, once for all the faults
    expert = int(ref_acts[name][0, 0])
    out = {}
    for label, fault in standard_faults(config, layer, expert).items():
        model = SelectiveMoE.from_checkpoint(checkpoint, dtype=dtype, faults=[fault], tokenizer=False)
        _, acts = run_with_cache(model, input_ids.to(model.device))
        out[label] = (fault, compare_activations(ref_acts, acts, rtol=divergence_rtol(reference, model),
                                                 names=reference.hook_names()))
    return out


def gallery_table(gallery: dict):
    """fault_gallery's result as a table: one row per fault (kind, layer, first divergence, logits rel_err, top-1
    agreement, KL)."""
    import pandas as pd

    return pd.DataFrame([{"fault": name, "kind": type(fault).__name__, "injected at layer": fault.layer,
                          "first divergence": res.first_divergence, "logits rel_err": res.logits_rel_err,
                          "top-1 agreement": res.top1_agreement, "KL": res.kl}
                         for name, (fault, res) in gallery.items()])
