"""The decode fast path: the selective model with every expert resident, one decode step replayed as a CUDA graph.

It follows gpt-fast (pytorch-labs/gpt-fast, generate.py): a static preallocated KV cache written at positions,
a step with no host synchronisation (positions, the next input id and every output live in device buffers), the
step captured once as a CUDA graph and replayed per token; and transformers' `grouped_mm` experts
implementation for the expert compute: the token-expert pairs sorted by expert, one grouped GEMM
(`torch._grouped_mm`) over the stacked experts for gate/up and one for down, the groups given by device offsets.

Pieces, top to bottom:
- `SlotPool`: per MoE layer, experts stacked in transformers' fused layout, gate_up [S, 2I, H] (gate rows then
  up rows) and down [S, H, I], plus `slot_of` [E] (the slot holding each expert, -1 for none). All-resident
  decoding uses S = E and slot = expert; the offloading engine (omnilab.gpu.offload) reuses the pool with S < E.
- `StaticKV`: keys and values [L, B, kv_heads, S_max, head_dim], preallocated; a step writes its positions.
- `FastDecoder`: prefill (batched, the same step function, not graphed) and decode (T = 1, graphed on CUDA).
  The top-k expert ids of every MoE layer and position go into one device buffer (`routing`), read once when
  generation ends: routing traces stay observable without a sync per step.
- `generate(model, ...)`: the fast path when it applies, the model's eager `generate` otherwise.

What takes the eager path instead (`fast_path_refusal` says which): hooks registered on the model (a hook is
arbitrary Python on every step, so hooks always run eagerly; the routing buffer replaces the router hooks'
read-only use), fault injection, experts masked as missing, routing options other than the checkpoint's top-k
(per model or per call: a top-k change, router transforms, a mask, a per-call override), left-padded batches,
sampling (greedy only here).

The operations are the eager model's (omnilab.model.decoder), in the same order, with these departures (each labelled
inline): attention runs over the whole static cache with a boolean mask; the query heads of one kv head are
folded into the query-length axis instead of SDPA's enable_gqa; gate and up are one GEMM; the k expert outputs
of a token are summed in one reduction (as transformers' grouped_mm path does) rather than by index_add_.
In fp32 the greedy tokens equal the eager path's (tests/test_engine.py); in bf16 the benchmark reports the
logits' relative error against the eager path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from omnilab.arch import EXPERT_PROJECTIONS, expert_tensor
from omnilab.gpu.traces import RoutingOverride
from omnilab.model.decoder import rope_inv_freq, rotate_half
from omnilab.model.generate import Generation
from omnilab.model.routing import RoutingOptions


# -- the slot pool -------------------------------------------------------------------------------------------------


class ExpertSlots:
    """What every pool of expert slots shares (SlotPool here, omnilab.gpu.offload.SlabPool): `slots` experts per
    MoE layer of one dtype on one device, and the byte accounting."""

    def __init__(self, config, slots: int, dtype: torch.dtype, device):
        if not 1 <= slots <= config.num_experts:
            raise ValueError(f"slot pool: {slots} slots per layer, need 1..{config.num_experts}")
        self.config, self.slots, self.dtype, self.device = config, slots, dtype, torch.device(device)
        self.layers = list(config.moe_layers)

    @property
    def expert_bytes(self) -> int:
        c = self.config
        return 3 * c.hidden_size * c.moe_intermediate_size * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.expert_bytes * self.slots * len(self.layers)


class SlotPool(ExpertSlots):
    """Stacked expert weights on one device, per MoE layer: gate_up [S, 2I, H], down [S, H, I], slot_of [E]."""

    def __init__(self, config, slots: int, dtype: torch.dtype, device):
        super().__init__(config, slots, dtype, device)
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up = {i: torch.empty(slots, 2 * I, H, dtype=dtype, device=device) for i in self.layers}
        self.down = {i: torch.empty(slots, H, I, dtype=dtype, device=device) for i in self.layers}
        self.slot_of = {i: torch.full((E,), -1, dtype=torch.long, device=device) for i in self.layers}
        self.expert_in = {i: [-1] * slots for i in self.layers}  # host mirror: slot -> expert (-1 empty)

    def put(self, layer: int, expert: int, slot: int, gate, up, down, non_blocking: bool = False) -> None:
        """Copy one expert's projections (nn.Linear layout: gate/up [I, H], down [H, I]) into a slot."""
        I = self.config.moe_intermediate_size
        old = self.expert_in[layer][slot]
        if old >= 0:
            self.slot_of[layer][old] = -1
        self.gate_up[layer][slot, :I].copy_(gate, non_blocking=non_blocking)
        self.gate_up[layer][slot, I:].copy_(up, non_blocking=non_blocking)
        self.down[layer][slot].copy_(down, non_blocking=non_blocking)
        self.slot_of[layer][expert] = slot
        self.expert_in[layer][slot] = expert

    @classmethod
    def all_resident(cls, checkpoint, config, layout, dtype: torch.dtype, device) -> "SlotPool":
        """Every expert of every MoE layer, slot = expert, read tensor by tensor from the checkpoint's shards."""
        pool = cls(config, config.num_experts, dtype, device)
        for layer in pool.layers:
            for e in range(config.num_experts):
                g, u, d = (checkpoint.read(expert_tensor(layout, layer, e, p)) for p in EXPERT_PROJECTIONS)
                pool.put(layer, e, e, g, u, d)
        return pool


