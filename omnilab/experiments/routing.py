"""Routing traces, their statistics, and a cache simulation driven by them.

A *trace* is a long pandas DataFrame with one row per routing assignment, i.e. per
(document, position, layer, rank), in that order:

    doc       int     document number within the trace
    domain    str     the document's domain label (e.g. "en", "python")
    position  int     token position within the document (0-based)
    token_id  int     the input token at that position
    layer     int     decoder layer
    rank      int     0 = the router's first choice, ..., top_k - 1
    expert    int     expert index within the layer
    weight    float   the routing weight the selective model applied (after norm_topk_prob, if set)
    entropy   float   router entropy of this token at this layer, in bits (softmax over all experts; the
                      same on the token's top_k rows)

`trace.attrs` carries `num_experts`, `top_k` and `num_layers` (statistics take them from there, or from the
data when absent). omnilab.trace.record's `record_trace` records one with the selective model's hooks
(`blocks.{i}.mlp.hook_topk_indices`, `hook_topk_weights`, `hook_router_logits`); `trace_rows` builds one
from arrays, which is how tests make synthetic traces.

Every statistic also takes a Parquet trace (`omnilab.trace.dataset.TraceDataset`, what `omnilab trace` writes) in place
of the DataFrame, with the same results: it reads one layer's row groups at a time (and only the columns it
needs), so memory follows one layer, not the corpus. The cache simulation is the exception by nature: its
request sequence holds every assignment (8 bytes each).

The statistics follow published router analyses:
- expert load per layer, and the domain x expert distribution per layer;
- specialization by domain as mutual information I(domain; expert) in bits, against a baseline that shuffles
  the domain labels between documents (so within-document correlation stays in the baseline);
- token specialization as in OLMoE (Muennighoff et al. 2024): the share of a token id's occurrences that are
  routed (within the top-k) to that token id's most frequent expert, against shuffled token ids; the same
  measure by domain is computed for comparison;
- co-activation P(b | a): of the tokens whose top-k holds expert a, the share whose top-k also holds b;
- consecutive-token same-expert rate as in Mixtral (Jiang et al. 2024), against the rate expected by chance
  from the layer's expert loads;
- a cache simulation: the trace read as a request sequence (token by token, layers in order, each token
  requesting its top-k experts, as decoding does) replayed through LRU, LFU and Belady's optimal (MIN).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from omnilab.trace.shards import TRACE_COLUMNS  # noqa: F401  the columns above, with the Parquet schema


def load_documents(path: str | Path, *, per_domain: int | None = None, seed: int = 0,
                   text_field: str | None = None, domain_field: str = "domain") -> pd.DataFrame:
    """Read a domain-labelled JSONL eval split into a DataFrame with columns `domain`, `text` (and `id` when
    present). `per_domain` keeps that many documents per domain, drawn with a fixed seed; `text_field`
    defaults to the first of "text", "prompt" present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such eval file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    docs = pd.DataFrame(rows)
    field = text_field or next((f for f in ("text", "prompt") if f in docs.columns), None)
    if field is None or field not in docs.columns or domain_field not in docs.columns:
        raise ValueError(f"{path}: needs a text field ({text_field or 'text/prompt'}) and {domain_field!r}; "
                         f"has {list(docs.columns)}")
    docs = docs.rename(columns={field: "text", domain_field: "domain"})
    if per_domain is not None:
        rng = np.random.default_rng(seed)
        docs = docs.iloc[rng.permutation(len(docs))]
        docs = docs.groupby("domain", sort=False).head(per_domain).sort_index(kind="stable")
    keep = [c for c in ("domain", "id", "text") if c in docs.columns]
    return docs[keep].reset_index(drop=True)


def is_frame(trace) -> bool:
    """A trace in memory (DataFrame), or else a Parquet trace read lazily (omnilab.trace.dataset.TraceDataset)."""
    return isinstance(trace, pd.DataFrame)


