"""Offloaded decoding: experts in a host tier, a GPU slot pool of a byte budget, copies on a side stream,
speculative next-layer prefetch. Follows mixtral-offloading (dvmazur/mixtral-offloading: per-layer LRU of expert
slots on the GPU, pinned host copies, the next layer's gate applied to the current hidden state to prefetch) and
reuses the fast path's pieces (omnilab.gpu.engine: SlotPool, StaticKV, the attention and expert-mix functions).

Per MoE layer i of a step: attention; the router's top-k; the *next* MoE layer's router applied to this layer's
post-attention state (normed with that layer's norm) guesses its experts; one small device->host read of both
(the step's only syncs, one per layer); misses of layer i are copied host->slot on the copy stream (a slot's
expert is evicted by the layer's LRU, never one needed by this token), the compute stream waits on their events;
then the guessed experts of layer i+1 start copying while layer i's experts compute. Prefetched experts are
ordinary residents: a later hit on one counts as a prefetch hit.

Host tier (`HostTier`): `copy` stacks every expert in (pinned, on CUDA) host memory; `mapped` views the
experts where they lie in the shards' memory maps (on /dev/shm: no second copy) and registers those maps with
CUDA as page-locked, so copies run at pinned speed with no extra host memory. Exactness is unchanged by
offloading: every budget computes the same experts as the all-resident path (tests/test_offload.py, fp32).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch

from omnilab.arch import EXPERT_PROJECTIONS, expert_tensor
from omnilab.gpu.engine import Consts, SlotPool, StaticKV, attention, expert_mix, layer_weights, rms_norm, route
from omnilab.gpu.traces import RoutingOverride
from omnilab.model.decoder import Generation, rope_inv_freq


class HostTier:
    """Every expert's projections on the host: `expert(layer, e) -> (gate [I, H], up [I, H], down [H, I])`."""

    def __init__(self, views: dict, nbytes: int, pinned: bool, how: str):
        self.views, self.nbytes, self.pinned, self.how = views, nbytes, pinned, how
        self._registered: list = []

    def expert(self, layer: int, e: int):
        return self.views[layer, e]

    @classmethod
    def copy(cls, checkpoint, config, layout, dtype: torch.dtype, pin: bool) -> "HostTier":
        """Read every expert once into host memory (page-locked when pin)."""
        I, H = config.moe_intermediate_size, config.hidden_size
        views, nbytes = {}, 0
        for layer in config.moe_layers:
            block = torch.empty(config.num_experts, 3, I * H, dtype=dtype, pin_memory=pin)  # [E, 3, I * H]
            for e in range(config.num_experts):
                for j, p in enumerate(EXPERT_PROJECTIONS):
                    block[e, j].copy_(checkpoint.read(expert_tensor(layout, layer, e, p)).reshape(-1))
                views[layer, e] = (block[e, 0].view(I, H), block[e, 1].view(I, H), block[e, 2].view(H, I))
            nbytes += block.numel() * block.element_size()
        return cls(views, nbytes, pin, "pinned copy" if pin else "copy")

    @classmethod
    def mapped(cls, checkpoint, config, layout, register: bool = True) -> "HostTier":
        """Views into the shards' memory maps (the stored dtype), each map registered as page-locked with CUDA
        (cudaHostRegister) when register; on failure the views stay pageable and `pinned` is False."""
        maps, views, nbytes = {}, {}, 0
        table = checkpoint.tensors
        for layer in config.moe_layers:
            for e in range(config.num_experts):
                parts = []
                for p in EXPERT_PROJECTIONS:
                    row = table.loc[expert_tensor(layout, layer, e, p)]
                    shard = row["shard"]
                    if shard not in maps:
                        maps[shard] = np.memmap(checkpoint.root / shard, dtype=np.uint8, mode="r+")
                    raw = torch.from_numpy(maps[shard][int(row["begin"]):int(row["end"])])
                    parts.append(raw.view(_TORCH_DTYPES[row["dtype"]]).view(*row["shape"]))
                    nbytes += int(row["end"] - row["begin"])
                views[layer, e] = tuple(parts)
        tier = cls(views, nbytes, False, "shard maps")
        tier._maps = maps
        if register and torch.cuda.is_available():
            cudart = torch.cuda.cudart()
            ok = True
            for m in maps.values():
                ptr = m.ctypes.data
                try:
                    err = int(cudart.cudaHostRegister(ptr, m.nbytes, 0))
                except Exception:  # noqa: BLE001 - any failure leaves the maps pageable, reported in `how`
                    err = -1
                if err != 0:
                    ok = False
                    break
                tier._registered.append(ptr)
            tier.pinned, tier.how = ok, "shard maps, registered page-locked" if ok else "shard maps (pageable)"
        return tier