# -- the static KV cache -------------------------------------------------------------------------------------------


class StaticKV:
    """keys, values [L, B, kv_heads, S_max, head_dim], zero-filled once; positions are written in place."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


# -- one step ------------------------------------------------------------------------------------------------------


def rms_norm(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """omnilab.model.decoder.RMSNorm's arithmetic (normalised in fp32, scaled in the input dtype) in one fused kernel."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class Consts(NamedTuple):
    """The config numbers a layer step needs (plain ints and floats: torch.compile treats them as constants)."""

    heads: int
    kv_heads: int
    head_dim: int
    top_k: int
    norm_topk_prob: bool
    eps: float


class LayerWeights(NamedTuple):
    """One decoder layer's backbone tensors (the experts are in the SlotPool)."""

    input_norm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    router: torch.Tensor


def layer_weights(layer) -> LayerWeights:
    a = layer.self_attn
    if a.q_proj.bias is not None:
        raise ValueError("fast path: attention_bias is not supported")
    return LayerWeights(layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                        a.q_norm.weight, a.k_norm.weight, a.o_proj.weight, layer.post_attention_layernorm.weight,
                        layer.mlp.gate.weight)


def attention(h, w: LayerWeights, cos, sin, mask, positions, keys, values, c: Consts):
    """The residual stream h [B, T, H] -> attention output [B, T, H]; writes keys/values [B, kvh, S_max, hd]."""
    B, T, _ = h.shape
    nh, nkv, hd = c.heads, c.kv_heads, c.head_dim
    g = nh // nkv
    x = rms_norm(w.input_norm, h, c.eps)
    q = rms_norm(w.q_norm, F.linear(x, w.q_proj).view(B, T, nh, hd), c.eps).transpose(1, 2)  # [B, nh, T, hd]
    k = rms_norm(w.k_norm, F.linear(x, w.k_proj).view(B, T, nkv, hd), c.eps).transpose(1, 2)  # [B, nkv, T, hd]
    v = F.linear(x, w.v_proj).view(B, T, nkv, hd).transpose(1, 2)  # [B, nkv, T, hd]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)
    # differs from eager: the g query heads of a kv head are folded into the query axis (no enable_gqa), and
    # attention spans the whole static cache with the positions past each query masked out
    qf = q.reshape(B, nkv, g * T, hd)  # [B, nkv, g * T, hd]: heads are kv-head major
    o = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask, scale=hd ** -0.5)  # [B, nkv, g * T, hd]
    o = o.view(B, nkv, g, T, hd).permute(0, 3, 1, 2, 4).reshape(B, T, nh * hd)  # [B, T, nh * hd]
    return F.linear(o, w.o_proj)


def decoder_layer(h, cos, sin, mask, positions, keys, values, routing, w: LayerWeights, gate_up, down, slot_of,
                  forced, slot_range, c: Consts, compute: str):
    """One MoE decoder layer on the static cache: h [B, T, H] -> [B, T, H]. Tensors only (no modules), so one
    torch.compile'd copy serves every layer. routing [B, S_max, k] receives the layer's top-k expert ids."""
    B, T, H = h.shape
    h = h + attention(h, w, cos, sin, mask, positions, keys, values, c)
    x = rms_norm(w.post_norm, h, c.eps).reshape(B * T, H)  # [N, H]
    if forced is not None:
        forced = forced.repeat(B, 1)  # [N, k]
    weights, experts = route(F.linear(x, w.router), c.top_k, c.norm_topk_prob, x.dtype, forced)  # [N, k]
    routing.index_copy_(1, positions, experts.view(B, T, -1).to(routing.dtype))
    slots = experts if slot_of is None else slot_of[experts]  # [N, k]
    return h + expert_mix(x, slots, weights, gate_up, down, slot_range, compute).view(B, T, H)


