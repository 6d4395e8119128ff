"""Hybrid offload on the GPU (OffloadDecoder(host_share=...)): a share of each layer's misses computed on the host's
cores from the pinned host tier while the others copy on the side stream, inside the captured segments. fp32: the
resident fast path's tokens; bf16 (compiled segments): the forced-input tokens of the all-copied decoder."""

from __future__ import annotations

import pytest
import torch

from omnilab.gpu.fast import FastDecoder
from omnilab.gpu.host import HostTier
from omnilab.gpu.offload import OffloadDecoder
from omnilab.model.decoder import SelectiveMoE

PROMPT = [3, 17, 42, 5, 99, 7, 64, 12, 250, 31]


@pytest.fixture(scope="module", params=["omni", "moe"])
def model(request, make_checkpoint):
    return SelectiveMoE.from_checkpoint(make_checkpoint(request.param), device="cuda", dtype="float32",
                                        tokenizer=False)


@pytest.mark.parametrize("share", [0.5, 1.0, "auto"])
def test_hybrid_gives_the_resident_tokens_in_fp32(model, share):
    config, layout = model.checkpoint.arch
    host = HostTier.copy(model.checkpoint, config, layout, model.dtype, pin=True)
    forced = torch.randint(0, config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    want = FastDecoder(model, max_len=64, compute="gather").generate(PROMPT, 16, forced=forced).new_token_ids
    decoder = OffloadDecoder(model, host, slots=config.num_experts_per_tok, max_len=64, host_share=share)
    assert decoder.graphs and decoder.issue == "driver"
    assert decoder.generate(PROMPT, 16, forced=forced).new_token_ids == want
    assert decoder.segmented_step.captured  # the decode steps replayed captured segments
    assert decoder.stats.host_computed > 0
    if share == 1.0:
        assert decoder.stats.misses == 0


def test_hybrid_bf16_compiled_equals_the_copied_decoder(make_checkpoint):
    model = SelectiveMoE.from_checkpoint(make_checkpoint("moe"), device="cuda", dtype="bfloat16", tokenizer=False)
    config, layout = model.checkpoint.arch
    host = HostTier.copy(model.checkpoint, config, layout, model.dtype, pin=True)
    forced = torch.randint(0, config.vocab_size, (16,), generator=torch.Generator().manual_seed(1))
    got = {share: OffloadDecoder(model, host, slots=config.num_experts_per_tok, max_len=64, compile=True,
                                 host_share=share).generate(PROMPT, 16, forced=forced).new_token_ids
           for share in (0.0, 0.5)}
    assert got[0.5] == got[0.0]