def layer_rows(trace, layer: int, columns=None) -> pd.DataFrame:
    """The rows of one layer: a slice of an in-memory trace, or only that layer's row groups of a Parquet one."""
    if is_frame(trace):
        return trace[trace["layer"] == layer]
    return trace.read(layer=layer, columns=columns)


def trace_attr(trace: pd.DataFrame, key: str) -> int:
    if key in trace.attrs:
        return int(trace.attrs[key])
    if key == "num_experts":
        return int(trace["expert"].max()) + 1
    if key == "top_k":
        return int(trace["rank"].max()) + 1
    return int(trace["layer"].nunique())


def token_experts(trace: pd.DataFrame, layer: int) -> tuple[pd.DataFrame, np.ndarray]:
    """One layer as tokens x top_k: (the token rows: doc, domain, position, token_id; experts [T, k])."""
    k = trace_attr(trace, "top_k")
    t = layer_rows(trace, layer, ["doc", "domain", "position", "token_id", "rank", "expert"])
    t = t.sort_values(["doc", "position", "rank"], kind="stable")
    experts = t["expert"].to_numpy().reshape(-1, k)  # [T * k] -> [T, k]
    tokens = t.iloc[::k][["doc", "domain", "position", "token_id"]].reset_index(drop=True)
    return tokens, experts


def layers_of(trace: pd.DataFrame) -> list[int]:
    if not is_frame(trace):
        return sorted(trace.layers)
    return sorted(int(x) for x in trace["layer"].unique())


def expert_load(trace: pd.DataFrame) -> pd.DataFrame:
    """layers x experts: the share of the layer's assignments (token x top-k slots) that go to each expert.
    Rows sum to 1; a uniform router gives 1 / num_experts everywhere."""
    E = trace_attr(trace, "num_experts")
    if is_frame(trace):
        counts = pd.crosstab(trace["layer"], trace["expert"]).reindex(columns=range(E), fill_value=0)
    else:  # layer by layer: [layers, E] counts of the expert column
        layers = layers_of(trace)
        counts = pd.DataFrame([np.bincount(layer_rows(trace, i, ["expert"])["expert"], minlength=E) for i in layers],
                              index=pd.Index(layers, dtype=np.int32, name="layer"),  # int32, as the trace's column
                              columns=pd.Index(range(E), name="expert"))
    return counts.div(counts.sum(axis=1), axis=0).rename_axis(index="layer", columns="expert")


def domain_expert(trace: pd.DataFrame, layer: int | None = None) -> pd.DataFrame:
    """(layer, domain) x experts: P(expert | domain), the share of that domain's assignments at that layer
    going to each expert (rows sum to 1). With `layer`, just that layer's domain x experts table."""
    E = trace_attr(trace, "num_experts")

    def count(t):
        counts = t.groupby(["layer", "domain"], observed=True)["expert"].value_counts().unstack(fill_value=0)
        return counts.reindex(columns=range(E), fill_value=0)

    if is_frame(trace):
        counts = count(trace if layer is None else trace[trace["layer"] == layer])
    else:
        shown = layers_of(trace) if layer is None else [layer]
        counts = pd.concat([count(layer_rows(trace, i, ["layer", "domain", "expert"])) for i in shown])
    table = counts.div(counts.sum(axis=1), axis=0).rename_axis(columns="expert")
    return table.loc[layer] if layer is not None else table


def domain_lift(trace: pd.DataFrame, layer: int) -> pd.DataFrame:
    """domains x experts at one layer: P(expert | domain) / P(expert). 1 = the domain uses the expert as
    often as the layer does overall; 3 = three times as often."""
    load = expert_load(trace).loc[layer]
    return domain_expert(trace, layer).div(load.where(load > 0), axis=1)


def mutual_information(labels, experts) -> float:
    """I(label; expert) in bits from paired samples (the plug-in estimate from the contingency counts)."""
    a = pd.factorize(np.asarray(labels))[0]
    b = pd.factorize(np.asarray(experts))[0]
    joint = np.bincount(a * (b.max() + 1) + b, minlength=(a.max() + 1) * (b.max() + 1))
    joint = joint.reshape(a.max() + 1, b.max() + 1) / a.size  # [labels, experts]
    pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (pa @ pb)[nz])).sum())


