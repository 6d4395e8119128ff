"""Recording routing through the selective model's router hooks: a padded batch in one forward that stops after
the last MoE layer (`record_batch`, what `omnilab trace` runs), or one forward per document into a trace
DataFrame (`record_trace`, `route`; `trace_rows` / `concat_traces` build one from arrays). Rows follow
TRACE_COLUMNS (omnilab.trace.shards). Design: docs/DESIGN.md, "Corpus traces".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from omnilab.model.hooks import ROUTER_LOGITS, TOPK_INDICES, TOPK_WEIGHTS, capture, layer_hook
from omnilab.trace.shards import TRACE_COLUMNS

class _Stop(Exception):
    """Raised from the last MoE layer's weights hook: nothing after it is needed for the routing."""

def record_batch(model, token_ids: list[list[int]], layers: list[int], *, pad_id: int = 0):
    """Prefill one batch (right-padded, plain causal attention: a real token never sees a pad) and return its
    routing as numpy arrays: experts [L, B, T, k] (int32), weights [L, B, T, k] (float32), entropy [L, B, T]
    (bits, float32), and valid [B, T] (False on padding). The forward stops after the last MoE layer's router."""
    B, T = len(token_ids), max(len(x) for x in token_ids)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T], right padded
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, x in enumerate(token_ids):
        ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        valid[b, : len(x)] = True
    got = {p: [] for p in (TOPK_INDICES, TOPK_WEIGHTS, ROUTER_LOGITS)}
    handles = []

    def recorder(point, last):
        def record(x):
            if point == ROUTER_LOGITS:  # keep the entropy [N] only, not the logits [N, E]
                logp = torch.log_softmax(x.double(), dim=-1)
                x = (-(logp.exp() * logp).sum(-1) / np.log(2)).float()  # bits, as routing.router_entropy
            got[point].append(x)
            if last:
                raise _Stop

        return record

    try:
        for i in layers:
            for point in got:
                last = i == layers[-1] and point == TOPK_WEIGHTS  # the weights hook comes after the indices
                handles.append(model.add_hook(layer_hook(i, point), recorder(point, last)))
        with torch.no_grad():
            try:
                model(ids.to(model.device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if len(got[TOPK_WEIGHTS]) != len(layers):
        raise RuntimeError(f"recorded {len(got[TOPK_WEIGHTS])} of {len(layers)} MoE layers")
    with torch.no_grad():
        experts = torch.stack(got[TOPK_INDICES]).to(torch.int32)  # [L, B * T, k]
        weights = torch.stack(got[TOPK_WEIGHTS]).float()  # [L, B * T, k]
        entropy = torch.stack(got[ROUTER_LOGITS])  # [L, B * T]
    L, k = len(layers), experts.shape[-1]
    return (experts.cpu().numpy().reshape(L, B, T, k), weights.cpu().numpy().reshape(L, B, T, k),  # [L, B, T, k]
            entropy.cpu().numpy().reshape(L, B, T), valid.numpy())  # [L, B, T], [B, T]

def router_entropy(logits) -> np.ndarray:
    """Entropy in bits of softmax(logits) over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=-1) / math.log(2)

def trace_rows(doc: int, domain: str, token_ids, experts, weights=None, entropy=None,
               layers=None) -> pd.DataFrame:
    """Trace rows for one document. experts, weights: [layers, tokens, top_k]; entropy: [layers, tokens]
    (bits); token_ids: [tokens]; layers: the layer numbers of the first axis (default 0..L-1)."""
    experts = np.asarray(experts)
    n_layers, n_tokens, k = experts.shape
    weights = np.full(experts.shape, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    entropy = np.full((n_layers, n_tokens), np.nan) if entropy is None else np.asarray(entropy, dtype=np.float64)
    token_ids = np.asarray(token_ids)
    if weights.shape != experts.shape or entropy.shape != (n_layers, n_tokens) or token_ids.shape != (n_tokens,):
        raise ValueError(f"doc {doc}: shapes disagree: experts {experts.shape}, weights {weights.shape}, "
                         f"entropy {entropy.shape}, token_ids {token_ids.shape}")
    layers = np.arange(n_layers) if layers is None else np.asarray(layers)
    # rows in (position, layer, rank) order: move tokens first. [L, T, k] -> [T, L, k]
    e = experts.transpose(1, 0, 2).reshape(-1)
    w = weights.transpose(1, 0, 2).reshape(-1)
    pos, lay, rank = np.meshgrid(np.arange(n_tokens), np.arange(n_layers), np.arange(k), indexing="ij")
    return pd.DataFrame({
        "doc": np.full(e.size, doc, dtype=np.int32),
        "domain": domain,
        "position": pos.reshape(-1).astype(np.int32),
        "token_id": token_ids[pos.reshape(-1)].astype(np.int64),
        "layer": layers[lay.reshape(-1)].astype(np.int32),
        "rank": rank.reshape(-1).astype(np.int16),
        "expert": e.astype(np.int32),
        "weight": w.astype(np.float32),
        "entropy": entropy.T[pos.reshape(-1), lay.reshape(-1)].astype(np.float32),  # [T, L] lookup
    })

def concat_traces(parts: list[pd.DataFrame], *, num_experts: int, top_k: int, num_layers: int) -> pd.DataFrame:
    """Join per-document rows into one trace and set its attrs."""
    trace = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TRACE_COLUMNS)
    trace["domain"] = trace["domain"].astype("category")
    trace.attrs.update(num_experts=int(num_experts), top_k=int(top_k), num_layers=int(num_layers))
    return trace

def record_trace(model, tokenizer, documents: pd.DataFrame, *, max_tokens: int = 128,
                 per_domain: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Run the selective model (omnilab.model.decoder.SelectiveMoE) over each document, the first `max_tokens`
    tokens of at most `per_domain` documents per domain, one document per forward pass, and record its
    routing through the hooks `blocks.{i}.mlp.hook_router_logits / hook_topk_indices / hook_topk_weights`.
    tokenizer None: the model's own. A tqdm bar runs over documents."""
    from tqdm.auto import tqdm

    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise ValueError("record_trace needs a tokenizer: the checkpoint has none, pass one")
    if per_domain is not None:
        documents = documents.groupby("domain", sort=False).head(per_domain)
    layers = list(model.config.moe_layers)
    parts = []
    for doc, row in enumerate(tqdm(list(documents.itertuples(index=False)), desc="routing trace",
                                   unit="doc", disable=not progress)):
        ids = tokenizer(row.text)["input_ids"][:max_tokens]
        if ids:
            experts, weights, logits = route(model, ids, layers)
            parts.append(trace_rows(doc, row.domain, ids, experts, weights, router_entropy(logits), layers=layers))
    if not parts:
        raise ValueError("no tokens to trace: the documents are empty")
    return concat_traces(parts, num_experts=model.config.num_experts, top_k=model.config.num_experts_per_tok,
                         num_layers=len(layers))

def route(model, ids: list[int], layers: list[int] | None = None, routing=None):
    """One forward pass over `ids` (the selective model, or anything with the same hook points); the routing
    of each MoE layer as numpy arrays: (experts [L, T, k], weights [L, T, k], router logits [L, T, E]).
    routing: the selective model's RoutingOptions for this pass (default: its own)."""
    layers = list(model.config.moe_layers) if layers is None else layers
    points = (TOPK_INDICES, TOPK_WEIGHTS, ROUTER_LOGITS)
    names = [layer_hook(i, p) for i in layers for p in points]
    ids = torch.tensor([ids], device=getattr(model, "device", "cpu"))  # [1, T]
    with torch.no_grad(), capture(model, names) as acts:
        model(ids) if routing is None else model(ids, routing=routing)

    def stack(point):  # each hook holds [B * T, .] with B = 1 -> [L, T, .]
        x = torch.stack([acts[layer_hook(i, point)] for i in layers]).cpu()
        return (x.float() if x.is_floating_point() else x).numpy()

    return tuple(stack(p) for p in points)
