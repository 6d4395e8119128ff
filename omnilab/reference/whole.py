"""The transformers reference for a checkpoint, with the hook names of omnilab.model.hooks mapped onto its modules.

qwen3_omni_moe: `Qwen3OmniMoeThinkerForConditionalGeneration` (the thinker's text decoder is
`model.language_model`); qwen3_moe: `AutoModelForCausalLM`. `Reference` offers SelectiveMoE's hook surface
(`add_hook`, `hook_names`, `__call__`, `generate`); `layer_site` is the one map from a layer hook to its
transformers module, for this whole model and the streamed one. Design: docs/DESIGN.md, "The reference".
"""

from __future__ import annotations

import torch

from omnilab.checkpoint import Checkpoint
from omnilab.dtypes import as_dtype
from omnilab.model.hooks import (ATTN_OUT, EMBED, FINAL_NORM, LOGITS, MLP_OUT, RESID_MID, RESID_POST, RESID_PRE,
                                 ROUTER_LOGITS, TOPK_INDICES, TOPK_WEIGHTS, hook_names, parse_name, resolve)


class Reference:
    def __init__(self, hf_model, config, layout):
        self.hf = hf_model
        self.config, self.layout = config, layout
        self.is_omni = layout.model_type == "qwen3_omni_moe"
        # the thinker's text decoder is model.language_model in transformers 5.23 (model itself in some 5.x)
        self.text = getattr(hf_model.model, "language_model", hf_model.model)
        self.lm_head = hf_model.lm_head

    @classmethod
    def from_checkpoint(cls, path, *, dtype="float32", device="cpu", attn_implementation: str = "eager") -> "Reference":
        """attn_implementation: "eager" by default (the plainest reference); "sdpa" for speed."""
        from omnilab.tokenizer import quiet_transformers

        dtype = as_dtype(dtype)
        checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
        config, layout = checkpoint.arch
        if layout.model_type == "qwen3_omni_moe":
            from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as model_cls
        else:
            from transformers import AutoModelForCausalLM as model_cls
        with quiet_transformers():
            hf = model_cls.from_pretrained(str(checkpoint.root), dtype=dtype, attn_implementation=attn_implementation,
                                           trust_remote_code=False, use_kernels=False)
        hf = hf.to(device).eval().requires_grad_(False)
        if layout.model_type == "qwen3_omni_moe" and not hasattr(hf.config, "vision_start_token_id"):
            # transformers 5.23: Qwen3OmniMoeThinkerConfig has no vision_start_token_id, yet the thinker's
            # get_rope_index reads it whenever an attention_mask is passed. <|vision_start|> is 151652 in the
            # Qwen tokenizer (the talker config's default); text-only prompts never contain it.
            hf.config.vision_start_token_id = 151652
        return cls(hf, config, layout)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # -- hooks -----------------------------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        return hook_names(self.config)

    def add_hook(self, name: str, fn):
        """Call fn(tensor) with the activation at `name` (or its TransformerLens alias; read only). Returns a
        handle with .remove()."""
        name = resolve(name)
        if name not in self.hook_names():
            raise KeyError(f"no hook point {name!r} in this model")
        if name == EMBED:
            return _attach_site(self.text.embed_tokens, "output", fn)
        if name == FINAL_NORM:
            return _attach_site(self.text.norm, "output", fn)
        if name == LOGITS:
            return _attach_site(self.lm_head, "output", fn)
        i, point = parse_name(name)
        return attach(self.text.layers[i], point, fn)

    # -- running ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (no cache)."""
        if self.is_omni:
            self.hf.model.rope_deltas = None  # the thinker keeps M-RoPE deltas between calls
        out = self.hf(input_ids=input_ids.to(self.device),
                      attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                      use_cache=False)
        return out.logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask=None, **kwargs) -> torch.Tensor:
        """Greedy by default, through transformers' own generate (with its KV cache); new tokens [B, N].
        No stop token unless eos_token_id is passed, so exactly max_new_tokens come back."""
        if self.is_omni:
            self.hf.model.rope_deltas = None
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("eos_token_id", None)
        kwargs.setdefault("pad_token_id", 0)
        out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask.to(self.device),
                               max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if kwargs["eos_token_id"] is None else 0,
                               **kwargs)
        return out[:, input_ids.shape[1]:]


def layer_site(layer: torch.nn.Module, point: str) -> tuple[torch.nn.Module, str]:
    """Where a layer hook point lives on a transformers decoder layer: (module, which of its values).
    The one mapping for the whole reference and the streamed one (omnilab.reference.streamed)."""
    mlp_gate = getattr(layer.mlp, "gate", None)
    return {
        RESID_PRE: (layer, "input"),
        ATTN_OUT: (layer.self_attn, "output"),
        RESID_MID: (layer.post_attention_layernorm, "input"),
        ROUTER_LOGITS: (mlp_gate, "router_logits"),
        TOPK_INDICES: (mlp_gate, "topk_indices"),
        TOPK_WEIGHTS: (mlp_gate, "topk_weights"),
        MLP_OUT: (layer.mlp, "output"),
        RESID_POST: (layer, "output"),
    }[point]


def attach(layer: torch.nn.Module, point: str, fn):
    """Call fn(tensor) with a decoder layer's activation at `point` (e.g. ATTN_OUT). Returns a handle."""
    return _attach_site(*layer_site(layer, point), fn)


def _attach_site(module: torch.nn.Module, where: str, fn):
    if where == "input":
        return module.register_forward_pre_hook(lambda m, args, kwargs: _call(fn, _first(args, kwargs)),
                                                with_kwargs=True)
    pick = {"output": lambda out: out[0] if isinstance(out, tuple) else out,
            "router_logits": lambda out: out[0], "topk_weights": lambda out: out[1],
            "topk_indices": lambda out: out[2]}[where]
    return module.register_forward_hook(lambda m, args, out: _call(fn, pick(out)))


def _first(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def _call(fn, x):
    fn(x)
    return None  # the reference is only observed, never changed