def dense_layer(layer, h, cos, sin, mask, positions, keys, values, c: Consts):
    """A dense-MLP decoder layer (mlp_only_layers / off the sparse step): h [B, T, H] -> [B, T, H]."""
    w = LayerWeights(layer.input_layernorm.weight, layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                     layer.self_attn.v_proj.weight, layer.self_attn.q_norm.weight, layer.self_attn.k_norm.weight,
                     layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight, None)
    h = h + attention(h, w, cos, sin, mask, positions, keys, values, c)
    return h + layer.mlp(rms_norm(w.post_norm, h, c.eps))


def expert_mix(x, slots, weights, gate_up, down, slot_range, compute: str):
    """x [N, H], slots [N, k] (slot ids), weights [N, k] -> sum over k of weight * expert(x), [N, H]. No host sync.

    grouped_mm: choices sorted by slot, one grouped GEMM per projection over all slots (empty groups cost
    nothing). gather: each choice's expert weights gathered and batch-multiplied (any dtype, any device)."""
    N, k = slots.shape
    I = down.shape[-1]
    flat = slots.reshape(-1)  # [N * k]
    if compute == "grouped_mm":
        sorted_slots, perm = torch.sort(flat, stable=True)  # choices grouped by slot
        rows = x[perm // k]  # [N * k, H]
        offs = torch.searchsorted(sorted_slots, slot_range, right=True).to(torch.int32)  # [S]: group ends
        gu = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offs)  # [N * k, 2I]
        # differs from eager: gate and up are one GEMM (transformers' fused gate_up_proj)
        y = torch._grouped_mm(F.silu(gu[:, :I]) * gu[:, I:], down.transpose(1, 2), offs=offs)  # [N * k, H]
        y = y * weights.reshape(-1)[perm][:, None]
        out = torch.empty_like(y)
        out[perm] = y  # back to (token, choice) order
    elif compute == "gather":
        rows = x.repeat_interleave(k, dim=0)  # [N * k, H]
        gu = torch.bmm(gate_up[flat], rows[:, :, None])[..., 0]  # [N * k, 2I]
        y = torch.bmm(down[flat], (F.silu(gu[:, :I]) * gu[:, I:])[:, :, None])[..., 0]  # [N * k, H]
        out = y * weights.reshape(-1)[:, None]
    else:
        raise ValueError(f"expert compute {compute!r}: use grouped_mm or gather")
    # differs from eager: the k outputs of a token are summed in one reduction, as transformers' grouped_mm does
    return out.view(N, k, -1).sum(dim=1)  # [N, H]


