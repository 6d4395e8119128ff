"""Modality routing, its analysis (notebook 06): which experts each modality uses, on the trace that
omnilab.experiments.modality.prompts.run_prompts records (`expert_modality_table`, `single_modality_experts`,
`modality_overlap`, each against modality labels shuffled between segments), and the causal test: the experts most
specific to a modality masked out of the router (`specific_experts`, `masking_experiment`; random masks of the same
size as the control), with `summarize`'s headline numbers.

Follows omnilab.experiments.routing's statistics (the domain being the modality) and omnilab.experiments.sweeps'
settings (omnilab.model.faults.RouterMask per layer); docs/DESIGN.md's "Modality routing" says why.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from omnilab.experiments import routing
from omnilab.experiments.modality.prompts import MODALITIES, FormPrompt, run_prompts


def _num_experts(trace) -> int:
    return int(trace.attrs["num_experts"]) if "num_experts" in trace.attrs else int(trace["expert"].max()) + 1


def _modalities(trace) -> list[str]:
    present = set(trace["domain"].astype(str))
    return [m for m in MODALITIES if m in present] + sorted(present - set(MODALITIES))


def _shuffled(trace: pd.DataFrame, rng) -> pd.DataFrame:
    """The trace with its segments' modality labels permuted between segments (attrs kept)."""
    docs = trace.drop_duplicates("doc")[["doc", "domain"]]
    labels = docs["domain"].to_numpy()[rng.permutation(len(docs))]
    out = trace.copy()
    out["domain"] = pd.Categorical(pd.Series(labels, index=docs["doc"].to_numpy()).loc[trace["doc"]].to_numpy(),
                                   categories=trace["domain"].cat.categories)
    out.attrs.update(trace.attrs)
    return out


def _subset(trace: pd.DataFrame, modality: str) -> pd.DataFrame:
    out = trace[trace["domain"] == modality]
    out.attrs.update(trace.attrs)
    return out


def expert_modality_table(trace: pd.DataFrame) -> pd.DataFrame:
    """(layer, expert) rows: load_<m> = P(expert | modality m) (the share of m's assignments at that layer),
    share_<m> = load_<m> / sum over modalities of load (each modality weighted alike, whatever its token count),
    assignments (all modalities), dominant (the modality of the largest share) and dominant_share."""
    mods = _modalities(trace)
    table = routing.domain_expert(trace)  # (layer, modality) x expert: P(expert | modality)
    load = table.stack().unstack(level=1).reindex(columns=mods).fillna(0.0)  # (layer, expert) x modality
    load.index = load.index.set_names(["layer", "expert"])
    total = load.sum(axis=1)
    share = load.div(total.where(total > 0), axis=0).fillna(0.0)
    out = pd.concat({**{f"load_{m}": load[m] for m in mods}, **{f"share_{m}": share[m] for m in mods}}, axis=1)
    counts = trace.groupby(["layer", "expert"]).size()
    out["assignments"] = counts.reindex(out.index, fill_value=0).to_numpy()
    out["dominant"] = share.idxmax(axis=1).where(total > 0, "")
    out["dominant_share"] = share.max(axis=1)
    return out


def _single_counts(table: pd.DataFrame, mods, threshold: float, min_load: float) -> pd.DataFrame:
    served = table[[f"load_{m}" for m in mods]].max(axis=1) >= min_load  # the expert carries some real load
    rows = {}
    for m in mods:
        rows[m] = ((table[f"share_{m}"] >= threshold) & served).groupby(level="layer").sum()
    return pd.DataFrame(rows)


def single_modality_experts(trace: pd.DataFrame, *, threshold: float = 0.9, min_load: float | None = None,
                            shuffles: int = 8, seed: int = 0) -> pd.DataFrame:
    """Per layer, the experts serving one modality: at least `threshold` of their modality-balanced use
    (share_<m> of expert_modality_table) from modality m, among experts with P(expert | some modality) >=
    `min_load` (default 1 / (4 E): a quarter of a uniform router's share). Columns <m>: the
    count, baseline_<m>: its mean over `shuffles` shufflings of the segments' modality labels."""
    E = _num_experts(trace)
    min_load = 1.0 / (4 * E) if min_load is None else min_load
    mods = _modalities(trace)
    observed = _single_counts(expert_modality_table(trace), mods, threshold, min_load)
    rng = np.random.default_rng(seed)
    base = [_single_counts(expert_modality_table(_shuffled(trace, rng)), mods, threshold, min_load)
            for _ in range(shuffles)]
    out = observed.copy()
    for m in mods:
        out[f"baseline_{m}"] = np.mean([b[m].to_numpy() for b in base], axis=0) if base else np.nan
    out["experts"] = E
    return out


