"""Where expert weights come from (`ExpertStore`) and the cache that holds some of them (`ExpertCache`).

The store reads one expert's three projections (`gate_proj`, `up_proj`, `down_proj`) by tensor name through
`Checkpoint.read`, so it works on the original shards and on an extraction folder alike, and never assumes
which shard holds what: one expert's projections may sit in three different shards. The cache holds experts
under a byte budget, evicts by a pluggable policy (LRU by default, LFU, trust-weighted, plus a pinned set that is
never evicted) and keeps statistics: hits, misses, loaded bytes, evictions, peak resident bytes, load time.

Bytes are counted as the cache holds them: in the compute dtype on the compute device. The cache never holds
more than its budget: an expert is admitted only after enough others were evicted to make room for it.
"""

from __future__ import annotations

import copy
import heapq
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from omnilab.arch import EXPERT_PROJECTIONS, expert_tensor
from omnilab.dtypes import STORED_DTYPES

Key = tuple[int, int]  # (layer, expert)


class ExpertWeights(NamedTuple):
    """One expert's projections, as nn.Linear weights: gate [I, H], up [I, H], down [H, I]."""

    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def read_expert(checkpoint, layout, layer: int, expert: int, read=None) -> ExpertWeights:
    """One expert's three projections as stored (each by name, wherever its shard is): gate, up, down. read: how
    one tensor is read by name (default `checkpoint.read`, safetensors through mmap); every reader of experts
    (ExpertStore.load, gpu.slots.SlotPool, gpu.host.HostTier) comes through here."""
    read = checkpoint.read if read is None else read
    return ExpertWeights(*(read(expert_tensor(layout, layer, expert, p)) for p in EXPERT_PROJECTIONS))


class MissingExpertError(KeyError):
    """An expert the model needs is not in the checkpoint. The message names the first missing tensor."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "missing expert"


class ExpertStore:
    """Expert weights by (layer, expert), read from a Checkpoint by tensor name, in `dtype` on `device`.

    `transform(layer, expert, weights) -> weights` lets fault injection alter an expert as it is loaded.
    `resident`: a pool holding every expert on this store's device in its dtype, slot = expert (the runtime's
    SlotPool.all_resident; gate_up[layer] [E, 2I, H], down[layer] [E, H, I]), or None: while it is set, load()
    returns views into it instead of copies, so the eager path and the fast engines share one copy of the experts
    (set and cleared by omnilab.runtime.generate.resident_pool / drop_resident)."""

    def __init__(self, checkpoint, config, layout, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 transform=None):
        self.checkpoint, self.config, self.layout = checkpoint, config, layout
        self.dtype, self.device = dtype, torch.device(device)
        self.transform = transform
        self.resident = None
        I, H = config.moe_intermediate_size, config.hidden_size
        self.expert_bytes = 3 * I * H * torch.empty((), dtype=dtype).element_size()
        present = set(checkpoint.tensors.index)
        self.missing_tensors: list[str] = []  # in layer, expert, projection order
        self.available: dict[int, torch.Tensor] = {}  # layer -> bool [num_experts]
        for layer in config.moe_layers:
            ok = torch.ones(config.num_experts, dtype=torch.bool)
            for e in range(config.num_experts):
                for proj in EXPERT_PROJECTIONS:
                    name = expert_tensor(layout, layer, e, proj)
                    if name not in present:
                        self.missing_tensors.append(name)
                        ok[e] = False
            self.available[layer] = ok

    @property
    def total_bytes(self) -> int:
        """Bytes of every expert of every MoE layer, in the compute dtype."""
        return self.expert_bytes * self.config.num_experts * len(self.config.moe_layers)

    def is_complete(self) -> bool:
        return not self.missing_tensors

    def _read(self, name: str) -> torch.Tensor:
        """One stored tensor by name: its bytes read from its shard (Checkpoint.read_raw), viewed as its dtype."""
        row = self.checkpoint.tensors.loc[name]
        dtype = STORED_DTYPES.get(row["dtype"])
        if dtype is None:  # a dtype this reader does not map: safetensors decodes it
            return self.checkpoint.read(name)
        data = bytearray(self.checkpoint.read_raw(name))
        return torch.frombuffer(data, dtype=dtype).reshape(tuple(row["shape"]))

    def load(self, layer: int, expert: int) -> ExpertWeights:
        """Read one expert's three projections (each by name, wherever its shard is)."""
        names = [expert_tensor(self.layout, layer, expert, proj) for proj in EXPERT_PROJECTIONS]
        for name in names:
            if name not in self.checkpoint.tensors.index:
                raise MissingExpertError(f"expert {expert} of layer {layer} is not in the checkpoint: "
                                         f"tensor {name} is missing")
        if self.resident is not None and self.transform is None:  # views: the same values, no second copy
            I = self.config.moe_intermediate_size
            gate_up = self.resident.gate_up[layer][expert]  # [2I, H]: gate rows then up rows
            return ExpertWeights(gate_up[:I], gate_up[I:], self.resident.down[layer][expert])
        # Read as stored bytes (one pread per projection), not through a kept safetensors handle: on an extraction
        # (a file per expert) every handle opened stayed in anonymous memory, 10 GB for an 8-layer real-shape model
        # whose budget was 4 GiB. copy=True: the cache holds its own memory in the compute dtype.
        weights = ExpertWeights(*(t.to(device=self.device, dtype=self.dtype, copy=True)
                                  for t in read_expert(self.checkpoint, self.layout, layer, expert, read=self._read)))
        if self.transform is not None:
            weights = self.transform(layer, expert, weights)
        return weights


