"""Figures of notebook 04 (router heatmaps): expert load, domain x expert lift, specialization, co-activation,
consecutive tokens routed alike, cache hit rates, router entropy, one layer and domain; and the per-token view,
each token of one document on its top expert's colour (`token_routing_table`, `plot_token_routing`). They draw
what omnilab.experiments.routing and cache_sim compute from a routing trace (omnilab.trace).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


# -- 04 router heatmaps --------------------------------------------------------------------------------


def plot_expert_load(load: pd.DataFrame):
    """Layers x experts heatmap of each expert's share of its layer's routing, relative to uniform
    (1 = 1 / num_experts; `load` from routing.expert_load)."""
    rel = load.to_numpy() * load.shape[1]
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.28 * load.shape[1]), 1.2 + 0.4 * load.shape[0]))
    im = ax.imshow(rel, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(np.nanmax(rel))))
    ax.set(xlabel="expert", ylabel="layer", title="Expert load (share of the layer's top-k slots, x uniform)",
           yticks=range(load.shape[0]), yticklabels=load.index)
    fig.colorbar(im, ax=ax, label="load / uniform")
    return fig


def plot_domain_expert(lifts: dict[int, pd.DataFrame], clip: float = 2.0):
    """One panel per layer: domains x experts, log2 of P(expert | domain) / P(expert) (routing.domain_lift).
    Red: the domain uses the expert more than the layer does overall; blue: less; white: as often."""
    layers = list(lifts)
    cols = min(3, len(layers))
    rows = -(-len(layers) // cols)
    first = lifts[layers[0]]
    fig, axes = plt.subplots(rows, cols, squeeze=False, sharey=True, layout="constrained",
                             figsize=(cols * max(4.0, 0.14 * first.shape[1]), rows * (1.0 + 0.3 * first.shape[0])))
    clipped = cells = 0
    for ax, layer in zip(axes.flat, layers):
        with np.errstate(divide="ignore"):
            values = np.log2(lifts[layer].to_numpy(dtype=float))
        values = np.nan_to_num(values, nan=0.0, neginf=-np.inf)
        clipped += int((np.abs(values) >= clip).sum())
        cells += values.size
        im = ax.imshow(np.clip(values, -clip, clip), aspect="auto",
                       cmap="RdBu_r", vmin=-clip, vmax=clip, interpolation="nearest")
        ax.set(title=f"layer {layer}", xlabel="expert", yticks=range(len(lifts[layer].index)),
               yticklabels=lifts[layer].index)
    for ax, _ in zip(axes[:, 0], range(rows)):
        ax.set_ylabel("domain")
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label=f"log2 P(expert | domain) / P(expert), clipped at ±{clip:g}", shrink=0.8,
                 extend="both")
    fig.suptitle("Domain x expert routing, relative to the layer's overall load\n"
                 f"colours saturate at ±{clip:g} ({2 ** clip:g}x or 1/{2 ** clip:g} of the load): {clipped} of {cells} "
                 "cells, unused experts (−∞) included", fontsize=10)
    return fig


def plot_specialization(spec: pd.DataFrame, tokens: pd.DataFrame, domains: pd.DataFrame):
    """Left: I(domain; expert) per layer against the shuffled-domain baseline, and the same given the token id
    (routing.specialization). Right: OLMoE's top-expert share by token id and by domain, each against its shuffled baseline
    (routing.token_specialization)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6))
    x = np.arange(len(spec))
    a.bar(x - 0.2, spec["mi_bits"], 0.4, label="I(domain; expert)")
    a.bar(x + 0.2, spec["baseline_mean"], 0.4, yerr=spec["baseline_std"], color="0.7", label="shuffled domains")
    if "cmi_bits" in spec:
        a.plot(x, spec["cmi_bits"], "o-", color="C3", label="I(domain; expert | token id)")
        a.plot(x, spec["cmi_baseline_mean"], "o--", color="C3", alpha=0.5, label="... shuffled domains")
    a.set(xticks=x, xticklabels=spec.index, xlabel="layer", ylabel="bits",
          title=f"Domain specialization (H(domain) = {spec['domain_entropy_bits'].mean():.2f} bits)")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    for frame, name, color in ((tokens, "token id", "C1"), (domains, "domain", "C0")):
        b.plot(frame.index, frame["share"], "o-", color=color, label=f"by {name}")
        b.plot(frame.index, frame["baseline"], "o--", color=color, alpha=0.5, label=f"by {name}, shuffled")
    b.plot(tokens.index, tokens["chance"], ":", color="0.4", label="uniform router (k / E)")
    b.set(xlabel="layer", ylabel="share routed to its top expert", ylim=(0, 1.02),
          title="Top-expert share (OLMoE's specialization)")
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def plot_coactivation(tables: dict[int, pd.DataFrame]):
    """One panel per layer: P(b in top-k | a in top-k) for experts a (rows) and b (columns)
    (routing.coactivation); the diagonal is left out."""
    layers = list(tables)
    fig, axes = plt.subplots(1, len(layers), squeeze=False, figsize=(4.2 * len(layers), 4), layout="constrained")
    vmax = max(float(t.to_numpy().max()) for t in tables.values())
    for ax, layer in zip(axes.flat, layers):
        im = ax.imshow(tables[layer].to_numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"co-activation within the top-k, layer {layer}", fontsize=10)
        ax.set(xlabel="expert b", ylabel="expert a")
    fig.colorbar(im, ax=axes, label="P(b in top-k | a in top-k), diagonal left out", shrink=0.85)
    return fig


