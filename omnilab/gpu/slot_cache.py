"""Which experts an offloaded decoder's device slots hold: per MoE layer a map expert -> slot and an eviction
policy (the eager cache's policies: omnilab.model.experts.POLICIES, one object per layer), the free slots, the
prefetched experts not yet routed to, and the statistics (hits, misses, prefetch hits and waste, bytes moved). It
issues no copy itself: `copy_in(layer, expert, slot, **how)` (the decoder's) does.
Follows mixtral-offloading (dvmazur/mixtral-offloading): per-layer expert slots (LRU by default), with speculative
prefetch; a prefetched expert is an ordinary resident, whose first later hit counts as a prefetch hit.
"""

from __future__ import annotations

from omnilab.model.experts import OFFLOAD_REPORT, CacheStats, make_policy


class SlotCache:
    """The slots of every MoE layer in `layers`, `slots` per layer, each `expert_bytes` bytes.

    policy: how a full layer picks the expert to evict: a name in POLICIES ("lru", "lfu", "trust") or a class of
    them (any callable making a fresh policy object); one object per layer, told of the layer's keys (layer,
    expert) as the eager ExpertCache tells its one policy: `touch` when an expert is copied in and on every hit,
    `remove` when it is evicted, `observe` (TrustWeighted) with the layer's routing weights. The eager cache's
    budget is global over all layers; here each layer has its own slots, so a policy ranks a layer's experts
    against each other only (LFU's counts and the trust of one layer never evict another layer's expert). A
    prefetched expert is touched when copied in and again when first routed to (LFU counts both)."""

    def __init__(self, layers, slots: int, expert_bytes: int, copy_in, policy="lru"):
        self.slots, self.expert_bytes, self.copy_in = slots, expert_bytes, copy_in
        if not callable(policy) and not isinstance(policy, str):
            raise ValueError(f"offload: policy {type(policy).__name__} object: give its name or class (the slots "
                             f"keep one policy per layer)")
        fresh = (lambda: make_policy(policy)) if isinstance(policy, str) else policy
        self.policy = {i: fresh() for i in layers}  # per layer: keys (layer, expert) of its resident experts
        self.observes = any(hasattr(p, "observe") for p in self.policy.values())  # it wants the routing weights
        self.where = {i: {} for i in layers}  # per layer: resident expert -> its slot
        self.free = {i: list(range(slots)) for i in layers}
        self.unused_prefetch = {i: set() for i in layers}  # prefetched, not yet routed to
        self.ready = {}  # (layer, expert) -> the event of its prefetch copy (the caller's)
        self.stats = CacheStats(report=OFFLOAD_REPORT)

    def reset_stats(self) -> None:
        self.stats = CacheStats(report=OFFLOAD_REPORT)

    def clear(self, layer: int) -> None:
        """Nothing of the layer is resident (its slots were overwritten)."""
        for e in self.where[layer]:
            self.policy[layer].remove((layer, e))
        self.where[layer].clear()
        self.free[layer] = list(range(self.slots))
        self.unused_prefetch[layer].clear()

    def observe(self, layer: int, experts, weights) -> None:
        """One layer's routing on the host (experts, weights [N, k]), before its experts are used: passed to a
        policy that weighs by it (TrustWeighted), as ExpertCache.observe does."""
        if self.observes:
            self.policy[layer].observe(layer, experts, weights)

    def fetch(self, layer: int, e: int, keep: set, prefetch: bool, **how):
        """Make expert e of a layer resident (copy_in(layer, e, slot, **how)): its slot, or None when every
        resident expert is in `keep`. A miss evicts the layer's policy's victim, never one in `keep`."""
        where, policy = self.where[layer], self.policy[layer]
        if e in where:
            return where[e]
        if self.free[layer]:
            slot = self.free[layer].pop()
        else:
            key = policy.victim({(layer, x) for x in keep})
            if key is None:
                return None
            victim = key[1]
            slot = where.pop(victim)
            policy.remove(key)
            self.ready.pop(key, None)
            if victim in self.unused_prefetch[layer]:
                self.unused_prefetch[layer].discard(victim)
                self.stats.prefetch_wasted += 1
        self.copy_in(layer, e, slot, **how)
        where[e] = slot
        policy.touch((layer, e))
        self.stats.loaded_bytes += self.expert_bytes
        if prefetch:
            self.unused_prefetch[layer].add(e)
            self.stats.prefetched += 1
        return slot

    def use(self, layer: int, e: int, want: set, **how) -> tuple[int, bool]:
        """A routed choice of expert e (`want`: every expert the layer routes to now, never evicted for it):
        (its slot, whether it missed and was copied in now); counted as a hit, a prefetch hit or a miss."""
        where, unused, st = self.where[layer], self.unused_prefetch[layer], self.stats
        slot = where.get(e)
        missed = slot is None
        if not missed:
            if e in unused:
                st.prefetch_hits += 1
                unused.discard(e)
            else:
                st.hits += 1
            self.policy[layer].touch((layer, e))
        else:
            st.misses += 1
            slot = self.fetch(layer, e, want, prefetch=False, **how)  # touches it
            if slot is None:
                raise RuntimeError(f"offload: layer {layer} needs {len(want)} experts at once, more than its slots")
        return slot, missed

    def host(self, layer: int, e: int) -> None:
        """A routed choice of expert e, not resident, computed on the host (hybrid offload): counted, nothing moves."""
        if e in self.where[layer]:
            raise RuntimeError(f"offload: layer {layer} expert {e} is resident; the host computes only misses")
        self.stats.host_computed += 1

    def prefetch(self, layer: int, guessed: list[int], **how) -> list[int]:
        """Copy in the experts guessed for `layer` that are not resident, until no slot can be freed (the
        guesses themselves are kept); returns those copied."""
        keep, fetched = set(), []
        for e in guessed:
            keep.add(e)
            if e in self.where[layer]:
                continue
            if self.fetch(layer, e, keep, prefetch=True, **how) is None:
                break
            fetched.append(e)
        return fetched