# -- eviction policies -----------------------------------------------------------------------------------------
#
# A policy tracks the resident experts: the cache calls `touch(key)` when an expert is admitted and on every hit,
# and `remove(key)` when it is evicted or cleared, so `order` (least recently used first) holds exactly the
# resident keys. `victim(pinned)` names the resident expert to evict next, never one in `pinned`, or None when
# every resident expert is pinned.


class LRU:
    """Evict the expert used longest ago."""

    def __init__(self):
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, pinned: set[Key]) -> Key | None:
        return next((k for k in self.order if k not in pinned), None)


def lazy_heap_top(heap: list, live, pinned) -> Key | None:
    """The key (last field) of the smallest heap item that is `live(item)` and not in `pinned`, left in place;
    stale items on the way are dropped (the lazy deletion of LFU and Belady), pinned ones kept."""
    skipped, found = [], None
    while heap:
        item = heap[0]
        if not live(item):
            heapq.heappop(heap)  # stale: touched again since, or evicted
        elif item[-1] in pinned:
            skipped.append(heapq.heappop(heap))
        else:
            found = item[-1]
            break
    for item in skipped:
        heapq.heappush(heap, item)
    return found


class LFU(LRU):
    """Evict the expert used least often (since it was first loaded); ties go to the one used longest ago.

    Counts survive eviction, so an expert that is popular over the whole run is preferred when it comes back.
    The minimum is kept in a lazy heap of (count, last use, key): O(log n) per touch and per eviction."""

    def __init__(self):
        super().__init__()
        self.count: dict[Key, int] = {}
        self.entry: dict[Key, tuple[int, int]] = {}  # resident key -> (count, last use) of its live heap entry
        self.heap: list[tuple[int, int, Key]] = []
        self.clock = 0

    def touch(self, key: Key) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self.clock += 1
        self.entry[key] = (self.count[key], self.clock)
        heapq.heappush(self.heap, (self.count[key], self.clock, key))
        super().touch(key)

    def remove(self, key: Key) -> None:
        self.entry.pop(key, None)
        super().remove(key)

    def victim(self, pinned: set[Key]) -> Key | None:
        return lazy_heap_top(self.heap, lambda item: self.entry.get(item[-1]) == item[:2], pinned)


