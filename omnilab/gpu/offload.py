"""Offloaded decoding: `OffloadDecoder`, the experts in a host tier (host.py), `slots` of them per MoE layer on the
GPU (slots.SlabPool, slot_cache.SlotCache), misses copied on a side stream while resident experts compute, and
speculative next-layer prefetch; the decode step runs as segments, each a CUDA graph (docs/DESIGN.md, omnilab/gpu/).
Follows mixtral-offloading (dvmazur/mixtral-offloading) and reuses the fast path's step (step.py).
differs from transformers: as step.py; and one routed choice at a time (`expert_choice`, two plain GEMMs on the
slot gathered from the slab) instead of the grouped GEMM, so each starts the moment its expert is resident.
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

from omnilab.gpu.host import DriverCopy, HostTier, split_spans
from omnilab.gpu.phases import PhaseTimer
from omnilab.gpu.slot_cache import SlotCache
from omnilab.gpu.slots import SlabPool
from omnilab.gpu.step import Consts, StaticKV, attention, dense_layer, expert_mix, layer_weights, rms_norm, route
from omnilab.model.decoder import rope_inv_freq
from omnilab.model.generate import Generation
from omnilab.model.routing import RoutingOverride


# -- the segments' arithmetic (tensors only: one torch.compile'd copy serves every layer) ---------------------------


def attention_router(h, w, cos, sin, mask, pos, keys, values, forced, c: Consts):
    """Segment a: h [1, 1, H] -> (h after attention [1, 1, H], normed x [1, H], weights [1, k], experts [1, k])."""
    h = h + attention(h, w, cos, sin, mask, pos, keys, values, c)
    x = rms_norm(w.post_norm, h, c.eps).reshape(1, -1)  # [1, H]
    weights, experts = route(F.linear(x, w.router), c.top_k, c.norm_topk_prob, x.dtype, forced)  # [1, k]
    return h, x, weights, experts


def expert_choice(x, slot, weight, slab, H: int, I: int):
    """One routed choice of a decode step: weight [1, 1] * the expert in `slot` ([1], on the device) applied to
    x [1, H] -> [1, H]. differs from step.expert_mix: one choice at a time (so each can start the moment its
    expert is resident), the slot gathered from the slab and two plain GEMMs instead of the grouped GEMM; the
    arithmetic per choice is the same (on CPU the rows are bitwise equal, tests/test_offload.py)."""
    w = slab.index_select(0, slot)  # [1, 3 * I * H]: the slot's down | gate | up
    down, gate_up = w[0, :H * I].view(H, I), w[0, H * I:].view(2 * I, H)
    gu = F.linear(x, gate_up)  # [1, 2I]
    return F.linear(F.silu(gu[:, :I]) * gu[:, I:], down) * weight  # [1, H]


def expert_on_slot(x, gate_up, down, I: int):
    """One expert on its slot's own views, unweighted: x [1, H], gate_up [2I, H], down [H, I] -> [1, H]. The
    step="slot" decode captures one graph per (layer, slot), so the slot is a fixed address: no gather of the
    slot's 9.4 MB as in expert_choice (its arithmetic otherwise: the same two GEMMs, silu(gate) * up between)."""
    gu = F.linear(x, gate_up)  # [1, 2I]
    return F.linear(F.silu(gu[:, :I]) * gu[:, I:], down)  # [1, H]


def expert_gate_up(x, gate_up, I: int):
    """The first half of expert_on_slot, x [1, H] -> silu(gate) * up [1, I]: computed while the slot's down
    projection is still copying (the layer's last miss)."""
    gu = F.linear(x, gate_up)  # [1, 2I]
    return F.silu(gu[:, :I]) * gu[:, I:]  # [1, I]


def expert_down(act, down):
    """The second half of expert_on_slot: act [1, I] -> [1, H]."""
    return F.linear(act, down)


def mix_sum(h, outputs, slots, weights):
    """A layer's expert mix into the residual: h [1, 1, H] + sum over the k choices of weight * the output of the
    choice's slot (outputs [S, H], one row per slot; slots [k]; weights [1, k]); as _seg_sum after
    _seg_choice: each output times its weight, the k products summed in one reduction, then the residual."""
    k = slots.shape[0]
    rows = outputs.index_select(0, slots) * weights.reshape(k, 1)  # [k, H]: each choice's weighted output
    return h + rows.view(1, k, -1).sum(dim=1).view(1, 1, -1)  # [1, 1, H]


def sum_attention_router(h, outputs, slots, weights_prev, w, cos, sin, mask, pos, keys, values, forced, c: Consts):
    """The previous layer's mix_sum, then segment a (attention_router): one graph per layer in step="slot"."""
    return attention_router(mix_sum(h, outputs, slots, weights_prev), w, cos, sin, mask, pos, keys, values, forced, c)




