"""The trace prefill: a batch of documents through the selective model with every expert resident, one grouped
GEMM per projection per MoE layer, and every layer's routing recorded into pinned host buffers (one CUDA event per
layer) read as the layers arrive (docs/DESIGN.md, omnilab/gpu/). Follows transformers' `grouped_mm` experts
implementation. The work around the GEMMs (the glue) is one of three, chosen once per TracePrefill (`prefill_glue`):
"torch", the eager model's own modules and step.expert_mix (CPU, fp32, no Triton); "triton", prefill_kernels.py's
fused norms, rotary, SiLU * up and combine into the residual stream; "fused" (bf16 on CUDA with Triton installed),
the Triton glue with gate|up's row gather and SiLU * up inside one Triton GEMM (the prefill 5.6% faster than the
Triton glue's on an H100, bit-equal; bench/results/trace_h100_bf16.md, run 7).
differs from transformers: padding rows skip the router and the experts; the k expert outputs of a token are
summed in one reduction; the forward stops after the last MoE layer's router; on CUDA the attention is
FlashAttention, not cuDNN's (ATTENTIONS; each labelled inline).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnilab.gpu.fast import plain_routing_refusal
from omnilab.gpu.slots import SlotPool, all_experts_room_refusal
from omnilab.gpu.step import (compute_refusal, default_compute, expert_mix, grouped_expert_rows, route,
                              sort_choices)
from omnilab.model.rope import rope_cos_sin


class ResidentExperts(NamedTuple):
    """Every expert of every MoE layer, stacked in transformers' fused layout: gate_up[layer] [E, 2I, H] (gate
    rows then up rows), down[layer] [E, H, I]."""

    gate_up: dict
    down: dict

    @classmethod
    def from_checkpoint(cls, model) -> "ResidentExperts":
        """Read every expert of `model`'s checkpoint into a SlotPool of all experts (slot = expert)."""
        config, layout = model.checkpoint.arch
        pool = SlotPool.all_resident(model.checkpoint, config, layout, model.dtype, model.device)
        return cls(pool.gate_up, pool.down)


class Routing(NamedTuple):
    """One batch's routing on the host, one row per real token in (document ascending, position) order:
    experts [L, n, k] int32, weights [L, n, k] float32, entropy [L, n] float32 (bits)."""

    experts: np.ndarray
    weights: np.ndarray
    entropy: np.ndarray

    def layer(self, j: int):
        """MoE layer j's (experts [n, k], weights [n, k], entropy [n]), as PendingRouting.layer gives them."""
        return self.experts[j], self.weights[j], self.entropy[j]

    def wait(self) -> "Routing":
        """Itself: already on the host (as PendingRouting.wait gives it)."""
        return self


def prefill_refusal(model, *, experts_given: bool = False) -> str | None:
    """Why `model` cannot take the grouped trace prefill (None when it can). experts_given: the stacked experts
    are supplied by the caller, so the budget and free-memory checks do not apply."""
    refusal = plain_routing_refusal(model)
    if refusal:
        return refusal
    if getattr(model, "routing_override", None) is not None:
        return "a routing override is set; overridden forwards run on the eager path"
    if model.device.type == "cuda" and model.dtype != torch.bfloat16:
        return (f"the model is {str(model.dtype).removeprefix('torch.')} on CUDA; torch._grouped_mm on CUDA needs "
                f"bfloat16 (--dtype bfloat16)")
    if experts_given:
        return None
    store = model.cache.store
    if model.cache.budget_bytes < store.total_bytes:
        return (f"the expert budget ({model.cache.budget_bytes:,} bytes) holds fewer than all experts "
                f"({store.total_bytes:,} bytes); the grouped prefill keeps every expert resident")
    return all_experts_room_refusal(model, margin=1.05)  # 5% for a batch's activations beside the experts


