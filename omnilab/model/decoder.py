"""The selective model: the Qwen3-MoE / Qwen3-Omni thinker text decoder with experts loaded on demand.

Everything but the experts is resident (the "backbone": embeddings, attention, norms, routers, dense MLPs,
final norm, lm_head); each MoE layer asks an `ExpertCache` for the experts its router picked, so a 58 GB
set of experts runs in whatever budget the cache is given. It follows transformers' `Qwen3MoeForCausalLM`
and `Qwen3OmniMoeThinkerTextModel` operation for operation (the reference this is compared against, hook by
hook), in the spirit of mlx-lm's models/qwen3_moe.py: module names match the checkpoint's tensor names, so
loading the backbone is a plain copy. The forward pass is one function that reads top to bottom, with a
hook point (TransformerLens names, see omnilab.model.hooks) between every two steps.

Rotary embedding: Qwen3-Omni's thinker uses interleaved M-RoPE (temporal / height / width sections). For
text-only input the three position rows are equal, so every section rotates by the same angle and M-RoPE is
exactly 1-D RoPE; tests/test_model.py checks this against transformers' own rotary module. Multimodal
prompts (omnilab.model.multimodal) pass `position_ids` [3, B, T]; when the rows differ, `mrope_cos_sin` interleaves
them as transformers does (tests/test_multimodal.py checks it against transformers' rotary module).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnilab.arch import expected_tensors
from omnilab.checkpoint import Checkpoint
from omnilab.dtypes import as_dtype
from omnilab.model.experts import ExpertCache, ExpertStore, MissingExpertError
from omnilab.model.faults import Fault
from omnilab.model.routing import RoutingOptions
from omnilab.tokenizer import load_tokenizer

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


def rope_inv_freq(config) -> torch.Tensor:
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    d = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))  # [d/2]


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, T, head_dim] (computed in fp32, then cast)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section, dtype: torch.dtype):
    """Interleaved M-RoPE: position_ids [3, B, T] (temporal, height, width) -> cos, sin [B, T, head_dim].
    Frequency j takes the height row when j % 3 == 1 and j < 3 * section[1], the width row when j % 3 == 2
    and j < 3 * section[2], the temporal row otherwise (transformers' recomposition_frequencies)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [3, B, T, d/2]
    mixed = freqs[0].clone()  # [B, T, d/2]
    for row in (1, 2):
        picked = slice(row, 3 * mrope_section[row], 3)
        mixed[..., picked] = freqs[row, ..., picked]
    emb = torch.cat((mixed, mixed), dim=-1)  # [B, T, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys and values of every layer seen so far: k, v [B, kv_heads, S, head_dim] per layer."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)  # [B, kvh, S + T, hd]
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


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


# -- the model ---------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What `generate` returns. new_token_ids: one list per prompt, stop token included when one was hit."""

    new_token_ids: list[list[int]]
    prompt_lengths: list[int]
    seconds: float
    prefill_seconds: float
    stopped: list[bool] = field(default_factory=list)

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.new_token_ids)

    @property
    def tokens_per_s(self) -> float:
        """New tokens (all prompts) per second of generate, prefill included."""
        return self.num_new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second after prefill."""
        decode = self.seconds - self.prefill_seconds
        n = self.num_new_tokens - len(self.new_token_ids)
        return n / decode if decode > 0 and n > 0 else float("nan")


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

    # -- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, *, dtype="float32", device="cpu", expert_budget: int | None = None,
                        policy="lru", pinned=(), faults=(), mask_missing_experts: bool = False,
                        tokenizer: bool = True) -> "SelectiveMoE":
        """Open any checkpoint folder (original shards or an extraction), load the backbone, set up the cache.

        expert_budget: bytes of experts held at once (None: all fit). mask_missing_experts: experts absent
        from the checkpoint are masked out of the router's choice (counted in `cache.stats.masked_choices`);
        without it a checkpoint with any expert tensor missing is refused, naming the first missing tensor."""
        dtype, device = as_dtype(dtype), torch.device(device)
        checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
        config, layout = checkpoint.arch
        store = ExpertStore(checkpoint, config, layout, dtype, device,
                            transform=_expert_transform(faults) if faults else None)
        available = None
        if not store.is_complete():
            if not mask_missing_experts:
                n = len(store.missing_tensors)
                raise MissingExpertError(
                    f"{checkpoint.path}: {n} expert tensor{'s' * (n != 1)} missing, first {store.missing_tensors[0]} "
                    f"(pass mask_missing_experts=True to restrict the router to the experts present)")
            available = {layer: ok.to(device) for layer, ok in store.available.items()}
            for layer, ok in store.available.items():
                if int(ok.sum()) < config.num_experts_per_tok:
                    raise MissingExpertError(f"{checkpoint.path}: layer {layer} has {int(ok.sum())} complete experts, "
                                             f"fewer than top-{config.num_experts_per_tok}")
        cache = ExpertCache(store, expert_budget, policy=policy, pinned=pinned)
        with torch.device("meta"):
            model = cls(config, cache, faults, available)
        state = {}
        for name, spec in expected_tensors(config, layout).items():
            if spec.component == "experts":
                continue
            if name not in checkpoint.tensors.index:
                raise KeyError(f"{checkpoint.path}: backbone tensor {name} ({spec.component}) is missing")
            local = "lm_head.weight" if name == layout.lm_head else "model." + name[len(layout.prefix):]
            state[local] = checkpoint.read(name).to(device=device, dtype=dtype, copy=True)  # own memory, not the mmap
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        for fault in model.faults:
            state = fault.on_backbone(state, config)
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.eval().requires_grad_(False)
        model.checkpoint = checkpoint
        if tokenizer:
            model.tokenizer = load_tokenizer(checkpoint.root)
        gen_file = checkpoint.root / "generation_config.json"
        if gen_file.exists():
            model.generation_config = json.loads(gen_file.read_text())
        return model

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def available(self) -> dict | None:
        """layer -> bool [E] of the experts present when missing ones are masked (else None)."""
        return self.routing.available

    @property
    def routing_override(self):
        """The routing's omnilab.gpu.traces.RoutingOverride (None: the routers choose)."""
        return self.routing.override

    @routing_override.setter
    def routing_override(self, override) -> None:
        self.routing = self.routing.replace(override=override)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # -- hooks -----------------------------------------------------------------------------------------------
    def add_hook(self, name: str, fn):
        """Call fn(tensor) at hook point `name` (or its TransformerLens alias, omnilab.model.hooks.ALIASES); a non-None
        return replaces the activation. Returns a handle."""
        from omnilab.model.hooks import resolve

        name = resolve(name)
        if name not in self.hook_names():
            raise KeyError(f"no hook point {name!r} in this model")
        self.hooks.setdefault(name, []).append(fn)
        return _HookHandle(self.hooks, name, fn)

    def hook_names(self) -> list[str]:
        from omnilab.model.hooks import hook_names

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
        input_ids = torch.as_tensor(input_ids, device=self.device)  # ids may come from the CPU for a CUDA model
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
        B, T = input_ids.shape
        rows = self.model.embed_tokens.num_embeddings
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < rows:
            bad = int(input_ids.max()) if int(input_ids.max()) >= rows else int(input_ids.min())
            raise ValueError(f"token id {bad} is outside the embedding's {rows} rows (ids 0..{rows - 1})")
        past = kv.length if kv is not None else 0
        positions, mask = self._positions_and_mask(B, T, past, attention_mask, input_ids.device)
        if position_ids is not None:
            positions = torch.as_tensor(position_ids, device=input_ids.device)  # [3, B, T] or [B, T]
            if positions.ndim == 3 and bool((positions == positions[:1]).all()):
                positions = positions[0]  # equal rows: M-RoPE is exactly 1-D RoPE
        if positions.ndim == 3:
            section = self.config.rope_parameters.get("mrope_section")
            if section is None:
                raise ValueError("position_ids [3, B, T] with distinct rows need M-RoPE (config.json has no mrope_section)")
            cos, sin = mrope_cos_sin(positions, self.inv_freq, section, self.dtype)  # [B, T, hd]
        else:
            cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)  # [B, T, hd]

        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.device, self.dtype)
        h = self.hook("hook_embed", h)  # [B, T, H]
        for i, layer in enumerate(self.model.layers):
            h = self.hook(f"blocks.{i}.hook_resid_pre", h)
            a = layer.self_attn(layer.input_layernorm(h), cos, sin, mask, kv, i)
            a = self.hook(f"blocks.{i}.hook_attn_out", a)
            h = self.hook(f"blocks.{i}.hook_resid_mid", h + a)
            x = layer.post_attention_layernorm(h)
            m = self.moe(i, layer.mlp, x, positions, routing) if layer.is_moe else layer.mlp(x)
            m = self.hook(f"blocks.{i}.hook_mlp_out", m)
            h = self.hook(f"blocks.{i}.hook_resid_post", h + m)
            if deepstack is not None and i < len(deepstack[1]):  # as transformers' _deepstack_process
                visual = deepstack[0].to(h.device)  # [B, T]
                h = h.clone()
                h[visual] = h[visual] + deepstack[1][i].to(h.device, h.dtype)  # [n_visual, H]
        h = self.hook("ln_final.hook_normalized", self.model.norm(h))
        return self.hook("hook_logits", self.lm_head(h))  # [B, T, V]

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

    def moe(self, i: int, router: Router, x: torch.Tensor, positions: torch.Tensor | None = None,
            routing: RoutingOptions | None = None) -> torch.Tensor:
        """Route each token to top-k experts and run each picked expert once over all its tokens.
        positions [B, T]: the tokens' positions, for a routing override given by position."""
        cfg = self.config
        routing = self.routing if routing is None else routing
        k = routing.experts_per_token(cfg)
        B, T, H = x.shape
        x = x.reshape(B * T, H)  # [N, H]
        logits = self.hook(f"blocks.{i}.mlp.hook_router_logits", router.gate(x))  # [N, E]
        routed = logits
        for transform in routing.transforms:
            routed = transform.on_router_logits(i, routed)
        if routing.available is not None:
            ok = routing.available[i]
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
        experts = self.hook(f"blocks.{i}.mlp.hook_topk_indices", experts)
        weights = self.hook(f"blocks.{i}.mlp.hook_topk_weights", weights)
        self.cache.observe(i, experts, weights)  # a policy that weighs by routing (TrustWeighted) sees it here

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
        return out.view(B, T, H)

    # -- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 32, *, greedy: bool = True, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop_tokens=(), vocab_limit="auto", seed: int | None = 0,
                 use_kv_cache: bool = True, progress: bool = False, routing: RoutingOptions | None = None) -> Generation:
        """Generate from one prompt (list of ids) or a batch (list of lists, left-padded here).

        greedy, or sampling with temperature / top_k / top_p (transformers' logits warpers). Stops at
        max_new_tokens or when every sequence has produced one of `stop_tokens`. vocab_limit: ids at or past
        it are never produced ("auto": the tokenizer's length when there is one: embedding rows past the
        tokenizer are padding). use_kv_cache False re-runs the whole sequence at every step (for testing).
        routing: RoutingOptions for every step (default: the model's own)."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one non-empty prompt")
        vocab_limit, warpers, generator = self.sampling_setup(vocab_limit, greedy, temperature, top_k, top_p, seed)
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=self.device)

        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, L, dtype=torch.long, device=self.device)  # [B, L], left padded with id 0
        attn = torch.zeros(B, L, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[b, L - len(p):] = 1
        padded = bool((attn == 0).any())
        kv = KVCache(self.config.num_hidden_layers) if use_kv_cache else None
        new = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        start = time.perf_counter()
        prefill = 0.0
        step_input, seq = ids, ids
        steps = range(max_new_tokens)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="generate", unit="tok")
        for step in steps:
            mask = attn if padded else None
            logits = (self(step_input, mask, kv, routing=routing) if kv is not None
                      else self(seq, mask, routing=routing))[:, -1].float()
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            if greedy:
                token = logits.argmax(-1)  # [B]
            else:
                for warp in warpers:
                    logits = warp(seq, logits)
                token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            token = torch.where(done, torch.zeros_like(token), token)
            for b in range(B):
                if not done[b]:
                    new[b].append(int(token[b]))
            if stop.numel():
                done |= torch.isin(token, stop)
            if step == 0:
                prefill = time.perf_counter() - start
            if bool(done.all()):
                break
            seq = torch.cat((seq, token[:, None]), dim=1)  # [B, L + step + 1]
            attn = torch.cat((attn, torch.ones_like(attn[:, :1])), dim=1)
            step_input = token[:, None]  # [B, 1]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return Generation(new, [len(p) for p in prompts], seconds, prefill,
                          stopped=[bool(d) for d in done.tolist()])

    def sampling_setup(self, vocab_limit, greedy, temperature, top_k, top_p, seed):
        """(vocab_limit, logits warpers, random generator) of one generate call; vocab_limit "auto" is the
        tokenizer's length, None when it covers the whole embedding."""
        if vocab_limit == "auto":
            vocab_limit = len(self.tokenizer) if self.tokenizer is not None else None
        if vocab_limit is not None and vocab_limit >= self.config.vocab_size:
            vocab_limit = None
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        return vocab_limit, self._warpers(greedy, temperature, top_k, top_p), generator

    @staticmethod
    def _warpers(greedy, temperature, top_k, top_p):
        if greedy:
            return []
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

        warpers = []
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k and top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        return warpers


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


def _expert_transform(faults):
    def transform(layer, expert, weights):
        for fault in faults:
            weights = fault.on_expert(layer, expert, weights)
        return weights

    return transform