def entropy_bits(labels) -> float:
    p = pd.Series(np.asarray(labels)).value_counts(normalize=True).to_numpy()
    return float(-(p * np.log2(p)).sum())


def conditional_mutual_information(labels, experts, given) -> float:
    """I(label; expert | given) in bits (plug-in): H(L,G) + H(E,G) - H(L,E,G) - H(G)."""
    codes = [pd.factorize(np.asarray(x))[0].astype(np.int64) for x in (labels, experts, given)]
    l, e, g = codes
    joint = lambda *cs: _entropy_codes(_combine(*cs))  # noqa: E731
    return float(joint(l, g) + joint(e, g) - joint(l, e, g) - joint(g))


def _combine(*codes):
    out = np.zeros_like(codes[0])
    for c in codes:
        out = out * (int(c.max()) + 1) + c
    return out


def _entropy_codes(codes) -> float:
    p = np.bincount(pd.factorize(codes)[0]) / len(codes)
    return float(-(p * np.log2(p)).sum())


def specialization(trace: pd.DataFrame, *, shuffles: int = 8, seed: int = 0) -> pd.DataFrame:
    """Per layer: `mi_bits` = I(domain; expert) over the layer's assignments, `baseline_mean` and
    `baseline_std` = the same with the domain labels permuted between documents (`shuffles` times),
    `domain_entropy_bits` = H(domain), the ceiling of the MI, and `mi_share` = mi_bits / H(domain).
    `cmi_bits` = I(domain; expert | token id), what the domain says about the expert beyond the token itself
    (languages and code share few tokens, so much of I(domain; expert) can come through the token), with
    `cmi_baseline_mean` from the same shuffles (the plug-in estimate is biased upwards by the many rare
    token ids; the baseline carries the same bias)."""
    rng = np.random.default_rng(seed)
    docs = trace.drop_duplicates("doc")[["doc", "domain"]] if is_frame(trace) else trace.traced_documents()
    doc_codes = pd.Index(docs["doc"])
    labels = pd.factorize(docs["domain"].astype(str))[0]
    perms = [labels[rng.permutation(labels.size)] for _ in range(shuffles)]
    rows = []
    by_layer = (trace.groupby("layer", sort=True) if is_frame(trace) else
                ((i, layer_rows(trace, i, ["doc", "expert", "token_id"])) for i in layers_of(trace)))
    for layer, t in by_layer:
        where = doc_codes.get_indexer(t["doc"])  # row -> document number in `docs`
        experts, tokens = t["expert"].to_numpy(), t["token_id"].to_numpy()
        base = [mutual_information(p[where], experts) for p in perms]
        cbase = [conditional_mutual_information(p[where], experts, tokens) for p in perms]
        h = entropy_bits(labels[where])
        mi = mutual_information(labels[where], experts)
        rows.append(dict(layer=int(layer), mi_bits=mi, baseline_mean=float(np.mean(base)) if base else np.nan,
                         baseline_std=float(np.std(base)) if base else np.nan, domain_entropy_bits=h,
                         mi_share=mi / h if h > 0 else np.nan,
                         cmi_bits=conditional_mutual_information(labels[where], experts, tokens),
                         cmi_baseline_mean=float(np.mean(cbase)) if cbase else np.nan))
    return pd.DataFrame(rows).set_index("layer")


def _top_expert_share(groups: np.ndarray, experts: np.ndarray, E: int, min_count: int) -> tuple[float, int]:
    """sum over groups (with >= min_count tokens) of max_e #(e in top-k) / sum of their token counts."""
    g = pd.factorize(groups)[0]
    n_groups = g.max() + 1
    k = experts.shape[1]
    counts = np.bincount(np.repeat(g, k) * E + experts.reshape(-1), minlength=n_groups * E).reshape(n_groups, E)
    tokens = np.bincount(g, minlength=n_groups)
    keep = tokens >= min_count
    if not keep.any():
        return np.nan, 0
    return float(counts[keep].max(axis=1).sum() / tokens[keep].sum()), int(keep.sum())