def plot_same_expert(same: pd.DataFrame):
    """Per layer, consecutive tokens routed alike (routing.same_expert_rate): first choice equal, and top-k
    overlap, each against its chance rate from the layer's loads."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    x = np.arange(len(same))
    for i, (col, label, color) in enumerate((("top1", "same first choice", "C0"), ("overlap", "top-k overlap", "C2"))):
        ax.bar(x + (i - 0.5) * 0.4, same[f"{col}_rate"], 0.4, color=color, label=label)
        ax.plot(x + (i - 0.5) * 0.4, same[f"{col}_chance"], "k_", markersize=18, mew=2,
                label="chance from loads" if i == 0 else None)
    ax.set(xticks=x, xticklabels=same.index, xlabel="layer", ylabel="rate over consecutive token pairs",
           title="Consecutive tokens routed to the same experts (Mixtral's statistic)")
    ax.legend(fontsize=8)
    return fig


def plot_hit_rates(curve: pd.DataFrame, per_token_share: float | None = None):
    """Hit rate against cache size (share of all layers x experts) per eviction policy (routing.hit_rate_curve).
    `per_token_share`: the share of all experts one token asks for (MoE layers x k / all experts); a cache smaller
    than that makes LRU evict every expert before the next token asks for it again (LRU's loop pathology: 0 hits),
    drawn as a dotted line."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = {"belady": "Belady (optimal)", "lru": "LRU", "lfu": "LFU"}
    for policy, c in curve.groupby("policy", sort=False):
        ax.plot(100 * c["share"], c["hit_rate"], "o-", label=names.get(policy, policy))
    if per_token_share is not None:
        ax.axvline(100 * per_token_share, color="0.4", ls=":",
                   label=f"one token's experts ({100 * per_token_share:.1f}%):\nLRU below it evicts all before reuse")
    ax.set(xlabel="cache size (% of all experts)", ylabel="hit rate", ylim=(0, 1.02),
           title="Expert cache replayed on the routing trace")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_router_entropy(entropy: pd.DataFrame, max_bits: float | None = None):
    """Mean router entropy (bits) per layer, one line per domain (`entropy`: layers x domains)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for domain in entropy.columns:
        ax.plot(entropy.index, entropy[domain], "o-", label=str(domain))
    if max_bits is not None:
        ax.axhline(max_bits, color="0.5", ls=":", label="uniform router")
    ax.set(xlabel="layer", ylabel="bits", title="Router entropy per layer and domain")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, never over them
    return fig


def plot_layer_domain(table: pd.DataFrame, load: pd.DataFrame, layer: int, domain: str):
    """One layer and one domain: P(expert | domain) as bars against the layer's overall load
    (`table` from routing.domain_expert over all layers, `load` from routing.expert_load)."""
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.22 * load.shape[1]), 3.2))
    row = table.loc[(layer, domain)]
    ax.bar(row.index, row.to_numpy(), color="C0", label=f"{domain}")
    ax.step(load.columns, load.loc[layer].to_numpy(), where="mid", color="k", label="all domains")
    ax.set(xlabel="expert", ylabel="share of top-k slots", title=f"layer {layer}: where {domain} tokens go")
    ax.legend(fontsize=8)
    return fig


# -- 04 per-token routing: which expert each token of one document went to ----------------------------


def token_routing_table(trace: pd.DataFrame, doc: int, layer: int, pieces: list[str] | None = None) -> pd.DataFrame:
    """One row per token of document DOC at LAYER, read from a routing trace (omnilab.experiments.routing's
    columns: doc, position, token_id, layer, rank, expert, weight, entropy): its text (PIECES per position, else
    the id), top expert, and the full top-k with weights in rank order."""
    t = trace[(trace["doc"] == doc) & (trace["layer"] == layer)].sort_values(["position", "rank"])
    if not len(t):
        raise KeyError(f"no rows for doc {doc} at layer {layer} in this trace")
    rows = []
    for pos, g in t.groupby("position", sort=True):
        token = int(g["token_id"].iloc[0])
        text = pieces[int(pos)] if pieces is not None and int(pos) < len(pieces) else str(token)
        rows.append({"position": int(pos), "token_id": token, "text": text, "top_expert": int(g["expert"].iloc[0]),
                     "experts": [int(e) for e in g["expert"]], "weights": [round(float(w), 3) for w in g["weight"]],
                     "entropy_bits": float(g["entropy"].iloc[0])})
    return pd.DataFrame(rows).set_index("position")


def _expert_colors(n: int):
    base = list(plt.cm.tab20.colors) + list(plt.cm.tab20b.colors) + list(plt.cm.tab20c.colors)
    return [base[i % len(base)] for i in range(n)]


def plot_token_routing(table: pd.DataFrame, num_experts: int, layer: int, title: str | None = None,
                       width: int = 70):
    """The text of one document, each token on a box coloured by its top expert at LAYER (`table` from
    token_routing_table), wrapped at WIDTH characters; a key names the colours of the experts used."""
    colors = _expert_colors(num_experts)
    x = row = 0.0
    boxes = []
    for _, r in table.iterrows():
        text = str(r["text"]).replace("\n", "⏎")
        w = max(1, len(text))
        if x + w > width and x > 0:
            x, row = 0.0, row + 1
        boxes.append((x, row, w, text, int(r["top_expert"])))
        x += w + 0.3
        if "⏎" in text:
            x, row = 0.0, row + 1
    rows = int(row) + 1
    fig, ax = plt.subplots(figsize=(11, 0.34 * rows + 1.6))
    for bx, by, w, text, e in boxes:
        ax.add_patch(plt.Rectangle((bx, by + 0.08), w, 0.84, color=colors[e], alpha=0.75, lw=0))
        ax.text(bx + w / 2, by + 0.5, text, ha="center", va="center", fontsize=8, family="monospace")
    ax.set_xlim(0, width + 1)
    ax.set_ylim(rows, 0)
    ax.set_yticks(np.arange(rows) + 0.5, [str(i + 1) for i in range(rows)], fontsize=7)
    ax.set_xticks([])
    ax.set_xlabel("each token on its top expert's colour (full top-k and weights: token_routing_table)")
    ax.set_ylabel("line")
    used = table["top_expert"].value_counts()
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[e], alpha=0.75, label=f"expert {e} ({n})") for e, n in used.items()]
    ax.legend(handles=handles, fontsize=7, ncol=min(8, len(handles)), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False, title="top expert (tokens)", title_fontsize=7)
    ax.set_title(title or f"Top expert of every token at layer {layer}", fontsize=10)
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig
