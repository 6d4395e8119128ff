"""The selective thinker on a multimodal prompt against transformers' thinker: whole (`compare`, hook by hook) or
streamed part by part (`compare_streamed`, chained and local views). `hook_embed` is the decoder's input on both
sides: token embeddings with the towers' features in place. Builds on omnilab.model.multimodal.
"""

from __future__ import annotations

import torch

from omnilab.model.hooks import EMBED, capture, compare_activations, divergence_rtol
from omnilab.model.multimodal import Towers, forward, prepare
from omnilab.reference.compare import NOISE_FACTOR
from omnilab.reference.compare import compare_streamed as streamed


@torch.no_grad()
def run_reference(reference, inputs) -> torch.Tensor:
    """The whole transformers thinker on the processor's tensors: logits [B, T, V]."""
    reference.hf.model.rope_deltas = None  # the thinker keeps M-RoPE deltas between calls
    inputs = {k: v.to(reference.device) if isinstance(v, torch.Tensor) else v for k, v in dict(inputs).items()
              if k != "num_audio_tokens"}
    return reference.hf(**inputs, use_cache=False).logits


def compare(reference, selective, towers: Towers, inputs, names=None, rtol: float | None = None):
    """Selective model (with `towers`) and the whole transformers thinker on one processed multimodal prompt,
    hook by hook (omnilab.model.hooks.Comparison). The reference's `hook_embed` is read where its text decoder
    takes `inputs_embeds` (after the towers' features are placed), as the selective model's is."""
    names = list(names or reference.hook_names())
    embed_seen = {}

    def read_embeds(module, args, kwargs):
        embed_seen[EMBED] = kwargs["inputs_embeds"].detach().clone()

    handle = reference.text.register_forward_pre_hook(read_embeds, with_kwargs=True)
    try:
        with capture(reference, [n for n in names if n != EMBED]) as ref_acts:
            run_reference(reference, inputs)
    finally:
        handle.remove()
    if EMBED in names:
        ref_acts[EMBED] = embed_seen[EMBED]
    prompt = prepare(selective, towers, inputs)
    with capture(selective, names) as sel_acts, torch.no_grad():
        forward(selective, prompt)
    if rtol is None:
        rtol = divergence_rtol(reference, selective)
    padded = None if bool(prompt.attention_mask.all()) else prompt.attention_mask.cpu()  # compare real tokens only
    return compare_activations(ref_acts, sel_acts, attention_mask=padded, rtol=rtol, names=names)


def compare_streamed(reference, selective, towers: Towers, inputs, dtype=None, *, noise_factor: float | None = None,
                     progress: bool = False):
    """Selective model (with `towers`) against a StreamedReference (omnilab.reference.streamed: transformers' thinker
    streamed part by part, its towers loaded with the embedding) on one processed multimodal prompt: both
    views, in bf16 beside transformers' own bf16 noise (omnilab.reference.compare.StreamedComparison). One prompt (B = 1)."""
    prompt = prepare(selective, towers, inputs)
    if prompt.input_ids.shape[0] != 1:
        raise ValueError("a streamed multimodal comparison takes one prompt at a time")
    with capture(selective, reference.hook_names()) as acts, torch.no_grad():
        forward(selective, prompt)
    return streamed(dict(acts), reference, prompt.input_ids.cpu(), dtype or selective.dtype,
                    noise_factor=NOISE_FACTOR if noise_factor is None else noise_factor, progress=progress,
                    media=dict(inputs))
