"""The tensor-only decode step both GPU decoders run (fast.py, offload.py) and the trace prefill reuses:
a static KV cache, the attention, the router and the grouped expert mix, on plain tensors (no modules), so one
torch.compile'd copy serves every layer.

Follows the eager model (omnilab.model.decoder) in the same order, and transformers' `grouped_mm` experts.
differs from transformers: attention spans the whole static cache with a boolean mask, the query heads of a kv
head folded into the query axis (no enable_gqa); gate and up are one GEMM; the k expert outputs of a token are
summed in one reduction (as transformers' grouped_mm path does) rather than by index_add_; under compute="triton"
a decode-sized bf16 step's projections, router and top-k are Triton kernels (step_kernels.py: `project`,
`project_qkv`, `route`) (each labelled inline).
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from omnilab.model.decoder import rotate_half


# -- the static KV cache -------------------------------------------------------------------------------------------


class StaticKV:
    """keys, values [L, B, kv_heads, S_max, head_dim], zero-filled once; positions are written in place."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


# -- the dense projections -----------------------------------------------------------------------------------------

GEMV_MAX_TOKENS = 64  # steps of at most this many tokens are decode-sized (step_kernels.MAX_ROWS): a decode step
# of batch <= 64, or a prefill as short
ROUTE_MAX_EXPERTS = 256  # step_kernels.route_topk holds a token's E logits in registers
# steps of at most this many tokens take step_kernels.route_topk (a program per token) whatever the GEMVs take: in a
# B = 8 decode step torch's softmax, topk and its sort took 13 us a layer (bench/results/batched_h100_run2.md)
ROUTE_MAX_TOKENS = 64


def triton_step(tokens: int, dtype, compute: str | None, max_tokens: int | None = None) -> bool:
    """Whether a step of `tokens` rows takes step_kernels.py's Triton kernels: decode-sized (at most max_tokens,
    GEMV_MAX_TOKENS for the GEMVs, ROUTE_MAX_TOKENS for the top-k), bf16, compute="triton". fp32 and the other
    computes keep torch's F.linear and topk."""
    limit = GEMV_MAX_TOKENS if max_tokens is None else max_tokens
    return compute == "triton" and dtype == torch.bfloat16 and tokens <= limit


def project(x, w, compute: str | None = None):
    """x [..., K] @ w.T -> [..., M] (w [M, K], no bias): F.linear, or a Triton GEMV for a decode-sized bf16 step
    under compute="triton" (triton_step)."""
    if not triton_step(x.shape[:-1].numel(), x.dtype, compute):
        return F.linear(x, w)
    from omnilab.gpu import step_kernels  # imports Triton: only when asked for

    # differs from transformers: a Triton GEMV (fp32 accumulation in its own order) rather than cuBLAS
    return step_kernels.linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])  # [..., M]


def project_qkv(x, w: LayerWeights, compute: str | None = None):
    """x [B, T, H] -> (q [B, T, nh * hd], k, v [B, T, nkv * hd]): three F.linear, or one Triton launch reading
    the three weights where they are (no concatenated copy) for a decode-sized bf16 step under compute="triton"."""
    if not triton_step(x.shape[:-1].numel(), x.dtype, compute):
        return F.linear(x, w.q_proj), F.linear(x, w.k_proj), F.linear(x, w.v_proj)
    from omnilab.gpu import step_kernels

    # differs from transformers: q, k and v by one Triton launch of GEMVs (fp32 accumulation in its own order)
    q, k, v = step_kernels.linear_qkv(x.reshape(-1, x.shape[-1]), w.q_proj, w.k_proj, w.v_proj)  # [B * T, M] each
    return tuple(t.view(*x.shape[:-1], t.shape[-1]) for t in (q, k, v))  # [B, T, M] each


# -- one step ------------------------------------------------------------------------------------------------------


