"""The decode fast path: `FastDecoder`, the selective model with every expert resident (slots.SlotPool, S = E), a
static KV cache, one sync-free decode step (step.py) captured once as a CUDA graph and replayed per token;
`generate` takes it when `fast_path_refusal` says nothing, the eager model's generate otherwise.

Research calls run here too, every per-call choice in a device buffer filled between calls: left-padded ragged
batches (per-row positions and key masks), sampling (sampling.py), stop tokens (`done`, read every 16 steps),
routing interventions (top-k, router transforms as `LogitOp`s, the availability mask, the override) and
recorded activations (the residual stream, the router logits).
Follows gpt-fast (pytorch-labs/gpt-fast, generate.py) and transformers' `grouped_mm` experts implementation.
differs from transformers: as step.py. In fp32 the greedy tokens equal the eager path's (tests/test_engine.py,
tests/test_fast_research.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from omnilab.gpu import sampling
from omnilab.gpu.slots import SlotPool
from omnilab.gpu.step import (Consts, StaticKV, compute_refusal, decoder_layer, default_compute, dense_layer,
                              layer_weights, rms_norm)
from omnilab.model.decoder import rope_inv_freq
from omnilab.model.faults import acts_on_weights
from omnilab.model.generate import Generation, as_batch, left_pad, resolve_vocab_limit
from omnilab.model.routing import LogitOp, RoutingOptions, RoutingOverride

RECORDABLE = ("resid", "router_logits")  # what generate(record=...) can keep
CHECK_EVERY = 16  # decode steps between the host's reads of `done`


class FastDecoder:
    """Fast generation for a SelectiveMoE (or any object with its `model` / `lm_head` / `config`).

    The backbone is the model's own (no copy); the experts are read from its checkpoint into a SlotPool of
    every expert. `max_len` bounds prompt + new tokens; `batch` the number of prompts (ragged prompts are left
    padded with id 0, as the eager generate pads them). routing: the RoutingOptions every call follows (default:
    the model's own; `override` replaces its override): top-k (a shape: one decoder per k), router transforms
    that have a `router_op` (RouterMask, SalienceMix), the availability mask and the override, all applied in the
    captured step from tensors built here.
    compute: "triton" (fused Triton kernels, fused_moe.py, and for bf16 decode steps the projections and top-k as
    Triton kernels, step_kernels.py; the default for bf16 on CUDA where Triton is installed),
    "grouped_mm" (bf16 on CUDA otherwise, any dtype on CPU) or "gather" (the default for fp32 on CUDA);
    graph: capture the decode step as a CUDA graph (CUDA only, default there; one graph for greedy, one for
    sampling); compile: the decode step's layer function through torch.compile first (bf16; one compiled graph
    serves every layer; H200, 48 layers: 156.8 tok/s against 92.2 without, bench/results/decode_h200_bf16.md)."""

    def __init__(self, model, *, max_len: int = 512, batch: int = 1, compute: str | None = None,
                 graph: bool | None = None, pool: SlotPool | None = None, override: RoutingOverride | None = None,
                 routing: RoutingOptions | None = None, compile: bool = False):
        routing = model.routing if routing is None else routing
        if override is not None:
            routing = routing.replace(override=override)
        refusal = fast_path_refusal(model, routing)
        if refusal:
            raise ValueError(f"fast path unavailable: {refusal}")
        self.model, self.config = model, model.config
        self.device, self.dtype = model.device, model.dtype
        cfg = self.config
        self.max_len = -(-max_len // 64) * 64  # a multiple of 64: the attention kernels' preferred key length
        self.batch = batch
        if compute is None:
            compute = default_compute(self.dtype, self.device)
        refusal = compute_refusal(compute, self.device)
        if refusal:
            raise ValueError(f"fast path: {refusal}")
        self.compute = compute
        self.graph_enabled = (self.device.type == "cuda") if graph is None else graph
        if self.graph_enabled and self.device.type != "cuda":
            raise ValueError("graph=True needs a CUDA model")
        if pool is None:
            config, layout = model.checkpoint.arch
            pool = SlotPool.all_resident(model.checkpoint, config, layout, self.dtype, self.device)
        self.pool = pool
        self.routing_options, self.override = routing, routing.override
        self.top_k = routing.experts_per_token(cfg)
        self.identity_slots = pool.slots == cfg.num_experts and all(
            pool.expert_in[i] == list(range(cfg.num_experts)) for i in pool.layers)
        self.kv = StaticKV(cfg, batch, self.max_len, self.dtype, self.device)
        dev = self.device
        self.slot_range = torch.arange(pool.slots, device=dev)
        inv_freq = rope_inv_freq(cfg).to(dev)
        freqs = torch.arange(self.max_len, device=dev).float()[:, None] * inv_freq  # [S_max, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S_max, hd], as omnilab.model.decoder.rope_cos_sin
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self.key_pos = torch.arange(self.max_len, device=dev)
        self.moe_index = {layer: j for j, layer in enumerate(pool.layers)}
        self._ops = {i: router_ops(routing, i, cfg.num_experts, dev, self.dtype) for i in pool.layers}
        # routing: [moe layers, B, S_max, k] expert ids by cache column, read once when generation ends
        self.routing = torch.full((len(pool.layers), batch, self.max_len, self.top_k), -1,
                                  dtype=torch.int16, device=dev)
        # per-call state in device buffers (static addresses for the graph), filled between calls
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # the next input id
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its cache column (row position: pos - pad)
        self.pad = torch.zeros(batch, dtype=torch.long, device=dev)  # left padding of each row
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # index of the token being produced
        self.tokens = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)  # produced ids
        self.forced = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)  # teacher-forced inputs
        self.teacher = torch.zeros((), dtype=torch.bool, device=dev)
        self.vocab_mask = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)  # True: never produced
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)  # rows that produced a stop token
        self.stop = torch.full((16,), -1, dtype=torch.long, device=dev)  # stop ids, -1 padded
        self.params = sampling.SamplingParams(dev)
        self.rows = torch.arange(batch, device=dev)
        self.vocab_ids = torch.arange(cfg.vocab_size, device=dev)
        self.record_logits = torch.zeros(0, device=dev)
        self.records: dict[str, torch.Tensor] = {}  # "resid" [S_max, L, B, H], "router_logits" [S_max, moe, B, E]
        self._sample = False
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # sampling? -> the captured decode step
        self._consts = Consts(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              self.top_k, bool(cfg.norm_topk_prob), float(cfg.rms_norm_eps))
        self._weights = {i: layer_weights(layer) for i, layer in enumerate(model.model.layers) if layer.is_moe}
        # compile: the decode step's layer function through torch.compile (one graph for every layer; prefill
        # stays uncompiled); the CUDA graph then captures the compiled kernels
        self._compiled = torch.compile(decoder_layer, dynamic=False) if compile else None

    # -- the step ------------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, columns: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """ids [B, T] at cache columns [T] (device) -> last-token logits [B, V]. Writes the KV cache, routing and
        the asked records (row `step` [1]). Row b's positions are columns - pad[b] (clamped at 0), and its keys
        before pad[b] are masked, as the eager model's left-padding mask (decoder._positions_and_mask)."""
        m, cfg = self.model, self.config
        T = ids.shape[1]
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        rowpos = (columns[None, :] - self.pad[:, None]).clamp(min=0)  # [B, T], the eager cumsum(mask) - 1
        cos, sin = self.cos[rowpos][:, None], self.sin[rowpos][:, None]  # [B, 1, T, hd]
        keys, query = self.key_pos[None, None, :], columns[None, :, None]  # [1, 1, S_max], [1, T, 1]
        # differs from transformers (as eager): a padding query also sees itself, so no row is all -inf
        allowed = (keys <= query) & ((keys >= self.pad[:, None, None]) | (keys == query))  # [B, T, S_max]
        mask = allowed.repeat(1, g, 1)[:, None]  # [B, 1, g * T, S_max]: the folded query rows, group-major
        layer_fn = self._compiled if (self._compiled is not None and T == 1) else decoder_layer
        resid, router = self.records.get("resid"), self.records.get("router_logits")
        h = m.model.embed_tokens(ids)  # [B, T, H]
        for i, layer in enumerate(m.model.layers):
            if layer.is_moe:
                j = self.moe_index[i]
                forced = None if self.override is None else self.override.choice(i, rowpos.reshape(-1))  # [B*T, k]
                slot_of = None if self.identity_slots else self.pool.slot_of[i]
                h = layer_fn(h, cos, sin, mask, columns, self.kv.keys[i], self.kv.values[i], self.routing[j],
                             self._weights[i], self.pool.gate_up[i], self.pool.down[i], slot_of, forced,
                             self.slot_range, self._consts, self.compute, self._ops[i],
                             None if router is None else router[:, j], step)
            else:
                h = dense_layer(layer, h, cos, sin, mask, columns, self.kv.keys[i], self.kv.values[i], self._consts)
            if resid is not None:
                resid[:, i].index_copy_(0, step, h[None, :, -1])  # [1, B, H]: the last position
        h = rms_norm(m.model.norm.weight, h[:, -1], m.model.norm.eps)  # [B, H]: only the last position is needed
        return m.lm_head(h)  # [B, V]

    def _emit(self, logits: torch.Tensor) -> None:
        """logits [B, V] (float) -> the token of row `step` (argmax, or sampled on the device), the stop check,
        the next input; as the eager loop: a stopped row produces 0 and is not extended."""
        logits = logits.masked_fill(self.vocab_mask, float("-inf"))
        if self._sample:
            token = sampling.sample(logits, self.params, self.step, self.rows, self.vocab_ids)  # [B]
        else:
            token = logits.argmax(-1)  # [B]
        token = torch.where(self.done, 0, token)
        self.tokens.index_copy_(1, self.step, token[:, None])
        if self.record_logits.numel():
            self.record_logits.index_copy_(0, self.step, logits[None])
        self.done |= (token[:, None] == self.stop[None, :]).any(-1)  # [B]
        nxt = torch.where(self.teacher, self.forced.index_select(1, self.step)[:, 0], token)  # [B]
        self.ids.copy_(nxt[:, None])
        self.step.add_(1)

    def _decode_step(self) -> None:
        """One token, entirely on the device: input self.ids at column self.pos -> self.tokens[:, step]."""
        self._emit(self.forward(self.ids, self.pos, self.step).float())
        self.pos.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (lazy inits happen outside the capture), then capture one decode step."""
        state = (self.ids, self.pos, self.step, self.tokens, self.done)
        saved = [t.clone() for t in state]
        self.pos.fill_(0)  # warm-up steps at columns 0 and 1 (prefill rewrites them): in range whatever ran before
        self.step.fill_(1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(state, saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step()
        self._graphs[self._sample] = graph

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """prompts [B, L] (left padded as self.pad says) -> last-token logits [B, V] (float); writes the KV cache
        and routing of columns 0..L-1 and the records at row `step`."""
        L = prompts.shape[1]
        return self.forward(prompts.to(self.device), torch.arange(L, device=self.device), self.step).float()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 32, *, forced=None, vocab_limit=None,
                 record_logits: bool = False, record=(), greedy: bool = True, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = 0, stop_tokens=()) -> "FastGeneration":
        """Tokens for one prompt ([P] ids) or a batch (lists of ids, ragged ones left padded with 0).

        greedy, or sampling (temperature, top_k, top_p: transformers' warpers; `seed`: the same tokens for the
        same seed, omnilab.gpu.sampling). stop_tokens: a row stops after its first one (kept, as the eager loop);
        the host reads `done` once every 16 steps and ends early when every row stopped.
        forced [B, n] (or [n]): teacher forcing, the input at decode step j is forced[:, j] instead of the
        token just produced (the produced tokens are still recorded). vocab_limit: ids at or past it are never
        produced. record_logits: keep every step's logits [n, B, V]. record: "resid" and/or "router_logits"
        (see FastGeneration)."""
        batch = as_batch(prompts)
        B, n = len(batch), int(max_new_tokens)
        lengths = [len(p) for p in batch]
        P = max(lengths)
        if B != self.batch:
            raise ValueError(f"fast path built for batch {self.batch}, got {B} prompts")
        if n < 1:
            raise ValueError("generate needs max_new_tokens >= 1")
        if P + n > self.max_len:
            raise ValueError(f"prompt {P} + {n} new tokens exceed the fast path's max_len {self.max_len}")
        ids, attn = left_pad(batch, "cpu")  # [B, P] each
        rows = self.config.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= rows:
            raise ValueError(f"token id outside the embedding's {rows} rows (ids 0..{rows - 1})")
        self.pad.copy_((attn == 0).sum(1))
        self.vocab_mask.zero_()
        if vocab_limit is not None and vocab_limit < rows:
            self.vocab_mask[vocab_limit:] = True
        self.teacher.fill_(forced is not None)
        if forced is not None:
            forced = torch.as_tensor(forced, dtype=torch.long).reshape(B, -1)
            if forced.shape[1] < n - 1:
                raise ValueError(f"forced holds {forced.shape[1]} ids per prompt, need {n - 1}")
            self.forced.zero_()
            self.forced[:, :forced.shape[1]] = forced[:, :self.max_len].to(self.device)
        stops = sorted(set(int(t) for t in stop_tokens or ()))
        if len(stops) > self.stop.numel():
            self.stop = torch.full((len(stops),), -1, dtype=torch.long, device=self.device)
            self._graphs.clear()  # the buffer's address is part of a captured graph
        self.stop.fill_(-1)
        self.stop[:len(stops)] = torch.tensor(stops, dtype=torch.long)
        self.done.zero_()
        self._sample = not greedy
        if self._sample:
            seed = int(torch.randint(0, 2 ** 31 - 1, ())) if seed is None else seed
            self.params.set(temperature, top_k, top_p, seed, vocab=rows)
        self._allocate_records(record_logits, record)
        self.routing.fill_(-1)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        if self.graph_enabled and self._sample not in self._graphs:
            self._capture()
        sync()
        start = time.perf_counter()
        self.step.zero_()
        self._emit(self.prefill(ids))
        self.pos.fill_(P)
        sync()
        prefill_seconds = time.perf_counter() - start
        graph, ran = self._graphs.get(self._sample) if self.graph_enabled else None, n  # graph_enabled off: uncaptured
        for j in range(1, n):
            graph.replay() if graph is not None else self._decode_step()
            if stops and (j + 1) % CHECK_EVERY == 0 and bool(self.done.all()):  # one sync per chunk
                ran = j + 1
                break
        sync()
        seconds = time.perf_counter() - start
        tokens, stopped = self.tokens[:, :ran].tolist(), self.done.tolist()  # the one read of the outputs
        if stops:  # each row up to and including its first stop token
            tokens = [row[:next((j + 1 for j, t in enumerate(row) if t in stops), len(row))] for row in tokens]
        routing = self.routing[:, :, :P + ran - 1].to(torch.long).cpu()  # [moe layers, B, S, k]
        return FastGeneration(tokens, lengths, seconds, prefill_seconds, stopped=stopped, routing=routing,
                              logits=self.record_logits[:ran].clone() if record_logits else None,
                              resid=self._record_out("resid", ran),
                              router_logits=self._record_out("router_logits", ran))

    def _allocate_records(self, record_logits: bool, record) -> None:
        """(Re)allocate the record buffers a call asks for; a new or dropped buffer drops the captured graphs."""
        unknown = set(record) - set(RECORDABLE)
        if unknown:
            raise ValueError(f"record {sorted(unknown)}: the fast path records {', '.join(RECORDABLE)}")
        cfg, B, S, dev = self.config, self.batch, self.max_len, self.device
        if record_logits != bool(self.record_logits.numel()):
            self.record_logits = (torch.zeros(S, B, cfg.vocab_size, device=dev) if record_logits
                                  else torch.zeros(0, device=dev))
            self._graphs.clear()
        shapes = {"resid": (S, cfg.num_hidden_layers, B, cfg.hidden_size),
                  "router_logits": (S, len(self.pool.layers), B, cfg.num_experts)}
        if set(record) != set(self.records):
            self.records = {name: torch.zeros(shapes[name], dtype=self.dtype, device=dev) for name in record}
            self._graphs.clear()

    def _record_out(self, name: str, ran: int):
        return self.records[name][:ran].clone() if name in self.records else None


@dataclass
class FastGeneration(Generation):
    """Generation plus routing [moe layers, B, columns, k] (cache columns 0 .. P + n - 2, the inputs seen; a row
    left padded by p has its padding in columns 0..p-1) and, when asked, the logits of every produced token
    [n, B, V] (float32, vocab mask applied), the residual stream after every layer at the last position of each
    step, resid [n, layers, B, H], and the raw router logits there (before transforms, as hook_router_logits),
    router_logits [n, moe layers, B, E] (both in the model's dtype). Step j is the input that produced token j
    (step 0: the prompt's last position); steps past a row's stop token hold that row's padding input 0."""

    routing: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    resid: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None


def router_ops(routing: RoutingOptions, layer: int, num_experts: int, device, dtype) -> tuple:
    """One MoE layer's router-logit transforms as LogitOps (built once per decoder): each transform's router_op in
    order, then the availability mask, as SelectiveMoE.route applies them."""
    ops = [t.router_op(layer, num_experts, device, dtype) for t in routing.transforms]
    if routing.available is not None:
        # differs from transformers (as eager): experts missing from the checkpoint are masked before the softmax
        ops.append(LogitOp(drop=~routing.available[layer].to(device)))
    return tuple(op for op in ops if op is not None)


def fast_path_refusal(model, routing: RoutingOptions | None = None) -> str | None:
    """Why `model` cannot take the resident fast path for a call with `routing` (default: the model's own), None
    when it can. It follows any top-k, the availability mask, the override and every transform with a `router_op`;
    it refuses hooks (Python callbacks), faults that act on weights, and transforms it does not know."""
    if model.hooks:
        return f"hooks are registered ({', '.join(sorted(model.hooks))}); hooked forwards run on the eager path"
    weights = [type(f).__name__ for f in model.faults if acts_on_weights(f)]
    if weights:
        return f"faults act on the weights as loaded ({', '.join(weights)})"
    routing = model.routing if routing is None else routing
    unknown = [type(t).__name__ for t in routing.transforms if not hasattr(t, "router_op")]
    if unknown:
        return f"router transforms without a router_op ({', '.join(unknown)}) run as Python on the eager path"
    k, E = routing.experts_per_token(model.config), model.config.num_experts
    if not 1 <= k <= E:
        return f"the routing picks top-{k} of {E} experts"
    return None


def plain_routing_refusal(model, routing: RoutingOptions | None = None) -> str | None:
    """Why `model` and `routing` are not the checkpoint's plain routing (None when they are): the engines that
    route only that way (the offload decoder, the trace prefill) refuse any fault, mask, transform, top-k change
    or per-call override."""
    if model.hooks:
        return f"hooks are registered ({', '.join(sorted(model.hooks))}); hooked forwards run on the eager path"
    if model.faults:
        return "fault injection is active"
    routing = model.routing if routing is None else routing
    if model.available is not None or routing.available is not None:
        return "experts are masked as missing"
    if routing.transforms:
        return f"the routing transforms the router logits ({', '.join(type(t).__name__ for t in routing.transforms)})"
    k = model.config.num_experts_per_tok
    if routing.experts_per_token(model.config) != k:
        return f"the routing picks top-{routing.experts_per_token(model.config)}, this engine the checkpoint's top-{k}"
    if routing.override is not model.routing.override:
        return "the call gives its own routing override (this engine reads the model's)"
    return None


def generate(model, prompts, max_new_tokens: int = 32, *, decoder: FastDecoder | None = None, **kwargs):
    """Generation on the fast path when `fast_path_refusal` says nothing for the model and the call's `routing`,
    else the eager `model.generate(prompts, max_new_tokens, **kwargs)` (also for use_kv_cache=False or progress).
    Pass a built `decoder` to reuse its pool and graphs (it then follows its own routing)."""
    routing = kwargs.get("routing")
    if not kwargs.get("use_kv_cache", True) or kwargs.get("progress") or fast_path_refusal(model, routing):
        return model.generate(prompts, max_new_tokens, **kwargs)
    batch = as_batch(prompts)
    if decoder is None:
        decoder = FastDecoder(model, max_len=max(map(len, batch)) + max_new_tokens, batch=len(batch),
                              routing=routing)
    limit = resolve_vocab_limit(model, kwargs.get("vocab_limit", "auto"))
    options = {k: kwargs[k] for k in ("greedy", "temperature", "top_k", "top_p", "seed", "stop_tokens")
               if k in kwargs}
    return decoder.generate(batch, max_new_tokens, vocab_limit=limit, **options)
