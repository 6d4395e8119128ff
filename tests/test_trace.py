"""Corpus traces (omnilab.trace, `omnilab trace`): the corpus readers, the batch plan, the Parquet trace against
the hooks (whole documents and token by token) and transformers' own router, one process against two gloo
processes under torchrun, resuming, and the statistics read lazily from Parquet against the same in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from omnilab.outdir import TEMP_TAG, temp_path
from omnilab.cli import main
from omnilab import trace
from omnilab.experiments import cache_sim, routing
from omnilab.trace import record as routing_trace

REPO = Path(__file__).resolve().parent.parent

DOCS = [
    ("en", "The quick brown fox jumps over the lazy dog."),
    ("en", "Mixture-of-Experts models route each token to a few experts."),
    ("fr", "Le renard brun saute par-dessus le chien paresseux."),
    ("python", "def add(a, b):\n    return a + b\n"),
    ("arith", "47 + 38 = 85\n12 + 30 = 42\n"),
    ("en", ""),  # no tokens: numbered, never traced
    ("fr", "Les modèles à mélange d'experts routent chaque jeton."),
    ("python", "for i in range(3):\n    print(i)\n"),
    ("arith", "7 + 5 = 12"),
    ("en", "A router picks the experts; the experts do the work."),
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"domain": d, "text": t}) + "\n" for d, t in DOCS))
    return path


def run_trace(ckpt, corpus, out, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("batch_tokens", 40)
    return trace.trace_corpus(ckpt, [corpus], out, progress=False, **kw)


# ------------------------------------------------------------------------------------------------ corpus and plan


def test_read_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"domain": "en", "text": "one"}) + "\n\n" +
                                      json.dumps({"prompt": "two"}) + "\n")
    (tmp_path / "notes.txt").write_text("three\nlines")
    pq.write_table(pa.table({"content": ["four", "five"], "lang": ["es", "fr"]}), tmp_path / "b.parquet")
    ds = tmp_path / "hf"  # the layout of datasets' save_to_disk: Arrow stream files named in state.json
    ds.mkdir()
    table = pa.table({"text": ["six"], "domain": ["python"]})
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    c = trace.read_corpus([tmp_path / "a.jsonl", tmp_path / "notes.txt", tmp_path / "b.parquet", ds])
    d = c.documents
    assert d["text"].tolist() == ["one", "two", "three\nlines", "four", "five", "six"]
    assert d["domain"].tolist() == ["en", "a", "notes", "b", "b", "python"]  # no domain field: the file's stem
    assert d["doc"].tolist() == list(range(6)) and d["row"].tolist() == [0, 1, 0, 0, 1, 0]
    assert [f["documents"] for f in c.files] == [2, 1, 2, 1]
    assert trace.read_corpus([tmp_path / "b.parquet"], domain_field="lang").documents["domain"].tolist() == ["es", "fr"]
    # a folder is read file by file, sorted; the datasets folder inside it as a dataset
    assert trace.read_corpus([tmp_path]).documents["text"].tolist() == ["one", "two", "four", "five", "six",
                                                                       "three\nlines"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', "bad.jsonl:2: not JSON"),
    ('{"body": "x"}\n', "bad.jsonl:1: no text field"),
    ('{"text": 3}\n', "bad.jsonl:1: field 'text' is int"),
    ('[1, 2]\n', "bad.jsonl:1: not a JSON object"),
])
def test_read_corpus_bad_input_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        trace.read_corpus([tmp_path / "bad.jsonl"])
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        trace.read_corpus([tmp_path / "nothere.jsonl"])


def test_plan_batches_by_length_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 50, 200)
    lengths[7] = 300  # longer than a batch: a batch of its own
    batches = trace.plan_batches(lengths, 128)
    flat = [d for b in batches for d in b]
    assert sorted(flat) == sorted(np.flatnonzero(lengths > 0).tolist())  # every non-empty document once
    assert batches[0] == [7]
    for b in batches:
        assert len(b) * lengths[b].max() <= 128 or len(b) == 1
    longest = [lengths[b].max() for b in batches]
    assert longest == sorted(longest, reverse=True)
    assert trace.plan_batches(lengths, 128) == batches


# ------------------------------------------------------------------------------------------------ exactness


def test_trace_equals_hooks_whole_documents_and_token_by_token(tiny_omni, corpus, tmp_path):
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.model.kv_cache import KVCache
    from omnilab.model.hooks import capture
    from omnilab.reference.whole import Reference

    result = run_trace(tiny_omni, corpus, tmp_path / "t")
    t = trace.TraceDataset(tmp_path / "t")
    frame = t.to_pandas()
    model = SelectiveMoE.from_checkpoint(tiny_omni)
    cfg = model.config
    ids = [model.tokenizer(text)["input_ids"][:12] for _, text in DOCS]
    assert result.tokens == sum(map(len, ids)) and len(frame) == result.tokens * len(cfg.moe_layers) * 2
    assert result.batches > 2  # several batches, padded: the test covers padding
    assert frame.attrs == dict(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                               num_layers=len(cfg.moe_layers))

    # whole documents through the hooks (routing_trace.record_trace: one document per forward, no padding)
    docs = pd.DataFrame({"domain": [d for d, _ in DOCS], "text": [t for _, t in DOCS]})
    ref = routing_trace.record_trace(model, None, docs, max_tokens=12, progress=False)
    for c in ("doc", "domain", "position", "token_id", "layer", "rank", "expert"):
        assert frame[c].astype(str).tolist() == ref[c].astype(str).tolist(), c
    np.testing.assert_allclose(frame["weight"], ref["weight"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(frame["entropy"], ref["entropy"], rtol=1e-5, atol=1e-6)

    # token by token, through the KV cache, read at the same hooks
    names = [f"blocks.{i}.mlp.hook_{p}" for i in cfg.moe_layers for p in ("topk_indices", "topk_weights")]
    for doc in (0, 3, 9):
        kv = KVCache(cfg.num_hidden_layers)
        steps = []
        for token in ids[doc]:
            with capture(model, names) as acts, torch.no_grad():
                model(torch.tensor([[token]]), None, kv)
            steps.append({n: a[0] for n, a in acts.items()})  # [1, k] -> [k]
        rows = frame[frame["doc"] == doc]
        for i in cfg.moe_layers:
            got = rows[rows["layer"] == i]
            experts = torch.stack([s[f"blocks.{i}.mlp.hook_topk_indices"] for s in steps])  # [T, k]
            weights = torch.stack([s[f"blocks.{i}.mlp.hook_topk_weights"] for s in steps])
            assert got["expert"].tolist() == experts.reshape(-1).tolist()
            np.testing.assert_allclose(got["weight"], weights.reshape(-1).numpy(), rtol=1e-5, atol=1e-7)

    # and transformers' own router, at the same hook names
    hf = routing_trace.record_trace(Reference.from_checkpoint(tiny_omni), model.tokenizer, docs, max_tokens=12,
                              progress=False)
    assert frame["expert"].tolist() == hf["expert"].tolist()
    np.testing.assert_allclose(frame["weight"], hf["weight"], rtol=1e-4, atol=1e-6)


def test_grouped_prefill_equals_eager_path_and_hooks(tiny_omni, corpus, tmp_path):
    """The grouped prefill (omnilab.gpu.prefill, every expert resident, one grouped GEMM per layer) writes the same
    trace as the eager path and as the hooks: the same rows, the same expert ids, weights and entropies equal to
    fp32 rounding."""
    from omnilab.model.decoder import SelectiveMoE

    eager = run_trace(tiny_omni, corpus, tmp_path / "eager", prefill="eager")
    grouped = run_trace(tiny_omni, corpus, tmp_path / "grouped", prefill="grouped_mm")
    assert (eager.prefill, grouped.prefill) == ("eager", "grouped_mm") and grouped.batches == eager.batches > 2
    a, b = trace.TraceDataset(tmp_path / "eager"), trace.TraceDataset(tmp_path / "grouped")
    assert a.manifest["run"]["prefill"] == "eager" and b.manifest["run"]["prefill"] == "grouped_mm"
    assert a.manifest["run"]["prefill_glue"] is None and b.manifest["run"]["prefill_glue"] == "torch"  # CPU
    assert b.manifest["settings"]["prefill"] == "grouped_mm" and "prefill" not in a.manifest["settings"]
    assert a.manifest["shards"] == b.manifest["shards"]  # same batches, tokens and rows per shard
    sa, sb = _shards(tmp_path / "eager"), _shards(tmp_path / "grouped")
    assert list(sa) == list(sb)
    for name in sa:  # shard by shard, column by column: every integer column exactly, the floats to rounding
        assert sa[name].schema == sb[name].schema
        for c in ("doc", "domain", "position", "token_id", "layer", "rank", "expert"):
            assert sa[name].column(c).equals(sb[name].column(c)), (name, c)
        for c in ("weight", "entropy"):
            np.testing.assert_allclose(sb[name].column(c).to_numpy(), sa[name].column(c).to_numpy(),
                                       rtol=1e-5, atol=1e-6)
        assert pq.read_metadata(tmp_path / "grouped" / "shards" / name).num_row_groups == 3  # one per layer
    with pytest.raises(ValueError, match="changed: prefill; the grouped prefill was not taken: --prefill eager"):
        run_trace(tiny_omni, corpus, tmp_path / "grouped", prefill="eager")  # a resume never mixes the two paths
    # and the hooks: whole documents, one per forward, no padding (routing.record_trace)
    model = SelectiveMoE.from_checkpoint(tiny_omni)
    docs = pd.DataFrame({"domain": [d for d, _ in DOCS], "text": [t for _, t in DOCS]})
    ref = routing_trace.record_trace(model, None, docs, max_tokens=12, progress=False)
    frame = b.to_pandas()
    for c in ("doc", "domain", "position", "token_id", "layer", "rank", "expert"):
        assert frame[c].astype(str).tolist() == ref[c].astype(str).tolist(), c
    np.testing.assert_allclose(frame["weight"], ref["weight"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(frame["entropy"], ref["entropy"], rtol=1e-5, atol=1e-6)


def test_grouped_prefill_refusals(tiny_omni, corpus, tmp_path, capsys):
    """What sends a trace to the eager path: hooks, faults, a routing override, an expert budget; auto on CPU."""
    from omnilab.model.faults import DefaultNorms
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.gpu.prefill import TracePrefill, prefill_refusal
    from omnilab.model.routing import RoutingOverride

    model = SelectiveMoE.from_checkpoint(tiny_omni)
    assert prefill_refusal(model) is None
    handle = model.add_hook("blocks.0.mlp.hook_topk_indices", lambda x: None)
    assert "hooks are registered" in prefill_refusal(model)
    with pytest.raises(ValueError, match="--prefill grouped_mm: hooks are registered"):
        run_trace(tiny_omni, corpus, tmp_path / "hooked", model=model, prefill="grouped_mm")
    with pytest.raises(ValueError, match="grouped prefill unavailable: hooks"):
        TracePrefill(model)
    handle.remove()
    model.routing_override = RoutingOverride({0: torch.tensor([0, 1])})
    assert "routing override" in prefill_refusal(model)
    model.routing_override = None
    assert "fault injection" in prefill_refusal(SelectiveMoE.from_checkpoint(tiny_omni, faults=[DefaultNorms(1)]))
    small = SelectiveMoE.from_checkpoint(tiny_omni, expert_budget=3 * model.cache.store.expert_bytes)
    assert "expert budget" in prefill_refusal(small)
    auto = run_trace(tiny_omni, corpus, tmp_path / "auto", model=small)  # auto: the eager path, under the budget
    assert auto.prefill == "eager" and "expert budget" in auto.prefill_refusal
    assert small.cache.stats.peak_resident_bytes <= small.cache.budget_bytes
    cpu = run_trace(tiny_omni, corpus, tmp_path / "cpu", model=model).prefill_refusal
    assert cpu.startswith("taken by auto on CUDA only") and "--prefill grouped_mm" in cpu
    assert main(["trace", str(tiny_omni), "--corpus", str(corpus), "--out", str(tmp_path / "cli"), "--prefill",
                 "grouped_mm", "--expert-budget", "100KB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--prefill grouped_mm: the expert budget" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="--prefill 'fast'"):
        run_trace(tiny_omni, corpus, tmp_path / "bad", prefill="fast")


def _shards(folder: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted((folder / "shards").glob("*.parquet"))}


# omnilab's CLI as `python -m omnilab` runs it; once the verb returns, each rank writes the names of the native gloo
# threads still alive (Linux: /proc/self/task) to $THREADS_LEFT.<rank>
RANK_SCRIPT = """
import os, sys
from omnilab.cli import main

