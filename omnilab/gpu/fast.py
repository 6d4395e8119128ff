"""The decode fast path: `FastDecoder`, the selective model with every expert resident (slots.SlotPool, S = E), a
static KV cache, one sync-free decode step (step.py) captured once as a CUDA graph and replayed per token;
`generate` takes it when `fast_path_refusal` says nothing, the eager model's generate otherwise.
Follows gpt-fast (pytorch-labs/gpt-fast, generate.py) and transformers' `grouped_mm` experts implementation.
differs from transformers: as step.py. In fp32 the greedy tokens equal the eager path's (tests/test_engine.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from omnilab.gpu.slots import SlotPool
from omnilab.gpu.step import Consts, StaticKV, decoder_layer, dense_layer, layer_weights, rms_norm
from omnilab.model.decoder import rope_inv_freq
from omnilab.model.generate import Generation
from omnilab.model.routing import RoutingOptions, RoutingOverride


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
