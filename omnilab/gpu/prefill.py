"""The trace prefill: a batch of documents through the selective model with every expert resident, one grouped
GEMM per projection per MoE layer, and every layer's routing recorded into device buffers read once per batch.

`omnilab trace` (omnilab.experiments.trace) needs the routing of every MoE layer, not the logits, over many documents. The
eager model (omnilab.model.decoder.SelectiveMoE.moe) runs one small GEMM chain per picked expert and syncs the host once
per layer; the hooks then copy each layer's routing out. This path follows transformers' `grouped_mm` experts
implementation and omnilab.gpu.engine's decode step instead: the token-expert choices sorted by expert, one
`torch._grouped_mm` over the stacked experts for gate/up and one for down (engine.expert_mix), the group ends
computed on the device, so a batch's forward never waits for the host. The top-k ids, weights and router
entropy of each MoE layer are written into preallocated device buffers; the host reads them once, after the
batch, already in the order the trace's rows take (documents ascending, then positions).

The rest of each layer is the eager model's own modules, called as its forward calls them (input norm,
attention with SDPA over the right-padded batch, post-attention norm, router, dense MLPs), so the attention
and the router logits are the eager path's computation. With right padding, plain causal attention is the
right mask: a real token at position t sees keys 0..t, which are all real tokens of its own document.

Departures from the eager forward (labelled inline): padding rows skip the router and the experts (no real
token ever attends to a padding row, so nothing real changes); the k expert outputs of a token are summed in
one reduction (transformers' grouped_mm path) instead of index_add_ in expert order; the forward stops after the
last MoE layer's router (as the eager trace does with its stop hook). In fp32 on CPU the trace equals the eager
path's and the hooks' (same expert ids; weights and entropies within fp32 rounding; tests/test_trace.py).

What takes the eager path instead (`prefill_refusal` says which): hooks, fault injection, masked experts (the
engine's fast_path_refusal), a routing override, an expert budget smaller than all experts (this path keeps
every expert resident), a CUDA model in a dtype other than bfloat16 (torch._grouped_mm on CUDA is bf16), and
a GPU without room for the stacked experts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from omnilab.gpu.engine import SlotPool, expert_mix, fast_path_refusal, route
from omnilab.model.decoder import rope_cos_sin


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


def prefill_refusal(model, *, experts_given: bool = False) -> str | None:
    """Why `model` cannot take the grouped trace prefill (None when it can). experts_given: the stacked experts
    are supplied by the caller, so the budget and free-memory checks do not apply."""
    refusal = fast_path_refusal(model)
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
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        if free < store.total_bytes * 1.05:
            return (f"{free / 1e9:.1f} GB free on {model.device}, the resident experts need "
                    f"{store.total_bytes / 1e9:.1f} GB")
    return None


class TracePrefill:
    """Routing of batches of documents through `model` (a SelectiveMoE) with every expert resident.

    experts: the stacked experts (ResidentExperts; default: read from the model's checkpoint). `record(...)`
    takes one batch and returns its Routing."""

    name = "grouped_mm"

    def __init__(self, model, experts: ResidentExperts | None = None):
        refusal = prefill_refusal(model, experts_given=experts is not None)
        if refusal:
            raise ValueError(f"grouped prefill unavailable: {refusal}")
        self.model, self.config = model, model.config
        self.layers = [int(i) for i in self.config.moe_layers]
        self.experts = experts if experts is not None else ResidentExperts.from_checkpoint(model)
        missing = [i for i in self.layers if i not in self.experts.gate_up or i not in self.experts.down]
        if missing:
            raise ValueError(f"grouped prefill: no stacked experts for MoE layer {missing[0]}")
        self.slot_range = torch.arange(self.config.num_experts, device=model.device)  # [E]: group ends by expert

    @torch.no_grad()
    def record(self, token_ids: list[list[int]], docs: list[int], *, pad_id: int = 0) -> Routing:
        """token_ids: the batch's documents (right padded here to the longest), docs their document numbers.
        Returns the routing of every real token, documents ascending, positions ascending."""
        m, cfg = self.model, self.config
        dev, dtype = m.device, m.dtype
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
        keep = torch.from_numpy(keep).to(dev)
        # the routing of the real tokens, per MoE layer, in row order; read once after the batch
        L = len(self.layers)
        experts_buf = torch.empty(L, n, k, dtype=torch.int32, device=dev)
        weights_buf = torch.empty(L, n, k, dtype=torch.float32, device=dev)
        entropy_buf = torch.empty(L, n, dtype=torch.float32, device=dev)

        ids = ids.to(dev)
        positions = torch.arange(T, device=dev).expand(B, T)  # [B, T]: right padding, every row from 0
        cos, sin = rope_cos_sin(positions, m.inv_freq, dtype)  # [B, T, hd]
        h = m.model.embed_tokens(ids)  # [B, T, H]
        last = self.layers[-1]
        for i, layer in enumerate(m.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, None, None, i)  # causal SDPA, [B, T, H]
            x = layer.post_attention_layernorm(h)  # [B, T, H]
            if not layer.is_moe:
                h = h + layer.mlp(x)
                continue
            # differs from eager: only the real tokens go through the router and the experts
            x = x.reshape(B * T, H)[keep]  # [n, H]
            logits = layer.mlp.gate(x)  # [n, E]
            weights, experts = route(logits, k, bool(cfg.norm_topk_prob), logits.dtype)  # [n, k]
            j = self.layers.index(i)
            experts_buf[j] = experts.to(torch.int32)
            weights_buf[j] = weights.float()
            logp = torch.log_softmax(logits.double(), dim=-1)  # [n, E]
            entropy_buf[j] = (-(logp.exp() * logp).sum(-1) / np.log(2)).float()  # bits, as routing.router_entropy
            if i == last:
                break  # nothing after the last router is part of the trace
            # differs from eager: one grouped GEMM per projection; a token's k outputs summed in one reduction
            mix = expert_mix(x, experts, weights, self.experts.gate_up[i], self.experts.down[i], self.slot_range,
                             "grouped_mm")  # [n, H]
            h = h.reshape(B * T, H).index_add(0, keep, mix).view(B, T, H)  # real rows: h + mix; padding: h
        return Routing(experts_buf.cpu().numpy(), weights_buf.cpu().numpy(), entropy_buf.cpu().numpy())
