"""The faces on a GPU: CLI generate takes the resident fast path or, under a budget, the offload engine, with the
eager path's fp32 tokens; bf16 compare on cuda runs and agrees with the CPU compare's verdict."""

import json

import pytest
import torch

import omnilab as ol
from omnilab import cli
from omnilab.testing import breakage


def run_json(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code == 0, err
    return json.loads(out)


def eager_tokens(path, ids, n, **load):
    model = ol.load(path, device="cuda", dtype="float32", **load)
    return model.generate(ids, n, engine="eager").new_token_ids[0]


def test_cli_generate_cuda_takes_the_fast_path_with_the_eager_tokens(capsys, tiny_moe):
    out = run_json(capsys, "generate", str(tiny_moe), "--input-ids", "3,17,42,9,11", "--max-new-tokens", "16",
                   "--device", "cuda", "--dtype", "float32", "--stop-ids", "none", "--json")
    assert out["engine"] == "gpu-resident" and out["refusal"] is None
    assert out["peak_gpu_bytes"] > 0
    assert out["new_token_ids"] == eager_tokens(tiny_moe, [3, 17, 42, 9, 11], 16)


def test_cli_generate_under_a_budget_takes_the_offload_engine_with_the_same_tokens(capsys, tiny_moe):
    model = ol.load(tiny_moe, device="cuda", dtype="float32")
    budget = model.cache.store.total_bytes // 2
    out = run_json(capsys, "generate", str(tiny_moe), "--input-ids", "3,17,42,9,11", "--max-new-tokens", "16",
                   "--device", "cuda", "--dtype", "float32", "--stop-ids", "none", "--expert-budget", str(budget),
                   "--json")
    assert out["engine"] == "gpu-offload"
    assert out["refusal"].startswith("gpu-resident: the expert budget")
    assert out["new_token_ids"] == eager_tokens(tiny_moe, [3, 17, 42, 9, 11], 16, expert_budget=budget)


def test_auto_device_on_a_gpu_machine_is_cuda_in_the_checkpoint_dtype(tiny_moe):
    model = ol.load(tiny_moe)
    assert model.device.type == "cuda"
    assert "auto" in model.placement


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compare_on_cuda_agrees_with_the_cpu_verdict(capsys, tiny_moe, tmp_path, dtype):
    edited = breakage.copy_checkpoint(tiny_moe, tmp_path / "edited")
    name = "model.layers.1.post_attention_layernorm.weight"
    weight = ol.Checkpoint(edited).read(name)
    breakage.replace_tensor(edited, name, weight * 3 + 0.5)  # a norm that is not the checkpoint's
    verdicts = {}
    for device in ("cpu", "cuda"):
        out = run_json(capsys, "compare", str(edited), "--reference", str(tiny_moe), "--input-ids",
                       "3,17,42,9,11,5,6", "--device", device, "--dtype", dtype, "--json")
        verdicts[device] = (out["first_divergence"], out["local_first_divergence"])
        if device == "cuda":
            assert out["peak_gpu_bytes"] > 0 and out["seconds"] > 0
    assert verdicts["cuda"] == verdicts["cpu"]
    assert verdicts["cpu"][1] is not None and ".1." in verdicts["cpu"][1]


def test_one_copy_of_the_experts_on_the_gpu_for_generate_eager_forwards_and_the_trace(tiny_moe, monkeypatch):
    """Notebook 05 on an H100: generate built the resident pool, then the eager trace filled a second copy of every
    expert and ran out of memory. Now the eager path reads views into the pool (no device memory added), and an
    offload budget that does not fit beside the pool frees it (the sweep's budget settings)."""
    from omnilab.experiments.sweeps import Setting, fresh_cache
    from omnilab.runtime import generate as runtime_generate
    from omnilab.runtime.choose import engines

    model = ol.load(tiny_moe, device="cuda", dtype="float32")
    total = model.cache.store.total_bytes
    assert model.generate([3, 17, 42, 9], 6).engine == "gpu-resident"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ids = torch.tensor([[3, 17, 42, 9, 11, 5, 6]], device="cuda")
    logits = model(ids)  # the eager path: every routed expert through the cache
    assert model.cache.stats.misses > 0
    assert torch.cuda.memory_allocated() - before < total // 4  # activations only, no copy of the experts
    pool = engines(model)["pool"]
    fresh_cache(model, Setting("half", "budget", value=0.5, budget_share=0.5))
    monkeypatch.setattr(runtime_generate, "OFFLOAD_MARGIN", 1 << 50)  # "does not fit": as on a full card
    out = model.generate([3, 17, 42, 9], 6)
    assert out.engine == "gpu-offload"
    assert "pool" not in engines(model) and model.cache.store.resident is None
    del pool
    model.cache = type(model.cache)(model.cache.store, None)
    assert torch.equal(model(ids), logits)  # from the shards again: the same logits
