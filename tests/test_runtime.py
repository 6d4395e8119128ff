"""The runtime (omnilab.runtime): one place picks the engine of every call, says why a faster one was refused,
and the engines it picks give the eager path's tokens (fp32, CPU here; tests/gpu/ runs the GPU engines)."""

import json
from pathlib import Path

import pytest
import torch

import omnilab as ol
from omnilab import cli
from omnilab.checkpoint import Checkpoint
from omnilab.model.faults import DefaultNorms, RouterMask, SalienceMix
from omnilab.model.routing import RoutingOptions
from omnilab.runtime import hardware
from omnilab.runtime.choose import Call, choose
from omnilab.runtime.generate import cut_at_stop, sampling_options
from omnilab.runtime.plan import PRESETS, machine_described, machine_here, plan, token_bytes
from omnilab.testing.synth import sparse_from_config
from omnilab.model.generate import Generation

REAL_CONFIG = Path(__file__).resolve().parent.parent / "data/reference/qwen3-omni-30b-a3b-instruct.config.json"


@pytest.fixture(scope="module")
def model(tiny_moe):
    return ol.load(tiny_moe)


def test_auto_on_a_cpu_is_fp32_with_every_expert(model):
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert model.cache.budget_bytes == model.cache.store.total_bytes
    assert "auto: device=auto, dtype=auto, expert_budget=auto" in model.placement


def test_plain_call_takes_the_cpu_fast_path_with_the_eager_tokens(model):
    prompts = [[3, 17, 42, 9], [5, 6, 7, 8]]
    fast = model.generate(prompts, 12)
    eager = model.generate(prompts, 12, engine="eager")
    assert fast.engine == "cpu-resident" and fast.refusal is None
    assert eager.engine == "eager"
    assert fast.new_token_ids == eager.new_token_ids


def test_hooks_send_a_call_to_the_eager_path_and_say_so(model):
    handle = model.add_hook("blocks.0.hook_resid_post", lambda x: None)
    try:
        out = model.generate([1, 2, 3], 4)
    finally:
        handle.remove()
    assert out.engine == "eager"
    assert out.refusal.startswith("cpu-resident: hooks are registered (blocks.0.hook_resid_post)")


def test_a_budget_below_all_experts_is_named(tiny_moe):
    small = ol.load(tiny_moe, expert_budget=ol.load(tiny_moe).cache.store.expert_bytes * 4)
    choice = choose(small, Call())
    assert choice.engine == "eager" and "expert budget" in choice.refusal and "below" in choice.refusal


def test_weight_faults_are_eager_only(tiny_moe):
    faulty = ol.load(tiny_moe, faults=[DefaultNorms(layer=0)])
    assert choose(faulty, Call()).engine == "eager"


def test_insisting_on_an_engine_that_cannot_run_the_call_is_one_line(model):
    with pytest.raises(ValueError, match="engine 'gpu-resident': on cpu"):
        choose(model, Call(), engine="gpu-resident")
    handle = model.add_hook("hook_embed", lambda x: None)
    try:
        with pytest.raises(ValueError, match="engine cpu-resident cannot run this call: hooks"):
            choose(model, Call(), engine="cpu-resident")
    finally:
        handle.remove()


def test_stop_tokens_cut_each_row_as_the_eager_loop_does(model):
    prompts = [[3, 17, 42, 9]]
    free = model.generate(prompts, 10, engine="eager").new_token_ids[0]
    stop = free[4]
    fast = model.generate(prompts, 10, stop_tokens=[stop])
    eager = model.generate(prompts, 10, stop_tokens=[stop], engine="eager")
    assert fast.new_token_ids == eager.new_token_ids and fast.stopped == eager.stopped == [True]
    g = cut_at_stop(Generation([[1, 2, 3], [4, 5, 6]], [1, 1], 1.0, 0.1, [False, False]), [2, 9])
    assert g.new_token_ids == [[1, 2], [4, 5, 6]] and g.stopped == [True, False]