def rms_norm(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """omnilab.model.decoder.RMSNorm's arithmetic (normalised in fp32, scaled in the input dtype) in one fused kernel."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Consts(NamedTuple):
    """The config numbers a layer step needs (plain ints and floats: torch.compile treats them as constants)."""

    heads: int
    kv_heads: int
    head_dim: int
    top_k: int
    norm_topk_prob: bool
    eps: float


class LayerWeights(NamedTuple):
    """One decoder layer's backbone tensors (the experts are in the SlotPool)."""

    input_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor


def layer_weights(layer) -> LayerWeights:
    a = layer.self_attn
    if a.q_proj.bias is not None:
        raise ValueError("fast path: attention_bias is not supported")
    return LayerWeights(layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                        a.q_norm.weight, a.k_norm.weight, a.o_proj.weight, layer.post_attention_layernorm.weight,
                        layer.mlp.gate.weight)


def attention(h, w: LayerWeights, cos, sin, mask, positions, keys, values, c: Consts, compute: str | None = None):
    """The residual stream h [B, T, H] -> attention output [B, T, H]; writes keys/values [B, kvh, S_max, hd] at the
    cache columns `positions` [T]. cos, sin [T, hd] or per row [B, 1, T, hd]; mask [1 or B, 1, g * T, S_max].
    compute: the decoder's expert compute; "triton" lets a decode-sized bf16 step project with Triton GEMVs."""
    B, T, _ = h.shape
    nh, nkv, hd = c.heads, c.kv_heads, c.head_dim
    g = nh // nkv
    x = rms_norm(w.input_norm, h, c.eps)
    q, k, v = project_qkv(x, w, compute)  # [B, T, nh * hd], [B, T, nkv * hd] twice
    q = rms_norm(w.q_norm, q.view(B, T, nh, hd), c.eps).transpose(1, 2)  # [B, nh, T, hd]
    k = rms_norm(w.k_norm, k.view(B, T, nkv, hd), c.eps).transpose(1, 2)  # [B, nkv, T, hd]
    v = v.view(B, T, nkv, hd).transpose(1, 2)  # [B, nkv, T, hd]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)
    # differs from eager: the g query heads of a kv head are folded into the query axis (no enable_gqa), and
    # attention spans the whole static cache with the positions past each query masked out
    qf = q.reshape(B, nkv, g * T, hd)  # [B, nkv, g * T, hd]: heads are kv-head major
    o = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask, scale=hd ** -0.5)  # [B, nkv, g * T, hd]
    o = o.view(B, nkv, g, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, nh * hd)  # [B, T, nh * hd]
    return project(o, w.o_proj, compute)


def decoder_layer(h, cos, sin, mask, positions, keys, values, routing, w: LayerWeights, gate_up, down, slot_of,
                  forced, slot_range, c: Consts, compute: str, ops=(), record=None, step=None):
    """One MoE decoder layer on the static cache: h [B, T, H] -> [B, T, H]. Tensors only (no modules), so one
    torch.compile'd copy serves every layer. routing [B, S_max, k] receives the layer's top-k expert ids.
    forced [B * T, k]: the override's experts (None: the router's top-k). ops: the layer's router-logit transforms
    (model.routing.LogitOp, the availability mask last), applied in order before the softmax, as the eager route.
    record [steps, B, E]: receives the last position's raw router logits at row `step` [1] (None: not recorded).
    compute: the expert mix's way (expert_mix); "triton" also takes step_kernels.py's GEMVs and top-k for a
    decode-sized bf16 step (triton_step)."""
    B, T, H = h.shape
    h = h + attention(h, w, cos, sin, mask, positions, keys, values, c, compute)
    x = rms_norm(w.post_norm, h, c.eps).reshape(B * T, H)  # [N, H]
    logits = project(x, w.router, compute)  # [N, E]
    if record is not None:
        record.index_copy_(0, step, logits.view(B, T, -1)[None, :, -1])  # [1, B, E]
    for op in ops:
        logits = op.apply(logits)
    weights, experts = route(logits, c.top_k, c.norm_topk_prob, x.dtype, forced, compute)  # [N, k]
    routing.index_copy_(1, positions, experts.view(B, T, -1).to(routing.dtype))
    slots = experts if slot_of is None else slot_of[experts]  # [N, k]
    return h + expert_mix(x, slots, weights, gate_up, down, slot_range, compute).view(B, T, H)


