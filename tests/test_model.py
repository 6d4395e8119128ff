"""The selective model against transformers, hook by hook, on tiny checkpoints of both architectures.

Norm weights of the tiny fixtures are perturbed on disk first (transformers initialises RMSNorm weights to
ones, which would hide a swapped or skipped norm), then both models load the same files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnilab.model import faults
from omnilab.model.decoder import SelectiveMoE
from omnilab.model.rope import rope_cos_sin, rope_inv_freq
from omnilab.model.hooks import compare, hook_names, run_with_cache
from omnilab.reference.whole import Reference

REAL_CONFIG = Path(__file__).resolve().parent.parent / "data/reference/qwen3-omni-30b-a3b-instruct.config.json"  # mrope_section [24, 20, 20]
PROMPT = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 61, 128, 9, 33, 2, 77, 301]])

# (kind, text overrides): head_dim != hidden/heads and GQA are in the defaults (64 / 4 heads, head_dim 24, 2 kv)
CONFIGS = {
    "omni-default": ("omni", {}),
    "omni-tied-1kv": ("omni", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "moe-nonorm-1kv": ("moe", dict(norm_topk_prob=False, num_key_value_heads=1)),
    "moe-dense-layers": ("moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False)),
    "moe-16-experts": ("moe", dict(num_experts=16, num_experts_per_tok=4)),
}


def perturb_norms(folder: Path, seed: int = 0) -> Path:
    """Rewrite every shard so the text model's RMSNorm weights are 1 + 0.3 N(0, 1) instead of all ones."""
    g = torch.Generator().manual_seed(seed)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        changed = False
        for name, t in tensors.items():
            if name.startswith(("model.", "thinker.model.")) and name.endswith("norm.weight"):
                tensors[name] = (t.float() + 0.3 * torch.randn(t.shape, generator=g)).to(t.dtype)
                changed = True
        if changed:
            save_file(tensors, str(shard) + ".tmp", metadata={"format": "pt"})
            Path(str(shard) + ".tmp").replace(shard)
    return folder


@pytest.fixture(scope="session")
def perturbed(make_checkpoint, tmp_path_factory):
    """perturbed(name) -> a tiny checkpoint of CONFIGS[name] with non-trivial norms (made once per session)."""
    made = {}

    def make(name: str) -> Path:
        if name not in made:
            kind, text = CONFIGS[name]
            dst = tmp_path_factory.mktemp(f"norms-{name}") / "ckpt"
            shutil.copytree(make_checkpoint(kind, **text), dst)
            made[name] = perturb_norms(dst)
        return made[name]

    return make


@pytest.fixture(scope="session")
def reference_of():
    """reference_of(path) -> the transformers reference in fp32, loaded once per path."""
    loaded = {}

    def get(path: Path, dtype="float32") -> Reference:
        key = (str(path), dtype)
        if key not in loaded:
            loaded[key] = Reference.from_checkpoint(path, dtype=dtype)
        return loaded[key]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_parity_at_every_hook(name, perturbed, reference_of):
    path = perturbed(name)
    ref, sel = reference_of(path), SelectiveMoE.from_checkpoint(path)
    result = compare(ref, sel, PROMPT)
    assert list(result.table.name) == hook_names(sel.config)  # every hook point was captured on both sides
    worst = result.table.loc[result.table.rel_err.idxmax()]
    assert result.table.rel_err.max() <= 1e-5, f"{name}: {worst['name']} rel_err {worst.rel_err:.2e}"
    assert result.first_divergence is None
    assert result.top1_agreement == 1.0
    assert result.kl < 1e-8
    router = result.table[result.table.point == "mlp.hook_topk_indices"]
    assert len(router) == len(sel.config.moe_layers) and (router.topk_agreement == 1.0).all()


def test_dense_layers_have_no_router_hooks(perturbed):
    sel = SelectiveMoE.from_checkpoint(perturbed("moe-dense-layers"))
    assert sel.config.moe_layers == [1]
    names = hook_names(sel.config)
    assert "blocks.1.mlp.hook_router_logits" in names and "blocks.0.mlp.hook_router_logits" not in names


def test_padded_batch_parity(perturbed, reference_of):
    path = perturbed("omni-default")
    ref, sel = reference_of(path), SelectiveMoE.from_checkpoint(path)
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # first row left-padded by 4
    result = compare(ref, sel, ids, attention_mask=mask)
    assert result.table.rel_err.max() <= 1e-5 and result.top1_agreement == 1.0


def test_text_only_mrope_is_1d_rope():
    """Qwen3-Omni's interleaved M-RoPE, as transformers computes it, equals plain 1-D RoPE when the temporal,
    height and width positions are equal (text), for the tiny config and for the real model's sections."""
    import json

    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding

    from omnilab.arch import read_config
    from omnilab.testing.synth import tiny_omni_config

    configs = [tiny_omni_config(), json.loads(REAL_CONFIG.read_text())]
    for config in configs:
        hf_text = Qwen3OmniMoeConfig.from_dict(config).thinker_config.text_config
        rotary = Qwen3OmniMoeThinkerTextRotaryEmbedding(hf_text)
        ours, _ = read_config(config)
        positions = torch.tensor([[0, 1, 2, 5, 100, 4095]])  # [B, T]
        x = torch.zeros(1, dtype=torch.float32)
        cos_ref, sin_ref = rotary(x, positions[None].expand(3, -1, -1))
        cos, sin = rope_cos_sin(positions, rope_inv_freq(ours), torch.float32)
        torch.testing.assert_close(cos, cos_ref, rtol=0, atol=0)
        torch.testing.assert_close(sin, sin_ref, rtol=0, atol=0)
        # and it is a real check: with distinct height / width rows M-RoPE is not 1-D RoPE
        vision = torch.stack([positions, positions * 0, positions * 0 + 3])
        assert not torch.equal(rotary(x, vision)[0], cos_ref)