# the attention kernels a TracePrefill lets torch's SDPA take on CUDA: "flash" (the default) leaves cuDNN's out:
# cuDNN builds an execution plan for each new (batch, length) shape, and a trace's batches nearly all differ in
# shape (bench/results/trace_h100_bf16.md, run 5); "torch" is torch's own order, cuDNN first on an H100
ATTENTIONS = {"flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], "torch": None}
DEFAULT_ATTENTION = "flash"
AUTO_BATCH_TOKENS = (16384, 8192, 4096)  # batch_tokens_for's choices, largest first (16,384: the measured row)


def activation_bytes_per_token(config, dtype) -> int:
    """GPU bytes a batch takes per padded token in the grouped prefill, twice the largest tensors alive in a MoE
    layer (each token's k gathered rows, gate|up, SiLU * up and expert outputs; h, x and the attention's; the
    router's float64 log-softmax): the allocator's headroom. Real shapes, bf16: 278 KB, against 262 KB measured
    (65.3 GB peak at 16,384 tokens beside 61.0 GB of weights, bench/results/trace_h100_bf16.md)."""
    k, H, I, E = config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size, config.num_experts
    return 2 * ((k * (2 * H + 3 * I) + 8 * H) * torch.empty((), dtype=dtype).element_size() + 4 * 8 * E)


def batch_tokens_for(model, fraction: float = 0.8) -> int:
    """`omnilab trace --batch-tokens auto` on CUDA: the largest of AUTO_BATCH_TOKENS whose activations
    (activation_bytes_per_token) fit in `fraction` of the GPU memory free now, the experts already resident (else
    the smallest); 4096 off CUDA."""
    if model.device.type != "cuda":
        return AUTO_BATCH_TOKENS[-1]
    free, _ = torch.cuda.mem_get_info(model.device)
    free += torch.cuda.memory_reserved(model.device) - torch.cuda.memory_allocated(model.device)  # torch's cache
    per_token = activation_bytes_per_token(model.config, model.dtype)
    return next((b for b in AUTO_BATCH_TOKENS if b * per_token <= fraction * free), AUTO_BATCH_TOKENS[-1])


def prefill_glue(dtype, device) -> str:
    """The glue a TracePrefill takes when not told: "fused" (prefill_kernels.py) for bf16 on CUDA where Triton is
    installed (as step.default_compute chooses the Triton expert mix), "torch" otherwise."""
    return "fused" if default_compute(dtype, device) == "triton" else "torch"


class TorchGlue:
    """The eager model's own modules around the GEMMs, and step.expert_mix's grouped_mm (the fallback)."""

    name = "torch"

    def attend(self, layer, h, cos, sin, i: int):
        """h [B, T, H] -> (h + attention, the post-attention norm of it), as the eager block computes them."""
        h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, None, None, i)  # causal SDPA, [B, T, H]
        return h, layer.post_attention_layernorm(h)

    def add_mix(self, h, x, experts, weights, gate_up, down, slot_range, rows):
        """h [B, T, H] with the expert mix of x [n, H] (experts, weights [n, k]) added to its rows `rows` [n] of
        h.view(B * T, H) (None: every row, in order); returns h."""
        # differs from eager: one grouped GEMM per projection; a token's k outputs summed in one reduction
        mix = expert_mix(x, experts, weights, gate_up, down, slot_range, "grouped_mm")  # [n, H]
        if rows is None:
            return h + mix.view(h.shape)  # [B, T, H]
        flat = h.view(-1, h.shape[-1])  # [B * T, H]; h is this layer's own residual sum: updated in place
        flat[rows] = flat[rows] + mix  # padding rows keep h (one rounding, as an index_add would, without atomics)
        return h