def token_specialization(trace: pd.DataFrame, *, by: str = "token_id", min_count: int = 8, seed: int = 0,
                         shuffles: int = 3) -> pd.DataFrame:
    """OLMoE's specialization per layer: for each value of `by` (token id, or "domain") with at least
    `min_count` tokens, the share of its tokens whose top-k holds its most frequent expert, averaged with
    token-count weights (`share`). `baseline` is the same with the `by` labels permuted over tokens (for
    token ids) or over documents (for domains): what the loads and the sample sizes alone give.
    `chance` = top_k / num_experts, a uniform router's value."""
    E, k = trace_attr(trace, "num_experts"), trace_attr(trace, "top_k")
    rng = np.random.default_rng(seed)
    rows = []
    for layer in layers_of(trace):
        tokens, experts = token_experts(trace, layer)
        labels = tokens[by].astype(str).to_numpy() if by == "domain" else tokens[by].to_numpy()
        share, n = _top_expert_share(labels, experts, E, min_count)
        base = []
        for _ in range(shuffles):
            if by == "domain":  # permute labels between documents
                doc_label = tokens.drop_duplicates("doc").set_index("doc")[by].astype(str)
                doc_label[:] = doc_label.to_numpy()[rng.permutation(len(doc_label))]
                shuffled = doc_label.loc[tokens["doc"]].to_numpy()
            else:
                shuffled = labels[rng.permutation(labels.size)]
            base.append(_top_expert_share(shuffled, experts, E, min_count)[0])
        rows.append(dict(layer=layer, share=share, baseline=float(np.mean(base)) if base else np.nan,
                         chance=k / E, groups=n))
    return pd.DataFrame(rows).set_index("layer")


def coactivation(trace: pd.DataFrame, layer: int) -> pd.DataFrame:
    """experts a x experts b at one layer: P(b in top-k | a in top-k), over the tokens whose top-k holds a.
    The diagonal is 0 (a with itself is not counted), so each used expert's row sums to top_k - 1."""
    E = trace_attr(trace, "num_experts")
    _, experts = token_experts(trace, layer)
    onehot = np.zeros((experts.shape[0], E))
    np.put_along_axis(onehot, experts, 1.0, axis=1)  # [T, E]: 1 where the expert is in the token's top-k
    both = onehot.T @ onehot  # [E, E]: tokens with a and b
    np.fill_diagonal(both, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = both / onehot.sum(axis=0)[:, None]
    return pd.DataFrame(np.nan_to_num(p), index=pd.RangeIndex(E, name="a"), columns=pd.RangeIndex(E, name="b"))


def top_coactivated(trace: pd.DataFrame, n: int = 10, min_tokens: int = 20) -> pd.DataFrame:
    """The `n` pairs with the highest lift = P(b | a) / P(b in top-k) over all layers (experts a and b each
    with at least `min_tokens` tokens). Lift 1 is independence."""
    rows = []
    for layer in layers_of(trace):
        _, experts = token_experts(trace, layer)
        p = coactivation(trace, layer).to_numpy()
        counts = np.bincount(experts.reshape(-1), minlength=p.shape[0])
        pb = counts / experts.shape[0]  # P(b in top-k)
        for a in np.flatnonzero(counts >= min_tokens):
            for b in np.flatnonzero((p[a] > 0) & (counts >= min_tokens)):
                rows.append((layer, int(a), int(b), p[a, b], pb[b], p[a, b] / pb[b], int(counts[a])))
    cols = ["layer", "a", "b", "p_b_given_a", "p_b", "lift", "tokens_a"]
    return pd.DataFrame(rows, columns=cols).sort_values("lift", ascending=False).head(n).reset_index(drop=True)


def same_expert_rate(trace: pd.DataFrame) -> pd.DataFrame:
    """Per layer, over consecutive token pairs (t, t + 1) of one document (Mixtral's statistic):
    `top1_rate` = share of pairs whose first-choice experts are equal, `top1_chance` = sum_e p_e^2 with p the
    layer's first-choice load; `overlap_rate` = mean |topk(t) & topk(t+1)| / k, `overlap_chance` =
    sum_e q_e^2 / k with q_e = P(e in top-k)."""
    E, k = trace_attr(trace, "num_experts"), trace_attr(trace, "top_k")
    rows = []
    for layer in layers_of(trace):
        tokens, experts = token_experts(trace, layer)
        doc, pos = tokens["doc"].to_numpy(), tokens["position"].to_numpy()
        pair = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)  # [T - 1]: t and t+1 consecutive
        onehot = np.zeros((experts.shape[0], E))
        np.put_along_axis(onehot, experts, 1.0, axis=1)
        overlap = (onehot[1:] * onehot[:-1]).sum(axis=1) / k
        p1 = np.bincount(experts[:, 0], minlength=E) / experts.shape[0]
        q = onehot.mean(axis=0)
        rows.append(dict(layer=layer, top1_rate=float((experts[1:, 0] == experts[:-1, 0])[pair].mean()),
                         top1_chance=float((p1 ** 2).sum()), overlap_rate=float(overlap[pair].mean()),
                         overlap_chance=float((q ** 2).sum() / k), pairs=int(pair.sum())))
    return pd.DataFrame(rows).set_index("layer")