def test_the_checkpoints_stop_tokens_end_a_text(model, monkeypatch):
    """model.stop_tokens: generation_config.json's eos_token_id, one id or a list (none: []); generating with them
    stops at the first, which is where until_stop cuts the same continuation generated past it."""
    prompts = [[3, 17, 42, 9]]
    free = model.generate(prompts, 10, engine="eager").new_token_ids[0]
    monkeypatch.setattr(model, "generation_config", {})
    assert model.stop_tokens == []
    monkeypatch.setattr(model, "generation_config", {"eos_token_id": free[3]})
    assert model.stop_tokens == [free[3]]
    monkeypatch.setattr(model, "generation_config", {"eos_token_id": [free[6], free[3]]})
    stopped = model.generate(prompts, 10, stop_tokens=model.stop_tokens).new_token_ids[0]
    assert stopped == ol.until_stop(free, model.stop_tokens) == free[:free.index(free[3]) + 1]
    assert ol.until_stop(free, []) == free


def test_sampled_generation_is_resident_and_reproducible_for_a_seed(model):
    prompts, options = [[5], [8, 8, 8, 8, 8, 8], [1, 2, 3, 4]], dict(greedy=False, temperature=0.9, top_k=20, top_p=0.9)
    a, b, c = (model.generate(prompts, 10, seed=s, **options) for s in (1, 1, 2))
    assert a.engine == "cpu-resident" and a.refusal is None
    assert a.new_token_ids == b.new_token_ids != c.new_token_ids


def test_ragged_masked_top_k_and_salience_calls_are_resident_with_the_eager_tokens(model):
    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    ok = torch.ones(E, dtype=torch.bool)
    ok[:2] = False
    cases = {"ragged": None, "top-k": RoutingOptions(top_k=k + 2),
             "masked": RoutingOptions(available={i: ok for i in cfg.moe_layers}),
             "router mask": RoutingOptions(transforms=(RouterMask(tuple(range(2, E))),)),
             "salience": RoutingOptions(transforms=(SalienceMix(alpha=0.7),))}
    prompts = [[3, 17, 42, 5, 99, 7, 64, 12], [250, 31, 9]]
    for what, routing in cases.items():
        stop = [model.generate(prompts, 10, engine="eager", routing=routing).new_token_ids[1][4]]
        fast = model.generate(prompts, 10, routing=routing, stop_tokens=stop)
        eager = model.generate(prompts, 10, routing=routing, stop_tokens=stop, engine="eager")
        assert fast.engine == "cpu-resident" and fast.refusal is None, what
        assert fast.new_token_ids == eager.new_token_ids and fast.stopped == eager.stopped, what


@pytest.mark.parametrize("bad, match", [(dict(max_new_tokens=0), "max_new_tokens"),
                                        (dict(greedy=False, temperature=0.0), "temperature"),
                                        (dict(greedy=False, temperature=float("inf")), "temperature"),
                                        (dict(greedy=False, top_p=0.0), "top_p"),
                                        (dict(greedy=False, top_k=-5), "top_k")])
def test_bad_generation_options_are_one_line_value_errors(model, bad, match):
    options = {"max_new_tokens": 4, **bad}
    with pytest.raises(ValueError, match=match):
        model.generate([1, 2, 3], **options)


def test_sampling_follows_generation_config_as_transformers_does():
    options, how = sampling_options({})
    assert options["greedy"] and "do_sample false" in how
    options, how = sampling_options({"do_sample": True, "temperature": 0.7, "top_p": 0.8})
    assert options == {"greedy": False, "temperature": 0.7, "top_k": 50, "top_p": 0.8}
    assert how.startswith("sampling: temperature 0.7, top_k 50, top_p 0.8")
    options, how = sampling_options({"do_sample": True}, greedy=True)
    assert options["greedy"] and "the call" in how


def test_device_and_dtype_resolution(tiny_moe):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
            hardware.resolve_device("cuda")
        assert hardware.resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="--device 'nonsense'"):
        hardware.resolve_device("nonsense")
    with pytest.raises(ValueError, match="--device meta"):
        hardware.resolve_device("meta")
    ckpt = Checkpoint(tiny_moe)
    assert hardware.resolve_dtype("auto", ckpt, torch.device("cpu")) == torch.float32
    sizes = hardware.model_bytes(ckpt, torch.float32)
    assert hardware.resolve_budget("all", all_experts_bytes=sizes["experts"], resident_bytes=0,
                                   device=torch.device("cpu")) is None
    assert hardware.resolve_budget("1kB", all_experts_bytes=sizes["experts"], resident_bytes=0,
                                   device=torch.device("cpu")) == 1000