def dense_layer(layer, h, cos, sin, mask, positions, keys, values, c: Consts):
    """A dense-MLP decoder layer (mlp_only_layers / off the sparse step): h [B, T, H] -> [B, T, H]."""
    w = LayerWeights(layer.input_layernorm.weight, layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                     layer.self_attn.v_proj.weight, layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight,
                     layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight, None)
    h = h + attention(h, w, cos, sin, mask, positions, keys, values, c)
    return h + layer.mlp(rms_norm(w.post_norm, h, c.eps))


COMPUTES = ("grouped_mm", "gather", "triton")  # expert_mix's ways
# steps of more choices than this (prefill) take grouped_mm under compute="triton" in bf16: on an H100 a 128-token
# prefill ran at 2,677 tok/s with grouped_mm and 2,156 with the fused kernels' sorted mode (decode_triton_h100.md)
TRITON_MAX_CHOICES = 512


def default_compute(dtype, device) -> str:
    """The expert mix a decoder takes when not told: the fused Triton kernels for bf16 on CUDA where Triton is
    installed (H100, 48 layers, batch 1: 187.8 tok/s against grouped_mm's 151.3; batches 8 and 32 faster too,
    bench/results/batched_h100.md), grouped_mm for bf16 otherwise and on the CPU, gather for fp32 on CUDA."""
    device = torch.device(device)
    if dtype == torch.bfloat16 and device.type == "cuda" and compute_refusal("triton", device) is None:
        return "triton"
    return torch_compute(dtype, device)


def torch_compute(dtype, device) -> str:
    """The expert mix through torch's kernels alone: grouped_mm for bf16 and on the CPU, gather for fp32 on CUDA
    (the default of a decoder without Triton, and the offload engine's: its segments compute per slot)."""
    return "grouped_mm" if torch.device(device).type == "cpu" or dtype == torch.bfloat16 else "gather"


def compute_refusal(compute: str, device) -> str | None:
    """Why `compute` cannot run expert_mix on `device` (None when it can): a decoder checks this when built."""
    if compute not in COMPUTES:
        return f"expert compute {compute!r}: use {', '.join(COMPUTES)}"
    if compute == "triton":
        if importlib.util.find_spec("triton") is None:
            return "compute='triton' needs Triton (pip install triton)"
        if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "compute='triton' runs on CUDA (on the CPU only under TRITON_INTERPRET=1)"
    return None


def sort_choices(slots, slot_range):
    """slots [N, k] -> (perm [N * k], offs [S]): the choices grouped by slot (row r of the grouped GEMMs is choice
    perm[r] = token * k + j) and each group's end (int32, torch._grouped_mm's offs)."""
    sorted_slots, perm = torch.sort(slots.reshape(-1), stable=True)  # [N * k]: choices grouped by slot
    return perm, torch.searchsorted(sorted_slots, slot_range, right=True).to(torch.int32)  # [S]: group ends


def grouped_expert_rows(x, slots, gate_up, down, slot_range, act):
    """x [N, H], slots [N, k] -> (y [N * k, H], perm [N * k]): each choice's unweighted expert output, in slot-sorted
    order (row r is choice perm[r] = token * k + j), one grouped GEMM per projection over all slots (empty groups
    cost nothing); act maps the gate|up output [N * k, 2I] to [N * k, I] (expert_mix's SiLU * up, or the trace
    prefill's Triton silu_mul)."""
    k = slots.shape[1]
    perm, offs = sort_choices(slots, slot_range)
    rows = x[perm // k]  # [N * k, H]
    # differs from eager: gate and up are one GEMM (transformers' fused gate_up_proj)
    gu = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offs)  # [N * k, 2I]
    return torch._grouped_mm(act(gu), down.transpose(1, 2), offs=offs), perm  # [N * k, H]