def summarize(spec: pd.DataFrame, tokens: pd.DataFrame, domains: pd.DataFrame, same: pd.DataFrame,
              curve: pd.DataFrame) -> dict:
    """Headline numbers for metrics.json from the outputs of `specialization`, `token_specialization`
    (by token id and by domain), `same_expert_rate` and `hit_rate_curve`."""
    out = {
        "mi_bits_mean": float(spec["mi_bits"].mean()),
        "mi_baseline_bits_mean": float(spec["baseline_mean"].mean()),
        "mi_share_mean": float(spec["mi_share"].mean()),
        "mi_bits_max_layer": int(spec["mi_bits"].idxmax()),
        "cmi_given_token_bits_mean": float(spec["cmi_bits"].mean()),
        "cmi_given_token_baseline_bits_mean": float(spec["cmi_baseline_mean"].mean()),
        "token_specialization_mean": float(tokens["share"].mean()),
        "token_specialization_baseline_mean": float(tokens["baseline"].mean()),
        "domain_specialization_mean": float(domains["share"].mean()),
        "domain_specialization_baseline_mean": float(domains["baseline"].mean()),
        "same_expert_top1_rate_mean": float(same["top1_rate"].mean()),
        "same_expert_top1_chance_mean": float(same["top1_chance"].mean()),
        "same_expert_overlap_rate_mean": float(same["overlap_rate"].mean()),
        "same_expert_overlap_chance_mean": float(same["overlap_chance"].mean()),
    }
    for row in curve.itertuples():
        if row.share < 1.0:
            out[f"hit_rate_{row.policy}_{round(100 * row.share)}pct"] = float(row.hit_rate)
    return out


def entropy_table(trace: pd.DataFrame) -> pd.DataFrame:
    """layers x domains: mean router entropy (bits) of the tokens."""
    first = trace[trace["rank"] == 0] if is_frame(trace) else trace.read(rank=0, columns=["layer", "domain", "entropy"])
    return first.pivot_table(index="layer", columns="domain", values="entropy", aggfunc="mean", observed=True)


def load_facts(load: pd.DataFrame) -> dict:
    """From `expert_load`: the busiest (layer, expert) and its load as a multiple of the uniform share, how many
    pairs get under a quarter of it, and the least even layer (std of the relative load)."""
    rel = load * load.shape[1]  # [layers, E]: 1 = the uniform share
    stacked = rel.stack()
    spread = rel.std(axis=1)
    layer, expert = stacked.idxmax()
    return {"busiest_layer": int(layer), "busiest_expert": int(expert), "busiest_x": float(stacked.max()),
            "under_quarter": int((rel < 0.25).to_numpy().sum()), "pairs": int(rel.size),
            "least_even_layer": int(spread.idxmax()), "least_even_std": float(spread.max())}


