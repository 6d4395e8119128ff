"""The decoder's key/value cache: keys and values of every layer seen so far (as mlx-lm's models/cache.py)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer seen so far: k, v [B, kv_heads, S, head_dim] per layer."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)  # [B, kvh, S + T, hd]
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v
