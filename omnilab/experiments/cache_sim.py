"""Cache simulation: a routing trace read as decoding would request experts, replayed through the expert cache's
own policies (omnilab.model.experts.POLICIES) and Belady's optimum (MIN), which sees the whole sequence."""

from __future__ import annotations

import heapq

import numpy as np
import pandas as pd

from omnilab.experiments.routing import is_frame, trace_attr
from omnilab.model.experts import POLICIES, lazy_heap_top, make_policy


SIMULATED = ("lru", "lfu", "belady")  # hit_rate_curve's default: two of the cache's own policies and the optimum


def request_sequence(trace: pd.DataFrame, layer: int | None = None) -> np.ndarray:
    """The expert requests decoding would make, in order: document by document, token by token, layers in
    order, each token's top-k by rank. Keys are layer * num_experts + expert (or just the expert with
    `layer`). The cache persists across documents."""
    E = trace_attr(trace, "num_experts")
    if is_frame(trace):
        t = trace if layer is None else trace[trace["layer"] == layer]
    else:  # the five integer columns only (of one layer's row groups with `layer`)
        t = trace.read(layer=layer, columns=["doc", "position", "layer", "rank", "expert"])
    order = np.lexsort((t["rank"].to_numpy(), t["layer"].to_numpy(), t["position"].to_numpy(), t["doc"].to_numpy()))
    keys = t["expert"].to_numpy(np.int64) if layer is not None else t["layer"].to_numpy(np.int64) * E + t["expert"].to_numpy()
    return keys[order]


def simulate_cache(requests, capacity: int, policy: str = "lru") -> int:
    """Replay `requests` through a cache of `capacity` entries; return the number of hits. Every miss loads
    the entry (demand paging), evicting one when full, as omnilab.model.experts.ExpertCache does and with its own
    policy objects (omnilab.model.experts.POLICIES: "lru", "lfu", "trust" needs routing weights and is not
    replayed here), or "belady": the entry whose next request is farthest in the future (MIN, optimal for
    demand paging; `Belady` sees the whole sequence)."""
    requests = [int(x) for x in np.asarray(requests).reshape(-1)]
    if capacity <= 0:
        return 0
    if policy == "belady":
        rule = Belady(requests)
    elif policy in POLICIES and policy != "trust":
        rule = make_policy(policy)
    else:
        raise ValueError(f"unknown cache policy {policy!r}: use one of {SIMULATED}")
    resident, hits, none = set(), 0, frozenset()
    for key in requests:
        if key in resident:
            hits += 1
        else:
            if len(resident) >= capacity:
                victim = rule.victim(none)
                rule.remove(victim)
                resident.discard(victim)
            resident.add(key)
        rule.touch(key)
    return hits


class Belady:
    """Belady's MIN as a cache policy over a known request sequence: `touch` is called once per request, in
    order; the victim is the resident entry requested next farthest in the future. O(log n) per request with
    precomputed next-use times and a lazy max-heap."""

    def __init__(self, requests):
        n = len(requests)
        self.next_use, last = [0] * n, {}
        for i in range(n - 1, -1, -1):  # next_use[i]: the next position requesting requests[i] (n: never)
            self.next_use[i] = last.get(requests[i], n)
            last[requests[i]] = i
        self.position = 0
        self.entry: dict = {}  # resident key -> its next use
        self.heap: list = []  # (-next use, key); stale entries skipped

    def touch(self, key) -> None:
        self.entry[key] = self.next_use[self.position]
        heapq.heappush(self.heap, (-self.entry[key], key))
        self.position += 1

    def remove(self, key) -> None:
        self.entry.pop(key, None)

    def victim(self, pinned):
        return lazy_heap_top(self.heap, lambda item: self.entry.get(item[1]) == -item[0], pinned)


def default_cache_sizes(trace: pd.DataFrame) -> list[int]:
    """Cache sizes (in experts, over all layers) from one token's worth (layers x top_k) up to every expert."""
    E, k, L = trace_attr(trace, "num_experts"), trace_attr(trace, "top_k"), trace_attr(trace, "num_layers")
    total = E * L
    sizes = {k * L} | {max(1, round(total * f)) for f in (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)}
    return sorted(sizes)


def hit_rate_curve(trace: pd.DataFrame, sizes: list[int] | None = None, policies=SIMULATED, *,
                   progress: bool = False) -> pd.DataFrame:
    """Hit rate against cache size (experts held, over all layers) for each policy, replaying
    `request_sequence(trace)`. Columns: policy, size, share (of all layers x experts), hits, requests,
    hit_rate. Cold misses count: even an all-experts cache misses each expert once."""
    from tqdm.auto import tqdm

    requests = request_sequence(trace)
    total = trace_attr(trace, "num_experts") * trace_attr(trace, "num_layers")
    sizes = default_cache_sizes(trace) if sizes is None else list(sizes)
    rows = []
    for policy, size in tqdm([(p, s) for p in policies for s in sizes], desc="cache simulation", disable=not progress):
        hits = simulate_cache(requests, size, policy)
        rows.append(dict(policy=policy, size=int(size), share=size / total, hits=hits, requests=len(requests),
                         hit_rate=hits / max(1, len(requests))))
    return pd.DataFrame(rows)