def _overlaps(trace: pd.DataFrame, mods, layers) -> dict:
    """{(layer, a, b): (Bhattacharyya coefficient of the loads, correlation of the co-activation matrices)}."""
    table = routing.domain_expert(trace)
    out = {}
    subs = {m: _subset(trace, m) for m in mods}
    for layer in layers:
        co = {m: routing.coactivation(subs[m], layer).to_numpy() for m in mods}
        for i, a in enumerate(mods):
            for b in mods[i + 1:]:
                pa, pb = table.loc[(layer, a)].to_numpy(), table.loc[(layer, b)].to_numpy()
                bc = float(np.sqrt(pa * pb).sum())
                used = (pa > 0) & (pb > 0)  # rows (expert a of the pair) used by both modalities
                x, y = co[a][used][:, used].reshape(-1), co[b][used][:, used].reshape(-1)
                r = float(np.corrcoef(x, y)[0, 1]) if x.size > 2 and x.std() > 0 and y.std() > 0 else np.nan
                out[layer, a, b] = (bc, r)
    return out


def modality_overlap(trace: pd.DataFrame, *, shuffles: int = 4, seed: int = 0) -> pd.DataFrame:
    """Per layer and modality pair (rows: layer, pair "a-b"): load_overlap = sum_e sqrt(P(e | a) P(e | b))
    (Bhattacharyya coefficient: 1 for the same expert load, 0 for disjoint experts) and coactivation_corr =
    the correlation between the two modalities' P(b | a) co-activation matrices over the experts both use;
    baseline_* = the same with the segments' modality labels shuffled (what sampling alone gives)."""
    mods = _modalities(trace)
    layers = routing.layers_of(trace)
    observed = _overlaps(trace, mods, layers)
    rng = np.random.default_rng(seed)
    base = [_overlaps(_shuffled(trace, rng), mods, layers) for _ in range(shuffles)]
    rows = []
    for (layer, a, b), (bc, r) in observed.items():
        rows.append(dict(layer=layer, pair=f"{a}-{b}", load_overlap=bc,
                         baseline_load_overlap=float(np.mean([s[layer, a, b][0] for s in base])) if base else np.nan,
                         coactivation_corr=r,
                         baseline_coactivation_corr=float(np.nanmean([s[layer, a, b][1] for s in base]))
                         if base and not all(np.isnan(s[layer, a, b][1]) for s in base) else np.nan))
    return pd.DataFrame(rows).set_index(["layer", "pair"])


def specific_experts(table: pd.DataFrame, modality: str, n: int) -> dict[int, list[int]]:
    """Per layer, the `n` experts most specific to `modality`: the largest load_<modality> - max over the other
    modalities of load_<m> (P(expert | modality) in excess of any other modality's), ties by expert number."""
    mods = [c.removeprefix("load_") for c in table.columns if c.startswith("load_")]
    if modality not in mods:
        raise ValueError(f"modality {modality!r} is not in the trace (it has {mods})")
    others = [f"load_{m}" for m in mods if m != modality]
    score = table[f"load_{modality}"] - (table[others].max(axis=1) if others else 0.0)
    out = {}
    for layer, s in score.groupby(level="layer"):
        s = s.droplevel("layer")
        order = sorted(s.index, key=lambda e: (-s[e], e))
        out[int(layer)] = [int(e) for e in order[:n]]
    return out


def random_experts(layers, num_experts: int, n: int, seed: int = 0) -> dict[int, list[int]]:
    """Per layer, `n` distinct experts drawn at random (the control mask)."""
    rng = np.random.default_rng(seed)
    return {int(layer): sorted(int(e) for e in rng.choice(num_experts, size=n, replace=False)) for layer in layers}


def mask_setting(name: str, masked: dict[int, list[int]], num_experts: int, budget_share: float | None = None):
    """An omnilab.experiments.sweeps.Setting whose routers never pick the `masked` experts of each layer (one
    omnilab.model.faults.RouterMask per layer, keeping the others). budget_share: the expert cache's budget as a
    share of all expert bytes (None: every expert may stay resident)."""
    from omnilab.model.faults import RouterMask
    from omnilab.experiments.sweeps import Setting

    faults = tuple(RouterMask(tuple(e for e in range(num_experts) if e not in set(experts)), layer=int(layer))
                   for layer, experts in masked.items())
    return Setting(name, "mask", value=float(np.mean([len(v) for v in masked.values()])), faults=faults,
                   budget_share=budget_share)