def strongest_lift(lifts: dict) -> dict:
    """From `domain_lift` per layer: the strongest (layer, domain, expert) preference and its lift."""
    best = pd.concat({layer: t.stack() for layer, t in lifts.items()}).idxmax()
    layer, domain, expert = best
    return {"layer": int(layer), "domain": str(domain), "expert": int(expert),
            "lift": float(lifts[layer].loc[domain, expert])}


def specialization_facts(spec: pd.DataFrame, tokens: pd.DataFrame, domains: pd.DataFrame) -> dict:
    """From `specialization` and `token_specialization` (by token id, by domain): means over layers, the layers
    more than 3 std above the shuffled baseline, which of token and domain routing follows more, and the share
    of the domain signal above baseline that runs through which tokens a domain uses."""
    mi_excess = spec["mi_bits"] - spec["baseline_mean"]
    z = mi_excess / spec["baseline_std"].replace(0, np.nan)
    token_excess = float((tokens["share"] - tokens["baseline"]).mean())
    domain_excess = float((domains["share"] - domains["baseline"]).mean())
    through = 1 - (spec["cmi_bits"] - spec["cmi_baseline_mean"]).mean() / mi_excess.mean()
    return {"mi_share": float(spec["mi_share"].mean()), "domain_bits": float(spec["domain_entropy_bits"].mean()),
            "mi_bits": float(spec["mi_bits"].mean()), "mi_baseline": float(spec["baseline_mean"].mean()),
            "layers_above_3std": int((z > 3).sum()), "layers": int(len(z)),
            "token_share": float(tokens["share"].mean()), "token_baseline": float(tokens["baseline"].mean()),
            "domain_share": float(domains["share"].mean()), "domain_baseline": float(domains["baseline"].mean()),
            "token_excess": token_excess, "domain_excess": domain_excess,
            "follows": "the token more than the domain" if token_excess > domain_excess else
                       "the domain more than the token",
            "cmi_bits": float(spec["cmi_bits"].mean()), "cmi_baseline": float(spec["cmi_baseline_mean"].mean()),
            "through_tokens": float(max(0.0, through))}


def same_expert_facts(same: pd.DataFrame) -> dict:
    """From `same_expert_rate`: means over layers and the layer where neighbours agree most above chance."""
    return {"top1_rate": float(same["top1_rate"].mean()), "top1_chance": float(same["top1_chance"].mean()),
            "ratio": float(same["top1_rate"].mean() / same["top1_chance"].mean()),
            "overlap_rate": float(same["overlap_rate"].mean()), "overlap_chance": float(same["overlap_chance"].mean()),
            "strongest_layer": int((same["top1_rate"] / same["top1_chance"]).idxmax())}


def entropy_facts(ent: pd.DataFrame) -> dict:
    """From `entropy_table`: the mean, the lowest layer, the most and least decisive domains."""
    by_domain = ent.mean()
    return {"mean_bits": float(ent.to_numpy().mean()), "lowest_layer": int(ent.mean(axis=1).idxmin()),
            "most_decisive": str(by_domain.idxmin()), "most_decisive_bits": float(by_domain.min()),
            "least_decisive": str(by_domain.idxmax()), "least_decisive_bits": float(by_domain.max())}


def cache_facts(curve: pd.DataFrame, target: float = 0.9) -> dict:
    """From `hit_rate_curve`: the size nearest a quarter of the experts and each policy's hit rate there, the
    smallest size reaching `target` per policy (NaN: none does, cold misses), the smallest size and its rates;
    `wide` is the curve as sizes x policies."""
    wide = curve.pivot(index="share", columns="policy", values="hit_rate")
    quarter = float(wide.index[np.argmin(abs(wide.index - 0.25))])
    smallest = float(wide.index.min())
    return {"wide": wide, "quarter": quarter, "at_quarter": wide.loc[quarter].to_dict(),
            "need": {p: float(wide.index[wide[p] >= target].min()) for p in wide.columns},
            "smallest": smallest, "at_smallest": wide.loc[smallest].to_dict()}