class TrustWeighted(LRU):
    """Trust-weighted eviction (the rule of earlier hand-built loaders): evict the expert with the least trust,
    where trust is the routing weight an expert has received, decayed by `decay` per forward pass (counts
    survive eviction); ties go to the one used longest ago. The MoE step hands each layer's routing weights to
    the cache (`ExpertCache.observe`), which passes them here; a forward pass begins when a layer is observed
    that is not after the previous one. Recency (`order`, `touch`, `remove`) is LRU's."""

    def __init__(self, decay: float = 0.9):
        super().__init__()
        self.decay = decay
        self.trust: dict[Key, tuple[float, int]] = {}  # key -> (trust, forward pass it was set at)
        self.step = 0
        self.last_layer: int | None = None

    def value(self, key) -> float:
        v, t = self.trust.get(key, (0.0, self.step))
        return v * self.decay ** (self.step - t)

    def observe(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one layer's routing weights (experts, weights [N, k]) to its experts' trust."""
        if self.last_layer is None or layer <= self.last_layer:
            self.step += 1  # a new forward pass
        self.last_layer = layer
        flat = experts.reshape(-1).cpu()  # [N * k]
        mass = torch.zeros(int(flat.max()) + 1).index_add_(0, flat, weights.reshape(-1).float().cpu())  # [E seen]
        for e in torch.nonzero(mass).reshape(-1).tolist():
            self.trust[layer, e] = (self.value((layer, e)) + float(mass[e]), self.step)

    def victim(self, pinned):
        # min keeps the first of equal trust, i.e. the one used longest ago
        return min((k for k in self.order if k not in pinned), key=self.value, default=None)


POLICIES = {"lru": LRU, "lfu": LFU, "trust": TrustWeighted}  # the online policies; the cache simulation replays these


def make_policy(policy):
    """A fresh policy object from its name in POLICIES, or `policy` itself when it is already one."""
    if not isinstance(policy, str):
        return policy
    try:
        return POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown cache policy {policy!r}: use one of {', '.join(POLICIES)}") from None


# what each path reports (to_dict keys, in this order): the eager cache and the offloaded decoder
EAGER_REPORT = ("budget_bytes", "hits", "misses", "loaded_bytes", "evictions", "resident_bytes", "peak_resident_bytes",
                "load_seconds", "masked_choices", "per_layer_misses", "hit_rate")
OFFLOAD_REPORT = ("hits", "misses", "host_computed", "prefetch_hits", "prefetched", "prefetch_wasted", "bytes_moved", "copies", "tokens",
                  "hit_rate", "prefetch_precision", "prefetch_recall", "bytes_per_token")


@dataclass
class CacheStats:
    """What an expert cache did: the eager ExpertCache's and the offloaded decoder's (omnilab.gpu.slot_cache).
    Bytes are as held (compute dtype): loaded_bytes sums every admitted expert, so it exceeds the budget once
    experts are evicted and reloaded; peak_resident_bytes never exceeds the budget. `report`: the keys to_dict
    gives (EAGER_REPORT or OFFLOAD_REPORT), so each path's JSON keeps its own keys."""

    budget_bytes: int = 0
    hits: int = 0  # routed choices whose expert was resident
    misses: int = 0  # routed choices loaded / copied in on demand (the compute waited)
    loaded_bytes: int = 0  # bytes of every admitted expert (the offload's bytes_moved)
    evictions: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    load_seconds: float = 0.0
    masked_choices: int = 0  # routed choices that fell on a missing expert (mask_missing_experts only)
    per_layer_misses: dict = field(default_factory=dict)
    prefetch_hits: int = 0  # hits on an expert brought in by a prefetch, not yet used
    prefetched: int = 0  # experts copied in speculatively
    prefetch_wasted: int = 0  # prefetched experts evicted unused
    copies: int = 0  # host->device copy calls issued
    host_computed: int = 0  # routed choices not resident, computed on the host's cores instead of copied (hybrid)
    tokens: int = 0  # decode steps counted
    report: tuple = field(default=EAGER_REPORT, repr=False, compare=False)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses + self.host_computed
        return self.hits / n if n else 0.0

    @property
    def bytes_moved(self) -> int:
        return self.loaded_bytes

    @property
    def prefetch_precision(self) -> float:
        """Of the experts prefetched, the fraction used by the layer they were fetched for."""
        return self.prefetch_hits / self.prefetched if self.prefetched else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the choices that were not resident before the prefetch, the fraction the prefetch covered."""
        n = self.prefetch_hits + self.misses
        return self.prefetch_hits / n if n else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.loaded_bytes / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in self.report}


class ExpertCache:
    """Experts held under a byte budget. `get(layer, expert)` returns the weights, loading them on a miss.

    budget_bytes: None -> every expert fits, nothing is ever evicted. policy: "lru", "lfu", "trust" or an object with
    touch(key) / remove(key) / victim(pinned) (see LRU: it tracks the resident keys and names the one to evict,
    not in `pinned`, or None). pinned: (layer, expert) keys that are never evicted (they still count in the
    budget)."""

    def __init__(self, store: ExpertStore, budget_bytes: int | None = None, policy="lru", pinned=()):
        self.store = store
        self.budget_bytes = store.total_bytes if budget_bytes is None else int(budget_bytes)
        if self.budget_bytes < store.expert_bytes:
            raise ValueError(f"expert budget {self.budget_bytes:,} bytes is smaller than one expert "
                             f"({store.expert_bytes:,} bytes in {str(store.dtype).removeprefix('torch.')})")
        self.policy = make_policy(policy)
        self.pinned: set[Key] = {tuple(k) for k in pinned}
        moe_layers, n = set(store.config.moe_layers), store.config.num_experts
        for key in self.pinned:
            if (len(key) != 2 or not all(type(x) is int for x in key) or key[0] not in moe_layers
                    or not 0 <= key[1] < n):
                raise ValueError(f"pinned expert {key!r} is not a (MoE layer, expert) of this model "
                                 f"(layers {min(moe_layers, default=0)}..{max(moe_layers, default=-1)}, experts 0..{n - 1})")
        if len(self.pinned) * store.expert_bytes > self.budget_bytes:
            raise ValueError(f"{len(self.pinned)} pinned experts need {len(self.pinned) * store.expert_bytes:,} bytes, "
                             f"more than the budget of {self.budget_bytes:,}")
        self.resident: dict[Key, ExpertWeights] = {}
        self.stats = CacheStats(self.budget_bytes)

    def __contains__(self, key: Key) -> bool:
        return tuple(key) in self.resident

    def get(self, layer: int, expert: int) -> ExpertWeights:
        key = (layer, expert)
        weights = self.resident.get(key)
        if weights is not None:
            self.stats.hits += 1
            self.policy.touch(key)
            return weights
        self.stats.misses += 1
        self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + 1
        nbytes = self.store.expert_bytes
        self._make_room(nbytes)  # before loading: memory never holds more than the budget, not even for a moment
        start = time.perf_counter()
        weights = self.store.load(layer, expert)
        self.stats.load_seconds += time.perf_counter() - start
        if weights.nbytes != nbytes:
            raise RuntimeError(f"expert {expert} of layer {layer} loaded as {weights.nbytes:,} bytes, "
                               f"not the {nbytes:,} its store counts")
        self.resident[key] = weights
        self.stats.loaded_bytes += nbytes
        self.stats.resident_bytes += nbytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.stats.resident_bytes)
        self.policy.touch(key)
        return weights

    def observe(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """One MoE layer's routing (experts, weights [N, k]), before its experts are fetched: passed to a policy
        that weighs by it (TrustWeighted)."""
        if hasattr(self.policy, "observe"):
            self.policy.observe(layer, experts, weights)

    def _make_room(self, nbytes: int) -> None:
        while self.stats.resident_bytes + nbytes > self.budget_bytes:
            key = self.policy.victim(self.pinned)
            if key is None:
                raise RuntimeError(f"expert budget {self.budget_bytes:,} bytes is full of pinned experts")
            self.evict(key)

    def evict(self, key: Key) -> None:
        weights = self.resident.pop(key)
        self.policy.remove(key)
        self.stats.resident_bytes -= weights.nbytes
        self.stats.evictions += 1

    def reread(self, change_source) -> None:
        """Call `change_source()` (which changes where the store reads experts from) and read every resident
        expert again from the store; keys, policy and statistics are kept. The old weights are let go before
        change_source runs, so the two copies never coexist."""
        keys = list(self.resident)
        self.resident.clear()
        change_source()
        for key in keys:
            self.resident[key] = self.store.load(*key)

    def clear(self) -> None:
        """Drop every expert (pinned ones too); statistics are kept."""
        for key in list(self.resident):
            weights = self.resident.pop(key)
            self.policy.remove(key)
            self.stats.resident_bytes -= weights.nbytes

    def reset_stats(self) -> None:
        resident = self.stats.resident_bytes
        self.stats = CacheStats(self.budget_bytes, resident_bytes=resident, peak_resident_bytes=resident)
