"""Qwen3-MoE family: the text decoder of Qwen3-MoE and of the Qwen3-Omni thinker.

Two things per config.json: the config dataclass (fields named exactly as in config.json, as in mlx-lm's
models/qwen3_moe.py) and every tensor name and shape that config implies, as `save_pretrained` of
transformers 5 writes them (one tensor per expert projection, not the fused in-memory `gate_up_proj`).
Qwen3-MoE and the Qwen3-Omni thinker differ only in where the text model sits (`Layout.prefix`) and in the
towers beside it (audio, vision, talker, code2wav), which this file names but does not describe tensor by tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import NamedTuple

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ConfigInsane(ValueError):
    """config.json is of the family but its values cannot describe a working model (top-k > experts, NaN eps)."""


@dataclass
class Qwen3MoeConfig:
    """The text decoder's config.json fields (flat for qwen3_moe, thinker_config.text_config for Qwen3-Omni)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    moe_intermediate_size: int  # each expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    head_dim: int | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigInsane(f"{name} is {value!r}; it must be a positive integer")
        for name in ("intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                     "decoder_sparse_step", "max_position_embeddings"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ConfigInsane(f"{name} is {value!r}; it must be a non-negative integer")
        if self.num_experts > 0 and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigInsane(f"num_experts_per_tok is {self.num_experts_per_tok}; it must be between 1 and "
                               f"num_experts ({self.num_experts})")
        if self.num_experts > 0 and self.decoder_sparse_step < 1:
            raise ConfigInsane(f"decoder_sparse_step is {self.decoder_sparse_step}; it must be at least 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigInsane(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                               f"num_key_value_heads ({self.num_key_value_heads})")
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:  # NaN fails too
            raise ConfigInsane(f"rms_norm_eps is {eps!r}; it must be a number in (0, 1)")
        if not isinstance(self.rope_parameters, dict):
            raise ConfigInsane(f"rope_parameters is {self.rope_parameters!r}; it must be an object")
        theta = self.rope_parameters.get("rope_theta", 10000.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < float("inf"):
            raise ConfigInsane(f"rope_theta is {theta!r}; it must be a positive number")
        if not isinstance(self.mlp_only_layers, list) or not all(type(i) is int for i in self.mlp_only_layers):
            raise ConfigInsane(f"mlp_only_layers is {self.mlp_only_layers!r}; it must be a list of layer numbers")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if type(self.head_dim) is not int or self.head_dim < 1:
            raise ConfigInsane(f"head_dim is {self.head_dim!r}; it must be a positive integer")

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3MoeConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        if "num_experts" not in kwargs and "num_local_experts" in d:  # transformers 5 writes qwen3_moe's count so
            kwargs["num_experts"] = d["num_local_experts"]
        if "rope_parameters" not in kwargs and "rope_theta" in d:  # transformers 4 configs keep rope_theta flat
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": d["rope_theta"]}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"lacks a field the text model needs: {e}") from None

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 10000.0))

    def is_moe_layer(self, layer: int) -> bool:
        """As transformers decides it: experts unless the layer is in mlp_only_layers or off the sparse step."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]


@dataclass(frozen=True)
class Layout:
    """Where the text decoder and its sibling towers live in a checkpoint's tensor names."""

    model_type: str
    prefix: str  # "model." (qwen3_moe) or "thinker.model." (Qwen3-Omni)
    lm_head: str  # "lm_head.weight" or "thinker.lm_head.weight"
    towers: tuple[tuple[str, str], ...] = ()  # (name prefix, component) for everything beside the text decoder


QWEN3_MOE = Layout("qwen3_moe", "model.", "lm_head.weight")
QWEN3_OMNI = Layout(
    "qwen3_omni_moe", "thinker.model.", "thinker.lm_head.weight",
    towers=(("thinker.audio_tower.", "audio"), ("thinker.visual.", "vision"),
            ("talker.", "talker"), ("code2wav.", "code2wav")),
)


class TensorSpec(NamedTuple):
    """What one tensor name means: its component, layer and expert (when it has them) and expected shape."""

    component: str
    layer: int | None = None
    expert: int | None = None
    projection: str | None = None
    shape: tuple[int, ...] | None = None


# Component names, in the order the inventory lists them.
TEXT_COMPONENTS = ("embed", "attention", "norms", "router", "experts", "dense_mlp", "final_norm", "lm_head")
TOWERS = tuple(component for _, component in QWEN3_OMNI.towers)  # audio, vision, talker, code2wav
ALL_COMPONENTS = TEXT_COMPONENTS + TOWERS + ("unrecognised",)


def read_config(config: dict) -> tuple[Qwen3MoeConfig, Layout]:
    """config.json (as a dict) -> (text config, layout). Raises ValueError for another architecture (the message
    does not name the file: Checkpoint.arch prefixes its path)."""
    if not isinstance(config, dict):
        raise ValueError(f"not a JSON object (a {type(config).__name__})")
    model_type = config.get("model_type")
    if model_type == "qwen3_moe":
        return Qwen3MoeConfig.from_dict(config), QWEN3_MOE
    if model_type in ("qwen3_omni_moe", "qwen3_omni_moe_thinker"):
        thinker = config.get("thinker_config", config)
        if not isinstance(thinker, dict) or not isinstance(thinker.get("text_config") or {}, dict):
            raise ConfigInsane("thinker_config / text_config is not an object")
        text = dict(thinker.get("text_config") or {})
        if not text:
            raise ValueError("qwen3_omni_moe without thinker_config.text_config")
        if "tie_word_embeddings" not in text:
            text["tie_word_embeddings"] = thinker.get("tie_word_embeddings", False)
        return Qwen3MoeConfig.from_dict(text), QWEN3_OMNI
    raise ValueError(f"model_type {model_type!r} is not in the Qwen3-MoE family (qwen3_moe, qwen3_omni_moe)")


def expected_tensors(cfg: Qwen3MoeConfig, layout: Layout) -> dict[str, TensorSpec]:
    """Every text-decoder tensor a config implies, with its shape, in checkpoint order."""
    H, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    p = layout.prefix
    out: dict[str, TensorSpec] = {f"{p}embed_tokens.weight": TensorSpec("embed", shape=(V, H))}
    for i in range(cfg.num_hidden_layers):
        lp = f"{p}layers.{i}."
        out[lp + "input_layernorm.weight"] = TensorSpec("norms", i, shape=(H,))
        out[lp + "post_attention_layernorm.weight"] = TensorSpec("norms", i, shape=(H,))
        for proj, shape in (("q_proj", (q_out, H)), ("k_proj", (kv_out, H)), ("v_proj", (kv_out, H)), ("o_proj", (H, q_out))):
            out[f"{lp}self_attn.{proj}.weight"] = TensorSpec("attention", i, shape=shape)
            if cfg.attention_bias and proj != "o_proj":
                out[f"{lp}self_attn.{proj}.bias"] = TensorSpec("attention", i, shape=shape[:1])
        out[lp + "self_attn.q_norm.weight"] = TensorSpec("attention", i, shape=(hd,))
        out[lp + "self_attn.k_norm.weight"] = TensorSpec("attention", i, shape=(hd,))
        if cfg.is_moe_layer(i):
            I = cfg.moe_intermediate_size
            out[lp + "mlp.gate.weight"] = TensorSpec("router", i, shape=(cfg.num_experts, H))
            for e in range(cfg.num_experts):
                for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                    out[f"{lp}mlp.experts.{e}.{proj}.weight"] = TensorSpec("experts", i, e, proj, shape)
        else:
            I = cfg.intermediate_size
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                out[f"{lp}mlp.{proj}.weight"] = TensorSpec("dense_mlp", i, None, proj, shape)
    out[f"{p}norm.weight"] = TensorSpec("final_norm", shape=(H,))
    if not cfg.tie_word_embeddings:
        out[layout.lm_head] = TensorSpec("lm_head", shape=(V, H))
    return out


def expert_tensor(layout: Layout, layer: int, expert: int, projection: str) -> str:
    return f"{layout.prefix}layers.{layer}.mlp.experts.{expert}.{projection}.weight"


_LAYER = re.compile(r"layers\.(\d+)\.(.*)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def classify(name: str, layout: Layout) -> TensorSpec:
    """Component (and layer / expert) of any tensor name, expected or not. Unknown names -> 'unrecognised'."""
    p = layout.prefix
    if name == layout.lm_head:
        return TensorSpec("lm_head")
    if name.startswith(p):
        rest = name[len(p):]
        if rest.startswith("embed_tokens."):
            return TensorSpec("embed")
        if rest.startswith("norm."):
            return TensorSpec("final_norm")
        m = _LAYER.match(rest)
        if m:
            layer, tail = int(m.group(1)), m.group(2)
            if (e := _EXPERT.fullmatch(tail)):
                return TensorSpec("experts", layer, int(e.group(1)), e.group(2))
            if tail.startswith("self_attn."):
                return TensorSpec("attention", layer)
            if tail.endswith("layernorm.weight"):
                return TensorSpec("norms", layer)
            if tail.startswith("mlp.gate."):
                return TensorSpec("router", layer)
            if tail.startswith("mlp.experts."):
                return TensorSpec("experts", layer)
            if tail.startswith("mlp."):
                return TensorSpec("dense_mlp", layer)
        return TensorSpec("unrecognised")
    for tower_prefix, component in layout.towers:
        if name.startswith(tower_prefix):
            return TensorSpec(component)
    return TensorSpec("unrecognised")