def masked_share(table: pd.DataFrame, masked: dict[int, list[int]]) -> dict[str, float]:
    """Per modality, the share of its routing assignments (in the unmasked model, averaged over layers) that
    went to the masked experts."""
    mods = [c.removeprefix("load_") for c in table.columns if c.startswith("load_")]
    picked = pd.MultiIndex.from_tuples([(layer, e) for layer, es in masked.items() for e in es],
                                       names=["layer", "expert"])
    sub = table.reindex(picked).fillna(0.0)
    return {m: float(sub[f"load_{m}"].groupby(level="layer").sum().mean()) for m in mods}


def text_documents(model, path, *, per_domain: int = 2, max_tokens: int = 64, seed: int = 0):
    """Held-out text documents (a domain-labelled JSONL, routing.load_documents): the first `max_tokens`
    tokens of `per_domain` documents per domain, as an omnilab.experiments.sweeps.EvalSet (docs only) for text_nll."""
    from omnilab.experiments.eval_data import EvalSet

    docs = routing.load_documents(path, per_domain=per_domain, seed=seed)
    encoded = [(d, model.tokenizer(t)["input_ids"][:max_tokens]) for d, t in zip(docs["domain"], docs["text"])]
    return EvalSet(docs=[(d, ids) for d, ids in encoded if len(ids) > 1], prompts=[])


@torch.no_grad()
def text_nll(model, evalset, batch_size: int = 16, routing=None) -> tuple[float, int, list[torch.Tensor]]:
    """(mean next-token NLL in nats over every position of the text documents, positions, log-probabilities
    [T, V] per document) of omnilab.experiments.sweeps.EvalSet docs, `batch_size` documents per left-padded forward pass."""
    logprobs, total, n = [], 0.0, 0
    docs = [ids for _, ids in evalset.docs]
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        T = max(len(ids) for ids in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)  # [B, T], left-padded with token 0
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, d in enumerate(chunk):
            ids[b, T - len(d):] = torch.tensor(d)
            mask[b, T - len(d):] = 1
        out = F.log_softmax(model(ids.to(model.device), mask.to(model.device), routing=routing).float(),
                            dim=-1).cpu()  # [B, T, V]
        for b, d in enumerate(chunk):
            lp = out[b, T - len(d):]  # [len, V]
            logprobs.append(lp)
            total += float(-lp[:-1].gather(1, torch.tensor(d[1:])[:, None]).sum())
            n += len(d) - 1
    return total / max(1, n), n, logprobs