# -- fault injection: each fault is caught at the layer it was injected in ---------------------------------------

FAULT_LAYER = 1


def _first_layer(name: str | None) -> int | None:
    return int(name.split(".")[1]) if name and name.startswith("blocks.") else None


@pytest.mark.parametrize("fault, expect_point", [
    (faults.RandomAttention(FAULT_LAYER), "hook_attn_out"),
    (faults.DefaultNorms(FAULT_LAYER), "hook_attn_out"),
    (faults.RouterMask(experts=tuple(range(8)), layer=FAULT_LAYER), "mlp.hook_topk_indices"),
    (faults.SalienceMix(alpha=0.5, layer=FAULT_LAYER), "mlp.hook_topk_indices"),
])
def test_fault_caught_at_its_layer(fault, expect_point, perturbed, reference_of):
    path = perturbed("moe-16-experts")  # 16 experts, so a mask to experts 0-7 is a real restriction
    ref = reference_of(path)
    sel = SelectiveMoE.from_checkpoint(path, faults=[fault])
    result = compare(ref, sel, PROMPT)
    assert result.first_divergence == f"blocks.{FAULT_LAYER}.{expect_point}", result.first_divergence
    # everything before the fault's layer is untouched; the output is visibly wrong
    before = result.table[result.table.layer < FAULT_LAYER]
    assert (before.rel_err <= 1e-5).all()
    assert result.table.set_index("name").rel_err["hook_logits"] > 1e-3


def test_zeroed_expert_caught_at_its_layer(perturbed, reference_of):
    path = perturbed("moe-16-experts")
    ref = reference_of(path)
    _, acts = run_with_cache(ref, PROMPT, names=[f"blocks.{FAULT_LAYER}.mlp.hook_topk_indices"])
    expert = int(acts[f"blocks.{FAULT_LAYER}.mlp.hook_topk_indices"][0, 0])  # the first token's top expert
    sel = SelectiveMoE.from_checkpoint(path, faults=[faults.ZeroedExpert(FAULT_LAYER, expert)])
    result = compare(ref, sel, PROMPT)
    assert result.first_divergence == f"blocks.{FAULT_LAYER}.hook_mlp_out"
    assert _first_layer(result.first_divergence) == FAULT_LAYER


def test_router_mask_only_routes_to_allowed_experts(perturbed):
    sel = SelectiveMoE.from_checkpoint(perturbed("moe-16-experts"), faults=[faults.RouterMask(experts=(1, 3, 5, 7, 9))])
    _, acts = run_with_cache(sel, PROMPT)
    for i in sel.config.moe_layers:
        assert set(acts[f"blocks.{i}.mlp.hook_topk_indices"].unique().tolist()) <= {1, 3, 5, 7, 9}


def test_faults_off_by_default(perturbed):
    """Without faults every norm is the checkpoint's own (not the default init) and routing is plain; with one
    the model really changes."""
    path = perturbed("omni-default")
    sel = SelectiveMoE.from_checkpoint(path)
    assert sel.faults == () and sel.routing.is_plain
    prefix = sel.checkpoint.arch[1].prefix
    for i, layer in enumerate(sel.model.layers):
        stored = sel.checkpoint.read(f"{prefix}layers.{i}.input_layernorm.weight").float()
        assert torch.equal(layer.input_layernorm.weight, stored)
        assert not torch.equal(stored, torch.ones_like(stored))  # the fixture's norms are not the default
    faulty = SelectiveMoE.from_checkpoint(path, faults=[faults.DefaultNorms(0)])
    assert torch.equal(faulty.model.layers[0].input_layernorm.weight, torch.ones_like(stored))
    with torch.no_grad():
        assert not torch.equal(sel(PROMPT), faulty(PROMPT))


def test_bf16_runs_and_stays_close(perturbed, reference_of):
    """bf16 against the bf16 reference: reported, not hidden; loose sanity bound only."""
    path = perturbed("omni-default")
    sel = SelectiveMoE.from_checkpoint(path, dtype="bfloat16")
    assert sel.dtype == torch.bfloat16 and sel.cache.store.expert_bytes == 3 * 32 * 64 * 2
    result = compare(reference_of(path, "bfloat16"), sel, PROMPT)
    assert result.table.set_index("name").rel_err["hook_embed"] == 0.0
    assert result.table.rel_err[result.table.point != "mlp.hook_topk_indices"].max() < 0.2


def test_fault_gallery_names_the_injected_layer(perturbed, reference_of):
    """Every standard fault diverges, never before the layer it is injected at; every hook before that layer
    keeps fp32 parity with the reference (rel_err <= 1e-5)."""
    from omnilab.experiments.fault_gallery import fault_gallery, gallery_table
    from omnilab.model.hooks import parse_name

    path = perturbed("omni-default")  # norms not at their default, so the norms fault changes something
    gallery = fault_gallery(path, reference_of(path), PROMPT)
    assert len(gallery) == 5
    for name, (fault, res) in gallery.items():
        assert res.first_divergence is not None, name
        layer, _ = parse_name(res.first_divergence)
        assert layer is not None and layer >= fault.layer, (name, res.first_divergence)
        before = res.table[(res.table.layer < fault.layer) | (res.table.name == "hook_embed")]
        assert (before.rel_err <= 1e-5).all() and not before.divergent.any(), name
        assert res.top1_agreement < 1.0 or res.kl > 0, name
    table = gallery_table(gallery)
    assert list(table["fault"]) == list(gallery) and (table["injected at layer"] == fault.layer).all()