code = main(sys.argv[1:])
tasks = "/proc/self/task"
names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
with open(os.environ["THREADS_LEFT"] + "." + os.environ["RANK"], "w") as f:
    f.write(" ".join(n for n in names if "gloo" in n))
raise SystemExit(code)
"""


def test_two_gloo_processes_equal_one_process(tiny_omni, corpus, tmp_path):
    """`omnilab trace` under torchrun with two gloo processes writes the very same shards as one process, and each
    rank's process group is gone when the verb returns: one kept alive (torch.distributed.nn, imported after
    init_process_group, holds it in its functions' defaults) left gloo threads that freed the last collective's
    tensors during interpreter exit and aborted a rank now and then."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "OMNILAB_DEBUG": "1",
           "THREADS_LEFT": str(tmp_path / "threads_left")}
    args = [str(script), "trace", str(tiny_omni), "--corpus", str(corpus), "--max-tokens", "12",
            "--batch-tokens", "40"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks run (OMP_NUM_THREADS=1): the test never depends on thread count
    try:
        run_trace(tiny_omni, corpus, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, "--out", str(tmp_path / "two"), "--json"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    if Path("/proc/self/task").is_dir():
        left = {rank: (tmp_path / f"threads_left.{rank}").read_text() for rank in (0, 1)}
        assert left == {0: "", 1: ""}, f"gloo threads alive after the trace returned: {left}"
    report = json.loads(two.stdout)  # rank 0 alone prints
    assert report["run"]["world_size"] == 2 and report["run"]["traced_batches"] == report["shards"] > 2
    a, b = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert list(a) == list(b)
    for name in a:
        assert a[name].equals(b[name]), name
    ma, mb = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in ("one", "two"))
    assert ma["fingerprint"] == mb["fingerprint"] and ma["shards"] == mb["shards"]
    pd.testing.assert_frame_equal(trace.TraceDataset(tmp_path / "one").to_pandas(),
                                  trace.TraceDataset(tmp_path / "two").to_pandas(), check_exact=True)


def test_expert_budget_changes_nothing(tiny_omni, corpus, tmp_path):
    from omnilab.model.decoder import SelectiveMoE

    run_trace(tiny_omni, corpus, tmp_path / "all")
    model = SelectiveMoE.from_checkpoint(tiny_omni, expert_budget=3 * SelectiveMoE.from_checkpoint(
        tiny_omni).cache.store.expert_bytes)
    run_trace(tiny_omni, corpus, tmp_path / "budget", model=model)
    assert model.cache.stats.peak_resident_bytes <= model.cache.budget_bytes
    assert model.cache.stats.evictions > 0
    a, b = _shards(tmp_path / "all"), _shards(tmp_path / "budget")
    assert list(a) == list(b) and all(a[n].equals(b[n]) for n in a)


def test_writer_threads_change_nothing(tiny_omni, corpus, tmp_path):
    """One writer thread or three: the same shards, byte for byte in content (batches run the most tokens first,
    in any order, each to its own shard); a writer count below one is refused."""
    run_trace(tiny_omni, corpus, tmp_path / "one", writers=1)
    run_trace(tiny_omni, corpus, tmp_path / "three", writers=3)
    a, b = _shards(tmp_path / "one"), _shards(tmp_path / "three")
    assert len(a) > 1 and list(a) == list(b) and all(a[n].equals(b[n]) for n in a)
    with pytest.raises(ValueError, match="writers must be >= 1"):
        run_trace(tiny_omni, corpus, tmp_path / "none", writers=0)


# ------------------------------------------------------------------------------------------------ resume and errors


def test_resume_skips_finished_batches_and_refuses_another_plan(tiny_omni, corpus, tmp_path):
    out = tmp_path / "t"
    first = run_trace(tiny_omni, corpus, out)
    before = _shards(out)
    # a run killed mid-way: one shard never renamed, another never written, no manifest
    (out / "manifest.json").unlink()
    victim = sorted(before)[1]
    (out / "shards" / victim).rename(temp_path(out / "shards" / victim))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        trace.TraceDataset(out)
    again = run_trace(tiny_omni, corpus, out)
    assert again.traced_batches == 1 and again.batches == first.batches
    assert again.traced_tokens == pq.read_metadata(out / "shards" / victim).num_rows // (3 * 2)
    after = _shards(out)
    assert list(after) == list(before) and all(after[n].equals(before[n]) for n in before)
    assert not list((out / "shards").glob(f"*{TEMP_TAG}*"))
    assert run_trace(tiny_omni, corpus, out).traced_batches == 0  # finished: nothing to do
    with pytest.raises(ValueError, match="another corpus or settings .*max_tokens"):
        run_trace(tiny_omni, corpus, out, max_tokens=8)
    corpus.write_text(corpus.read_text().replace("The quick", "A quick"))  # within the first 12 tokens
    with pytest.raises(ValueError, match="token ids differ"):
        run_trace(tiny_omni, corpus, out)


def test_a_trace_is_resumed_only_with_its_own_glue(tiny_omni, corpus, tmp_path):
    """The prefill's glues round differently (bf16), so a trace's settings name a glue other than the torch one, and
    a resume that would take another glue (a machine without Triton, say) is refused with the reason; a torch-glue
    trace keeps the fingerprint it had before glues were recorded."""
    from omnilab.gpu.prefill import TracePrefill
    from omnilab.model.decoder import SelectiveMoE

    model = SelectiveMoE.from_checkpoint(tiny_omni, dtype=torch.float32)
    plain = run_trace(tiny_omni, corpus, tmp_path / "plain", model=model, prefill="grouped_mm")
    assert "prefill_glue" not in json.loads((tmp_path / "plain" / "plan.json").read_text())["settings"]
    assert plain.prefill == "grouped_mm"
    recorder = TracePrefill(model)
    recorder.glue = "triton"  # as a CUDA machine's would be named (this CPU computes with the torch glue)
    out = tmp_path / "t"
    run_trace(tiny_omni, corpus, out, model=model, prefill=recorder)
    assert json.loads((out / "plan.json").read_text())["settings"]["prefill_glue"] == "triton"
    (out / "manifest.json").unlink()
    (out / "shards" / sorted(p.name for p in (out / "shards").iterdir())[0]).unlink()  # an unfinished run
    with pytest.raises(ValueError, match=r"changed: prefill_glue; its shards were computed with other kernels "
                                         r"around the grouped GEMMs \(glue triton, this run torch\)"):
        run_trace(tiny_omni, corpus, out, model=model, prefill="grouped_mm")
    assert run_trace(tiny_omni, corpus, out, model=model, prefill=recorder).traced_batches == 1


def test_auto_batch_tokens_resumes_with_the_folders_own(tiny_omni, corpus, tmp_path):
    """--batch-tokens auto takes the batch size of the trace the folder already holds (a resume, on any machine,
    keeps its plan); a number that differs from it is refused."""
    out = tmp_path / "t"
    first = run_trace(tiny_omni, corpus, out, batch_tokens=24)
    assert first.batches > 2
    (out / "manifest.json").unlink()
    shards = sorted((out / "shards").iterdir())
    for shard in shards[:2]:
        shard.unlink()  # an unfinished run
    again = run_trace(tiny_omni, corpus, out, batch_tokens="auto")
    assert (again.batches, again.traced_batches) == (first.batches, 2)
    assert json.loads((out / "plan.json").read_text())["settings"]["batch_tokens"] == 24
    assert again.batch_tokens == 24 and "shards of at most 24 padded tokens" in again.summary()
    with pytest.raises(ValueError, match="changed: batch_tokens"):
        run_trace(tiny_omni, corpus, out, batch_tokens=40)
    with pytest.raises(ValueError, match="--batch-tokens must be a positive number of tokens or auto"):
        run_trace(tiny_omni, corpus, tmp_path / "u", batch_tokens="big")


def test_auto_batch_tokens_off_cuda_and_the_activation_estimate(tiny_omni):
    """--batch-tokens auto: 4096 off CUDA; the per-token activation estimate at the real thinker's shapes in bf16 is
    within 10% of the 262 KB measured on an H100 (4.3 GB beyond the weights at 16,384 tokens), so 16,384 tokens
    need about 4.5 GB beside the resident experts."""
    from types import SimpleNamespace

    from omnilab.gpu.prefill import AUTO_BATCH_TOKENS, activation_bytes_per_token, batch_tokens_for
    from omnilab.model.decoder import SelectiveMoE
    from omnilab.testing.synth import real_shape_config

    model = SelectiveMoE.from_checkpoint(tiny_omni, dtype=torch.float32, tokenizer=False)
    assert batch_tokens_for(model) == AUTO_BATCH_TOKENS[-1] == 4096
    text = SimpleNamespace(**real_shape_config(2)["thinker_config"]["text_config"])
    per_token = activation_bytes_per_token(text, torch.bfloat16)
    assert abs(per_token / 262e3 - 1) < 0.1, per_token
    assert activation_bytes_per_token(text, torch.float32) > 1.9 * per_token - 2 * 4 * 8 * text.num_experts


def test_cli_trace_and_its_errors(tiny_omni, corpus, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["trace", str(tiny_omni), "--corpus", str(corpus), "--out", str(out), "--max-tokens", "8",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["traced_documents"] == len(DOCS) - 1 and report["domains"] == ["arith", "en", "fr", "python"]
    assert report["rows"] == report["tokens"] * 3 * 2
    assert 0 <= report["run"]["writing_tail_s"] <= report["run"]["seconds"]  # the shards' writing after the last forward
    # --batch-tokens auto (the default) on a CPU: 4096, recorded in the plan
    assert json.loads((out / "plan.json").read_text())["settings"]["batch_tokens"] == 4096
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops}\n')
    for argv, message in [
        (["--corpus", str(bad)], "bad.jsonl:2: not JSON"),
        (["--corpus", str(tmp_path / "none.jsonl")], "none.jsonl: no such file or folder (--corpus)"),
        (["--corpus", str(corpus), "--max-tokens", "0"], "--max-tokens"),
        (["--corpus", str(corpus), "--max-tokens", "9"], "holds a trace of another corpus"),
        (["--corpus", str(corpus), "--max-tokens", "8", "--batch-tokens", "24"],
         "holds a trace of another corpus or settings (changed: batch_tokens)"),
    ]:
        assert main(["trace", str(tiny_omni), "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    for value, message in [("0", "--batch-tokens must be positive, got 0"),
                           ("many", "--batch-tokens takes auto or a number of tokens, got 'many'")]:
        with pytest.raises(SystemExit) as e:  # argparse's own refusal: exit 2, the flag named
            main(["trace", str(tiny_omni), "--out", str(out), "--corpus", str(corpus), "--batch-tokens", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("terminal", [True, False])
def test_cli_trace_progress_bar_only_on_a_terminal(tiny_omni, corpus, tmp_path, capsys, monkeypatch, terminal):
    """`omnilab trace` draws tqdm's bar on stderr when stderr is a terminal, and none when it is a file or a pipe
    (a log would fill with bar redraws)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["trace", str(tiny_omni), "--corpus", str(corpus), "--out", str(tmp_path / "t"), "--max-tokens", "8"]) == 0
    err = capsys.readouterr().err
    bar = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("trace (1 process)")]
    if terminal:
        assert bar and "100%" in bar[-1] and "tok" in bar[-1], err
    else:
        assert not bar and "%|" not in err, err


# ------------------------------------------------------------------------------------------------ lazy statistics


def test_statistics_from_parquet_equal_in_memory(tiny_omni, corpus, tmp_path):
    run_trace(tiny_omni, corpus, tmp_path / "t", max_tokens=16, batch_tokens=48)
    lazy = trace.TraceDataset(tmp_path / "t")
    mem = lazy.to_pandas()
    eq = lambda a, b: pd.testing.assert_frame_equal(a, b, check_exact=True)  # noqa: E731
    eq(routing.expert_load(lazy), routing.expert_load(mem))
    eq(routing.domain_expert(lazy), routing.domain_expert(mem))
    eq(routing.domain_expert(lazy, 1), routing.domain_expert(mem, 1))
    eq(routing.domain_lift(lazy, 2), routing.domain_lift(mem, 2))
    eq(routing.specialization(lazy, shuffles=3), routing.specialization(mem, shuffles=3))
    eq(routing.token_specialization(lazy, min_count=2), routing.token_specialization(mem, min_count=2))
    eq(routing.token_specialization(lazy, by="domain", min_count=2),
       routing.token_specialization(mem, by="domain", min_count=2))
    eq(routing.coactivation(lazy, 0), routing.coactivation(mem, 0))
    eq(routing.top_coactivated(lazy, min_tokens=2), routing.top_coactivated(mem, min_tokens=2))
    eq(routing.same_expert_rate(lazy), routing.same_expert_rate(mem))
    eq(routing.entropy_table(lazy), routing.entropy_table(mem))
    np.testing.assert_array_equal(cache_sim.request_sequence(lazy), cache_sim.request_sequence(mem))
    np.testing.assert_array_equal(cache_sim.request_sequence(lazy, 1), cache_sim.request_sequence(mem, 1))
    eq(cache_sim.hit_rate_curve(lazy, sizes=[4, 12]), cache_sim.hit_rate_curve(mem, sizes=[4, 12]))
    assert routing.layers_of(lazy) == routing.layers_of(mem) == [0, 1, 2]
    # one layer's read touches only that layer's row groups
    one = lazy.read(layer=1, columns=["doc", "expert"])
    assert list(one.columns) == ["doc", "expert"] and len(one) == len(mem[mem["layer"] == 1])
    meta = pq.read_metadata(lazy.files[0])
    assert meta.num_row_groups == 3
    assert [meta.row_group(g).column(4).statistics.min for g in range(3)] == [0, 1, 2]
