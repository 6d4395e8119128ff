"""omnilab.experiments.modality: the multimodal evaluation manifest, prompts in three forms through the selective thinker,
teacher-forced answers (checked against greedy decoding), the modality trace, its statistics on a trace whose
answer is known, the masking experiment, and the notebook 06 figures (labelled axes, as tests/test_plots.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_plots import assert_labelled

from omnilab.experiments import modality as md
from omnilab.model import multimodal as mm
from omnilab import plots
from omnilab.experiments import routing
from omnilab.trace import record as routing_trace
from omnilab.testing import synth
from omnilab.model.hooks import capture
from omnilab.model.decoder import SelectiveMoE
from omnilab.experiments.sweeps import applied

REPO = Path(__file__).resolve().parent.parent
EVAL_DIR = REPO / "data/eval/multimodal"


# -- the manifest ----------------------------------------------------------------------------------------------


def test_the_committed_evaluation_set_loads():
    items = md.load_manifest(EVAL_DIR)
    kinds = pd.Series([i.kind for i in items]).value_counts()
    assert set(kinds.index) == {"sum", "sentence"} and len(items) == kinds.sum()
    assert all(i.wav.is_file() and i.png.is_file() for i in items)
    assert all(i.answer.isdigit() for i in items if i.kind == "sum")
    two = md.load_manifest(EVAL_DIR, per_kind=2)
    assert [i.kind for i in two].count("sum") == 2 and [i.kind for i in two].count("sentence") == 2
    with pytest.raises(ValueError, match=r"manifest.jsonl: no rows of split 'nope'"):
        md.load_manifest(EVAL_DIR, split="nope")


def _write_manifest(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / md.MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mm-eval")
    (folder / "speech").mkdir()
    (folder / "image").mkdir()
    rows = []
    for n, (kind, text, answer) in enumerate([("sum", "12 + 30", "42"), ("sum", "7 + 8", "15"),
                                               ("sentence", "The quick brown fox", None)]):
        for voice in ("a", "b"):  # two voices: the text and image forms are shared, speech is not
            row = {"id": f"{kind}{n}{voice}", "kind": kind, "text": text, "voice": voice, "speed": 150,
                   "wav": f"speech/{n}{voice}.wav", "png": f"image/{n}.png", "split": "heldout"}
            if answer is not None:
                row["answer"] = answer
            mm.synth_wav(folder / row["wav"], 0.3 + 0.1 * n, freq=300 + 50 * n + (voice == "b") * 20, seed=n)
            mm.synth_png(folder / row["png"], 20, 16, seed=n)
            rows.append(row)
    return _write_manifest(folder, rows)


def test_manifest_errors_name_file_line_and_problem(tmp_path, media):
    with pytest.raises(FileNotFoundError, match=r"nowhere/manifest.jsonl: no such manifest"):
        md.load_manifest(tmp_path / "nowhere")
    good = json.loads((media / md.MANIFEST).read_text().splitlines()[0])
    cases = [("not json", r":2: not JSON"),
             ({k: v for k, v in good.items() if k != "answer"}, r":2: row has no 'answer'"),
             ({k: v for k, v in good.items() if k != "png"}, r":2: row has no 'png'"),
             ({**good, "kind": "poem"}, r":2: kind 'poem' is not one of"),
             ({**good, "wav": "speech/missing.wav"}, r":2: wav 'speech/missing.wav'.*does not exist")]
    for i, (bad, message) in enumerate(cases):
        folder = tmp_path / f"bad{i}"
        for sub in ("speech", "image"):
            (folder / sub).mkdir(parents=True)
        for key in ("wav", "png"):
            (folder / good[key]).write_bytes((media / good[key]).read_bytes())
        (folder / md.MANIFEST).write_text(json.dumps(good) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            md.load_manifest(folder)


# -- prompts and answers through a tiny model that hears and sees ------------------------------------------------


class Tiny:
    def __init__(self, path: Path, media: Path):
        self.model = SelectiveMoE.from_checkpoint(path)
        self.towers, self.processor = mm.open_multimodal(self.model)
        self.items = md.load_manifest(media)
        self.prompts = md.build_prompts(self.model, self.towers, self.processor, self.items)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, media):
    return Tiny(synth.tiny_qwen3_omni_multimodal(tmp_path_factory.mktemp("mm-model") / "ckpt"), media)


def test_prompts_share_text_and_image_forms_between_voices(tiny):
    forms = pd.Series([fp.form for fp in tiny.prompts]).value_counts()
    assert forms.to_dict() == {"audio": 6, "text": 3, "image": 3}
    cfg = tiny.towers.config
    for fp in tiny.prompts:
        ids = fp.prompt.input_ids[0]
        assert fp.prompt.inputs_embeds.shape[1] == ids.numel() == fp.answer_start + len(fp.answer_ids)
        assert ids[fp.answer_start:].tolist() == fp.answer_ids
        if fp.form == "audio":
            assert torch.equal(fp.content, ids == cfg.audio_token_id) and fp.content.any()
        elif fp.form == "image":
            assert torch.equal(fp.content, ids == cfg.image_token_id) and fp.prompt.deepstack is not None
        else:  # text tokens only, never a special token
            assert fp.content.any() and not torch.isin(ids[fp.content], torch.tensor(tiny.processor.tokenizer.all_special_ids)).any()
        if fp.item.kind == "sentence" and fp.form == "text":
            assert not fp.content[:fp.answer_start].any()  # a sentence as text: its routing is its own tokens'


@pytest.mark.parametrize("form", ["audio", "image", "text"])
def test_teacher_forced_exact_answers_are_greedy_answers(tiny, form):
    """Appending tokens with `extend` positions them as multimodal.generate decodes them: the greedy tokens,
    scored teacher-forced, are exact with every token the argmax; one wrong token is not."""
    item = tiny.items[0]
    base = md.form_prompt(tiny.model, tiny.towers, tiny.processor, item, form)
    prompt_only = mm.MultimodalPrompt(base.prompt.input_ids[:, :base.answer_start],
                                      base.prompt.attention_mask[:, :base.answer_start],
                                      base.prompt.inputs_embeds[:, :base.answer_start],
                                      base.prompt.position_ids[:, :, :base.answer_start], base.prompt.rope_deltas,
                                      None if base.prompt.deepstack is None else
                                      (base.prompt.deepstack[0][:, :base.answer_start], base.prompt.deepstack[1]), {})
    greedy = mm.generate(tiny.model, prompt_only, 4, vocab_limit=None).new_token_ids[0]
    wrong = greedy[:-1] + [(greedy[-1] + 1) % tiny.model.config.vocab_size]
    cases = [md.FormPrompt(item, form, md.extend(tiny.model, prompt_only, answer),
                           torch.zeros(base.answer_start + len(answer), dtype=torch.bool), base.answer_start, answer)
             for answer in (greedy, wrong)]
    scores, _ = md.run_prompts(tiny.model, cases, record=False)
    assert scores["exact"].tolist() == [True, False]
    assert scores["token_accuracy"].tolist() == [1.0, 0.75]
    assert scores["answer_nll"].iloc[1] > scores["answer_nll"].iloc[0]


def test_batches_score_and_route_as_single_prompts(tiny):
    one, trace_one = md.run_prompts(tiny.model, tiny.prompts, batch_size=1)
    many, trace_many = md.run_prompts(tiny.model, tiny.prompts, batch_size=5)
    assert one[["id", "form", "exact"]].equals(many[["id", "form", "exact"]])
    np.testing.assert_allclose(one["answer_nll"], many["answer_nll"], rtol=1e-5, atol=1e-6)
    assert trace_one[["doc", "domain", "layer", "position", "rank", "expert"]].equals(
        trace_many[["doc", "domain", "layer", "position", "rank", "expert"]])
    # one row per content position, layer and rank; the domain is the form
    L, k = len(tiny.model.config.moe_layers), tiny.model.config.num_experts_per_tok
    for doc, fp in enumerate(tiny.prompts):
        rows = trace_one[trace_one["doc"] == doc]
        assert len(rows) == int(fp.content.sum()) * L * k and set(rows["domain"]) == {fp.form}
    assert list(trace_one["domain"].cat.categories) == ["text", "audio", "image"]


def test_a_mask_keeps_its_experts_out_of_every_router(tiny):
    E = tiny.model.config.num_experts
    masked = {layer: [0, 5] for layer in tiny.model.config.moe_layers}
    names = [f"blocks.{i}.mlp.hook_topk_indices" for i in tiny.model.config.moe_layers]
    batch, _ = md.collate(tiny.model, tiny.prompts)
    with applied(tiny.model, md.mask_setting("m", masked, E)) as routing, capture(tiny.model, names) as acts:
        mm.forward(tiny.model, batch, routing=routing)
    assert all(not torch.isin(acts[n], torch.tensor([0, 5])).any() for n in names)
    assert tiny.model.faults == () and tiny.model.routing.is_plain
    with capture(tiny.model, names) as acts:
        mm.forward(tiny.model, batch)
    assert any(torch.isin(acts[n], torch.tensor([0, 5])).any() for n in names)  # restored: they are picked again


def test_masking_experiment_against_the_full_model(tiny):
    _, trace = md.run_prompts(tiny.model, tiny.prompts)
    table = md.expert_modality_table(trace)
    docs = md.text_documents(tiny.model, REPO / "data/eval/eval.jsonl", per_domain=1, max_tokens=12)
    masks = {"audio-specific": md.specific_experts(table, "audio", 2),
             "random": md.random_experts(tiny.model.config.moe_layers, tiny.model.config.num_experts, 2)}
    summary, scores = md.masking_experiment(tiny.model, tiny.prompts, docs, masks, table=table)
    assert len(summary) == 3 * 3 and len(scores) == 3 * len(tiny.prompts)
    full = summary[summary["setting"] == "full"]
    assert (full[["d_answer_nll", "d_exact", "text_kl", "masked_share"]] == 0).all().all()
    assert (full["text_ppl_ratio"] == 1).all()
    random = summary[summary["setting"] == "random"]
    assert (random["excess_answer_nll"].abs() < 1e-12).all()
    spec = summary.set_index(["setting", "form"])
    for form in md.MODALITIES:
        assert spec.loc[("audio-specific", form), "excess_answer_nll"] == pytest.approx(
            spec.loc[("audio-specific", form), "d_answer_nll"] - spec.loc[("random", form), "d_answer_nll"])
    masked = summary[summary["setting"] != "full"]
    assert (masked["text_kl"] > 0).all() and (masked["d_answer_nll"] != 0).any()
    audio = summary.set_index(["setting", "form"]).loc[("audio-specific", "audio")]
    assert audio["masked_share"] == pytest.approx(md.masked_share(table, masks["audio-specific"])["audio"])
    assert audio["masked_share"] > 0
    # under an expert budget the masked runs keep it (each gets a fresh cache) and compute the same numbers
    small = SelectiveMoE.from_checkpoint(tiny.model.checkpoint, expert_budget=3 * tiny.model.cache.store.expert_bytes)
    budgeted, _ = md.masking_experiment(small, tiny.prompts, docs, masks, table=table)
    pd.testing.assert_frame_equal(budgeted, summary)
    assert md.mask_setting("m", masks["random"], 8, 0.25).budget_share == 0.25
    # text_nll agrees with the unbatched next-token log-probabilities
    from omnilab.experiments.measures import next_token_logprobs

    _, n, logprobs = md.text_nll(tiny.model, docs)
    assert n == sum(len(ids) - 1 for _, ids in docs.docs)
    for ours, theirs in zip(logprobs, next_token_logprobs(tiny.model, docs)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# -- statistics on a trace with a known answer ---------------------------------------------------------------------

E, K, L = 8, 2, 2


@pytest.fixture(scope="module")
def known_trace():
    """text segments route to experts {0, 1}, audio to {2, 3}, image to two of {4, 5, 6, 7} at random."""
    rng = np.random.default_rng(0)
    parts = []
    for doc in range(18):
        modality = md.MODALITIES[doc % 3]
        n = 10 + doc
        if modality == "image":
            experts = np.array([[rng.choice([4, 5, 6, 7], K, replace=False) for _ in range(n)] for _ in range(L)])
        else:
            experts = np.tile(np.array([0, 1]) + (2 if modality == "audio" else 0), (L, n, 1))
        parts.append(routing_trace.trace_rows(doc, modality, np.zeros(n, dtype=int), experts))
    trace = routing_trace.concat_traces(parts, num_experts=E, top_k=K, num_layers=L)
    trace["domain"] = trace["domain"].cat.set_categories(list(md.MODALITIES))
    return trace


def test_statistics_find_disjoint_experts(known_trace):
    table = md.expert_modality_table(known_trace)
    assert table.loc[(0, 2), "dominant"] == "audio" and table.loc[(0, 2), "share_audio"] == 1.0
    used = table[table["assignments"] > 0]
    np.testing.assert_allclose(used[[f"share_{m}" for m in md.MODALITIES]].sum(axis=1), 1.0)
    single = md.single_modality_experts(known_trace, shuffles=4)
    assert single[["text", "audio", "image"]].to_numpy().tolist() == [[2, 2, 4]] * L
    assert (single[["baseline_text", "baseline_audio", "baseline_image"]].sum(axis=1) < 8).all()
    assert md.specific_experts(table, "audio", 2) == {0: [2, 3], 1: [2, 3]}
    assert md.specific_experts(table, "text", 1) == {0: [0], 1: [0]}
    share = md.masked_share(table, {0: [2, 3], 1: [2, 3]})
    assert share == {"text": 0.0, "audio": 1.0, "image": 0.0}
    overlap = md.modality_overlap(known_trace, shuffles=3)
    assert (overlap["load_overlap"] == 0).all()  # the modalities share no expert
    assert (overlap["baseline_load_overlap"] > 0.3).all()
    spec = routing.specialization(known_trace, shuffles=4)
    np.testing.assert_allclose(spec["mi_share"], 1.0)  # the expert tells the modality exactly
    assert (spec["baseline_mean"] < spec["mi_bits"]).all()
    with pytest.raises(ValueError, match="modality 'video' is not in the trace"):
        md.specific_experts(table, "video", 2)


def test_random_masks_are_distinct_and_seeded():
    a = md.random_experts([0, 3], 32, 4, seed=1)
    assert a == md.random_experts([0, 3], 32, 4, seed=1) and a != md.random_experts([0, 3], 32, 4, seed=2)
    assert all(len(set(v)) == 4 and all(0 <= e < 32 for e in v) for v in a.values())


# -- figures -----------------------------------------------------------------------------------------------------


def test_modality_figures_are_labelled(known_trace):
    table = md.expert_modality_table(known_trace)
    masks = {m: md.specific_experts(table, m, 2) for m in md.MODALITIES}
    assert_labelled(plots.plot_modality_load(routing.domain_expert(known_trace), masks))
    assert_labelled(plots.plot_modality_load(routing.domain_expert(known_trace)))
    spec = routing.specialization(known_trace, shuffles=2)
    assert_labelled(plots.plot_modality_specialization(spec, md.single_modality_experts(known_trace, shuffles=2)))
    assert_labelled(plots.plot_modality_overlap(md.modality_overlap(known_trace, shuffles=2)))
    rows = []
    for setting in ("full", "audio-specific", "random"):
        for i, form in enumerate(md.MODALITIES):
            full = setting == "full"
            rows.append(dict(setting=setting, form=form, d_answer_nll=0.0 if full else 0.1 * (i + 1),
                             masked_share=0.0 if full else 0.2, text_ppl_ratio=1.0 if full else 1.3))
    assert_labelled(plots.plot_modality_masking(pd.DataFrame(rows)))
    # error bars: the per-prompt change's standard error (prompt 0 of each form moves 0.2 more than prompt 1)
    scores = pd.DataFrame([dict(setting=s, form=f, id=j, answer_nll=1.0 + (0 if s == "full" else 0.1 + 0.2 * (j == 0)))
                           for s in ("full", "audio-specific", "random") for f in md.MODALITIES for j in range(2)])
    fig = plots.plot_modality_masking(pd.DataFrame(rows), scores)
    caps = [c for c in fig.axes[0].collections if c.__class__.__name__ == "LineCollection"]
    assert caps and "s.e." in fig.axes[0].get_ylabel()
    assert abs(plots._paired_sem(scores, "random", "text") - 0.1) < 1e-9
    assert_labelled(fig)
