"""Synthetic routing traces for tests and benchmarks, with stated reuse statistics, and a trace's measured reuse.

A trace is a long tensor [layers, positions, k]: for each MoE layer (in `config.moe_layers` order) and each token
position, the k experts picked; `omnilab.model.routing.RoutingOverride.from_trace` routes a model by one (the way
the offloading benchmark routes a random-weight model like a trained one). The generators:

- `uniform_trace`: k distinct experts drawn uniformly at every position (the worst case for a cache).
- `locality_trace`: each choice repeats one of the previous position's experts with probability `next`, one of
  the experts of positions t-2..t-8 (not at t-1) with probability `within8 - next`, and otherwise an expert used
  nowhere in the last 8 positions, so `reuse_stats` measures `next` and `within8` by construction (as far as the
  sets allow). The default 0.45 / 0.80 are the Qwen3-30B-A3B figures quoted in issue 13 (45% of selections
  repeat at the next token, 80% within 8).
- `recorded_trace`: the routing of a real forward pass of a model (e.g. omni-tiny) over given ids.
"""

from __future__ import annotations

import torch


def _distinct_rows(gen: torch.Generator, rows: int, E: int, k: int) -> torch.Tensor:
    return torch.rand(rows, E, generator=gen).argsort(dim=-1)[:, :k]  # [rows, k], k distinct experts per row


def uniform_trace(layers: int, positions: int, num_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """[layers, positions, k]: k distinct experts uniformly at random at every layer and position."""
    gen = torch.Generator().manual_seed(seed)
    return _distinct_rows(gen, layers * positions, num_experts, k).view(layers, positions, k)


def locality_trace(layers: int, positions: int, num_experts: int, k: int, *, next: float = 0.45,
                   within8: float = 0.80, seed: int = 0) -> torch.Tensor:
    """[layers, positions, k] with about `next` of each position's choices repeated from the previous position and
    `within8` from the previous 8 positions (see the module docstring)."""
    if not 0 <= next <= within8 <= 1:
        raise ValueError(f"locality trace: need 0 <= next ({next}) <= within8 ({within8}) <= 1")
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(layers, positions, k, dtype=torch.long)
    for layer in range(layers):
        history: list[list[int]] = []
        for t in range(positions):
            prev = set(history[-1]) if history else set()
            older = set().union(*history[-8:-1]) - prev if len(history) > 1 else set()
            recent = prev | older
            chosen: list[int] = []
            for u in torch.rand(k, generator=gen).tolist():
                pool = prev if u < next else older if u < within8 else set(range(num_experts)) - recent
                pool = sorted(pool - set(chosen)) or sorted(set(range(num_experts)) - set(chosen))
                chosen.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
            history.append(chosen)
            out[layer, t] = torch.tensor(chosen)
    return out


def reuse_stats(trace: torch.Tensor) -> dict:
    """Fraction of selections (positions 1.. of every layer) whose expert was also picked at the previous position
    ("next"), and within the previous 8 positions ("within8")."""
    L, S, k = trace.shape
    nxt = within = total = 0
    for layer in range(L):
        rows = [set(r) for r in trace[layer].tolist()]
        for t in range(1, S):
            window = set().union(*rows[max(0, t - 8):t])
            for e in rows[t]:
                nxt += e in rows[t - 1]
                within += e in window
            total += len(rows[t])
    return {"next": nxt / total if total else 0.0, "within8": within / total if total else 0.0, "selections": total}


@torch.no_grad()
def recorded_trace(model, input_ids) -> torch.Tensor:
    """The top-k experts a SelectiveMoE picks over input_ids [T] (one eager forward), [moe layers, T, k]."""
    from omnilab.model.hooks import TOPK_INDICES, capture, layer_hook

    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    layers = model.config.moe_layers
    with capture(model, [layer_hook(i, TOPK_INDICES) for i in layers]) as acts:
        model(ids)
    return torch.stack([acts[layer_hook(i, TOPK_INDICES)].cpu() for i in layers])  # [L, T, k]