def route(router_logits: torch.Tensor, k: int, norm_topk_prob: bool, dtype, forced: torch.Tensor | None = None):
    """router logits [N, E] -> (weights [N, k] in dtype, experts [N, k]); transformers' Qwen3-MoE router."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # [N, E]
    if forced is None:
        weights, experts = torch.topk(probs, k, dim=-1)  # [N, k]
    else:
        experts = forced
        weights = probs.gather(-1, experts)  # [N, k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


class FastDecoder:
    """Fast greedy generation for a SelectiveMoE (or any object with its `model` / `lm_head` / `config`).

    The backbone is the model's own (no copy); the experts are read from its checkpoint into a SlotPool of
    every expert. `max_len` bounds prompt + new tokens; `batch` the number of prompts (equal lengths).
    compute: "grouped_mm" (default; bf16 on CUDA, any dtype on CPU) or "gather" (the default for fp32 on CUDA);
    graph: capture the decode step as a CUDA graph (CUDA only, default there); compile: the decode step's layer
    function through torch.compile first (bf16; one compiled graph serves every layer; H200, 48 layers: 156.8
    tok/s against 92.2 without, bench/results/decode_h200_bf16.md)."""

    def __init__(self, model, *, max_len: int = 512, batch: int = 1, compute: str | None = None,
                 graph: bool | None = None, pool: SlotPool | None = None, override: RoutingOverride | None = None,
                 compile: bool = False):
        refusal = fast_path_refusal(model)
        if refusal:
            raise ValueError(f"fast path unavailable: {refusal}")
        self.model, self.config = model, model.config
        self.device, self.dtype = model.device, model.dtype
        cfg = self.config
        self.max_len = -(-max_len // 64) * 64  # a multiple of 64: the attention kernels' preferred key length
        self.batch = batch
        if compute is None:
            compute = "grouped_mm" if self.dtype == torch.bfloat16 or self.device.type == "cpu" else "gather"
        self.compute = compute
        self.graph_enabled = (self.device.type == "cuda") if graph is None else graph
        if self.graph_enabled and self.device.type != "cuda":
            raise ValueError("graph=True needs a CUDA model")
        if pool is None:
            config, layout = model.checkpoint.arch
            pool = SlotPool.all_resident(model.checkpoint, config, layout, self.dtype, self.device)
        self.pool = pool
        self.override = override if override is not None else getattr(model, "routing_override", None)
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
        # routing: [moe layers, B, S_max, k] expert ids by absolute position, read once when generation ends
        self.routing = torch.full((len(pool.layers), batch, self.max_len, cfg.num_experts_per_tok), -1,
                                  dtype=torch.int16, device=dev)
        # decode-step buffers (static addresses for the graph)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # the next input id
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # index of the token being produced
        self.tokens = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)  # produced ids
        self.forced = torch.zeros(batch, self.max_len, dtype=torch.long, device=dev)  # teacher-forced inputs
        self.teacher = torch.zeros((), dtype=torch.bool, device=dev)
        self.vocab_mask = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=dev)  # True: never produced
        self.record_logits = torch.zeros(0, device=dev)
        self._graph = None
        self._consts = Consts(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              cfg.num_experts_per_tok, bool(cfg.norm_topk_prob), float(cfg.rms_norm_eps))
        self._weights = {i: layer_weights(layer) for i, layer in enumerate(model.model.layers) if layer.is_moe}
        # compile: the decode step's layer function through torch.compile (one graph for every layer; prefill
        # stays uncompiled); the CUDA graph then captures the compiled kernels
        self._compiled = torch.compile(decoder_layer, dynamic=False) if compile else None

    # -- the step ------------------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids [B, T] at positions [T] (device) -> last-token logits [B, V]. Writes the KV cache and routing."""
        m, cfg = self.model, self.config
        T = ids.shape[1]
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        cos, sin = self.cos[positions], self.sin[positions]  # [T, hd]
        allowed = self.key_pos[None, :] <= positions[:, None]  # [T, S_max]
        mask = allowed.repeat(g, 1)[None, None]  # [1, 1, g * T, S_max]: the folded query rows, group-major
        layer_fn = self._compiled if (self._compiled is not None and T == 1) else decoder_layer
        h = m.model.embed_tokens(ids)  # [B, T, H]
        for i, layer in enumerate(m.model.layers):
            if layer.is_moe:
                forced = None
                if self.override is not None:
                    forced = self.override.choice(i, positions)  # [T, k] or None
                slot_of = None if self.identity_slots else self.pool.slot_of[i]
                h = layer_fn(h, cos, sin, mask, positions, self.kv.keys[i], self.kv.values[i],
                             self.routing[self.moe_index[i]], self._weights[i], self.pool.gate_up[i],
                             self.pool.down[i], slot_of, forced, self.slot_range, self._consts, self.compute)
            else:
                h = dense_layer(layer, h, cos, sin, mask, positions, self.kv.keys[i], self.kv.values[i], self._consts)
        h = rms_norm(m.model.norm.weight, h[:, -1], m.model.norm.eps)  # [B, H]: only the last position is needed
        return m.lm_head(h)  # [B, V]

    def _decode_step(self) -> None:
        """One token, entirely on the device: input self.ids at self.pos -> self.tokens[:, step]."""
        logits = self.forward(self.ids, self.pos).float()  # [B, V]
        logits = logits.masked_fill(self.vocab_mask, float("-inf"))
        token = logits.argmax(-1)  # [B]
        self.tokens.index_copy_(1, self.step, token[:, None])
        if self.record_logits.numel():
            self.record_logits.index_copy_(0, self.step, logits[None])
        nxt = torch.where(self.teacher, self.forced.index_select(1, self.step)[:, 0], token)  # [B]
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)
        self.step.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (lazy inits happen outside the capture), then capture one decode step."""
        saved = [t.clone() for t in (self.ids, self.pos, self.step, self.tokens)]
        self.pos.fill_(0)  # warm-up steps at positions 0 and 1 (prefill rewrites them): in range whatever ran before
        self.step.fill_(1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip((self.ids, self.pos, self.step, self.tokens), saved):
            t.copy_(s)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._decode_step()

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """prompts [B, P] -> last-token logits [B, V] (float); writes the KV cache and routing of 0..P-1."""
        P = prompts.shape[1]
        return self.forward(prompts.to(self.device), torch.arange(P, device=self.device)).float()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 32, *, forced=None, vocab_limit=None,
                 record_logits: bool = False) -> "FastGeneration":
        """Greedy tokens for equal-length prompts ([P] or [B, P] ids).

        forced [B, n] (or [n]): teacher forcing, the input at decode step j is forced[:, j] instead of the
        token just produced (the produced tokens are still recorded: the argmax after each forced input).
        vocab_limit: ids at or past it are never produced. record_logits: keep every step's logits [n, B, V]."""
        prompts = torch.as_tensor(prompts, dtype=torch.long)
        if prompts.dim() == 1:
            prompts = prompts[None]
        B, P = prompts.shape
        n = int(max_new_tokens)
        if B != self.batch:
            raise ValueError(f"fast path built for batch {self.batch}, got {B} prompts")
        if P == 0 or n < 1:
            raise ValueError("generate needs a non-empty prompt and max_new_tokens >= 1")
        if P + n > self.max_len:
            raise ValueError(f"prompt {P} + {n} new tokens exceed the fast path's max_len {self.max_len}")
        rows = self.config.vocab_size
        if int(prompts.min()) < 0 or int(prompts.max()) >= rows:
            raise ValueError(f"token id outside the embedding's {rows} rows (ids 0..{rows - 1})")
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
        if record_logits != bool(self.record_logits.numel()):
            self.record_logits = (torch.zeros(self.max_len, B, rows, device=self.device) if record_logits
                                  else torch.zeros(0, device=self.device))
            self._graph = None  # the buffer's address is part of a captured graph
        self.routing.fill_(-1)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        if self.graph_enabled and self._graph is None:
            self._capture()
        sync()
        start = time.perf_counter()
        logits = self.prefill(prompts)  # [B, V]
        logits = logits.masked_fill(self.vocab_mask, float("-inf"))
        first = logits.argmax(-1)  # [B]
        self.tokens[:, 0] = first
        if record_logits:
            self.record_logits[0] = logits
        self.ids.copy_((self.forced[:, 0] if forced is not None else first)[:, None])
        self.pos.fill_(P)
        self.step.fill_(1)
        sync()
        prefill_seconds = time.perf_counter() - start
        for _ in range(n - 1):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._decode_step()
        sync()
        seconds = time.perf_counter() - start
        tokens = self.tokens[:, :n].tolist()  # the one read of the outputs
        routing = self.routing[:, :, :P + n - 1].to(torch.long).cpu()  # [moe layers, B, S, k]
        logits_out = self.record_logits[:n].clone() if record_logits else None
        return FastGeneration(tokens, [P] * B, seconds, prefill_seconds, stopped=[False] * B,
                              routing=routing, logits=logits_out)