def expert_mix(x, slots, weights, gate_up, down, slot_range, compute: str):
    """x [N, H], slots [N, k] (slot ids), weights [N, k] -> sum over k of weight * expert(x), [N, H]. No host sync.

    grouped_mm: choices sorted by slot, one grouped GEMM per projection over all slots (empty groups cost
    nothing). gather: each choice's expert weights gathered and batch-multiplied (any dtype, any device).
    triton: fused Triton kernels (fused_moe.py: each routed expert read once, SiLU and the weighted sum over k
    fused, fp32 accumulation; CUDA, or CPU tensors under TRITON_INTERPRET=1; needs Triton); prefill-sized bf16
    steps (more than TRITON_MAX_CHOICES choices) take grouped_mm."""
    N, k = slots.shape
    if compute == "triton" and N * k > TRITON_MAX_CHOICES and x.dtype == torch.bfloat16:
        compute = "grouped_mm"  # a prefill-sized step in bf16 (TRITON_MAX_CHOICES)
    if compute == "triton":
        from omnilab.gpu.fused_moe import fused_expert_mix  # imports Triton: only when asked for

        return fused_expert_mix(x, slots, weights, gate_up, down)
    I = down.shape[-1]
    flat = slots.reshape(-1)  # [N * k]
    if compute == "grouped_mm":
        y, perm = grouped_expert_rows(x, slots, gate_up, down, slot_range,
                                      lambda gu: F.silu(gu[:, :I]) * gu[:, I:])  # [N * k, H], slot-sorted
        y = y * weights.reshape(-1)[perm][:, None]
        out = torch.empty_like(y)
        out[perm] = y  # back to (token, choice) order
    elif compute == "gather":
        rows = x.repeat_interleave(k, dim=0)  # [N * k, H]
        gu = torch.bmm(gate_up[flat], rows[:, :, None])[..., 0]  # [N * k, 2I]
        y = torch.bmm(down[flat], (F.silu(gu[:, :I]) * gu[:, I:])[:, :, None])[..., 0]  # [N * k, H]
        out = y * weights.reshape(-1)[:, None]
    else:
        raise ValueError(compute_refusal(compute, x.device))
    # differs from eager: the k outputs of a token are summed in one reduction, as transformers' grouped_mm does
    return out.view(N, k, -1).sum(dim=1)  # [N, H]


def route(router_logits: torch.Tensor, k: int, norm_topk_prob: bool, dtype, forced: torch.Tensor | None = None,
          compute: str | None = None):
    """router logits [N, E] -> (weights [N, k] in dtype, experts [N, k]); transformers' Qwen3-MoE router.
    compute="triton" with a bf16 step of at most ROUTE_MAX_TOKENS tokens and no override: step_kernels.route_topk,
    one kernel (the override's gather stays in torch)."""
    if (forced is None and router_logits.dim() == 2 and router_logits.shape[1] <= ROUTE_MAX_EXPERTS
            and triton_step(router_logits.shape[0], dtype, compute, ROUTE_MAX_TOKENS)):
        from omnilab.gpu import step_kernels

        # differs from transformers: softmax, top-k and renormalisation in one Triton program per token (sums in
        # its own order; equal probabilities go to the lower expert id, torch.topk promises no order among ties)
        return step_kernels.route_topk(router_logits, k, norm_topk_prob, dtype)
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # [N, E]
    if forced is None:
        weights, experts = torch.topk(probs, k, dim=-1)  # [N, k]
    else:
        experts = forced
        weights = probs.gather(-1, experts)  # [N, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts
