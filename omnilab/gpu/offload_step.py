"""The offloaded decode step run as segments (`SegmentedStep`, OffloadDecoder's decode; docs/DESIGN.md, omnilab/gpu/):
the step's device and pinned host buffers, the segments of step="choice" (pre; per MoE layer a, slots, one per
routed choice, sum; final) and of step="slot" (per MoE layer A; per (layer, slot) E, G and D; F), their CUDA-graph
capture, and the host loop that runs them between the misses' copies. The segments' arithmetic is segments.py's;
the slots and their copies are the decoder's (`route_step`, `prefetch`, `copied_gate_up`).
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

from omnilab.gpu.segments import (attention_router, expert_choice, expert_down, expert_gate_up, expert_on_host,
                                  expert_on_slot, mix_sum, sum_attention_router)
from omnilab.gpu.step import rms_norm


class SegmentedStep:
    """One decode step of `decoder` (an OffloadDecoder: its model, layer weights, KV cache, slots and copies) as
    segments, each a CUDA graph once `capture` ran; `decode_choice` / `decode_slot` run a step of either mode."""

    def __init__(self, decoder):
        self.decoder = d = decoder
        cfg, dev = d.config, d.device
        cuda = dev.type == "cuda"
        layers = cfg.moe_layers
        k, slots = cfg.num_experts_per_tok, d.pool.slots
        I, H = cfg.moe_intermediate_size, cfg.hidden_size
        self._attention_router = torch.compile(attention_router, dynamic=False) if d.compiled else attention_router
        self._expert_choice = torch.compile(expert_choice, dynamic=False) if d.compiled else expert_choice
        fns = (sum_attention_router, expert_on_slot, expert_gate_up, expert_down, mix_sum)
        (self._sum_attention_router, self._expert_on_slot, self._expert_gate_up, self._expert_down,
         self._mix_sum) = (torch.compile(f, dynamic=False) if d.compiled else f for f in fns)
        self.prev_moe = {b: a for a, b in zip(layers, layers[1:])}
        L = len(layers)
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        hd = cfg.head_dim
        self.s_ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.s_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.s_cos = torch.zeros(1, hd, dtype=d.dtype, device=dev)
        self.s_sin = torch.zeros(1, hd, dtype=d.dtype, device=dev)
        self.s_mask = torch.zeros(1, 1, g, d.max_len, dtype=torch.bool, device=dev)
        self.s_h = torch.zeros(1, 1, H, dtype=d.dtype, device=dev)
        self.s_x = torch.zeros(1, H, dtype=d.dtype, device=dev)
        self.s_w = torch.zeros(1, k, dtype=d.dtype, device=dev)
        self.s_slots = torch.zeros(L, 1, k, dtype=torch.long, device=dev)
        self.s_y = torch.zeros(k, H, dtype=d.dtype, device=dev)  # each choice's weighted expert output
        # step="slot": each slot's unweighted expert output, and silu(gate) * up of a split last miss
        self.s_out = torch.zeros(slots, H, dtype=d.dtype, device=dev)
        self.s_act = torch.zeros(slots, I, dtype=d.dtype, device=dev)
        self.s_token = torch.zeros(1, dtype=torch.long, device=dev)
        self.record: dict | None = None  # MoE layer -> [H] residuals after it, one per step (step="choice")
        self.s_vocab_mask = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)
        # pinned host buffers the graphs copy from / into (a graph's memcpy node reads them when it runs)
        pin = cuda
        self.h_step = torch.zeros(2, dtype=torch.long, pin_memory=pin)  # [input id, position]
        self.h_embed = torch.zeros(1, 1, H, dtype=d.dtype, pin_memory=pin)  # the input's row (host embedding)
        self.h_experts = torch.zeros(L, k, dtype=torch.long, pin_memory=pin)  # the routed ids, per layer
        self.h_slots = torch.zeros(L, 1, k, dtype=torch.long, pin_memory=pin)  # their slots, written by the host
        self.h_token = torch.zeros(1, dtype=torch.long, pin_memory=pin)
        # hybrid offload (decoder.host_share): the layer's x and weights for the host, its outputs back; the
        # weights also for a slot policy that weighs by routing (TrustWeighted)
        self.h_x = torch.zeros(1, H, dtype=d.dtype, pin_memory=pin)
        self.h_w = torch.zeros(1, k, dtype=d.dtype, pin_memory=pin)
        self.h_y = torch.zeros(k, H, dtype=d.dtype, pin_memory=pin)
        self._np_step, self._np_experts = self.h_step.numpy(), self.h_experts.numpy()
        self._np_slots = self.h_slots.numpy()
        self.captured = None  # after capture(): segment name -> its CUDA graph

    # -- step="choice" (pre, a and final serve step="slot" too) --------------------------------------------------
    def _seg_pre(self) -> None:
        """The step's input: token id and position from the pinned h_step; the embedding row; rotary; mask."""
        d = self.decoder
        self.s_ids.copy_(self.h_step[:1].view(1, 1), non_blocking=True)
        self.s_pos.copy_(self.h_step[1:], non_blocking=True)
        if d.embed_on_host:
            self.s_h.copy_(self.h_embed, non_blocking=True)
        else:
            self.s_h.copy_(d.embed(self.s_ids))
        g = d.consts.heads // d.consts.kv_heads
        self.s_cos.copy_(d.cos[self.s_pos])
        self.s_sin.copy_(d.sin[self.s_pos])
        self.s_mask.copy_((d.key_pos[None, :] <= self.s_pos[:, None]).repeat(g, 1)[None, None])  # [1, 1, g, S]

    def _seg_a(self, i: int) -> None:
        d = self.decoder
        forced = d.override.choice(i, self.s_pos) if d.override is not None else None
        h, x, weights, experts = self._attention_router(self.s_h, d.weights[i], self.s_cos, self.s_sin,
                                                        self.s_mask, self.s_pos, d.kv.keys[i], d.kv.values[i],
                                                        forced, d.consts)
        self.s_h.copy_(h)
        self.s_x.copy_(x)
        self.s_w.copy_(weights)
        self.h_experts[d.moe_index[i]].copy_(experts[0], non_blocking=True)  # to the pinned host buffer
        if d.host_share:  # the host computes some misses: it needs x
            self.h_x.copy_(x, non_blocking=True)
        if d.host_share or d.cache.observes:  # ... and the weights, as does a policy weighing by routing
            self.h_w.copy_(weights, non_blocking=True)

    def _seg_slots(self, i: int) -> None:
        j = self.decoder.moe_index[i]
        self.s_slots[j].copy_(self.h_slots[j], non_blocking=True)  # the slots the host chose, from pinned memory

    def _seg_choice(self, i: int, c: int) -> None:
        d = self.decoder
        j, cfg = d.moe_index[i], d.config
        self.s_y[c].copy_(self._expert_choice(self.s_x, self.s_slots[j, 0, c:c + 1], self.s_w[:, c:c + 1],
                                              d.pool.slab[i], cfg.hidden_size, cfg.moe_intermediate_size)[0])

    def _seg_sum(self, i: int) -> None:
        k = self.decoder.consts.top_k
        # as step.expert_mix: the k weighted outputs summed in one reduction, then the residual
        self.s_h.add_(self.s_y.view(1, k, -1).sum(dim=1).view(1, 1, -1))

    def _seg_final(self) -> None:
        m = self.decoder.model
        h = rms_norm(m.model.norm.weight, self.s_h[:, -1], m.model.norm.eps)
        logits = m.lm_head(h).float().masked_fill(self.s_vocab_mask, float("-inf"))  # [1, V]
        self.s_token.copy_(logits.argmax(-1))
        self.h_token.copy_(self.s_token, non_blocking=True)

    # -- step="slot": per MoE layer one graph "A" (the previous layer's sum, or "pre" for the first, then segment
    # a) and per slot one graph "E" (that slot's expert on the layer's x), "G" and "D" (its two halves); "F" is
    # the last layer's sum and "final" --------------------------------------------------------------------------
    def _seg_a_slot(self, i: int) -> None:
        d = self.decoder
        p = self.prev_moe.get(i)
        if p is None:
            self._seg_pre()
            self._seg_a(i)
            return
        jp = d.moe_index[p]
        self.s_slots[jp].copy_(self.h_slots[jp], non_blocking=True)  # the previous layer's slots, from the host
        forced = d.override.choice(i, self.s_pos) if d.override is not None else None
        h, x, weights, experts = self._sum_attention_router(self.s_h, self.s_out, self.s_slots[jp, 0], self.s_w,
                                                            d.weights[i], self.s_cos, self.s_sin, self.s_mask,
                                                            self.s_pos, d.kv.keys[i], d.kv.values[i], forced,
                                                            d.consts)
        self.s_h.copy_(h)
        self.s_x.copy_(x)
        self.s_w.copy_(weights)
        self.h_experts[d.moe_index[i]].copy_(experts[0], non_blocking=True)  # to the pinned host buffer
        if d.cache.observes:  # a policy weighing by routing (TrustWeighted): the weights too
            self.h_w.copy_(weights, non_blocking=True)

    def _seg_expert(self, i: int, s: int) -> None:
        d = self.decoder
        I = d.config.moe_intermediate_size
        self.s_out[s].copy_(self._expert_on_slot(self.s_x, d.pool.gate_up[i][s], d.pool.down[i][s], I)[0])

    def _seg_gate_up(self, i: int, s: int) -> None:
        d = self.decoder
        I = d.config.moe_intermediate_size
        self.s_act[s].copy_(self._expert_gate_up(self.s_x, d.pool.gate_up[i][s], I)[0])

    def _seg_down(self, i: int, s: int) -> None:
        self.s_out[s].copy_(self._expert_down(self.s_act[s:s + 1], self.decoder.pool.down[i][s])[0])

    def _seg_final_slot(self) -> None:
        d = self.decoder
        jl = d.moe_index[d.config.moe_layers[-1]]
        self.s_slots[jl].copy_(self.h_slots[jl], non_blocking=True)
        self.s_h.copy_(self._mix_sum(self.s_h, self.s_out, self.s_slots[jl, 0], self.s_w))
        self._seg_final()

    # -- capture -------------------------------------------------------------------------------------------------
    def segments(self):
        """(name, function) in step order (choices in routed order; a step replays them hits first)."""
        d = self.decoder
        if d.step == "slot":
            out = [(("A", i), lambda i=i: self._seg_a_slot(i)) for i in d.config.moe_layers]
            for i in d.config.moe_layers:
                for s in range(d.pool.slots):
                    out += [(("E", i, s), lambda i=i, s=s: self._seg_expert(i, s)),
                            (("G", i, s), lambda i=i, s=s: self._seg_gate_up(i, s)),
                            (("D", i, s), lambda i=i, s=s: self._seg_down(i, s))]
            return out + [(("F", None), self._seg_final_slot)]
        out = [(("pre", None), self._seg_pre)]
        for i in d.config.moe_layers:
            out += [(("a", i), lambda i=i: self._seg_a(i)), (("slots", i), lambda i=i: self._seg_slots(i))]
            out += [(("choice", i, c), lambda i=i, c=c: self._seg_choice(i, c)) for c in range(d.consts.top_k)]
            out.append((("sum", i), lambda i=i: self._seg_sum(i)))
        return out + [(("final", None), self._seg_final)]

    def capture(self) -> None:
        """Every segment of the decoder's step mode as a CUDA graph (after a warm-up run at position 0)."""
        d = self.decoder
        saved = self.h_step.clone()
        self._np_step[:] = (0, 0)  # warm-up at position 0 (rewritten by the next prefill)
        self.h_slots.zero_()
        stream = torch.cuda.Stream(d.device)
        stream.wait_stream(torch.cuda.current_stream(d.device))
        with torch.cuda.stream(stream):
            for _ in range(2 if d.compiled else 1):
                for _, fn in self.segments():
                    fn()
        torch.cuda.current_stream(d.device).wait_stream(stream)
        torch.cuda.synchronize(d.device)
        pool = torch.cuda.graph_pool_handle()
        self.captured = {}
        # capture_begin/end on one side stream rather than torch.cuda.graph per segment: that context runs
        # gc.collect and empty_cache around every capture (step="slot" has thousands of segments)
        gc.collect()
        with torch.cuda.stream(stream):
            for name, fn in self.segments():
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pool)
                fn()
                graph.capture_end()
                self.captured[name] = graph
        torch.cuda.synchronize(d.device)
        self.h_step.copy_(saved)

    def _run(self, name, fn) -> None:
        if self.captured is not None:
            self.captured[name].replay()
        else:
            fn()

    # -- the host loop -------------------------------------------------------------------------------------------
    def _start(self, token_in: int, position: int):
        """A step's input into the pinned buffers the first graph reads (h_step; h_embed, the input's row, when the
        embedding lives on the host); returns the compute stream (None off CUDA)."""
        d = self.decoder
        self._np_step[0], self._np_step[1] = token_in, position
        if d.embed_on_host:
            self.h_embed[0, 0].copy_(d.embed.weight[token_in])
        cuda = d.device.type == "cuda"
        return torch.cuda.current_stream(d.device) if cuda else None

    def decode_choice(self, token_in: int, position: int, timer=None) -> int:
        """One decode step of step="choice"; returns the produced token. timer: a PhaseTimer (profile).

        Per MoE layer: segment a; the routed ids read (one sync); the misses' copies issued back to back; the
        slots segment; each resident choice's expert at once (overlapping the copies), each missed one the moment
        its copy lands; the sum."""
        d = self.decoder
        compute = self._start(token_in, position)
        k = d.consts.top_k
        run = self._run
        step_routing = []
        if timer:
            timer.mark("step")
        run(("pre", None), self._seg_pre)
        host_s, host_n = 0.0, 0  # the step's host-computed choices and the host's time for them (observe_host)
        for i in d.config.moe_layers:
            j = d.moe_index[i]
            flat, slots, waits, host = self._attend_and_route(i, ("a", i), lambda: self._seg_a(i), step_routing,
                                                              timer)
            run(("slots", i), lambda: self._seg_slots(i))
            later = {c for c, _ in waits} | set(host)
            for c in range(k):  # resident experts first: they compute while the copies run
                if c not in later:
                    run(("choice", i, c), lambda: self._seg_choice(i, c))
            for c, ev in waits:
                if ev is not None:
                    compute.wait_event(ev)  # the device waits, the host goes on
                run(("choice", i, c), lambda: self._seg_choice(i, c))
            if host:  # hybrid: the rest of the misses on the host's cores while the device works through the above
                start = time.perf_counter()
                self._host_choices(i, flat, host)
                host_s, host_n = host_s + time.perf_counter() - start, host_n + len(host)
            if d.prefetch_enabled and i in d.next_moe:
                # guess the next layer's experts from this layer's state (one more small sync), copy them behind
                nxt = d.next_moe[i]
                wn = d.weights[nxt]
                xn = rms_norm(wn.post_norm, self.s_h, d.consts.eps).reshape(1, -1)
                guess = torch.topk(F.linear(xn, wn.router), k, dim=-1).indices[0].tolist()
                d.prefetch(nxt, guess)
            run(("sum", i), lambda: self._seg_sum(i))
            if self.record is not None:  # the residual after the layer, queued behind its sum (no sync)
                self.record.setdefault(i, []).append(self.s_h[0, 0].clone())
            if timer:
                timer.mark("b1")
        d.observe_host(host_s, host_n)
        return self._finish_step(("final", None), self._seg_final, step_routing, timer)

    def _host_choices(self, i: int, flat: list[int], host: list[int]) -> None:
        """Hybrid offload: the choices `host` of layer i computed on the host's cores from the host tier (h_x and
        h_w arrived with segment a, before the sync that read the routing), each weighted output copied into its
        row of s_y for the sum (on the compute stream, after the queued segments)."""
        d = self.decoder
        for c in host:
            y = expert_on_host(self.h_x, *d.host.expert(i, flat[c]))  # [1, H]
            self.h_y[c].copy_((y * self.h_w[:, c:c + 1])[0])
            self.s_y[c].copy_(self.h_y[c], non_blocking=True)

    def _attend_and_route(self, i: int, key, segment, step_routing: list, timer, split_last: bool = False):
        """Layer i's attention and router (graph `key`), its routed ids read on the host (one sync; their weights
        with them for a slot policy that observes them), the misses' copies issued; the slots of its choices land
        in _np_slots. Returns (the routed ids, their slots, [(choice, copy event)] of the misses)."""
        d = self.decoder
        j = d.moe_index[i]
        if timer:
            timer.mark("a0")
        self._run(key, segment)
        if timer:
            timer.mark("a1")
        if d.device.type == "cuda":
            torch.cuda.current_stream(d.device).synchronize()  # the ids are in h_experts[j]; earlier compute done
        flat = self._np_experts[j].tolist()
        step_routing.append([flat])
        if d.cache.observes:  # h_w arrived with the ids (segment a): [1, k]
            d.cache.observe(i, torch.tensor([flat]), self.h_w)
        if timer:
            timer.mark("c0", stream=d.copy_stream)
        slots, waits, host = d.route_step(i, flat, split_last=split_last)
        if timer:
            timer.mark("c1", stream=d.copy_stream)
        self._np_slots[j, 0] = slots
        return flat, slots, waits, host

    def _finish_step(self, key, segment, step_routing: list, timer) -> int:
        """The last graph (final norm, lm_head, argmax), one sync, the step's routing kept; the produced token."""
        d = self.decoder
        self._run(key, segment)
        if timer:
            timer.mark("end")
        if d.device.type == "cuda":
            torch.cuda.current_stream(d.device).synchronize()
        d.routing.append(torch.tensor(step_routing))
        return int(self.h_token[0])

    def decode_slot(self, token_in: int, position: int, timer=None) -> int:
        """One decode step of step="slot"; returns the produced token. Per MoE layer: graph A (the previous
        layer's sum and this layer's attention and router); the routed ids read (one sync); the misses' copies
        issued back to back, the last one gate|up first; each resident slot's expert at once (graph E, during the
        copies); each missed one when its copy lands, the last as G (when its gate|up landed) and D (its down)."""
        d = self.decoder
        compute = self._start(token_in, position)
        run = self._run
        step_routing = []
        if timer:
            timer.mark("step")
        layers = d.config.moe_layers
        for n, i in enumerate(layers):
            j = d.moe_index[i]
            flat, slots, waits, _ = self._attend_and_route(i, ("A", i), lambda: self._seg_a_slot(i), step_routing,
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
                        compute.wait_event(d.copied_gate_up)
                    run(("G", i, s), lambda: self._seg_gate_up(i, s))
                    if ev is not None:
                        compute.wait_event(ev)
                    run(("D", i, s), lambda: self._seg_down(i, s))
            if timer:
                timer.mark("b1")
        return self._finish_step(("F", None), self._seg_final_slot, step_routing, timer)