class OffloadDecoder:
    """Greedy decoding of a SelectiveMoE whose experts live in a HostTier, `slots` of them per layer on the device.

    slots: experts held per MoE layer (>= top-k); or give expert_budget_bytes (split evenly over the layers).
    prefetch: speculative next-layer prefetch. override: a RoutingOverride (defaults to model.routing_override).
    issue: "driver" (cuMemcpyHtoDAsync through ctypes; the CUDA default) or "torch" (copy_; elsewhere).
    compile: the segments' arithmetic through torch.compile before capture (CUDA). The embedding may live on the
    host (model.model.embed_tokens moved to the CPU to save its GPU memory): each step copies one row."""

    def __init__(self, model, host: HostTier, *, slots: int | None = None, expert_budget_bytes: int | None = None,
                 max_len: int = 512, prefetch: bool = True, override: RoutingOverride | None = None,
                 compute: str | None = None, graphs: bool | None = None, issue: str | None = None,
                 compile: bool = False, step: str = "choice"):
        cfg = self.config = model.config
        if step not in ("choice", "slot"):
            raise ValueError(f"offload: step={step!r}, use 'choice' or 'slot'")
        if step == "slot" and prefetch:
            raise ValueError("offload: step='slot' runs without prefetch (pass prefetch=False)")
        self.step = step
        self.model, self.host = model, host
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.embed = model.model.embed_tokens
        self.embed_on_host = self.embed.weight.device != self.device
        k, E = cfg.num_experts_per_tok, cfg.num_experts
        layers = cfg.moe_layers
        if slots is None:
            per = SlabPool(cfg, 1, self.dtype, "meta").expert_bytes
            slots = min(E, int(expert_budget_bytes // (per * len(layers)))) if expert_budget_bytes else E
        if slots < k:
            raise ValueError(f"offload: {slots} expert slots per layer, fewer than top-{k}")
        self.pool = SlabPool(cfg, slots, self.dtype, self.device)
        self.max_len = -(-max_len // 64) * 64
        self.kv = StaticKV(cfg, 1, self.max_len, self.dtype, self.device)
        self.prefetch_enabled = prefetch
        self.override = override if override is not None else getattr(model, "routing_override", None)
        self.compute = compute or ("grouped_mm" if self.dtype == torch.bfloat16 or self.device.type == "cpu"
                                   else "gather")
        dev = self.device
        cuda = dev.type == "cuda"
        inv_freq = rope_inv_freq(cfg).to(dev)
        freqs = torch.arange(self.max_len, device=dev).float()[:, None] * inv_freq  # [S_max, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S_max, hd]
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self.key_pos = torch.arange(self.max_len, device=dev)
        self.slot_range = torch.arange(slots, device=dev)
        self.consts = Consts(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, k,
                             bool(cfg.norm_topk_prob), float(cfg.rms_norm_eps))
        self.weights = {i: layer_weights(layer) for i, layer in enumerate(model.model.layers) if layer.is_moe}
        self.moe_index = {layer: j for j, layer in enumerate(layers)}
        self.next_moe = {a: b for a, b in zip(layers, layers[1:])}
        self.cache = SlotCache(layers, slots, self.pool.expert_bytes, self._issue_copy)
        self.copy_stream = torch.cuda.Stream(dev) if cuda else None
        if issue is None:
            same = not layers or {t.dtype for t in host.expert(layers[0], 0)} == {self.dtype}
            issue = "driver" if cuda and same else "torch"
        if issue not in ("driver", "torch"):
            raise ValueError(f"offload: issue={issue!r}, use 'driver' or 'torch'")
        if issue == "driver" and not cuda:
            raise ValueError("offload: issue='driver' needs a CUDA model")
        stored = {t.dtype for t in host.expert(layers[0], 0)} if layers else {self.dtype}
        if issue == "driver" and stored != {self.dtype}:  # raw bytes are copied: no cast on the way
            raise ValueError(f"offload: issue='driver' copies raw bytes; the host tier holds {sorted(map(str, stored))}, "
                             f"the model {self.dtype} (use issue='torch' or a host copy in the model's dtype)")
        self.issue = issue
        self._driver = DriverCopy() if issue == "driver" else None
        # per (layer, expert): the copies of a miss as (host address, bytes, offset in the slot's down|gate|up)
        self._spans = {(i, e): host.spans(i, e) for i in layers for e in range(E)} if self._driver else {}
        I, H = cfg.moe_intermediate_size, cfg.hidden_size
        self._slab_ptr = {i: self.pool.slab[i].data_ptr() for i in layers}
        self._slot_bytes = self.pool.expert_bytes
        self._copy_handle = self.copy_stream.cuda_stream if cuda else None
        self._copied = [torch.cuda.Event() for _ in range(k)] if cuda else []  # per choice: its copy is done
        self.routing = []  # per step: [moe layers, T, k] on the host
        self.segmented = all(layer.is_moe for layer in model.model.layers)
        self.graphs = (cuda if graphs is None else graphs) and self.segmented
        self.compiled = bool(compile) and cuda
        self._attention_router = torch.compile(attention_router, dynamic=False) if self.compiled else attention_router
        self._expert_choice = torch.compile(expert_choice, dynamic=False) if self.compiled else expert_choice
        fns = (sum_attention_router, expert_on_slot, expert_gate_up, expert_down, mix_sum)
        (self._sum_attention_router, self._expert_on_slot, self._expert_gate_up, self._expert_down,
         self._mix_sum) = (torch.compile(f, dynamic=False) if self.compiled else f for f in fns)
        self.prev_moe = {b: a for a, b in zip(layers, layers[1:])}
        L = len(layers)
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        hd = cfg.head_dim
        self.s_ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.s_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.s_cos = torch.zeros(1, hd, dtype=self.dtype, device=dev)
        self.s_sin = torch.zeros(1, hd, dtype=self.dtype, device=dev)
        self.s_mask = torch.zeros(1, 1, g, self.max_len, dtype=torch.bool, device=dev)
        self.s_h = torch.zeros(1, 1, H, dtype=self.dtype, device=dev)
        self.s_x = torch.zeros(1, H, dtype=self.dtype, device=dev)
        self.s_w = torch.zeros(1, k, dtype=self.dtype, device=dev)
        self.s_slots = torch.zeros(L, 1, k, dtype=torch.long, device=dev)
        self.s_y = torch.zeros(k, H, dtype=self.dtype, device=dev)  # each choice's weighted expert output
        # step="slot": each slot's unweighted expert output, and silu(gate) * up of a split last miss
        self.s_out = torch.zeros(slots, H, dtype=self.dtype, device=dev)
        self.s_act = torch.zeros(slots, I, dtype=self.dtype, device=dev)
        self._copied_gate_up = torch.cuda.Event() if cuda else None  # the layer's last miss: gate|up landed
        self.s_token = torch.zeros(1, dtype=torch.long, device=dev)
        self.s_vocab_mask = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
        # pinned host buffers the graphs copy from / into (a graph's memcpy node reads them when it runs)
        pin = cuda
        self.h_step = torch.zeros(2, dtype=torch.long, pin_memory=pin)  # [input id, position]
        self.h_embed = torch.zeros(1, 1, H, dtype=self.dtype, pin_memory=pin)  # the input's row (host embedding)
        self.h_experts = torch.zeros(L, k, dtype=torch.long, pin_memory=pin)  # the routed ids, per layer
        self.h_slots = torch.zeros(L, 1, k, dtype=torch.long, pin_memory=pin)  # their slots, written by the host
        self.h_token = torch.zeros(1, dtype=torch.long, pin_memory=pin)
        self._np_step, self._np_experts = self.h_step.numpy(), self.h_experts.numpy()
        self._np_slots = self.h_slots.numpy()
        self._graphs = None
        self.profile = None  # after generate(profile=True): {"phase_ms": {phase: ms per token}, ...}

    # -- slots ---------------------------------------------------------------------------------------------------
    @property
    def stats(self):
        """The slot cache's CacheStats (OFFLOAD_REPORT keys), of the decode steps since the last generate."""
        return self.cache.stats

    def _copy_in(self, layer: int, e: int, slot: int, split: bool = False) -> None:
        """Copy expert e's projections from the host tier into a slot (on the copy stream on CUDA). split: gate and
        up first, then `_copied_gate_up` recorded on the copy stream, then down (the layer's last miss: its gate|up
        GEMM runs while its down projection copies)."""
        if self._driver is not None:
            base = self._slab_ptr[layer] + slot * self._slot_bytes
            spans = self._spans[layer, e]
            if split:
                first, second = split_spans(spans, self.pool.down[layer][0].numel() * self.pool.slab[layer].element_size())
                for src, n, offset in first:
                    self._driver(base + offset, src, n, self._copy_handle)
                self._copied_gate_up.record(self.copy_stream)
                spans = second
                self.stats.copies += len(first)
            for src, n, offset in spans:
                self._driver(base + offset, src, n, self._copy_handle)
            self.stats.copies += len(spans)
            return
        gate, up, down = self.host.expert(layer, e)
        I = self.config.moe_intermediate_size
        nb = self.host.pinned and self.copy_stream is not None
        self.pool.gate_up[layer][slot, :I].copy_(gate, non_blocking=nb)
        self.pool.gate_up[layer][slot, I:].copy_(up, non_blocking=nb)
        if split and self._copied_gate_up is not None:
            self._copied_gate_up.record(self.copy_stream)
        self.pool.down[layer][slot].copy_(down, non_blocking=nb)
        self.stats.copies += 3

    def _issue_copy(self, layer: int, e: int, slot: int, ordered: bool = False, split: bool = False) -> None:
        """The slot cache's copy_in: expert e into a slot, on the copy stream. ordered: the caller already made
        the copy stream wait for the compute that read the slots."""
        if self.copy_stream is not None and not ordered:
            # the slot may still be read by queued compute: the copy waits for the compute stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.copy_stream is not None and self._driver is None:
            with torch.cuda.stream(self.copy_stream):
                self._copy_in(layer, e, slot, split)
        else:  # the driver path names the copy stream itself
            self._copy_in(layer, e, slot, split)

    def _use(self, layer: int, experts: list[int], ordered: bool = False) -> list[int]:
        """Experts routed now -> their slots; misses are fetched and (on the device) waited for. Counts them."""
        want = set(experts)
        copied = False
        for e in experts:
            copied |= self.cache.use(layer, e, want, ordered=ordered)[1]
        if self.copy_stream is not None:
            stream = torch.cuda.current_stream(self.device)
            if copied:  # this call's copies: one event after the last
                done = torch.cuda.Event()
                done.record(self.copy_stream)
                stream.wait_event(done)
            for e in want:
                ev = self.cache.ready.pop((layer, e), None)  # earlier (prefetch) copies of the experts routed now
                if ev is not None:
                    stream.wait_event(ev)
        return [self.cache.lru[layer][e] for e in experts]

    def _prefetch(self, layer: int, guessed: list[int]) -> None:
        """Start copying the experts guessed for `layer` (not yet resident) on the copy stream; one event."""
        fetched = self.cache.prefetch(layer, guessed, ordered=True)
        if fetched and self.copy_stream is not None:
            done = torch.cuda.Event()
            done.record(self.copy_stream)
            for e in fetched:
                self.cache.ready[layer, e] = done

    # -- the eager step (prefill, and models with dense layers) --------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.to(self.embed.weight.device)).to(self.device)  # [B, T, H]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids [1, T] at positions [T] -> last-token logits [1, V]."""
        m, cfg, c = self.model, self.config, self.consts
        B, T = ids.shape
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        cos, sin = self.cos[positions], self.sin[positions]
        mask = (self.key_pos[None, :] <= positions[:, None]).repeat(g, 1)[None, None]  # [1, 1, g * T, S_max]
        h = self._embed(ids)  # [B, T, H]
        step_routing = []
        for i, layer in enumerate(m.model.layers):
            if not layer.is_moe:
                h = dense_layer(layer, h, cos, sin, mask, positions, self.kv.keys[i], self.kv.values[i], c)
                continue
            w = self.weights[i]
            h = h + attention(h, w, cos, sin, mask, positions, self.kv.keys[i], self.kv.values[i], c)
            H = h.shape[-1]
            x = rms_norm(w.post_norm, h, c.eps).reshape(B * T, H)  # [N, H]
            forced = self.override.choice(i, positions) if self.override is not None else None
            weights, experts = route(F.linear(x, w.router), c.top_k, c.norm_topk_prob, x.dtype, forced)  # [N, k]
            nxt = self.next_moe.get(i) if self.prefetch_enabled else None
            guess = None
            if nxt is not None:
                wn = self.weights[nxt]
                xn = rms_norm(wn.post_norm, h, c.eps).reshape(B * T, H)
                guess = torch.topk(F.linear(xn, wn.router), c.top_k, dim=-1).indices  # [N, k]
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
                self._prefetch(nxt, list(dict.fromkeys(e for row in guessed for e in row)))
            if out is None:
                out = expert_mix(x, slots, weights, self.pool.gate_up[i], self.pool.down[i], self.slot_range,
                                 self.compute)
            h = h + out.view(B, T, H)
        self.routing.append(torch.tensor(step_routing))  # [moe layers, N, k]
        h = rms_norm(m.model.norm.weight, h[:, -1], m.model.norm.eps)
        return m.lm_head(h)  # [B, V]

    def _chunked(self, i, x, experts, weights, distinct):
        """The expert mix when a step routes to more distinct experts than the layer has slots: one pass per
        chunk of resident experts over exactly the (token, choice) pairs routed into the chunk, in routed order,
        each pair a one-choice row, so every expert's group holds the rows it holds in a single pass (a grouped
        GEMM's rows depend on their group's size); the k rows of a token are summed at the end as
        step.expert_mix sums them. So the result does not depend on the budget (tests/test_offload.py)."""
        N, k = experts.shape
        flat_experts = experts.reshape(-1)  # [N * k], token-major
        flat_weights = weights.reshape(-1, 1)  # [N * k, 1]
        rows = torch.zeros(N * k, x.shape[-1], dtype=x.dtype, device=x.device)  # [N * k, H]
        n = self.pool.slots
        for start in range(0, len(distinct), n):
            chunk = distinct[start:start + n]
            slot_of = dict(zip(chunk, self._use(i, chunk)))
            lookup = torch.full((self.config.num_experts,), -1, dtype=torch.long)
            lookup[list(slot_of)] = torch.tensor(list(slot_of.values()))
            slots = lookup.to(self.device)[flat_experts]  # [N * k]: -1 off the chunk
            pairs = torch.nonzero(slots >= 0).reshape(-1)  # [M], routed order
            rows[pairs] = expert_mix(x[pairs // k], slots[pairs, None], flat_weights[pairs], self.pool.gate_up[i],
                                     self.pool.down[i], self.slot_range, self.compute)  # [M, H]: one choice each
        return rows.view(N, k, -1).sum(dim=1)  # [N, H]

    # -- the segmented decode step -------------------------------------------------------------------------------
    def _seg_pre(self) -> None:
        """The step's input: token id and position from the pinned h_step; the embedding row; rotary; mask."""
        self.s_ids.copy_(self.h_step[:1].view(1, 1), non_blocking=True)
        self.s_pos.copy_(self.h_step[1:], non_blocking=True)
        if self.embed_on_host:
            self.s_h.copy_(self.h_embed, non_blocking=True)
        else:
            self.s_h.copy_(self.embed(self.s_ids))
        g = self.consts.heads // self.consts.kv_heads
        self.s_cos.copy_(self.cos[self.s_pos])
        self.s_sin.copy_(self.sin[self.s_pos])
        self.s_mask.copy_((self.key_pos[None, :] <= self.s_pos[:, None]).repeat(g, 1)[None, None])  # [1, 1, g, S]

    def _seg_a(self, i: int) -> None:
        forced = self.override.choice(i, self.s_pos) if self.override is not None else None
        h, x, weights, experts = self._attention_router(self.s_h, self.weights[i], self.s_cos, self.s_sin,
                                                        self.s_mask, self.s_pos, self.kv.keys[i], self.kv.values[i],
                                                        forced, self.consts)
        self.s_h.copy_(h)
        self.s_x.copy_(x)
        self.s_w.copy_(weights)
        self.h_experts[self.moe_index[i]].copy_(experts[0], non_blocking=True)  # to the pinned host buffer

    def _seg_slots(self, i: int) -> None:
        j = self.moe_index[i]
        self.s_slots[j].copy_(self.h_slots[j], non_blocking=True)  # the slots the host chose, from pinned memory

    def _seg_choice(self, i: int, c: int) -> None:
        j, cfg = self.moe_index[i], self.config
        self.s_y[c].copy_(self._expert_choice(self.s_x, self.s_slots[j, 0, c:c + 1], self.s_w[:, c:c + 1],
                                              self.pool.slab[i], cfg.hidden_size, cfg.moe_intermediate_size)[0])

    def _seg_sum(self, i: int) -> None:
        k = self.consts.top_k
        # as step.expert_mix: the k weighted outputs summed in one reduction, then the residual
        self.s_h.add_(self.s_y.view(1, k, -1).sum(dim=1).view(1, 1, -1))

    def _seg_final(self) -> None:
        m = self.model
        h = rms_norm(m.model.norm.weight, self.s_h[:, -1], m.model.norm.eps)
        logits = m.lm_head(h).float().masked_fill(self.s_vocab_mask, float("-inf"))  # [1, V]
        self.s_token.copy_(logits.argmax(-1))
        self.h_token.copy_(self.s_token, non_blocking=True)

    # step="slot": per MoE layer one graph "A" (the previous layer's sum, or "pre" for the first, then segment
    # a) and per slot one graph "E" (that slot's expert on the layer's x), "G" and "D" (its two halves); "F" is
    # the last layer's sum and "final"
    def _seg_a_slot(self, i: int) -> None:
        p = self.prev_moe.get(i)
        if p is None:
            self._seg_pre()
            self._seg_a(i)
            return
        jp = self.moe_index[p]
        self.s_slots[jp].copy_(self.h_slots[jp], non_blocking=True)  # the previous layer's slots, from the host
        forced = self.override.choice(i, self.s_pos) if self.override is not None else None
        h, x, weights, experts = self._sum_attention_router(self.s_h, self.s_out, self.s_slots[jp, 0], self.s_w,
                                                            self.weights[i], self.s_cos, self.s_sin, self.s_mask,
                                                            self.s_pos, self.kv.keys[i], self.kv.values[i], forced,
                                                            self.consts)
        self.s_h.copy_(h)
        self.s_x.copy_(x)
        self.s_w.copy_(weights)
        self.h_experts[self.moe_index[i]].copy_(experts[0], non_blocking=True)  # to the pinned host buffer

    def _seg_expert(self, i: int, s: int) -> None:
        I = self.config.moe_intermediate_size
        self.s_out[s].copy_(self._expert_on_slot(self.s_x, self.pool.gate_up[i][s], self.pool.down[i][s], I)[0])

    def _seg_gate_up(self, i: int, s: int) -> None:
        I = self.config.moe_intermediate_size
        self.s_act[s].copy_(self._expert_gate_up(self.s_x, self.pool.gate_up[i][s], I)[0])

    def _seg_down(self, i: int, s: int) -> None:
        self.s_out[s].copy_(self._expert_down(self.s_act[s:s + 1], self.pool.down[i][s])[0])

    def _seg_final_slot(self) -> None:
        jl = self.moe_index[self.config.moe_layers[-1]]
        self.s_slots[jl].copy_(self.h_slots[jl], non_blocking=True)
        self.s_h.copy_(self._mix_sum(self.s_h, self.s_out, self.s_slots[jl, 0], self.s_w))
        self._seg_final()

    def _segments(self):
        """(name, function) in step order (choices in routed order; a step replays them hits first)."""
        if self.step == "slot":
            out = [(("A", i), lambda i=i: self._seg_a_slot(i)) for i in self.config.moe_layers]
            for i in self.config.moe_layers:
                for s in range(self.pool.slots):
                    out += [(("E", i, s), lambda i=i, s=s: self._seg_expert(i, s)),
                            (("G", i, s), lambda i=i, s=s: self._seg_gate_up(i, s)),
                            (("D", i, s), lambda i=i, s=s: self._seg_down(i, s))]
            return out + [(("F", None), self._seg_final_slot)]
        out = [(("pre", None), self._seg_pre)]
        for i in self.config.moe_layers:
            out += [(("a", i), lambda i=i: self._seg_a(i)), (("slots", i), lambda i=i: self._seg_slots(i))]
            out += [(("choice", i, c), lambda i=i, c=c: self._seg_choice(i, c)) for c in range(self.consts.top_k)]
            out.append((("sum", i), lambda i=i: self._seg_sum(i)))
        return out + [(("final", None), self._seg_final)]

    def _check_slab_views(self) -> None:
        """Once, on the device: the expert mix on the slab's strided views equals it on contiguous copies (the
        grouped GEMM must read each slot at the slab's stride); if not, prefill falls back to the gather compute."""
        i = self.config.moe_layers[0]
        S, k, H = min(4, self.pool.slots), self.consts.top_k, self.config.hidden_size  # 4 slots: little memory
        gen = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(3, H, generator=gen, device=self.device, dtype=self.dtype)  # [N, H]
        slots = torch.randint(0, S, (3, k), generator=gen, device=self.device)  # [N, k]
        weights = torch.rand(3, k, generator=gen, device=self.device).to(self.dtype)
        self.pool.slab[i].normal_(generator=gen)
        gate_up, down, slot_range = self.pool.gate_up[i][:S], self.pool.down[i][:S], self.slot_range[:S]
        want = expert_mix(x, slots, weights, gate_up.contiguous(), down.contiguous(), slot_range, self.compute)
        got = expert_mix(x, slots, weights, gate_up, down, slot_range, self.compute)
        same = torch.equal(got, want)
        self.slab_check = "equal" if same else f"{self.compute} differs on strided slots: prefill uses gather"
        if not same:
            self.compute = "gather"
        self.pool.slab[i].zero_()
        self.cache.clear(i)  # the layer's slots were overwritten: nothing of it is resident

    def _capture(self) -> None:
        self._check_slab_views()
        saved = self.h_step.clone()
        self._np_step[:] = (0, 0)  # warm-up at position 0 (rewritten by the next prefill)
        self.h_slots.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2 if self.compiled else 1):
                for _, fn in self._segments():
                    fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        self._graphs = {}
        # capture_begin/end on one side stream rather than torch.cuda.graph per segment: that context runs
        # gc.collect and empty_cache around every capture (step="slot" has thousands of segments)
        gc.collect()
        with torch.cuda.stream(stream):
            for name, fn in self._segments():
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pool)
                fn()
                graph.capture_end()
                self._graphs[name] = graph
        torch.cuda.synchronize(self.device)
        self.h_step.copy_(saved)

    def _run(self, name, fn) -> None:
        if self._graphs is not None:
            self._graphs[name].replay()
        else:
            fn()

    def _route_step(self, layer: int, experts: list[int], split_last: bool = False) -> tuple[list[int], list]:
        """The decode step's slots for the routed experts, misses copied in (one copy per span, one event per
        choice on the copy stream); returns (slots, [(choice, event)] for the choices to wait for, in copy
        order; the event is None off CUDA). split_last: the last miss copies gate|up before down (_copy_in).
        The compute stream is idle here (the caller synchronised), so no copy can hit a slot in use."""
        lru = self.cache.lru[layer]
        want = set(experts)
        last = next((c for c in range(len(experts) - 1, -1, -1) if experts[c] not in lru), None) if split_last else None
        slots, waits = [], []
        for c, e in enumerate(experts):
            slot, missed = self.cache.use(layer, e, want, ordered=True, split=c == last)
            if not missed:
                ev = self.cache.ready.pop((layer, e), None)  # a prefetch copy, maybe still in flight
                if ev is not None:
                    waits.append((c, ev))
            else:
                ev = None
                if self.copy_stream is not None:
                    ev = self._copied[c]
                    ev.record(self.copy_stream)
                waits.append((c, ev))
            slots.append(slot)
        return slots, waits

    def _decode_segmented(self, token_in: int, position: int, timer=None) -> int:
        """One decode step through the segments; returns the produced token. timer: a PhaseTimer (profile).

        Per MoE layer: segment a; the routed ids read (one sync); the misses' copies issued back to back; the
        slots segment; each resident choice's expert at once (overlapping the copies), each missed one the moment
        its copy lands; the sum."""
        self._np_step[0], self._np_step[1] = token_in, position
        if self.embed_on_host:
            self.h_embed[0, 0].copy_(self.embed.weight[token_in])
        cuda = self.device.type == "cuda"
        compute = torch.cuda.current_stream(self.device) if cuda else None
        k = self.consts.top_k
        run = self._run
        step_routing = []
        if timer:
            timer.mark("step")
        run(("pre", None), self._seg_pre)
        for i in self.config.moe_layers:
            j = self.moe_index[i]
            flat, slots, waits = self._attend_and_route(i, ("a", i), lambda: self._seg_a(i), step_routing, timer)
            run(("slots", i), lambda: self._seg_slots(i))
            later = {c for c, _ in waits}
            for c in range(k):  # resident experts first: they compute while the copies run
                if c not in later:
                    run(("choice", i, c), lambda: self._seg_choice(i, c))
            for c, ev in waits:
                if ev is not None:
                    compute.wait_event(ev)  # the device waits, the host goes on
                run(("choice", i, c), lambda: self._seg_choice(i, c))
            if self.prefetch_enabled and i in self.next_moe:
                # guess the next layer's experts from this layer's state (one more small sync), copy them behind
                nxt = self.next_moe[i]
                wn = self.weights[nxt]
                xn = rms_norm(wn.post_norm, self.s_h, self.consts.eps).reshape(1, -1)
                guess = torch.topk(F.linear(xn, wn.router), k, dim=-1).indices[0].tolist()
                self._prefetch(nxt, guess)
            run(("sum", i), lambda: self._seg_sum(i))
            if timer:
                timer.mark("b1")
        return self._finish_step(("final", None), self._seg_final, step_routing, timer)

    def _attend_and_route(self, i: int, key, segment, step_routing: list, timer, split_last: bool = False):
        """Layer i's attention and router (graph `key`), its routed ids read on the host (one sync), the misses'
        copies issued; the slots of its choices land in _np_slots. Returns (the routed ids, their slots,
        [(choice, copy event)] of the misses)."""
        j = self.moe_index[i]
        if timer:
            timer.mark("a0")
        self._run(key, segment)
        if timer:
            timer.mark("a1")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the ids are in h_experts[j]; earlier compute done
        flat = self._np_experts[j].tolist()
        step_routing.append([flat])
        if timer:
            timer.mark("c0", stream=self.copy_stream)
        slots, waits = self._route_step(i, flat, split_last=split_last)
        if timer:
            timer.mark("c1", stream=self.copy_stream)
        self._np_slots[j, 0] = slots
        return flat, slots, waits

    def _finish_step(self, key, segment, step_routing: list, timer) -> int:
        """The last graph (final norm, lm_head, argmax), one sync, the step's routing kept; the produced token."""
        self._run(key, segment)
        if timer:
            timer.mark("end")
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.routing.append(torch.tensor(step_routing))
        return int(self.h_token[0])

    def _decode_slot(self, token_in: int, position: int, timer=None) -> int:
        """One decode step of step="slot"; returns the produced token. Per MoE layer: graph A (the previous
        layer's sum and this layer's attention and router); the routed ids read (one sync); the misses' copies
        issued back to back, the last one gate|up first; each resident slot's expert at once (graph E, during the
        copies); each missed one when its copy lands, the last as G (when its gate|up landed) and D (its down)."""
        self._np_step[0], self._np_step[1] = token_in, position
        if self.embed_on_host:
            self.h_embed[0, 0].copy_(self.embed.weight[token_in])
        cuda = self.device.type == "cuda"
        compute = torch.cuda.current_stream(self.device) if cuda else None
        run = self._run
        step_routing = []
        if timer:
            timer.mark("step")
        layers = self.config.moe_layers
        for n, i in enumerate(layers):
            j = self.moe_index[i]
            flat, slots, waits = self._attend_and_route(i, ("A", i), lambda: self._seg_a_slot(i), step_routing,
                                                        timer, split_last=True)  # _np_slots: read by the next A (or F)
            later = {c for c, _ in waits}
            for c in range(len(flat)):  # resident experts first: they compute while the copies run
                if c not in later:
                    s = slots[c]
                    run(("E", i, s), lambda: self._seg_expert(i, s))
            for w, (c, ev) in enumerate(waits):
                s = slots[c]
                if w < len(waits) - 1:
                    if ev is not None:
                        compute.wait_event(ev)  # the device waits, the host goes on
                    run(("E", i, s), lambda: self._seg_expert(i, s))
                else:  # the last miss: gate|up landed first
                    if ev is not None:
                        compute.wait_event(self._copied_gate_up)
                    run(("G", i, s), lambda: self._seg_gate_up(i, s))
                    if ev is not None:
                        compute.wait_event(ev)
                    run(("D", i, s), lambda: self._seg_down(i, s))
            if timer:
                timer.mark("b1")
        return self._finish_step(("F", None), self._seg_final_slot, step_routing, timer)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 32, *, forced=None, vocab_limit=None,
                 profile: bool = False) -> Generation:
        """Greedy tokens for one prompt [P]; forced [n - 1] teacher-forces the decode inputs (see FastDecoder).
        profile: time every phase of the decode steps (CUDA events; perturbs the speed a little), into
        `self.profile`."""
        prompt = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        P, n = prompt.shape[1], int(max_new_tokens)
        if P + n > self.max_len:
            raise ValueError(f"prompt {P} + {n} new tokens exceed the offload decoder's max_len {self.max_len}")
        if forced is not None:
            forced = torch.as_tensor(forced, dtype=torch.long).reshape(-1)
            if forced.numel() < n - 1:
                raise ValueError(f"forced holds {forced.numel()} ids, need {n - 1}")
        self.routing = []
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.s_vocab_mask.zero_()
        if vocab_limit is not None:
            self.s_vocab_mask[vocab_limit:] = True
        if self.graphs and self._graphs is None:
            self._capture()
        timer = PhaseTimer(self.device) if profile and self.segmented else None
        sync()
        start = time.perf_counter()
        tokens = []
        ids, pos = prompt.to(self.device), torch.arange(P, device=self.device)
        prefill = 0.0
        for step in range(n):
            if step > 0 and self.segmented:
                decode = self._decode_slot if self.step == "slot" else self._decode_segmented
                token = decode(nxt, P + step - 1, timer)
            else:
                logits = self.forward(ids, pos).float()
                if vocab_limit is not None:
                    logits[:, vocab_limit:] = float("-inf")
                token = int(logits.argmax(-1))
            tokens.append(token)
            if step == 0:
                sync()
                prefill = time.perf_counter() - start
                self.cache.reset_stats()  # the statistics count decode steps only
            else:
                self.stats.tokens += 1
            nxt = int(forced[step]) if forced is not None and step < n - 1 else token
            if not self.segmented:
                ids = torch.tensor([[nxt]], device=self.device)
                pos = torch.tensor([P + step], device=self.device)
        sync()
        seconds = time.perf_counter() - start
        if timer:
            self.profile = timer.summary(n - 1)
        return Generation([tokens], [P], seconds, prefill, stopped=[False])

    def reset_stats(self) -> None:
        self.cache.reset_stats()