def masking_experiment(model, prompts: list[FormPrompt], evalset, masks: dict[str, dict[int, list[int]]], *,
                       table: pd.DataFrame | None = None, control: str | None = "random",
                       progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The unmodified model ("full") and each mask (name -> {layer: experts}) on every prompt and on the text
    documents of `evalset` (omnilab.experiments.sweeps.EvalSet). Returns (summary, scores): summary one row per (setting,
    form) with answer_nll, token_accuracy, exact (means over the form's prompts), their change from "full"
    (d_answer_nll ...), text_ppl and text_kl (next-token KL from the full model on the documents, nats), the
    share of the form's routing the mask removed (masked_share, from `table`) and, when `control` names one of
    the masks (a random one), excess_answer_nll = d_answer_nll minus the control's for the same form (what the
    mask costs beyond removing as many experts at random); scores one row per prompt and setting."""
    from tqdm.auto import tqdm

    from omnilab.experiments.sweeps import applied

    E = model.config.num_experts
    store = model.cache.store
    # the masked runs keep the model's expert budget (sweeps.applied gives each setting a fresh cache)
    budget = None if model.cache.budget_bytes >= store.total_bytes else model.cache.budget_bytes / store.total_bytes
    settings = {"full": None, **masks}
    summaries, all_scores, reference = [], [], None
    for name, masked in tqdm(list(settings.items()), desc="masks", disable=not progress):
        setting = mask_setting(name, masked, E, budget) if masked is not None else None
        if setting is None:
            scores, _ = run_prompts(model, prompts, record=False)
            nll, _, logprobs = text_nll(model, evalset)
        else:
            with applied(model, setting) as routing:
                scores, _ = run_prompts(model, prompts, record=False, routing=routing)
                nll, _, logprobs = text_nll(model, evalset, routing=routing)
        reference = logprobs if reference is None else reference
        kl = sum(float((r.exp() * (r - lp)).sum()) for r, lp in zip(reference, logprobs)) / sum(r.shape[0] for r in reference)
        scores.insert(0, "setting", name)
        all_scores.append(scores)
        share = masked_share(table, masked) if (table is not None and masked is not None) else {}
        for form, s in scores.groupby("form", sort=False):
            summaries.append(dict(setting=name, form=form, answer_nll=float(s["answer_nll"].mean()),
                                  token_accuracy=float(s["token_accuracy"].mean()), exact=float(s["exact"].mean()),
                                  text_ppl=math.exp(nll), text_kl=kl, masked_share=share.get(form, 0.0)))
    summary = pd.DataFrame(summaries)
    full = summary[summary["setting"] == "full"].set_index("form")
    for col in ("answer_nll", "token_accuracy", "exact"):
        summary[f"d_{col}"] = summary[col] - summary["form"].map(full[col])
    summary["text_ppl_ratio"] = summary["text_ppl"] / float(full["text_ppl"].iloc[0])
    if control is not None and control in masks:
        base = summary[summary["setting"] == control].set_index("form")["d_answer_nll"]
        summary["excess_answer_nll"] = summary["d_answer_nll"] - summary["form"].map(base)
    return summary, pd.concat(all_scores, ignore_index=True)


def summarize(spec: pd.DataFrame, single: pd.DataFrame, overlap: pd.DataFrame, summary: pd.DataFrame,
              scores: pd.DataFrame, trace: pd.DataFrame) -> dict:
    """Headline numbers for metrics.json from routing.specialization (on the modality trace),
    single_modality_experts, modality_overlap and masking_experiment."""
    mods = _modalities(trace)
    first = trace[(trace["layer"] == routing.layers_of(trace)[0]) & (trace["rank"] == 0)]
    out = {
        "segments": int(trace["doc"].nunique()),
        "mi_bits_mean": float(spec["mi_bits"].mean()),
        "mi_baseline_bits_mean": float(spec["baseline_mean"].mean()),
        "mi_share_mean": float(spec["mi_share"].mean()),
        "mi_layers_above_baseline": int((spec["mi_bits"] > spec["baseline_mean"] + 3 * spec["baseline_std"]).sum()),
        "mi_bits_max_layer": int(spec["mi_bits"].idxmax()),
    }
    for m in mods:
        out[f"tokens_{m}"] = int((first["domain"] == m).sum())
        out[f"single_modality_experts_{m}"] = int(single[m].sum())
        out[f"single_modality_experts_{m}_baseline"] = float(single[f"baseline_{m}"].sum())
    for pair, s in overlap.groupby(level="pair"):
        key = pair.replace("-", "_")
        out[f"load_overlap_{key}_mean"] = float(s["load_overlap"].mean())
        out[f"load_overlap_{key}_baseline_mean"] = float(s["baseline_load_overlap"].mean())
    full = scores[scores["setting"] == "full"]
    for form, s in full.groupby("form"):
        out[f"full_{form}_answer_nll"] = float(s["answer_nll"].mean())
        out[f"full_{form}_exact"] = float(s["exact"].mean())
    out["full_text_ppl"] = float(summary.loc[summary["setting"] == "full", "text_ppl"].iloc[0])
    for row in summary[summary["setting"] != "full"].itertuples():
        key = row.setting.replace("-", "_").replace(" ", "_")
        out[f"{key}_d_{row.form}_answer_nll"] = float(row.d_answer_nll)
        if "excess_answer_nll" in summary and row.setting != "random":
            out[f"{key}_excess_{row.form}_answer_nll"] = float(row.excess_answer_nll)
        out[f"{key}_{row.form}_masked_share"] = float(row.masked_share)
    for name, s in summary[summary["setting"] != "full"].groupby("setting", sort=False):
        key = name.replace("-", "_").replace(" ", "_")
        out[f"{key}_text_ppl_ratio"] = float(s["text_ppl_ratio"].iloc[0])
        out[f"{key}_text_kl"] = float(s["text_kl"].iloc[0])
    return out