class TritonGlue:
    """prefill_kernels.py's kernels around the same GEMMs (torch's grouped_mm and the modules' linear layers):
    each norm one pass (the post-attention one with the residual add), q / k norm and RoPE one pass each, SiLU *
    up one pass, and the weighted sum over k gathered and added into the residual rows in place. The eager ops'
    arithmetic and roundings (prefill_kernels.py's header); the residual stream h is updated in place."""

    name = "triton"

    def __init__(self):
        from omnilab.gpu import prefill_kernels  # imports Triton: only for this glue

        self.k = prefill_kernels

    def attend(self, layer, h, cos, sin, i: int):
        """As TorchGlue.attend (the eager Attention.forward's ops, in its order), h updated in place."""
        pk, a = self.k, layer.self_attn
        B, T, _ = h.shape
        nh, nkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
        norm = layer.input_layernorm
        x = pk.rms_norm(h, norm.weight, norm.eps)  # [B, T, H]
        # differs from eager: q_norm / k_norm and RoPE in one kernel per projection (the same roundings)
        q = pk.norm_rope(a.q_proj(x).view(B, T, nh, hd), a.q_norm.weight, cos, sin, a.q_norm.eps)  # [B, T, nh, hd]
        k = pk.norm_rope(a.k_proj(x).view(B, T, nkv, hd), a.k_norm.weight, cos, sin, a.k_norm.eps)  # [B, T, nkv, hd]
        v = a.v_proj(x).view(B, T, nkv, hd)  # [B, T, nkv, hd]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=T > 1,
                                           scale=hd ** -0.5, enable_gqa=nh != nkv)  # [B, nh, T, hd]
        o = a.o_proj(o.transpose(1, 2).reshape(B, T, nh * hd))  # [B, T, H]
        norm = layer.post_attention_layernorm
        # differs from eager: h + o in place (one rounding, as h + o) and the norm of the sum, one kernel
        return h, pk.add_rms_norm(h, o, norm.weight, norm.eps)

    def add_mix(self, h, x, experts, weights, gate_up, down, slot_range, rows):
        """As TorchGlue.add_mix (step.expert_mix's grouped_mm), the elementwise work in two kernels; h in place."""
        n, k = experts.shape
        y, perm = self.expert_rows(x, experts, gate_up, down, slot_range)  # [n * k, H], sorted by expert
        inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(n * k, device=perm.device))  # [n * k]
        # differs from TorchGlue: y * w, the scatter back to (token, choice) order, the sum over k and the residual
        # add in one kernel reading each row of y once (the same roundings; no index_put)
        self.k.combine_into(h.view(-1, h.shape[-1]), y, inv, weights, rows)
        return h

    def expert_rows(self, x, experts, gate_up, down, slot_range):
        """Each choice's unweighted expert output [n * k, H], slot-sorted, and its perm (step.grouped_expert_rows)."""
        I = down.shape[-1]
        return grouped_expert_rows(x, experts, gate_up, down, slot_range, lambda gu: self.k.silu_mul(gu, I))


