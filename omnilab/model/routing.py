"""How the MoE step picks experts, as one explicit object the model is given (`SelectiveMoE.routing`, or
`model(ids, routing=...)` / `model.generate(..., routing=...)` for one call), instead of options patched
into a live model.

- `top_k`: experts per token (None: the config's `num_experts_per_tok`);
- `transforms`: router-logit transforms applied in order before the softmax (omnilab.model.faults: `RouterMask`,
  `SalienceMix`, any `Fault` with `on_router_logits`);
- `available`: layer -> bool [E], the experts present in the checkpoint; the others are masked before the
  softmax (`mask_missing_experts`);
- `override`: an omnilab.gpu.traces.RoutingOverride, forced choices per layer (an intervention; the GPU decoders
  read it too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingOptions:
    top_k: int | None = None
    transforms: tuple = ()
    available: dict | None = None
    override: object | None = None

    def experts_per_token(self, config) -> int:
        return int(self.top_k) if self.top_k is not None else int(config.num_experts_per_tok)

    def replace(self, **changes) -> "RoutingOptions":
        return dataclasses.replace(self, **changes)

    @property
    def is_plain(self) -> bool:
        """True when routing is the checkpoint's own: no top-k change, transform, mask or override."""
        return self.top_k is None and not self.transforms and self.available is None and self.override is None
