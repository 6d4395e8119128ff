"""Rotary position embedding for the Qwen3 decoders: 1-D RoPE and Qwen3-Omni's interleaved M-RoPE (temporal /
height / width sections), computed in fp32 and cast, as transformers' rotary modules do. Follows mlx-lm's
models/rope_utils.py in keeping RoPE apart from the model."""

from __future__ import annotations

import torch


def rope_inv_freq(config) -> torch.Tensor:
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # [d/2]


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, T, head_dim] (computed in fp32, then cast)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype: torch.dtype):
    """Interleaved M-RoPE: position_ids [3, B, T] (temporal, height, width) -> cos, sin [B, T, head_dim].
    Frequency j takes the height row when j % 3 == 1 and j < 3 * section[1], the width row when j % 3 == 2
    and j < 3 * section[2], the temporal row otherwise (transformers' recomposition_frequencies)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, B, T, d/2]
    mixed = freqs[0].clone()  # [B, T, d/2]
    for row in (1, 2):
        picked = slice(row, 3 * mrope_section[row], 3)
        mixed[..., picked] = freqs[row, ..., picked]
    emb = torch.cat((mixed, mixed), dim=-1)  # [B, T, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
