"""Offloaded decoding: `OffloadDecoder`, the experts in a host tier (host.py), `slots` of them per MoE layer on the
GPU (slots.SlabPool, slot_cache.SlotCache), misses copied on a side stream while resident experts compute, and
speculative next-layer prefetch; the decode step runs as segments, each a CUDA graph (offload_step.SegmentedStep,
its arithmetic in segments.py; docs/DESIGN.md, omnilab/gpu/), prefill and models with dense layers an eager step.
Follows mixtral-offloading (dvmazur/mixtral-offloading) and reuses the fast path's step (step.py).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from omnilab.gpu.host import DriverCopy, HostTier, split_spans
from omnilab.gpu.offload_step import SegmentedStep
from omnilab.gpu.phases import PhaseTimer
from omnilab.gpu.segments import expert_on_host
from omnilab.gpu.slot_cache import SlotCache
from omnilab.gpu.slots import SlabPool
from omnilab.gpu.step import (Consts, StaticKV, attention, compute_refusal, dense_layer, expert_mix, layer_weights,
                              rms_norm, route, torch_compute)
from omnilab.model.rope import rope_inv_freq
from omnilab.model.generate import Generation
from omnilab.model.hooks import RESID_POST, layer_hook
from omnilab.model.routing import RoutingOverride


class OffloadDecoder:
    """Greedy decoding of a SelectiveMoE whose experts live in a HostTier, `slots` of them per layer on the device.

    slots: experts held per MoE layer (>= top-k); or give expert_budget_bytes (split evenly over the layers).
    prefetch: speculative next-layer prefetch. override: a RoutingOverride (defaults to model.routing_override).
    issue: "driver" (cuMemcpyHtoDAsync through ctypes; the CUDA default) or "torch" (copy_; elsewhere).
    host_share: hybrid offload, the share of each decode step's misses computed on the host's cores (from the
    host tier, while the other misses copy) instead of copied; "auto": measured (measure_host_share), then
    following each decode step's own host time (observe_host); 0: none.
    policy: which expert a full layer evicts: "lru", "lfu", "trust" or a class from omnilab.model.experts.POLICIES,
    one per MoE layer (SlotCache: per-layer slots, where the eager cache's budget is global); TrustWeighted sees
    each layer's routing weights (brought to the host with the routed ids only for a policy that observes them).
    compute: the expert mix of prefill and the unsegmented step (step.expert_mix: grouped_mm, gather or triton;
    the graphed segments compute per slot). compile: the segments' arithmetic through torch.compile before capture
    (CUDA). The embedding may live on the host (model.model.embed_tokens moved to the CPU to save its GPU memory):
    each step copies one row."""

    def __init__(self, model, host: HostTier, *, slots: int | None = None, expert_budget_bytes: int | None = None,
                 max_len: int = 512, prefetch: bool = True, override: RoutingOverride | None = None,
                 compute: str | None = None, graphs: bool | None = None, issue: str | None = None,
                 compile: bool = False, step: str = "choice", host_share: float | str = 0.0, policy="lru"):
        cfg = self.config = model.config
        if step not in ("choice", "slot"):
            raise ValueError(f"offload: step={step!r}, use 'choice' or 'slot'")
        if host_share != "auto" and not (isinstance(host_share, (int, float)) and 0.0 <= host_share <= 1.0):
            raise ValueError(f"offload: host_share={host_share!r}, use a share in [0, 1] or 'auto'")
        if step == "slot" and host_share:
            raise ValueError("offload: step='slot' copies every miss (host_share needs step='choice')")
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
        self.compute = compute or torch_compute(self.dtype, self.device)
        refusal = compute_refusal(self.compute, self.device)
        if refusal:
            raise ValueError(f"offload: {refusal}")
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
        self.cache = SlotCache(layers, slots, self.pool.expert_bytes, self._issue_copy, policy=policy)
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
        self._slab_ptr = {i: self.pool.slab[i].data_ptr() for i in layers}
        self._slot_bytes = self.pool.expert_bytes
        self._copy_handle = self.copy_stream.cuda_stream if cuda else None
        self._copied = [torch.cuda.Event() for _ in range(k)] if cuda else []  # per choice: its copy is done
        self.routing = []  # per step: [moe layers, T, k] on the host
        self.segmented = all(layer.is_moe for layer in model.model.layers)
        self.graphs = (cuda if graphs is None else graphs) and self.segmented
        self.compiled = bool(compile) and cuda
        self.copied_gate_up = torch.cuda.Event() if cuda else None  # the layer's last miss: gate|up landed
        # hybrid: this share of each layer's misses computed on the host's cores while the rest copy ("auto": the
        # share that ends both at once, from an expert's copy and host compute times measured here, then the host
        # time of each decode step's own host-computed choices: observe_host)
        self.host_rates = self.measure_host_share() if host_share == "auto" else None
        self.host_share = self.host_rates["share"] if self.host_rates else float(host_share)
        self._host_carry = 0.0  # the fraction of a host choice route_step owes (its share of misses, carried)
        self._routed_at = {i: {} for i in layers}  # per layer: expert -> the route_step call that last routed it
        self._clock = 0
        self.segmented_step = SegmentedStep(self)  # the decode step's buffers and segments
        self.profile = None  # after generate(profile=True): {"phase_ms": {phase: ms per token}, ...}

    # -- slots ---------------------------------------------------------------------------------------------------
    @property
    def stats(self):
        """The slot cache's CacheStats (OFFLOAD_REPORT keys), of the decode steps since the last generate."""
        return self.cache.stats

    def _copy_in(self, layer: int, e: int, slot: int, split: bool = False) -> None:
        """Copy expert e's projections from the host tier into a slot (on the copy stream on CUDA). split: gate and
        up first, then `copied_gate_up` recorded on the copy stream, then down (the layer's last miss: its gate|up
        GEMM runs while its down projection copies)."""
        if self._driver is not None:
            base = self._slab_ptr[layer] + slot * self._slot_bytes
            spans = self._spans[layer, e]
            if split:
                first, second = split_spans(spans, self.pool.down[layer][0].numel() * self.pool.slab[layer].element_size())
                for src, n, offset in first:
                    self._driver(base + offset, src, n, self._copy_handle)
                self.copied_gate_up.record(self.copy_stream)
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
        if split and self.copied_gate_up is not None:
            self.copied_gate_up.record(self.copy_stream)
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
        return [self.cache.where[layer][e] for e in experts]

    def prefetch(self, layer: int, guessed: list[int]) -> None:
        """Start copying the experts guessed for `layer` (not yet resident) on the copy stream; one event."""
        fetched = self.cache.prefetch(layer, guessed, ordered=True)
        if fetched and self.copy_stream is not None:
            done = torch.cuda.Event()
            done.record(self.copy_stream)
            for e in fetched:
                self.cache.ready[layer, e] = done

    def measure_host_share(self, repeats: int = 3, experts: int = 16) -> dict:
        """Seconds to copy one expert into a slot and to compute one on the host's cores (expert_on_host), and
        the share of misses to compute on the host so that both finish together: copy / (copy + host). The copy
        is timed into the first MoE layer's slot 0 (before any step: nothing is resident yet), best of `repeats`;
        the host over `experts` distinct experts, each read once from memory as a decode step reads its misses
        (one expert again and again is served from the CPU's caches: bench/host_rate.py measured that warm rate
        above the cold one)."""
        layer = self.config.moe_layers[0]
        if self.cache.where[layer]:
            raise RuntimeError("offload: measure_host_share before any step (it overwrites slot 0)")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        x = torch.randn(1, self.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(self.dtype)
        copies = []
        for r in range(repeats + 1):  # the first is a warm-up
            sync()
            start = time.perf_counter()
            self._issue_copy(layer, 0, 0)
            sync()
            copies.append(time.perf_counter() - start)
        layers, E = list(self.config.moe_layers), self.config.num_experts
        cold = [(layers[j % len(layers)], 1 + j // len(layers)) for j in range(min(experts, len(layers) * (E - 1)))]
        cold = cold or [(layer, 0)]  # one expert per layer: that one
        expert_on_host(x, *self.host.expert(layer, 0))  # warm-up: the kernels, not the weights timed below
        start = time.perf_counter()
        for where in cold:  # distinct experts, across layers: none of them in the CPU's caches from the one before
            expert_on_host(x, *self.host.expert(*where))
        copy_s, host_s = min(copies[1:]), (time.perf_counter() - start) / len(cold)
        self.cache.stats.copies = 0
        return {"copy_s": copy_s, "host_s": host_s, "share": copy_s / (copy_s + host_s)}

    def observe_host(self, seconds: float, choices: int) -> None:
        """host_share="auto": a decode step's own host seconds for its `choices` host-computed choices (each expert
        read from the host tier, computed, its output sent on; between the step's launches) averaged into the host
        time of one expert, and the share recomputed: in a step the host ran at about 0.4 of the rate measured
        before decoding (bench/results/offload_hybrid_h100.md), which left it finishing long after the copies."""
        if self.host_rates is None or choices == 0:
            return
        r = self.host_rates
        r["host_s"] = 0.5 * (r["host_s"] + seconds / choices)
        r["share"] = r["copy_s"] / (r["copy_s"] + r["host_s"])
        self.host_share = r["share"]

    def route_step(self, layer: int, experts: list[int], split_last: bool = False) -> tuple[list[int], list, list]:
        """The decode step's slots for the routed experts, misses copied in (one copy per span, one event per
        choice on the copy stream); returns (slots, [(choice, event)] for the choices to wait for, in copy
        order; the event is None off CUDA, [choices the host computes]). split_last: the last miss copies
        gate|up before down (_copy_in). host_share: share * misses of them, with the fraction left over carried to
        the next layer's (so a share that rounds to none a layer still reaches the host, and observe_host still
        sees its time), are not copied but left to the host (no slot: theirs reads 0): the misses whose experts
        this layer routed to longest ago (never first; then the later choices), so the copies, which stay in the
        slots, are the misses a locality of routing is likeliest to route to again. The
        compute stream is idle here (the caller synchronised), so no copy can hit a slot in use."""
        where = self.cache.where[layer]
        want = set(experts)
        misses = [c for c, e in enumerate(experts) if e not in where]  # choices, before this step's copies
        owed = len(misses) * self.host_share + self._host_carry
        n_host = min(len(misses), int(owed + 1e-9))
        self._host_carry = owed - n_host
        routed_at = self._routed_at[layer]
        # differs from the copy-only step's order of misses: the host's are the least recently routed (-1: never)
        host = sorted(sorted(misses, key=lambda c: (routed_at.get(experts[c], -1), -c))[:n_host])
        for e in experts:
            routed_at[e] = self._clock
        self._clock += 1
        last = misses[-1] if split_last and misses else None
        slots, waits = [], []
        for c, e in enumerate(experts):
            if c in host:
                self.cache.host(layer, e)
                slots.append(0)
                continue
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
        return slots, waits, host

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
            if self.cache.observes:  # a policy weighing by routing (TrustWeighted): the weights too, [N, k]
                self.cache.observe(i, torch.tensor(routed), weights.cpu())
            flat = [e for row in routed for e in row]
            distinct = list(dict.fromkeys(flat))
            if len(distinct) <= self.pool.slots:
                slots = torch.tensor(self._use(i, flat), device=self.device).view(B * T, -1)  # [N, k]
                out = None
            else:  # a prefill needing more experts than the layer's slots: in chunks of slots experts
                out = self._chunked(i, x, experts, weights, distinct)
            if guess is not None:  # start the next layer's likely experts copying while this layer computes
                self.prefetch(nxt, list(dict.fromkeys(e for row in guessed for e in row)))
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

    # -- capture -------------------------------------------------------------------------------------------------
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
        """Before the first graphed step: the slab check (prefill's compute), then every segment of the step mode
        captured (SegmentedStep.capture)."""
        self._check_slab_views()
        self.segmented_step.capture()

    # -- generate ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int = 32, *, forced=None, vocab_limit=None,
                 profile: bool = False, record_residuals: bool = False) -> Generation:
        """Greedy tokens for one prompt [P]; forced [n - 1] teacher-forces the decode inputs (see FastDecoder).
        profile: time every phase of the decode steps (CUDA events; perturbs the speed a little), into
        `self.profile`. record_residuals: every decode step's residual stream after each MoE layer, into
        `self.residuals` (hook name blocks.{i}.hook_resid_post -> [1, n - 1, H], positions P .. P + n - 2, whose
        inputs are the prompt's last token's successors: omnilab.reference.compare.compare_decode's input)."""
        prompt = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        P, n = prompt.shape[1], int(max_new_tokens)
        if P + n > self.max_len:
            raise ValueError(f"prompt {P} + {n} new tokens exceed the offload decoder's max_len {self.max_len}")
        if record_residuals and not (self.segmented and self.step == "choice"):
            raise ValueError("offload: record_residuals needs the segmented step='choice' (step='slot' adds a layer's "
                             "experts inside the next layer's segment)")
        if forced is not None:
            forced = torch.as_tensor(forced, dtype=torch.long).reshape(-1)
            if forced.numel() < n - 1:
                raise ValueError(f"forced holds {forced.numel()} ids, need {n - 1}")
        self.routing = []
        self._host_carry = 0.0  # each call splits its misses alike: the same prompt, the same host choices
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        seg = self.segmented_step
        seg.s_vocab_mask.zero_()
        if vocab_limit is not None:
            seg.s_vocab_mask[vocab_limit:] = True
        if self.graphs and seg.captured is None:
            self._capture()
        timer = PhaseTimer(self.device) if profile and self.segmented else None
        seg.record = {} if record_residuals else None
        sync()
        start = time.perf_counter()
        tokens = []
        ids, pos = prompt.to(self.device), torch.arange(P, device=self.device)
        prefill = 0.0
        for step in range(n):
            if step > 0 and self.segmented:
                decode = seg.decode_slot if self.step == "slot" else seg.decode_choice
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
        if record_residuals:
            self.residuals = {layer_hook(i, RESID_POST): torch.stack(rows).reshape(1, len(rows), -1)  # [1, n - 1, H]
                              for i, rows in seg.record.items()}
            seg.record = None
        return Generation([tokens], [P], seconds, prefill, stopped=[False])

    def reset_stats(self) -> None:
        self.cache.reset_stats()