@dataclass
class FastGeneration(Generation):
    """Generation plus routing [moe layers, B, positions, k] (positions 0 .. P + n - 2, the inputs seen) and,
    when asked, the logits of every produced token [n, B, V]."""

    routing: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def fast_path_refusal(model, routing: RoutingOptions | None = None) -> str | None:
    """Why `model` cannot take the fast path (None when it can). routing: the call's RoutingOptions (default:
    the model's own): the fast path routes the checkpoint's top-k with no router transform, no mask, and at most
    the model's own override (the one FastDecoder reads), so any other per-call routing goes eager."""
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
        return f"the routing picks top-{routing.experts_per_token(model.config)}, the fast path the checkpoint's top-{k}"
    if routing.override is not model.routing.override:
        return "the call gives its own routing override (the fast path reads the model's: FastDecoder(override=...))"
    return None


def generate(model, prompts, max_new_tokens: int = 32, *, decoder: FastDecoder | None = None, **kwargs):
    """Greedy generation on the fast path when it applies (no fast_path_refusal for the model and the call's
    `routing`, equal-length prompts, greedy), else the eager `model.generate(prompts, max_new_tokens, **kwargs)`.
    Pass a built `decoder` to reuse its pool and graph."""
    sampling = not kwargs.get("greedy", True) or bool(kwargs.get("stop_tokens")) or not kwargs.get("use_kv_cache", True)
    try:
        ids = torch.as_tensor(prompts, dtype=torch.long)  # fails for ragged batches
    except (ValueError, TypeError):
        ids = None
    if ids is None or sampling or fast_path_refusal(model, kwargs.get("routing")) is not None:
        return model.generate(prompts, max_new_tokens, **kwargs)
    ids = ids if ids.dim() == 2 else ids[None]  # [B, P]
    if decoder is None:
        decoder = FastDecoder(model, max_len=ids.shape[1] + max_new_tokens, batch=ids.shape[0])
    limit = kwargs.get("vocab_limit", "auto")
    if limit == "auto":
        limit = len(model.tokenizer) if model.tokenizer is not None else None
    return decoder.generate(ids, max_new_tokens, vocab_limit=limit)
