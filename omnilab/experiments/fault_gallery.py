"""The fault gallery: each failure of a hand extraction injected at one layer and compared with transformers, hook
by hook, and its table.

Streamed (no `reference` given, what notebook 03 runs at any scale): the transformers reference streams only the
layers around the fault (omnilab.reference.streamed, `layers`), once for all the faults, its chain starting at the
first of them from the clean selective model's input there (every layer before the fault is the clean model's);
each faulted selective model is loaded, recorded and freed in turn. Memory stays at one selective backbone, one
layer of the reference and the activations; the reference reads `2 * window + 1` layers, not the whole model once
per fault. The logits row is against the clean selective model (which notebook 03's main comparison holds to
transformers), since the reference stops after the window.
"""

from __future__ import annotations

import torch

from omnilab.checkpoint import Checkpoint
from omnilab.model.faults import DefaultNorms, Fault, RandomAttention, RouterMask, SalienceMix, ZeroedExpert


class FaultGallery(dict):
    """name -> (fault, Comparison), with `layers` (the decoder layers the reference streamed; None: the whole
    reference model) and `peak_rss_bytes` (the streamed gallery's peak anonymous RSS)."""

    layers: list | None = None
    peak_rss_bytes: int | None = None


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


def fault_window(config, layer: int, window: int) -> list[int]:
    """The decoder layers compared around a fault at `layer`: `window` on each side, within the model."""
    return list(range(max(0, layer - window), min(config.num_hidden_layers - 1, layer + window) + 1))


def fault_gallery(checkpoint, reference=None, input_ids=None, layer: int | None = None, dtype="float32", *,
                  window: int = 1, device="cpu", expert_budget: int | None = None) -> FaultGallery:
    """Run every standard fault against transformers on `input_ids`: name -> (fault, Comparison).
    layer None: the middle MoE layer. The zeroed expert is the one the reference routes the first token to.

    reference: a whole transformers model (omnilab.reference.whole.Reference) to compare every hook against; None
    (the default): the reference streamed over the fault's layer and `window` layers on each side (see the module's
    docstring). expert_budget: bytes of experts each selective model holds (default: one layer's worth)."""
    from omnilab.model.hooks import compare_activations, divergence_rtol, run_with_cache

    if input_ids is None:
        raise ValueError("fault_gallery needs input_ids")
    input_ids = torch.as_tensor(input_ids).reshape(1, -1)
    checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)  # opened once
    config = checkpoint.arch[0] if reference is None else reference.config
    if layer is None:
        layer = config.moe_layers[len(config.moe_layers) // 2]
    if layer not in config.moe_layers:
        raise ValueError(f"layer {layer} has no experts (MoE layers: {config.moe_layers})")
    if reference is None:
        return _streamed(checkpoint, input_ids, layer, dtype, window, device, expert_budget)
    from omnilab.model.decoder import SelectiveMoE

    name = f"blocks.{layer}.mlp.hook_topk_indices"
    _, ref_acts = run_with_cache(reference, input_ids)  # every hook, once for all the faults
    expert = int(ref_acts[name][0, 0])
    out = FaultGallery()
    for label, fault in standard_faults(config, layer, expert).items():
        model = SelectiveMoE.from_checkpoint(checkpoint, dtype=dtype, faults=[fault], tokenizer=False)
        _, acts = run_with_cache(model, input_ids.to(model.device))
        out[label] = (fault, compare_activations(ref_acts, acts, rtol=divergence_rtol(reference, model),
                                                 names=reference.hook_names()))
    return out


@torch.no_grad()
def _streamed(checkpoint, input_ids, layer: int, dtype, window: int, device, expert_budget) -> FaultGallery:
    from omnilab.dtypes import as_dtype
    from omnilab.memory import AnonPeak, release_memory
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.model.hooks import DIVERGENCE_RTOL, LOGITS, compare_activations, run_with_cache
    from omnilab.reference.compare import one_layer_budget, window_names
    from omnilab.reference.streamed import StreamedReference

    config, _ = checkpoint.arch
    dtype = as_dtype(dtype)
    budget = one_layer_budget(config, dtype) if expert_budget is None else expert_budget
    layers = fault_window(config, layer, window)
    names = window_names(config, layers) + [LOGITS]
    rtol = DIVERGENCE_RTOL.get(dtype, DIVERGENCE_RTOL[torch.float32])
    load = lambda faults: SelectiveMoE.from_checkpoint(checkpoint, dtype=dtype, device=device,  # noqa: E731
                                                        expert_budget=budget, faults=faults, tokenizer=False)
    out = FaultGallery()
    with AnonPeak() as peak:
        model = load(())
        ids = input_ids.to(model.device)
        _, clean = run_with_cache(model, ids)
        del model
        release_memory()
        reference = StreamedReference(checkpoint, device=device)
        run = reference.run(input_ids, [dtype], local_inputs=clean, layers=layers)
        ref_acts = {**run.chained[dtype], LOGITS: clean[LOGITS]}  # logits: the clean selective model's
        out.layers = list(reference.streamed_layers)
        del reference, run
        expert = int(ref_acts[f"blocks.{layer}.mlp.hook_topk_indices"][0, 0])
        for label, fault in standard_faults(config, layer, expert).items():
            model = load([fault])
            _, acts = run_with_cache(model, ids, names=names)
            del model
            release_memory()
            out[label] = (fault, compare_activations(ref_acts, acts, rtol=rtol, names=names))
    out.peak_rss_bytes = peak.peak
    return out


def gallery_table(gallery: dict):
    """fault_gallery's result as a table: one row per fault (kind, layer, first divergence ("none" for a fault that
    changed nothing, e.g. norms at their default init on a random checkpoint), logits rel_err, top-1 agreement, KL)."""
    import pandas as pd

    return pd.DataFrame([{"fault": name, "kind": type(fault).__name__, "injected at layer": fault.layer,
                          "first divergence": res.first_divergence or "none", "logits rel_err": res.logits_rel_err,
                          "top-1 agreement": res.top1_agreement, "KL": res.kl}
                         for name, (fault, res) in gallery.items()])