def test_model_bytes_add_up_to_the_checkpoint(tiny_moe):
    from omnilab.arch import expected_tensors

    ckpt = Checkpoint(tiny_moe)
    config, layout = ckpt.arch
    sizes = hardware.model_bytes(ckpt, torch.float32)
    names = list(expected_tensors(config, layout))
    assert sizes["experts"] + sizes["backbone"] == int(ckpt.tensors.loc[names, "numel"].sum()) * 4
    assert sizes["expert"] * config.num_experts * len(config.moe_layers) == sizes["experts"]


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "omni"
    sparse_from_config(REAL_CONFIG, out)
    return Checkpoint(out)


def test_plan_of_the_real_model_on_described_gpus(real_layout):
    here = machine_here("cpu")
    config, _ = real_layout.arch
    h100 = plan(real_layout, machine_described("h100", None, None, here))
    assert h100["dtype"] == "bfloat16"
    read = h100["bytes"]["read_per_token"]
    assert 5.9e9 < read["total"] < 6.3e9  # the 6.10 GB a token reads (DESIGN.md)
    engines = {r["engine"]: r for r in h100["engines"]}
    assert engines["gpu-resident"]["fits"] and h100["verbs"]["generate"] == "gpu-resident"
    # within 25% of the H100's measured 251.8 tok/s with the Triton step (bench/results/decode_step_h100.md)
    assert 251.8 * 0.75 < engines["gpu-resident"]["tokens_per_s"] < 251.8 * 1.25
    h200 = {r["engine"]: r for r in plan(real_layout, machine_described("h200", None, None, here))["engines"]}
    assert h200["gpu-resident"]["tokens_per_s"] > engines["gpu-resident"]["tokens_per_s"]  # more HBM bandwidth
    # fp32 runs torch's kernels (gather): the 100 us a layer of the measured grouped_mm / fp32 rows
    fp32 = {r["engine"]: r for r in plan(real_layout, machine_described("h100", None, None, here),
                                         dtype="float32")["engines"]}
    read32 = 2 * read["backbone"] + 2 * read["experts"] + 2 * read["kv"]
    expected = 1 / (read32 / PRESETS["h100"]["hbm"] + config.num_hidden_layers * 100e-6)
    assert fp32["gpu-resident"]["tokens_per_s"] == pytest.approx(expected, rel=0.02)
    small = plan(real_layout, machine_described("h100", 24e9, None, here))
    rows = {r["engine"]: r for r in small["engines"]}
    assert not rows["gpu-resident"]["fits"] and small["verbs"]["generate"] == "gpu-offload"
    assert "exceed the GPU" in rows["gpu-resident"]["why"]
    assert token_bytes(config, {"backbone": 0, "expert": 2, "experts": 0}, 0)["experts"] == 2 * 8 * 48
    # a batched step (bench/batched.py): its distinct experts per layer, every row's KV cache
    expert = 3 * config.hidden_size * config.moe_intermediate_size * 2  # bf16
    one, four = (token_bytes(config, {"backbone": config.vocab_size * config.hidden_size * 2, "expert": expert,
                                      "experts": 0}, 100, experts_per_layer=30.5, batch=b) for b in (1, 4))
    assert one["experts"] == expert * 30.5 * 48 and four["experts"] == one["experts"]
    assert four["kv"] == 4 * one["kv"] == 4 * 2 * 48 * config.num_key_value_heads * config.head_dim * 100 * 2


