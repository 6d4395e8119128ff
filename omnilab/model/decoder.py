"""The selective model: the Qwen3-MoE / Qwen3-Omni thinker text decoder with experts loaded on demand.

Follows transformers' `Qwen3MoeForCausalLM` and `Qwen3OmniMoeThinkerTextModel` operation for operation, in the
spirit of mlx-lm's models/qwen3_moe.py; the backbone is resident, each MoE layer's experts come from an
ExpertCache (omnilab.model.experts). Top to bottom: the blocks, then SelectiveMoE (forward, block, MoE step).
Differs from transformers: experts missing from a checkpoint may be masked before the softmax, and a padding query
also sees itself. Design: docs/DESIGN.md, "The selective model".
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnilab.model.experts import ExpertCache
from omnilab.model.faults import Fault
from omnilab.model.generate import generate
from omnilab.model.hooks import (ATTN_OUT, EMBED, FINAL_NORM, LOGITS, MLP_OUT, RESID_MID, RESID_POST, RESID_PRE,
                                 ROUTER_LOGITS, TOPK_INDICES, TOPK_WEIGHTS, hook_names, layer_hook, resolve)
from omnilab.model.kv_cache import KVCache
from omnilab.model.loading import load_model
from omnilab.model.rope import mrope_cos_sin, rope_cos_sin, rope_inv_freq, rotate_half
from omnilab.model.routing import RoutingOptions

# -- building blocks -------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalised in fp32, scaled in the input dtype, as transformers does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """GQA with per-head RMSNorm on q and k (before RoPE), as Qwen3 does it."""

    def __init__(self, config):
        super().__init__()
        H, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        bias = config.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, H, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            k, v = kv.update(layer, k, v)  # [B, nkv, S, hd]
        causal = mask is None and T > 1 and k.shape[2] == T
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim ** -0.5,
                                             enable_gqa=self.n_heads != self.n_kv_heads)  # [B, nh, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # [B, T, H]


class MLP(nn.Module):
    """Dense SwiGLU MLP (layers in mlp_only_layers or off the decoder_sparse_step)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """The MoE layer's resident part. Its experts live in the ExpertCache, not in this module."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int):
        super().__init__()
        self.self_attn = Attention(config)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp = Router(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TextModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# -- the model -------------------------------------------------------------------------------------------------


class SelectiveMoE(nn.Module):
    """Qwen3-MoE text decoder with a resident backbone and experts from an ExpertCache.

    Build it with `SelectiveMoE.from_checkpoint(path, ...)`. Call it like a module:
    `model(input_ids [B, T], attention_mask=None, kv=None) -> logits [B, T, V]`."""

    def __init__(self, config, cache: ExpertCache, faults=(), available: dict | None = None):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.cache = cache
        self.faults = tuple(faults)  # as loaded; those acting on router logits are the routing's transforms
        self.routing = RoutingOptions(transforms=tuple(f for f in self.faults if _acts_on_router(f)),
                                      available=available)  # available: layer -> bool [E] when experts are masked
        self.hooks: dict[str, list] = {}
        self.tokenizer = None
        self.generation_config: dict = {}

    @property
    def stop_tokens(self) -> list[int]:
        """The ids that end a text: generation_config.json's eos_token_id, where transformers' generate stops (also
        `omnilab generate`'s default --stop-ids); [] when the checkpoint names none. For generate(stop_tokens=...)
        and omnilab.model.generate.until_stop."""
        eos = self.generation_config.get("eos_token_id")
        return [eos] if isinstance(eos, int) else [int(t) for t in eos or []]

    @classmethod
    def from_checkpoint(cls, path, **options) -> "SelectiveMoE":
        """Open a checkpoint folder and load the backbone, the experts behind a cache: omnilab.model.loading.load_model
        (dtype, device, expert_budget, policy, pinned, faults, mask_missing_experts, tokenizer)."""
        return load_model(cls, path, **options)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def available(self) -> dict | None:
        """layer -> bool [E] of the experts present when missing ones are masked (else None)."""
        return self.routing.available

    @property
    def routing_override(self):
        """The routing's omnilab.model.routing.RoutingOverride (None: the routers choose)."""
        return self.routing.override

    @routing_override.setter
    def routing_override(self, override) -> None:
        self.routing = self.routing.replace(override=override)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # -- hooks -----------------------------------------------------------------------------------------------
    def add_hook(self, name: str, fn):
        """Call fn(tensor) at hook point `name` (or its TransformerLens alias, omnilab.model.ALIASES); a non-None
        return replaces the activation. Returns a handle."""
        from omnilab.model.hooks import resolve

        name = resolve(name)
        if name not in self.hook_names():
            raise KeyError(f"no hook point {name!r} in this model")
        self.hooks.setdefault(name, []).append(fn)
        return _HookHandle(self.hooks, name, fn)

    def hook_names(self) -> list[str]:
        return hook_names(self.config)

    def hook(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for fn in self.hooks.get(name, ()):
            out = fn(x)
            if out is not None:
                x = out
        return x

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv: KVCache | None = None, *, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, deepstack: tuple | None = None,
                routing: RoutingOptions | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. attention_mask [B, past + T] (1 = token, 0 = left padding).

        Multimodal prompts (built by omnilab.model.multimodal.prepare): inputs_embeds [B, T, H] replaces the token
        embedding; position_ids [3, B, T] (M-RoPE rows) or [B, T] replaces the positions; deepstack
        (visual_pos_masks [B, T], [features [n_visual, H] per layer]) is added to the visual rows of the
        residual after each of the first len(features) layers, as transformers' thinker adds it. routing:
        this call's RoutingOptions (default: the model's own, `self.routing`)."""
        routing = self.routing if routing is None else routing
        input_ids = self._checked_ids(input_ids)  # [B, T]
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        B, T = input_ids.shape
        past = kv.length if kv is not None else 0
        positions, mask = self._positions_and_mask(B, T, past, attention_mask, input_ids.device)
        if position_ids is not None:
            positions = torch.as_tensor(position_ids, device=input_ids.device)  # [3, B, T] or [B, T]
        positions, cos, sin = self._rotary(positions)  # positions [B, T] or [3, B, T]; cos, sin [B, T, hd]

        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
        h = self.hook(EMBED, h)  # [B, T, H]
        for i, layer in enumerate(self.model.layers):
            h = self.block(i, layer, h, cos, sin, mask, kv, positions, routing)  # [B, T, H]
            if deepstack is not None and i < len(deepstack[1]):  # as transformers' _deepstack_process
                visual = deepstack[0].to(h.device)  # [B, T]
                h = h.clone()
                h[visual] = h[visual] + deepstack[1][i].to(h.device, h.dtype)  # [n_visual, H]
        h = self.hook(FINAL_NORM, self.model.norm(h))
        return self.hook(LOGITS, self.lm_head(h))  # [B, T, V]

    def block(self, i: int, layer: DecoderLayer, h, cos, sin, mask, kv, positions, routing) -> torch.Tensor:
        """One decoder layer, h [B, T, H] -> [B, T, H]: pre-norm attention, then pre-norm MLP or MoE, each added
        to the residual, with a hook point between every two steps."""
        h = self.hook(layer_hook(i, RESID_PRE), h)
        a = self.hook(layer_hook(i, ATTN_OUT),
                      layer.self_attn(layer.input_layernorm(h), cos, sin, mask, kv, i))
        h = self.hook(layer_hook(i, RESID_MID), h + a)
        x = layer.post_attention_layernorm(h)
        m = self.hook(layer_hook(i, MLP_OUT), self.moe(i, layer.mlp, x, positions, routing) if layer.is_moe
                      else layer.mlp(x))
        return self.hook(layer_hook(i, RESID_POST), h + m)

    def _checked_ids(self, input_ids) -> torch.Tensor:
        """input_ids on the model's device (ids may come from the CPU for a CUDA model), every id an embedding row."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        rows = self.model.embed_tokens.num_embeddings
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < rows:
            bad = int(input_ids.max()) if int(input_ids.max()) >= rows else int(input_ids.min())
            raise ValueError(f"token id {bad} is outside the embedding's {rows} rows (ids 0..{rows - 1})")
        return input_ids

    def _rotary(self, positions: torch.Tensor):
        """positions [B, T] or [3, B, T] (M-RoPE rows) -> (positions, cos [B, T, hd], sin [B, T, hd]); equal
        M-RoPE rows become [B, T], since M-RoPE is then exactly 1-D RoPE."""
        if positions.ndim == 3 and bool((positions == positions[:1]).all()):
            positions = positions[0]  # [B, T]
        if positions.ndim == 2:
            return (positions, *rope_cos_sin(positions, self.inv_freq, self.dtype))
        section = self.config.rope_parameters.get("mrope_section")
        if section is None:
            raise ValueError("position_ids [3, B, T] with distinct rows need M-RoPE (config.json has no mrope_section)")
        return (positions, *mrope_cos_sin(positions, self.inv_freq, section, self.dtype))

    def _positions_and_mask(self, B, T, past, attention_mask, device):
        """Positions [B, T] and a boolean attention mask [B, 1, T, past + T] (None when plain causal)."""
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(past, past + T, device=device).expand(B, T)  # [B, T]
            if past == 0 or T == 1:
                return positions, None  # plain causal (SDPA's is_causal) or one query that sees everything
            q = torch.arange(past, past + T, device=device)[:, None]
            allowed = torch.arange(past + T, device=device)[None, :] <= q  # [T, S]
            return positions, allowed[None, None].expand(B, 1, T, past + T)
        attention_mask = attention_mask.to(device).bool()  # [B, S]
        S = past + T
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, T], as transformers
        q = torch.arange(past, S, device=device)[:, None]  # [T, 1]
        k = torch.arange(S, device=device)[None, :]  # [1, S]
        allowed = (k <= q)[None] & attention_mask[:, None, :]  # [B, T, S]
        # differs from transformers: a padding query also sees itself, so its row is never all -inf (no NaN)
        allowed = allowed | (k == q)[None]
        return positions, allowed[:, None]  # [B, 1, T, S]

    # -- the MoE step ----------------------------------------------------------------------------------------
    def moe(self, i: int, router: Router, x: torch.Tensor, positions: torch.Tensor | None = None,
            routing: RoutingOptions | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]: route each token to top-k experts, then run each picked expert once over all
        its tokens. positions [B, T]: the tokens' positions, for a routing override given by position."""
        B, T, H = x.shape
        x = x.reshape(B * T, H)  # [N, H]
        experts, weights = self.route(i, router, x, positions, self.routing if routing is None else routing)
        self.cache.observe(i, experts, weights)  # a policy that weighs by routing (TrustWeighted) sees it here
        return self.mix_experts(i, x, experts, weights).view(B, T, H)

    def route(self, i: int, router: Router, x: torch.Tensor, positions, routing: RoutingOptions):
        """x [N, H] -> experts [N, k], weights [N, k]: the router's softmax over the (transformed, masked) logits,
        its top-k or the override's choice, renormalised when the config says so."""
        cfg = self.config
        k = routing.experts_per_token(cfg)
        logits = self.hook(layer_hook(i, ROUTER_LOGITS), router.gate(x))  # [N, E]
        routed = logits
        for transform in routing.transforms:
            routed = transform.on_router_logits(i, routed)
        if routing.available is not None:
            ok = routing.available[i].to(routed.device)  # [E] bool (a mask given on the CPU for a GPU model)
            # differs from transformers: experts missing from the checkpoint are masked before the softmax
            wanted = torch.topk(routed, k, dim=-1).indices  # [N, k]
            self.cache.stats.masked_choices += int((~ok[wanted]).sum())
            routed = routed.masked_fill(~ok, float("-inf"))
        probs = F.softmax(routed, dim=-1, dtype=torch.float)  # [N, E]
        weights, experts = torch.topk(probs, k, dim=-1)  # [N, k]
        if routing.override is not None and positions is not None:
            forced = routing.override.choice(i, positions.reshape(-1))  # [N, k] or None
            if forced is not None:  # an intervention: the given experts, weighted by the router's softmax there
                experts, weights = forced, probs.gather(-1, forced)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(logits.dtype)
        experts = self.hook(layer_hook(i, TOPK_INDICES), experts)
        weights = self.hook(layer_hook(i, TOPK_WEIGHTS), weights)
        return experts, weights

    def mix_experts(self, i: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], experts and weights [N, k] -> the weighted sum of each token's experts [N, H], each picked
        expert fetched from the cache once and run over all its tokens as one SwiGLU."""
        out = torch.zeros_like(x)  # [N, H]
        flat = experts.reshape(-1)  # [N * k]
        order = torch.argsort(flat, stable=True)  # choices grouped by expert
        picked, counts = torch.unique_consecutive(flat[order], return_counts=True)
        picked, counts = torch.stack((picked, counts)).tolist()  # the layer's one host sync
        tokens = (order // experts.shape[1]).split(counts)  # per expert: its token rows
        slot_weights = weights.reshape(-1)[order].split(counts)  # per expert: [n_e]
        for e, rows, w in zip(picked, tokens, slot_weights):
            ex = self.cache.get(i, e)
            h = x[rows]  # [n_e, H]
            y = F.linear(F.silu(F.linear(h, ex.gate_proj)) * F.linear(h, ex.up_proj), ex.down_proj)  # [n_e, H]
            out.index_add_(0, rows, y * w[:, None])
        return out

    def generate(self, prompts, max_new_tokens: int = 32, **options):
        """Greedy or sampled generation from one prompt or a left-padded batch: omnilab.model.generate.generate
        (greedy, temperature, top_k, top_p, stop_tokens, vocab_limit, seed, use_kv_cache, progress, routing)."""
        return generate(self, prompts, max_new_tokens, **options)


class _HookHandle:
    def __init__(self, hooks: dict, name: str, fn):
        self.hooks, self.name, self.fn = hooks, name, fn

    def remove(self) -> None:
        fns = self.hooks.get(self.name, [])
        if self.fn in fns:
            fns.remove(self.fn)
        if not fns:
            self.hooks.pop(self.name, None)


def _acts_on_router(fault) -> bool:
    return type(fault).on_router_logits is not Fault.on_router_logits
