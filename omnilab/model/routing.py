"""How the MoE step picks experts, as one explicit object the model is given (`SelectiveMoE.routing`, or
`model(ids, routing=...)` / `model.generate(..., routing=...)` for one call), instead of options patched
into a live model.

- `top_k`: experts per token (None: the config's `num_experts_per_tok`);
- `transforms`: router-logit transforms applied in order before the softmax (omnilab.model.faults: `RouterMask`,
  `SalienceMix`, any `Fault` with `on_router_logits`);
- `available`: layer -> bool [E], the experts present in the checkpoint; the others are masked before the
  softmax (`mask_missing_experts`);
- `override`: a `RoutingOverride`, forced choices per layer (an intervention; the GPU decoders read it too).

`LogitOp` is a router-logit transform as tensors built once (`transform.router_op(layer, E, device, dtype)`),
so the resident fast path (omnilab.gpu) applies transforms and the mask inside a captured graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch


class LogitOp(NamedTuple):
    """One layer's router-logit transform as tensors: logits -> scale * logits + shift (when shift is given), then
    -inf where drop [E] is True (when given). `apply` does exactly the arithmetic of the eager transform it stands
    for (RouterMask, SalienceMix, the availability mask), so fp32 routing is bit for bit the eager one."""

    scale: float = 1.0
    shift: torch.Tensor | None = None
    drop: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            logits = self.scale * logits + self.shift
        if self.drop is not None:
            logits = logits.masked_fill(self.drop, float("-inf"))
        return logits


@dataclass
class RoutingOverride:
    """Replace the routers' top-k choice by given experts.

    experts: MoE layer -> long tensor [S, k] (row p is used for the token at absolute position p) or [k] (every
    position). The weights become the router's softmax at the given experts, renormalised when the config says
    norm_topk_prob, so the rest of the layer runs unchanged. Set it as `model.routing_override` (eager path) or
    pass it to `FastDecoder(override=...)` / `OffloadDecoder(override=...)`; layers not named route normally."""

    experts: dict

    @classmethod
    def from_trace(cls, trace: torch.Tensor, moe_layers) -> "RoutingOverride":
        """trace [moe layers, S, k] -> an override of every MoE layer."""
        if trace.dim() != 3 or trace.shape[0] != len(moe_layers):
            raise ValueError(f"trace of shape {tuple(trace.shape)}: need [{len(moe_layers)} moe layers, positions, k]")
        return cls({layer: trace[j] for j, layer in enumerate(moe_layers)})

    def choice(self, layer: int, positions: torch.Tensor) -> torch.Tensor | None:
        """positions [N] -> experts [N, k] for this layer, or None when the layer is not overridden."""
        given = self.experts.get(layer)
        if given is None:
            return None
        if given.device != positions.device:
            given = self.experts[layer] = given.to(positions.device)  # moved once, then reused (no copy per step)
        if given.dim() == 1:
            return given.expand(positions.shape[0], -1)
        return given[positions]  # [N, k]


@dataclass(frozen=True)
class RoutingOptions:
    top_k: int | None = None
    transforms: tuple = ()
    available: dict | None = None
    override: RoutingOverride | None = None

    def experts_per_token(self, config) -> int:
        return int(self.top_k) if self.top_k is not None else int(config.num_experts_per_tok)

    def replace(self, **changes) -> "RoutingOptions":
        return dataclasses.replace(self, **changes)

    @property
    def is_plain(self) -> bool:
        """True when routing is the checkpoint's own: no top-k change, transform, mask or override."""
        return self.top_k is None and not self.transforms and self.available is None and self.override is None
