"""The selective model (omnilab.model.decoder) on an extraction: bit-identical to the original shards; on a partial
extraction it refuses to run unless asked to mask missing experts, and then counts the masked choices."""

from __future__ import annotations

import pytest
import torch

from omnilab.extraction.write import extract
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.experts import MissingExpertError


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["omni", "moe"])
def test_selective_model_on_extraction_is_bit_identical(make_checkpoint, tmp_path, ids, kind):
    src = make_checkpoint(kind)
    out = tmp_path / "x"
    extract(src, out, progress=False)
    a = SelectiveMoE.from_checkpoint(src, tokenizer=False)
    b = SelectiveMoE.from_checkpoint(out, tokenizer=False)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert a.cache.stats.misses == b.cache.stats.misses > 0  # experts were really read, from the extraction too


def test_partial_extraction_refused_unless_masked_and_masked_choices_counted(tiny_omni, tmp_path, ids):
    out = tmp_path / "x"
    present = [0, 2, 5]  # of 8 experts, top-2
    extract(tiny_omni, out, components="backbone", progress=False)
    extract(tiny_omni, out, components="experts", layers=[1, 2], progress=False)
    extract(tiny_omni, out, components="experts", layers=[0], experts=present, progress=False)

    with pytest.raises(MissingExpertError, match=r"thinker\.model\.layers\.0\.mlp\.experts\.1\."):
        SelectiveMoE.from_checkpoint(out, tokenizer=False)

    full = SelectiveMoE.from_checkpoint(tiny_omni, tokenizer=False)
    masked = SelectiveMoE.from_checkpoint(out, tokenizer=False, mask_missing_experts=True)
    picks = {}
    full.add_hook("blocks.0.mlp.hook_topk_indices", lambda x: picks.__setitem__("full", x.clone()))
    masked.add_hook("blocks.0.mlp.hook_topk_indices", lambda x: picks.__setitem__("masked", x.clone()))
    with torch.no_grad():
        ref, got = full(ids), masked(ids)
    # layer 0 sees the same input in both models, so the choices that fell on a missing expert are exactly the
    # full model's layer-0 choices outside `present`; layers 1 and 2 have every expert and mask nothing
    outside = int((~torch.isin(picks["full"], torch.tensor(present))).sum())
    assert outside > 0
    assert masked.cache.stats.masked_choices == outside
    assert torch.isin(picks["masked"], torch.tensor(present)).all()
    assert not torch.equal(ref, got)