_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@dataclass
class OffloadStats:
    hits: int = 0  # routed choices whose expert was resident
    misses: int = 0  # routed choices copied in on demand (the compute waited)
    prefetch_hits: int = 0  # hits on an expert brought in by a prefetch, not yet used
    prefetched: int = 0  # experts copied in speculatively
    prefetch_wasted: int = 0  # prefetched experts evicted unused
    bytes_moved: int = 0
    tokens: int = 0  # decode steps counted

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Of the experts prefetched, the fraction used by the layer they were fetched for."""
        return self.prefetch_hits / self.prefetched if self.prefetched else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Of the choices that were not resident before the prefetch, the fraction the prefetch covered."""
        n = self.prefetch_hits + self.misses
        return self.prefetch_hits / n if n else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, prefetch_precision=self.prefetch_precision,
                 prefetch_recall=self.prefetch_recall,
                 bytes_per_token=self.bytes_moved / self.tokens if self.tokens else 0.0)
        return d


class OffloadDecoder:
    """Greedy decoding of a SelectiveMoE whose experts live in a HostTier, `slots` of them per layer on the device.

    slots: experts held per MoE layer (>= top-k); or give expert_budget_bytes (split evenly over the layers).
    prefetch: speculative next-layer prefetch. override: a RoutingOverride (defaults to model.routing_override)."""

    def __init__(self, model, host: HostTier, *, slots: int | None = None, expert_budget_bytes: int | None = None,
                 max_len: int = 512, prefetch: bool = True, override: RoutingOverride | None = None,
                 compute: str | None = None, graphs: bool | None = None):
        cfg = self.config = model.config
        self.model, self.host = model, host
        self.device, self.dtype = model.device, model.dtype
        k, E = cfg.num_experts_per_tok, cfg.num_experts
        layers = cfg.moe_layers
        if slots is None:
            per = SlotPool(cfg, 1, self.dtype, "meta").expert_bytes
            slots = min(E, int(expert_budget_bytes // (per * len(layers)))) if expert_budget_bytes else E
        if slots < k:
            raise ValueError(f"offload: {slots} expert slots per layer, fewer than top-{k}")
        self.pool = SlotPool(cfg, slots, self.dtype, self.device)
        self.max_len = -(-max_len // 64) * 64
        self.kv = StaticKV(cfg, 1, self.max_len, self.dtype, self.device)
        self.prefetch_enabled = prefetch
        self.override = override if override is not None else getattr(model, "routing_override", None)
        self.compute = compute or ("grouped_mm" if self.dtype == torch.bfloat16 or self.device.type == "cpu"
                                   else "gather")
        dev = self.device
        inv_freq = rope_inv_freq(cfg).to(dev)
        freqs = torch.arange(self.max_len, device=dev).float()[:, None] * inv_freq  # [S_max, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S_max, hd]
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self.key_pos = torch.arange(self.max_len, device=dev)
        self.slot_range = torch.arange(slots, device=dev)
        self.consts = Consts(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, k,
                             bool(cfg.norm_topk_prob), float(cfg.rms_norm_eps))
        self.weights = {i: layer_weights(layer) for i, layer in enumerate(model.model.layers) if layer.is_moe}
        self.next_moe = {a: b for a, b in zip(layers, layers[1:])}
        self.lru = {i: OrderedDict() for i in layers}  # expert -> slot, least recently used first
        self.free = {i: list(range(slots)) for i in layers}
        self.unused_prefetch = {i: set() for i in layers}  # prefetched, not yet routed to
        self.ready = {}  # (layer, expert) -> CUDA event of its copy
        cuda = dev.type == "cuda"
        self.copy_stream = torch.cuda.Stream(dev) if cuda else None
        self.stats = OffloadStats()
        self.routing = []  # per step: [moe layers, T, k] on the host
        # the decode step in segments: per MoE layer, "a" (attention, router, routed ids to a pinned host buffer)
        # and "b" (the expert mix on the slots the host chose), plus "final" (norm, lm_head, argmax); each a CUDA
        # graph on CUDA (graphs=None: when CUDA), plain calls elsewhere. Between a and b the host reads the ids
        # (the layer's one sync), fetches misses and writes the slots.
        self.segmented = all(layer.is_moe for layer in model.model.layers)
        self.graphs = (cuda if graphs is None else graphs) and self.segmented
        H = cfg.hidden_size
        pin = cuda
        self.s_ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.s_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.s_h = torch.zeros(1, 1, H, dtype=self.dtype, device=dev)
        self.s_x = torch.zeros(1, H, dtype=self.dtype, device=dev)
        self.s_w = torch.zeros(1, k, dtype=self.dtype, device=dev)
        self.s_experts = torch.zeros(1, k, dtype=torch.long, device=dev)
        self.s_slots = torch.zeros(1, k, dtype=torch.long, device=dev)
        self.s_token = torch.zeros(1, dtype=torch.long, device=dev)
        self.s_vocab_mask = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
        self.h_experts = torch.zeros(k, dtype=torch.long, pin_memory=pin)  # the routed ids, read by the host
        self.h_slots = torch.zeros(k, dtype=torch.long, pin_memory=pin)
        self.h_token = torch.zeros(1, dtype=torch.long, pin_memory=pin)
        self._graphs = None

    # -- slots ---------------------------------------------------------------------------------------------------
    def _fetch(self, layer: int, e: int, keep: set, prefetch: bool) -> bool:
        """Make expert e of a layer resident (copy on the copy stream); False when no slot can be freed."""
        lru = self.lru[layer]
        if e in lru:
            return True
        if self.free[layer]:
            slot = self.free[layer].pop()
        else:
            victim = next((x for x in lru if x not in keep), None)
            if victim is None:
                return False
            slot = lru.pop(victim)
            self.ready.pop((layer, victim), None)
            if victim in self.unused_prefetch[layer]:
                self.unused_prefetch[layer].discard(victim)
                self.stats.prefetch_wasted += 1
        gate, up, down = self.host.expert(layer, e)
        if self.copy_stream is not None:
            # the slot may still be read by this layer's previous compute: the copy waits for the compute stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.pool.put(layer, e, slot, gate, up, down, non_blocking=self.host.pinned)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.ready[layer, e] = event
        else:
            self.pool.put(layer, e, slot, gate, up, down)
        lru[e] = slot
        self.stats.bytes_moved += self.pool.expert_bytes
        if prefetch:
            self.unused_prefetch[layer].add(e)
            self.stats.prefetched += 1
        return True

    def _use(self, layer: int, experts: list[int]) -> list[int]:
        """Experts routed now -> their slots; misses are fetched and waited for. Updates the statistics."""
        want = set(experts)
        for e in experts:
            if e in self.lru[layer]:
                if e in self.unused_prefetch[layer]:
                    self.stats.prefetch_hits += 1
                    self.unused_prefetch[layer].discard(e)
                else:
                    self.stats.hits += 1
            else:
                self.stats.misses += 1
                if not self._fetch(layer, e, want, prefetch=False):
                    raise RuntimeError(f"offload: layer {layer} needs {len(want)} experts at once, more than its slots")
            self.lru[layer].move_to_end(e)
        if self.copy_stream is not None:
            stream = torch.cuda.current_stream(self.device)
            for e in want:
                event = self.ready.pop((layer, e), None)
                if event is not None:
                    stream.wait_event(event)  # the compute waits on the device, the host goes on
        return [self.lru[layer][e] for e in experts]

    # -- the step ------------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids [1, T] at positions [T] -> last-token logits [1, V]."""
        m, cfg, c = self.model, self.config, self.consts
        B, T = ids.shape
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        cos, sin = self.cos[positions], self.sin[positions]
        mask = (self.key_pos[None, :] <= positions[:, None]).repeat(g, 1)[None, None]  # [1, 1, g * T, S_max]
        h = m.model.embed_tokens(ids)  # [B, T, H]
        step_routing = []
        for i, layer in enumerate(m.model.layers):
            if not layer.is_moe:
                from omnilab.gpu.engine import dense_layer

                h = dense_layer(layer, h, cos, sin, mask, positions, self.kv.keys[i], self.kv.values[i], c)
                continue
            w = self.weights[i]
            h = h + attention(h, w, cos, sin, mask, positions, self.kv.keys[i], self.kv.values[i], c)
            H = h.shape[-1]
            x = rms_norm(w.post_norm, h, c.eps).reshape(B * T, H)  # [N, H]
            forced = self.override.choice(i, positions) if self.override is not None else None
            weights, experts = route(torch.nn.functional.linear(x, w.router), c.top_k, c.norm_topk_prob, x.dtype,
                                     forced)  # [N, k]
            nxt = self.next_moe.get(i) if self.prefetch_enabled else None
            guess = None
            if nxt is not None:
                wn = self.weights[nxt]
                xn = rms_norm(wn.post_norm, h, c.eps).reshape(B * T, H)
                guess = torch.topk(torch.nn.functional.linear(xn, wn.router), c.top_k, dim=-1).indices  # [N, k]
            both = experts if guess is None else torch.cat((experts, guess), dim=0)
            both = both.tolist()  # the layer's one sync: routed experts (and the guess) to the host
            routed, guessed = both[:B * T], both[B * T:]
            step_routing.append(routed)
            flat = [e for row in routed for e in row]
            distinct = list(dict.fromkeys(flat))
            if len(distinct) <= self.pool.slots:
                slots = torch.tensor(self._use(i, flat), device=self.device).view(B * T, -1)  # [N, k]
                out = None
            else:  # a prefill needing more experts than the layer's slots: in chunks of slots experts
                out = self._chunked(i, x, experts, weights, distinct)
            if guess is not None:  # start the next layer's likely experts copying while this layer computes
                keep = set()
                for e in dict.fromkeys(e for row in guessed for e in row):
                    keep.add(e)
                    if not self._fetch(nxt, e, keep, prefetch=True):
                        break
            if out is None:
                out = expert_mix(x, slots, weights, self.pool.gate_up[i], self.pool.down[i], self.slot_range,
                                 self.compute)
            h = h + out.view(B, T, H)
        self.routing.append(torch.tensor(step_routing))  # [moe layers, N, k]
        h = rms_norm(m.model.norm.weight, h[:, -1], m.model.norm.eps)
        return m.lm_head(h)  # [B, V]

    def _chunked(self, i, x, experts, weights, distinct):
        """The expert mix when a step routes to more distinct experts than the layer has slots: one pass per
        chunk of experts, the other choices' weights zeroed (their rows compute on a resident slot, times 0)."""
        out = torch.zeros_like(x)  # [N, H]
        n = self.pool.slots
        for start in range(0, len(distinct), n):
            chunk = distinct[start:start + n]
            slot_of = dict(zip(chunk, self._use(i, chunk)))
            lookup = torch.full((self.config.num_experts,), -1, dtype=torch.long)
            lookup[list(slot_of)] = torch.tensor(list(slot_of.values()))
            slots = lookup.to(self.device)[experts]  # [N, k]: -1 off the chunk
            inside = slots >= 0
            out += expert_mix(x, slots.clamp(min=0), weights * inside, self.pool.gate_up[i], self.pool.down[i],
                              self.slot_range, self.compute)
        return out

    # -- the segmented decode step -------------------------------------------------------------------------------
    def _seg_a(self, i: int) -> None:
        c, w = self.consts, self.weights[i]
        if i == 0:
            self.s_h.copy_(self.model.model.embed_tokens(self.s_ids))
        g = c.heads // c.kv_heads
        pos = self.s_pos
        cos, sin = self.cos[pos], self.sin[pos]
        mask = (self.key_pos[None, :] <= pos[:, None]).repeat(g, 1)[None, None]  # [1, 1, g, S_max]
        h = self.s_h + attention(self.s_h, w, cos, sin, mask, pos, self.kv.keys[i], self.kv.values[i], c)
        self.s_h.copy_(h)
        x = rms_norm(w.post_norm, h, c.eps).reshape(1, -1)  # [1, H]
        forced = self.override.choice(i, pos) if self.override is not None else None
        weights, experts = route(torch.nn.functional.linear(x, w.router), c.top_k, c.norm_topk_prob, x.dtype, forced)
        self.s_x.copy_(x)
        self.s_w.copy_(weights)
        self.s_experts.copy_(experts)
        self.h_experts.copy_(experts[0], non_blocking=True)  # to the pinned host buffer

    def _seg_b(self, i: int) -> None:
        out = expert_mix(self.s_x, self.s_slots, self.s_w, self.pool.gate_up[i], self.pool.down[i], self.slot_range,
                         self.compute)  # [1, H]
        self.s_h.add_(out.view(1, 1, -1))

    def _seg_final(self) -> None:
        m = self.model
        h = rms_norm(m.model.norm.weight, self.s_h[:, -1], m.model.norm.eps)
        logits = m.lm_head(h).float().masked_fill(self.s_vocab_mask, float("-inf"))  # [1, V]
        self.s_token.copy_(logits.argmax(-1))
        self.h_token.copy_(self.s_token, non_blocking=True)

    def _segments(self):
        """(name, function) in step order."""
        out = []
        for i in self.config.moe_layers:
            out += [(("a", i), lambda i=i: self._seg_a(i)), (("b", i), lambda i=i: self._seg_b(i))]
        return out + [(("final", None), self._seg_final)]

    def _capture(self) -> None:
        saved_pos = self.s_pos.clone()
        self.s_pos.fill_(0)  # warm-up at position 0 (rewritten by the next prefill)
        self.s_slots.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _, fn in self._segments():
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        self._graphs = {}
        for name, fn in self._segments():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                fn()
            self._graphs[name] = graph
        self.s_pos.copy_(saved_pos)

    def _run(self, name, fn) -> None:
        if self._graphs is not None:
            self._graphs[name].replay()
        else:
            fn()

    def _decode_segmented(self, token_in: int, position: int) -> int:
        """One decode step through the segments; returns the produced token."""
        self.s_ids.fill_(token_in)
        self.s_pos.fill_(position)
        cuda = self.device.type == "cuda"
        step_routing = []
        for i in self.config.moe_layers:
            self._run(("a", i), lambda: self._seg_a(i))
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()  # the routed ids are in h_experts
            flat = self.h_experts.tolist()
            step_routing.append([flat])
            self.h_slots.copy_(torch.tensor(self._use(i, flat)))
            self.s_slots.copy_(self.h_slots[None], non_blocking=cuda)
            if self.prefetch_enabled:
                nxt = self.next_moe.get(i)
                if nxt is not None:  # guess the next layer's experts from this layer's state (one more sync)
                    wn = self.weights[nxt]
                    xn = rms_norm(wn.post_norm, self.s_h, self.consts.eps).reshape(1, -1)
                    guess = torch.topk(torch.nn.functional.linear(xn, wn.router), self.consts.top_k, dim=-1)
                    keep = set()
                    for e in guess.indices[0].tolist():
                        keep.add(e)
                        if not self._fetch(nxt, e, keep, prefetch=True):
                            break
            self._run(("b", i), lambda: self._seg_b(i))
        self._run(("final", None), self._seg_final)
        if cuda:
            torch.cuda.current_stream(self.device).synchronize()
        self.routing.append(torch.tensor(step_routing))
        return int(self.h_token[0])

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 32, *, forced=None, vocab_limit=None) -> Generation:
        """Greedy tokens for one prompt [P]; forced [n - 1] teacher-forces the decode inputs (see FastDecoder)."""
        prompt = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        P, n = prompt.shape[1], int(max_new_tokens)
        if P + n > self.max_len:
            raise ValueError(f"prompt {P} + {n} new tokens exceed the offload decoder's max_len {self.max_len}")
        if forced is not None:
            forced = torch.as_tensor(forced, dtype=torch.long).reshape(-1)
            if forced.numel() < n - 1:
                raise ValueError(f"forced holds {forced.numel()} ids, need {n - 1}")
        self.routing = []
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        tokens = []
        ids, pos = prompt.to(self.device), torch.arange(P, device=self.device)
        prefill = 0.0
        self.s_vocab_mask.zero_()
        if vocab_limit is not None:
            self.s_vocab_mask[vocab_limit:] = True
        if self.graphs and self._graphs is None:
            self._capture()
        for step in range(n):
            if step > 0 and self.segmented:
                token = self._decode_segmented(int(ids[0, 0]), P + step - 1)
            else:
                logits = self.forward(ids, pos).float()
                if vocab_limit is not None:
                    logits[:, vocab_limit:] = float("-inf")
                token = int(logits.argmax(-1))
            tokens.append(token)
            if step == 0:
                sync()
                prefill = time.perf_counter() - start
                self.stats = OffloadStats()  # the statistics count decode steps only
            else:
                self.stats.tokens += 1
            nxt = int(forced[step]) if forced is not None and step < n - 1 else token
            ids = torch.tensor([[nxt]], device=self.device)
            pos = torch.tensor([P + step], device=self.device)
        sync()
        return Generation([tokens], [P], time.perf_counter() - start, prefill, stopped=[False])

    def reset_stats(self) -> None:
        self.stats = OffloadStats()
