"""Sampling on the device without a host sync: transformers' temperature / top-k / top-p warpers as tensor ops whose
parameters live in device buffers (one captured graph serves any setting), and a Gumbel-max draw whose noise is a
counter-based integer hash of (seed, step, row, vocab id), so a replayed graph is reproducible for a seed and
independent of torch's RNG state.

Follows transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` (applied in that order,
as omnilab.model.generate does); tests/test_fast_research.py checks equality with transformers' own warpers.
differs from transformers: the draw is Gumbel-max over hashed noise, not torch.multinomial (same distribution,
other tokens for a seed); top-k reads the k-th largest value from a sort (a buffer k, no shape change).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


class SamplingParams:
    """Device buffers of one decoder's sampling options; `set(...)` fills them between calls (never inside a graph).

    temperature [1]: the divisor (CPU) or its float32 reciprocal (CUDA), as transformers' `scores / t` computes
    on each device (CUDA's div by a CPU scalar is a multiply by 1/t); top_k [1] long (V: off); top_p_cut [1]
    float32: 1 - top_p (-1: off); seed [1] long."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.temperature = torch.ones(1, device=device)
        self.top_k = torch.zeros(1, dtype=torch.long, device=device)
        self.top_p_cut = torch.full((1,), -1.0, device=device)
        self.seed = torch.zeros(1, dtype=torch.long, device=device)

    def set(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
            vocab: int = 1) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        t = torch.tensor(float(temperature), dtype=torch.float32)
        if self.device.type == "cuda":  # transformers' `scores / t` on CUDA: scores * (1 / float32(t))
            t = torch.tensor(1.0, dtype=torch.float32) / t
        self.temperature.copy_(t)
        self.top_k.fill_(min(max(int(top_k), 1), vocab) if top_k and top_k > 0 else vocab)
        self.top_p_cut.fill_(float(1 - top_p) if top_p < 1.0 else -1.0)  # compared in float32, as transformers
        self.seed.fill_(int(seed) & 0x7FFFFFFF)


def temperature(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """TemperatureLogitsWarper: scores [B, V] / t (CUDA: * 1/t, transformers' arithmetic there)."""
    return scores * p.temperature if p.device.type == "cuda" else scores / p.temperature


def top_k(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """TopKLogitsWarper: scores below the k-th largest value -> -inf. k [1] on the device (V keeps all)."""
    ordered = torch.sort(scores, dim=-1, descending=True).values  # [B, V]
    kth = ordered.index_select(-1, p.top_k - 1)  # [B, 1]: topk(...)[0][..., -1] without a shape from k
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """TopPLogitsWarper (min_tokens_to_keep 1): the same sort, cumulative softmax and scatter as transformers."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)  # [B, V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    remove = cumulative <= p.top_p_cut  # cut -1: nothing removed (transformers skips the warper at top_p 1)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, float("-inf"))


def warp(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The three warpers in transformers' order: scores [B, V] float32 -> warped scores [B, V]."""
    return top_p(top_k(temperature(scores, p), p), p)


# -- the draw ------------------------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow (c split in 16-bit halves)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (Wellons' lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor, rows: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64 [B, V], a pure function of (seed [1], step [1], rows [B], vocab_ids [V])."""
    key = hash32((hash32(seed & MASK32) + step) & MASK32)  # [1]
    key = hash32((key + rows) & MASK32)  # [B]
    h1 = hash32(key[:, None] ^ vocab_ids[None, :])  # [B, V]
    h2 = hash32((h1 + 0x9E3779B9) & MASK32)  # [B, V]: a second word for 53 bits
    bits = (h1 >> 6) * (1 << 27) + (h2 >> 5)  # [B, V]: 26 + 27 = 53 random bits
    return (bits.double() + 0.5) / float(1 << 53)


def draw(scores: torch.Tensor, p: SamplingParams, step: torch.Tensor, rows: torch.Tensor,
         vocab_ids: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores) [B, V] by Gumbel-max: argmax(scores + Gumbel noise) -> [B]."""
    u = uniform(p.seed, step, rows, vocab_ids)  # [B, V]
    return (scores.double() - torch.log(-torch.log(u))).argmax(-1)


def sample(scores: torch.Tensor, p: SamplingParams, step, rows, vocab_ids) -> torch.Tensor:
    """Warp, then draw: scores [B, V] float32 (vocab mask applied) -> tokens [B]."""
    return draw(warp(scores, p), p, step, rows, vocab_ids)
