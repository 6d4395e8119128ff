"""Loading the selective model from a checkpoint folder: `load_model(model_class, path, ...)`, which
`SelectiveMoE.from_checkpoint` (and `ol.load`) call. Module names match the checkpoint's tensor names (as in
mlx-lm's loaders), so the backbone is a plain `load_state_dict`: a missing tensor is named, never left at its init.
Design: docs/DESIGN.md, "The selective model".
"""

from __future__ import annotations

import json

import torch

from omnilab.arch import expected_tensors
from omnilab.checkpoint import Checkpoint
from omnilab.dtypes import as_dtype
from omnilab.model.experts import ExpertCache, ExpertStore, MissingExpertError
from omnilab.model.rope import rope_inv_freq
from omnilab.threads import choose_threads
from omnilab.tokenizer import load_tokenizer


def load_model(model_class: type, path, *, dtype="float32", device="cpu", expert_budget: int | None = None,
               policy="lru", pinned=(), faults=(), mask_missing_experts: bool = False, tokenizer: bool = True):
    """Open any checkpoint folder (original shards or an extraction), build `model_class` (SelectiveMoE or a
    subclass) with its backbone loaded and its experts behind a cache.

    expert_budget: bytes of experts held at once (None: all fit). mask_missing_experts: experts absent
    from the checkpoint are masked out of the router's choice (counted in `cache.stats.masked_choices`);
    without it a checkpoint with any expert tensor missing is refused, naming the first missing tensor."""
    dtype, device = as_dtype(dtype), torch.device(device)
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
    config, layout = checkpoint.arch
    store = ExpertStore(checkpoint, config, layout, dtype, device,
                        transform=expert_transform(faults) if faults else None)
    available = available_experts(checkpoint, store, config, device, mask_missing_experts)
    cache = ExpertCache(store, expert_budget, policy=policy, pinned=pinned)
    with torch.device("meta"):
        model = model_class(config, cache, faults, available)
    state = backbone_state(checkpoint, config, layout, dtype, device)
    for fault in model.faults:
        state = fault.on_backbone(state, config)
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    model.checkpoint = checkpoint
    model.threads = choose_threads(hidden_size=config.hidden_size)  # "threads: N (why)"
    if tokenizer:
        model.tokenizer = load_tokenizer(checkpoint.root)
    gen_file = checkpoint.root / "generation_config.json"
    if gen_file.exists():
        model.generation_config = json.loads(gen_file.read_text())
    return model


def available_experts(checkpoint: Checkpoint, store: ExpertStore, config, device, mask_missing_experts: bool):
    """layer -> bool [E] of the complete experts when some are missing and may be masked; None when all are
    present. Raises MissingExpertError naming the first missing tensor when masking is not allowed, or a layer
    left with fewer complete experts than top-k."""
    if store.is_complete():
        return None
    if not mask_missing_experts:
        n = len(store.missing_tensors)
        raise MissingExpertError(
            f"{checkpoint.path}: {n} expert tensor{'s' * (n != 1)} missing, first {store.missing_tensors[0]} "
            f"(pass mask_missing_experts=True to restrict the router to the experts present)")
    for layer, ok in store.available.items():
        if int(ok.sum()) < config.num_experts_per_tok:
            raise MissingExpertError(f"{checkpoint.path}: layer {layer} has {int(ok.sum())} complete experts, "
                                     f"fewer than top-{config.num_experts_per_tok}")
    return {layer: ok.to(device) for layer, ok in store.available.items()}


def backbone_state(checkpoint: Checkpoint, config, layout, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Every tensor but the experts, keyed by SelectiveMoE's module names, in the model's own memory."""
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
    return state


def expert_transform(faults):
    """The faults' `on_expert` steps as one transform(layer, expert, weights) for the ExpertStore."""
    def transform(layer, expert, weights):
        for fault in faults:
            weights = fault.on_expert(layer, expert, weights)
        return weights

    return transform
