"""Fault injection: the failures that hand-built selective loaders hit, as options of the selective model.

Each fault is a small frozen dataclass passed to `SelectiveMoE.from_checkpoint(path, faults=[...])`; none is
on by default and none forks the model code. A fault acts at one of three places, each a method that is the
identity unless the fault overrides it:

- `on_backbone(state, config)`: the resident weights as loaded (state-dict names of the selective model);
- `on_router_logits(layer, logits)`: the router's logits after `hook_router_logits`, before softmax / top-k;
- `on_expert(layer, expert, weights)`: one expert's weights as the ExpertStore loads them.

`omnilab.hooks.compare` then shows the first hook where the run leaves the reference, and how far it drifts.
(Checkpoint-breaking helpers for the inventory / verify tests are a different thing: omnilab/breakage.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnilab.checkpoint import Checkpoint


class Fault:
    """Base: every method leaves its input alone."""

    def on_backbone(self, state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        return state

    def on_router_logits(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def on_expert(self, layer: int, expert: int, weights):
        return weights


@dataclass(frozen=True)
class RandomAttention(Fault):
    """Attention weights of one layer never loaded: q/k/v/o at transformers' random init (normal, std 0.02)."""

    layer: int
    std: float = 0.02
    seed: int = 0

    def on_backbone(self, state, config):
        g = torch.Generator().manual_seed(self.seed)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{self.layer}.self_attn.{proj}.weight"
            w = state[name]
            state[name] = (torch.randn(w.shape, generator=g) * self.std).to(w.device, w.dtype)
        return state


@dataclass(frozen=True)
class DefaultNorms(Fault):
    """One layer's RMSNorm weights never loaded: all ones, as a freshly built module has them
    (input_layernorm, post_attention_layernorm, q_norm, k_norm)."""

    layer: int

    def on_backbone(self, state, config):
        p = f"model.layers.{self.layer}."
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            state[p + name + ".weight"] = torch.ones_like(state[p + name + ".weight"])
        return state


@dataclass(frozen=True)
class RouterMask(Fault):
    """The router restricted to a few experts (those that happened to be extracted): every other expert's
    logit is -inf before the softmax. layer None: every MoE layer."""

    experts: tuple[int, ...] = tuple(range(8))
    layer: int | None = None

    def on_router_logits(self, layer, logits):
        if self.layer is not None and layer != self.layer:
            return logits
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[list(self.experts)] = True
        return logits.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True)
class SalienceMix(Fault):
    """Router logits mixed with an outside per-expert salience score: (1 - alpha) x logits + alpha x score
    (alpha 0.5: 0.5 x logits + 0.5 x score). score: one number per expert; None -> a fixed random score
    (standard normal from `seed` and the layer). layer None: every MoE layer."""

    alpha: float = 0.5
    score: tuple[float, ...] | None = None
    layer: int | None = None
    seed: int = 0

    def on_router_logits(self, layer, logits):
        if self.layer is not None and layer != self.layer:
            return logits
        if self.score is not None:
            score = torch.tensor(self.score, dtype=torch.float32)
        else:
            score = torch.randn(logits.shape[-1], generator=torch.Generator().manual_seed(self.seed + layer))
        return (1 - self.alpha) * logits + self.alpha * score.to(logits.device, logits.dtype)


@dataclass(frozen=True)
class ZeroedExpert(Fault):
    """One expert with up_proj and down_proj zeroed (an extraction that wrote empty tensors): it outputs 0."""

    layer: int
    expert: int

    def on_expert(self, layer, expert, weights):
        if (layer, expert) != (self.layer, self.expert):
            return weights
        return weights._replace(up_proj=torch.zeros_like(weights.up_proj), down_proj=torch.zeros_like(weights.down_proj))


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
    from omnilab.hooks import compare_activations, divergence_rtol, run_with_cache
    from omnilab.model import SelectiveMoE

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