def test_plan_cli_here_and_described(capsys, real_layout):
    assert cli.main(["plan", str(real_layout.path), "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"here", "described"}
    assert out["here"]["verbs"]["generate"] in ("cpu-resident", "eager")
    assert out["described"]["machine"]["gpu_bytes"] == PRESETS["h100"]["gpu_bytes"]
    assert cli.main(["plan", str(real_layout.path), "--device", "cpu", "--gpu", "h200"]) == 0
    text = capsys.readouterr().out
    assert "[described]" in text and "gpu-resident" in text and "tok/s" in text


def test_cli_generate_json_names_the_engine(capsys, tiny_moe):
    assert cli.main(["generate", str(tiny_moe), "--input-ids", "1,2,3", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "cpu-resident" and out["refusal"] is None and out["peak_gpu_bytes"] is None
    assert out["sampling"].startswith("greedy") and out["placement"].startswith("cpu, float32")
    assert cli.main(["generate", str(tiny_moe), "--input-ids", "1,2,3", "--max-new-tokens", "4", "--json",
                     "--expert-budget", "1B"]) == 2  # below one expert: one line
    assert "expert budget" in capsys.readouterr().err


def test_only_the_models_own_routing_compiles_the_resident_step():
    """bf16 on CUDA compiles the step for plain routing only: an intervention would recompile per setting and past
    dynamo's recompile limit run uncompiled (notebook 05's sweep on the H200); CPU and fp32 never compile."""
    from types import SimpleNamespace

    from omnilab.runtime.generate import compiles

    gpu = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert compiles(gpu, RoutingOptions())
    for routing in (RoutingOptions(top_k=4), RoutingOptions(transforms=(RouterMask((0, 1)),)),
                    RoutingOptions(available={0: torch.ones(8, dtype=torch.bool)})):
        assert not compiles(gpu, routing), routing
    assert not compiles(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32), RoutingOptions())
    assert not compiles(SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16), RoutingOptions())


def test_one_copy_of_the_experts_serves_the_resident_engine_and_the_eager_path(tiny_moe):
    """Once the runtime holds every expert in its pool, the eager path's cache serves views into that pool (its
    own copies dropped first) with the same logits; drop_resident frees the pool and the eager path reads the
    shards again. Two copies of the 48-layer thinker do not fit an 80 GB card (notebook 05 on an H100)."""
    from omnilab.runtime.choose import engines
    from omnilab.runtime.generate import drop_resident, resident_pool

    model = ol.load(tiny_moe)
    ids = torch.tensor([[3, 17, 42, 9, 5]])
    before = model(ids)  # the eager cache loads its own copies
    assert model.cache.stats.resident_bytes > 0
    own = {key: w.gate_proj.data_ptr() for key, w in model.cache.resident.items()}
    assert model.generate([3, 17, 42], 4).engine == "cpu-resident"
    pool = engines(model)["pool"]
    assert model.cache.store.resident is pool and set(model.cache.resident) == set(own)  # the same keys, as views
    assert torch.equal(model(ids), before)
    I = model.config.moe_intermediate_size
    (layer, e), weights = next(iter(model.cache.resident.items()))
    assert weights.gate_proj.data_ptr() == pool.gate_up[layer][e].data_ptr()  # a view, not a copy
    assert weights.up_proj.data_ptr() == pool.gate_up[layer][e, I:].data_ptr()
    assert weights.down_proj.data_ptr() == pool.down[layer][e].data_ptr()
    assert resident_pool(model) is pool  # built once
    drop_resident(model)
    assert "pool" not in engines(model) and model.cache.store.resident is None and not model.cache.resident
    assert not any(isinstance(k, tuple) and k[0] == "fast" for k in engines(model))
    assert torch.equal(model(ids), before)
    (layer, e), weights = next(iter(model.cache.resident.items()))
    assert weights.gate_proj.data_ptr() != pool.gate_up[layer][e].data_ptr()


def test_a_weight_transform_never_reads_the_shared_pool(tiny_moe):
    """A store that alters experts as they load (faults) copies them: altering a view would alter the pool."""
    from omnilab.runtime.generate import resident_pool

    model = ol.load(tiny_moe)
    pool = resident_pool(model)
    store = model.cache.store
    store.transform = lambda layer, e, w: w
    try:
        layer = model.config.moe_layers[0]
        assert store.load(layer, 0).gate_proj.data_ptr() != pool.gate_up[layer][0].data_ptr()
    finally:
        store.transform = None


def test_the_offload_engine_evicts_by_every_policy_of_the_cache(tiny_moe, monkeypatch):
    """Under a budget below all experts a CUDA model takes the offload engine whatever its cache's eviction policy
    (asked here with the model's device reported as cuda); only a policy outside POLICIES is refused. The engine
    the runtime builds (run here on the CPU) evicts by the cache's policy, one per MoE layer, TrustWeighted's decay
    kept, gives the eager tokens and reports hit statistics; a new policy gets a new engine."""
    from omnilab.model.experts import LRU, POLICIES, ExpertCache, TrustWeighted
    from omnilab.runtime import generate as runtime_generate
    from omnilab.model.generate import resolve_vocab_limit

    store = ol.load(tiny_moe).cache.store
    cfg = store.config
    k, L = cfg.num_experts_per_tok, len(cfg.moe_layers)
    budget = store.expert_bytes * L * k  # top-k slots a layer: every step evicts
    prompt, n = [3, 17, 42, 9, 11, 5], 12
    call = Call(max_len=len(prompt) + n)
    for name, policy in POLICIES.items():
        small = ol.load(tiny_moe, expert_budget=budget, policy=name)
        with monkeypatch.context() as m:
            m.setattr(type(small), "device", property(lambda self: torch.device("cuda")))
            choice = choose(small, call)
        assert choice.engine == "gpu-offload", (name, choice.refused)
        assert choice.refusal.startswith("gpu-resident: the expert budget")
        eager = small.generate(prompt, n, engine="eager").new_token_ids
        out = runtime_generate._offload(small, [prompt], n, resolve_vocab_limit(small, "auto"), call)
        assert out.new_token_ids == eager, name
        decoder = runtime_generate.offload_decoder(small, call)  # the one just run
        assert {type(p) for p in decoder.cache.policy.values()} == {policy}
        assert out.cache["hits"] + out.cache["misses"] == (n - 1) * L * k and out.cache["misses"] > 0
        assert out.cache["hit_rate"] == out.cache["hits"] / ((n - 1) * L * k)
    small.cache = ExpertCache(small.cache.store, budget, policy=TrustWeighted(decay=0.5))
    again = runtime_generate.offload_decoder(small, call)
    assert again is not decoder and {p.decay for p in again.cache.policy.values()} == {0.5}

    class MostRecentlyUsed(LRU):
        def victim(self, pinned):
            return next((k for k in reversed(self.order) if k not in pinned), None)

    small.cache = ExpertCache(small.cache.store, budget, policy=MostRecentlyUsed())
    with monkeypatch.context() as m:
        m.setattr(type(small), "device", property(lambda self: torch.device("cuda")))
        choice = choose(small, call)
    assert choice.engine == "eager"
    assert choice.refused["gpu-offload"].startswith("the expert cache's policy is MostRecentlyUsed, not one of lru")


def test_one_room_check_for_every_expert_on_the_gpu(tiny_moe, monkeypatch):
    """The resident fast path and the trace prefill ask one check (gpu.slots.all_experts_room_refusal): the device's
    free memory plus the eager cache's copies (let go when the pool is built) against all experts, the prefill with
    5% beside them. Asked here with the model's device reported as cuda and the free memory set."""
    from omnilab.gpu import prefill, slots

    model = ol.load(tiny_moe, dtype="bfloat16")
    need = model.cache.store.total_bytes
    assert slots.all_experts_room_refusal(model) is None  # the CPU: no device memory to check
    free = {"bytes": need - 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    refusal = slots.all_experts_room_refusal(model)
    assert refusal is not None and "all experts need" in refusal and "free" in refusal
    assert choose(model, Call()).refused["gpu-resident"] == refusal  # the runtime's resident refusal is this one
    model.cache.stats.resident_bytes = 1  # one byte of eager copies counts as free: they go when the pool comes
    assert slots.all_experts_room_refusal(model) is None and "gpu-resident" not in choose(model, Call()).refused
    assert "5% beside them" in prefill.prefill_refusal(model)  # the prefill wants room for a batch's activations
    free["bytes"] = int(need * 1.05) + 1
    assert prefill.prefill_refusal(model) is None
