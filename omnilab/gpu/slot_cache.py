"""Which experts an offloaded decoder's device slots hold: per MoE layer an LRU of expert -> slot, the free
slots, the prefetched experts not yet routed to, and the statistics (hits, misses, prefetch hits and waste,
bytes moved). It issues no copy itself: `copy_in(layer, expert, slot, **how)` (the decoder's) does.
Follows mixtral-offloading (dvmazur/mixtral-offloading): a per-layer LRU of expert slots, with speculative
prefetch; a prefetched expert is an ordinary resident, whose first later hit counts as a prefetch hit.
"""

from __future__ import annotations

from collections import OrderedDict

from omnilab.model.experts import OFFLOAD_REPORT, CacheStats


class SlotCache:
    """The slots of every MoE layer in `layers`, `slots` per layer, each `expert_bytes` bytes."""

    def __init__(self, layers, slots: int, expert_bytes: int, copy_in):
        self.slots, self.expert_bytes, self.copy_in = slots, expert_bytes, copy_in
        self.lru = {i: OrderedDict() for i in layers}  # expert -> slot, least recently used first
        self.free = {i: list(range(slots)) for i in layers}
        self.unused_prefetch = {i: set() for i in layers}  # prefetched, not yet routed to
        self.ready = {}  # (layer, expert) -> the event of its prefetch copy (the caller's)
        self.stats = CacheStats(report=OFFLOAD_REPORT)

    def reset_stats(self) -> None:
        self.stats = CacheStats(report=OFFLOAD_REPORT)

    def clear(self, layer: int) -> None:
        """Nothing of the layer is resident (its slots were overwritten)."""
        self.lru[layer].clear()
        self.free[layer] = list(range(self.slots))
        self.unused_prefetch[layer].clear()

    def fetch(self, layer: int, e: int, keep: set, prefetch: bool, **how):
        """Make expert e of a layer resident (copy_in(layer, e, slot, **how)): its slot, or None when every
        resident expert is in `keep`. A miss evicts the layer's least recently used expert not in `keep`."""
        lru = self.lru[layer]
        if e in lru:
            return lru[e]
        if self.free[layer]:
            slot = self.free[layer].pop()
        else:
            victim = next((x for x in lru if x not in keep), None)
            if victim is None:
                return None
            slot = lru.pop(victim)
            self.ready.pop((layer, victim), None)
            if victim in self.unused_prefetch[layer]:
                self.unused_prefetch[layer].discard(victim)
                self.stats.prefetch_wasted += 1
        self.copy_in(layer, e, slot, **how)
        lru[e] = slot
        self.stats.loaded_bytes += self.expert_bytes
        if prefetch:
            self.unused_prefetch[layer].add(e)
            self.stats.prefetched += 1
        return slot

    def use(self, layer: int, e: int, want: set, **how) -> tuple[int, bool]:
        """A routed choice of expert e (`want`: every expert the layer routes to now, never evicted for it):
        (its slot, whether it missed and was copied in now); counted as a hit, a prefetch hit or a miss."""
        lru, unused, st = self.lru[layer], self.unused_prefetch[layer], self.stats
        slot = lru.get(e)
        missed = slot is None
        if not missed:
            if e in unused:
                st.prefetch_hits += 1
                unused.discard(e)
            else:
                st.hits += 1
        else:
            st.misses += 1
            slot = self.fetch(layer, e, want, prefetch=False, **how)
            if slot is None:
                raise RuntimeError(f"offload: layer {layer} needs {len(want)} experts at once, more than its slots")
        lru.move_to_end(e)
        return slot, missed

    def host(self, layer: int, e: int) -> None:
        """A routed choice of expert e, not resident, computed on the host (hybrid offload): counted, nothing moves."""
        if e in self.lru[layer]:
            raise RuntimeError(f"offload: layer {layer} expert {e} is resident; the host computes only misses")
        self.stats.host_computed += 1

    def prefetch(self, layer: int, guessed: list[int], **how) -> list[int]:
        """Copy in the experts guessed for `layer` that are not resident, until no slot can be freed (the
        guesses themselves are kept); returns those copied."""
        keep, fetched = set(), []
        for e in guessed:
            keep.add(e)
            if e in self.lru[layer]:
                continue
            if self.fetch(layer, e, keep, prefetch=True, **how) is None:
                break
            fetched.append(e)
        return fetched