class FusedGlue(TritonGlue):
    """TritonGlue with gate|up's grouped GEMM and SiLU * up as one Triton kernel (prefill_kernels.gate_up_rows):
    each sorted row reads its token's row of x inside the GEMM, so neither the [n * k, H] gathered rows nor the
    [n * k, 2I] gate|up output is written; down stays torch's grouped_mm."""

    name = "fused"

    def expert_rows(self, x, experts, gate_up, down, slot_range):
        k = experts.shape[1]
        perm, offs = sort_choices(experts, slot_range)  # [n * k], [S]
        act = self.k.gate_up_rows(x, (perm // k).to(torch.int32), offs, gate_up)  # [n * k, I], sorted
        return torch._grouped_mm(act, down.transpose(1, 2), offs=offs), perm  # [n * k, H]


GLUES = {g.name: g for g in (TorchGlue, TritonGlue, FusedGlue)}  # the work around the GEMMs (TracePrefill's glue)


class TracePrefill:
    """Routing of batches of documents through `model` (a SelectiveMoE) with every expert resident.

    experts: the stacked experts (ResidentExperts; default: read from the model's checkpoint). glue: "torch",
    "triton" or "fused" (GLUES; default prefill_glue's choice), the work around the GEMMs; `glue` names the one taken.
    spin: how a writer thread waits for the routing (PendingRouting.wait, .layer). False (default): it sleeps in the
    driver (events with cudaEventBlockingSync); True: it spins, as torch's default events do, a core each, polling
    the driver beside the thread that launches the kernels (kept to measure: bench/trace.py --spin).
    attention: the SDPA kernels allowed on CUDA (ATTENTIONS: "flash", the default, or "torch").
    `record(...)` takes one batch and returns its Routing."""

    name = "grouped_mm"

    def __init__(self, model, experts: ResidentExperts | None = None, glue: str | None = None, spin: bool = False,
                 attention: str = DEFAULT_ATTENTION):
        refusal = prefill_refusal(model, experts_given=experts is not None)
        if refusal:
            raise ValueError(f"grouped prefill unavailable: {refusal}")
        glue = glue or prefill_glue(model.dtype, model.device)
        if glue not in GLUES:
            raise ValueError(f"grouped prefill: glue {glue!r}, use {', '.join(GLUES)}")
        refusal = compute_refusal("triton", model.device) if glue != "torch" else None
        if refusal:
            raise ValueError(f"grouped prefill: glue {glue!r}: {refusal}")
        if attention not in ATTENTIONS:
            raise ValueError(f"grouped prefill: attention {attention!r}, use {', '.join(ATTENTIONS)}")
        self.glue, self.spin, self.attention = glue, spin, attention
        self._glue = GLUES[glue]()
        self.model, self.config = model, model.config
        self.layers = [int(i) for i in self.config.moe_layers]
        self.experts = experts if experts is not None else ResidentExperts.from_checkpoint(model)
        missing = [i for i in self.layers if i not in self.experts.gate_up or i not in self.experts.down]
        if missing:
            raise ValueError(f"grouped prefill: no stacked experts for MoE layer {missing[0]}")
        self.slot_range = torch.arange(self.config.num_experts, device=model.device)  # [E]: group ends by expert

    def record(self, token_ids: list[list[int]], docs: list[int], *, pad_id: int = 0) -> "Routing":
        """token_ids: the batch's documents (right padded here to the longest), docs their document numbers.
        Returns the routing of every real token, documents ascending, positions ascending (waits for it)."""
        return self.record_async(token_ids, docs, pad_id=pad_id).wait()

    def record_async(self, token_ids: list[list[int]], docs: list[int], *, pad_id: int = 0) -> "PendingRouting":
        """As record, without waiting: the batch's kernels are queued, each MoE layer's routing is copied to
        pinned host memory as soon as it is computed (one event per layer), and the host never waits for the
        device, so the next batch's kernels queue behind this one's while writer threads read its layers
        (PendingRouting.layer) as they arrive."""
        backends = ATTENTIONS[self.attention] if self.model.device.type == "cuda" else None
        # differs from transformers: no cuDNN attention (its plan for each new shape costs more than the kernel)
        with torch.no_grad(), sdpa_kernel(backends) if backends else nullcontext():
            return self._record_async(token_ids, docs, pad_id)

    def _record_async(self, token_ids, docs, pad_id) -> "PendingRouting":
        m, cfg = self.model, self.config
        dev, dtype = m.device, m.dtype
        cuda = dev.type == "cuda"
        B, T = len(token_ids), max(len(x) for x in token_ids)
        H, k = cfg.hidden_size, cfg.num_experts_per_tok
        ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T], right padded (as the eager trace pads)
        for b, x in enumerate(token_ids):
            ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        rows = m.model.embed_tokens.num_embeddings
        if not 0 <= int(ids.min()) <= int(ids.max()) < rows:
            raise ValueError(f"token id outside the embedding's {rows} rows (ids 0..{rows - 1})")
        order = np.argsort(np.asarray(docs), kind="stable")  # the batch's rows, documents ascending
        keep = np.concatenate([b * T + np.arange(len(token_ids[b])) for b in order])  # [n]: flat rows b * T + t
        n = keep.size
        # no padding and the rows already in document order: the flat rows are the trace's rows, no gather
        whole = n == B * T and bool((order == np.arange(B)).all())
        L = len(self.layers)
        # the routing of the real tokens on the host, per MoE layer, in row order (pinned: copies run async)
        host = Routing(torch.empty(L, n, k, dtype=torch.int32, pin_memory=cuda),
                       torch.empty(L, n, k, dtype=torch.float32, pin_memory=cuda),
                       torch.empty(L, n, dtype=torch.float32, pin_memory=cuda))
        pending = PendingRouting(host, [] if cuda else None)
        # a copy from pageable memory waits for the device to go idle: pinned, it queues behind the work
        ids = (ids.pin_memory() if cuda else ids).to(dev, non_blocking=True)
        keep = torch.from_numpy(keep)
        keep = (keep.pin_memory() if cuda else keep).to(dev, non_blocking=True)
        positions = torch.arange(T, device=dev).expand(B, T)  # [B, T]: right padding, every row from 0
        cos, sin = rope_cos_sin(positions, m.inv_freq, dtype)  # [B, T, hd]
        h = m.model.embed_tokens(ids)  # [B, T, H]
        last = self.layers[-1]
        glue = self._glue
        rows = None if whole else keep  # the real rows of h.view(B * T, H), in the trace's order
        j = 0  # MoE layers so far
        for i, layer in enumerate(m.model.layers):
            h, x = glue.attend(layer, h, cos, sin, i)  # h + attention, its post-attention norm [B, T, H]
            if not layer.is_moe:
                h = h + layer.mlp(x)
                continue
            # differs from eager: only the real tokens go through the router and the experts
            x = x.view(B * T, H) if whole else x.reshape(B * T, H)[keep]  # [n, H]
            logits = layer.mlp.gate(x)  # [n, E]
            weights, experts = route(logits, k, bool(cfg.norm_topk_prob), logits.dtype)  # [n, k]
            logp = torch.log_softmax(logits.double(), dim=-1)  # [n, E]
            entropy = (-(logp.exp() * logp).sum(-1) / np.log(2)).float()  # bits, as routing.router_entropy
            # to the host without waiting; each source is freed only after its copy (stream-ordered allocator)
            host.experts[j].copy_(experts.to(torch.int32), non_blocking=cuda)
            host.weights[j].copy_(weights.float(), non_blocking=cuda)
            host.entropy[j].copy_(entropy, non_blocking=cuda)
            if cuda:
                pending.events.append(torch.cuda.Event(blocking=not self.spin))  # blocking: waiters sleep
                pending.events[-1].record()
            j += 1
            if i == last:
                break  # nothing after the last router is part of the trace
            h = glue.add_mix(h, x, experts, weights, self.experts.gate_up[i], self.experts.down[i], self.slot_range,
                             rows)  # [B, T, H]: the mix added to the real rows
        return pending


class PendingRouting:
    """One batch's routing on its way to the host: `host` a Routing of (pinned) tensors, `events[j]` recorded
    after MoE layer j's copies were queued (None on CPU: the copies are done). `layer(j)` waits for layer j and
    returns its numpy views; `wait()` the whole Routing as numpy arrays."""

    def __init__(self, host: Routing, events: list | None):
        self.host, self.events = host, events

    def layer(self, j: int):
        if self.events is not None:
            self.events[j].synchronize()  # releases the GIL while it waits
        return self.host.experts[j].numpy(), self.host.weights[j].numpy(), self.host.entropy[j].numpy()

    def wait(self) -> Routing:
        if self.events:
            self.events[-1].synchronize()
        return Routing(*(x.numpy() for x in self.host))
