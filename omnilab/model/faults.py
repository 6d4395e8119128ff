"""Fault injection: the failures that hand-built selective loaders hit, as options of the selective model.

Each fault is a small frozen dataclass passed to `SelectiveMoE.from_checkpoint(path, faults=[...])`; none is
on by default and none forks the model code. A fault acts at one of three places, each a method that is the
identity unless the fault overrides it:

- `on_backbone(state, config)`: the resident weights as loaded (state-dict names of the selective model);
- `on_router_logits(layer, logits)`: the router's logits after `hook_router_logits`, before softmax / top-k;
- `on_expert(layer, expert, weights)`: one expert's weights as the ExpertStore loads them.

`omnilab.model.hooks.compare` then shows the first hook where the run leaves the reference, and how far it drifts.
(Checkpoint-breaking helpers for the inventory / verify tests are a different thing: omnilab/testing/breakage.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnilab.model.routing import LogitOp


class Fault:
    """Base: every method leaves its input alone."""

    def on_backbone(self, state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        return state

    def on_router_logits(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def on_expert(self, layer: int, expert: int, weights):
        return weights


def acts_on_weights(fault: Fault) -> bool:
    """True when the fault changes weights as they are loaded (on_backbone or on_expert), not only routing."""
    return any(getattr(type(fault), m) is not getattr(Fault, m) for m in ("on_backbone", "on_expert"))


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

    def router_op(self, layer: int, num_experts: int, device, dtype) -> LogitOp | None:
        """on_router_logits as a LogitOp built once (None: this layer is left alone)."""
        if self.layer is not None and layer != self.layer:
            return None
        keep = torch.zeros(num_experts, dtype=torch.bool, device=device)
        keep[list(self.experts)] = True
        return LogitOp(drop=~keep)


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

    def router_op(self, layer: int, num_experts: int, device, dtype) -> LogitOp | None:
        """on_router_logits as a LogitOp built once: scale 1 - alpha, shift alpha x score (the same arithmetic)."""
        if self.layer is not None and layer != self.layer:
            return None
        if self.score is not None:
            score = torch.tensor(self.score, dtype=torch.float32)
        else:
            score = torch.randn(num_experts, generator=torch.Generator().manual_seed(self.seed + layer))
        return LogitOp(1 - self.alpha, self.alpha * score.to(device, dtype))


@dataclass(frozen=True)
class ZeroedExpert(Fault):
    """One expert with up_proj and down_proj zeroed (an extraction that wrote empty tensors): it outputs 0."""

    layer: int
    expert: int

    def on_expert(self, layer, expert, weights):
        if (layer, expert) != (self.layer, self.expert):
            return weights
        return weights._replace(up_proj=torch.zeros_like(weights.up_proj), down_proj=torch.zeros_like(weights.down_proj))
