"""Figures of notebook 06 (modality routing, issue 14: the same prompts as text, speech and image): expert load by
modality, modality specialization and single-modality experts, overlap between modalities, and what masking the
most specific experts costs. They draw what omnilab.experiments.modality computes, each against modality labels
shuffled between segments; docs/DESIGN.md's "Modality routing" is the design.
"""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


_MODALITY_COLORS = {"text": "C0", "audio": "C3", "image": "C2"}


def _modality_color(m: str, i: int) -> str:
    return _MODALITY_COLORS.get(m, f"C{4 + i}")


def plot_modality_load(load: pd.DataFrame, masked: dict | None = None, clip: float = 3.0):
    """One panel per layer: modalities x experts, log2 of P(expert | modality) x E (0 = a uniform router's
    share; `load` from routing.domain_expert of a modality trace). `masked`: modality -> {layer: experts}, the
    experts the causal test masks, marked with a dot in that modality's row."""
    layers = sorted({int(layer) for layer, _ in load.index})
    E = load.shape[1]
    cols = min(3, len(layers))
    rows = -(-len(layers) // cols)
    mods = list(dict.fromkeys(m for _, m in load.index))
    fig, axes = plt.subplots(rows, cols, squeeze=False, sharey=True, layout="constrained",
                             figsize=(cols * max(4.0, 0.14 * E), rows * (1.0 + 0.35 * len(mods))))
    for ax, layer in zip(axes.flat, layers):
        table = load.loc[layer].reindex(mods)
        with np.errstate(divide="ignore"):
            values = np.log2(table.to_numpy(dtype=float) * E)
        im = ax.imshow(np.clip(np.nan_to_num(values, nan=-clip, neginf=-clip), -clip, clip), aspect="auto",
                       cmap="RdBu_r", vmin=-clip, vmax=clip, interpolation="nearest")
        for row, m in enumerate(mods):
            picked = (masked or {}).get(m, {}).get(layer, [])
            if picked:
                ax.scatter(picked, [row] * len(picked), s=14, color="black", marker="o")
        ax.set(title=f"layer {layer}", xlabel="expert", yticks=range(len(mods)), yticklabels=mods)
    for ax in axes[:, 0]:
        ax.set_ylabel("modality")
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label=f"log2 P(expert | modality) x {E} (0: uniform), clipped at ±{clip:g}",
                 shrink=0.8, extend="both")
    note = "; dots: the experts masked for that modality" if masked else ""
    fig.suptitle(f"Expert load by modality, relative to a uniform router{note}", fontsize=10)
    return fig


def plot_modality_specialization(spec: pd.DataFrame, single: pd.DataFrame):
    """Left: I(modality; expert) per layer against modality labels shuffled between segments
    (routing.specialization on a modality trace). Right: experts serving one modality per layer, stacked by
    modality, with the count under shuffled labels (modality.single_modality_experts)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    x = np.arange(len(spec))
    a.bar(x - 0.2, spec["mi_bits"], 0.4, label="I(modality; expert)")
    a.bar(x + 0.2, spec["baseline_mean"], 0.4, yerr=spec["baseline_std"], color="0.7", label="shuffled modalities")
    a.set(xticks=x, xticklabels=spec.index, xlabel="layer", ylabel="bits",
          title=f"Modality specialization (H(modality) = {spec['domain_entropy_bits'].mean():.2f} bits)")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    mods = [c for c in single.columns if f"baseline_{c}" in single.columns]
    xs = np.arange(len(single))
    bottom = np.zeros(len(single))
    base = np.zeros(len(single))
    for i, m in enumerate(mods):
        b.bar(xs, single[m], 0.6, bottom=bottom, color=_modality_color(m, i), label=m)
        bottom += single[m].to_numpy()
        base += single[f"baseline_{m}"].to_numpy()
    b.plot(xs, base, "k_", markersize=22, mew=2, zorder=3, clip_on=False, label="all modalities, shuffled labels")
    top = max(float(bottom.max()), float(base.max()), 1.0)
    b.set_ylim(-0.04 * top, 1.12 * top)  # every bar whole, and a baseline of 0 visible above the axis
    b.set(xticks=xs, xticklabels=single.index, xlabel="layer", ylabel="experts",
          title=f"Experts serving one modality (of {int(single['experts'].iloc[0])} per layer)")
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def plot_modality_overlap(overlap: pd.DataFrame):
    """Per layer and modality pair (modality.modality_overlap): left, the overlap of the two expert loads
    (Bhattacharyya coefficient); right, the correlation of their co-activation matrices; dashed, each with the
    segments' modality labels shuffled."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    pairs = list(dict.fromkeys(p for _, p in overlap.index))
    for i, pair in enumerate(pairs):
        t = overlap.xs(pair, level="pair")
        for ax, col in ((a, "load_overlap"), (b, "coactivation_corr")):
            ax.plot(t.index, t[col], "o-", color=f"C{i}", label=pair)
            ax.plot(t.index, t[f"baseline_{col}"], "o--", color=f"C{i}", alpha=0.45, label=f"{pair}, shuffled")
    a.set(xlabel="layer", ylabel="sum_e sqrt(P(e | a) P(e | b))", ylim=(0, 1.02),
          title="Expert load overlap between modalities (1: the same load)")
    b.set(xlabel="layer", ylabel="correlation of P(b | a) matrices",
          title="Co-activation structure shared between modalities")
    a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(1.1, -0.15), frameon=False)  # one, under both
    fig.tight_layout()
    return fig


def _paired_sem(scores: pd.DataFrame | None, setting: str, form: str) -> float:
    """Standard error of the per-prompt change in answer NLL (SETTING minus "full", the same prompts)."""
    if scores is None:
        return float("nan")
    keys = [c for c in ("id", "form", "kind", "voice") if c in scores.columns]
    full = scores[(scores["setting"] == "full") & (scores["form"] == form)].set_index(keys)["answer_nll"]
    masked = scores[(scores["setting"] == setting) & (scores["form"] == form)].set_index(keys)["answer_nll"]
    d = (masked - full.reindex(masked.index)).dropna()
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def plot_modality_masking(summary: pd.DataFrame, scores: pd.DataFrame | None = None):
    """The causal test (modality.masking_experiment): for each mask, left, the change in answer NLL of each
    form's prompts and in the text documents' NLL (log of the perplexity ratio), nats per token; right, the share
    of each form's routing (in the unmasked model) that the mask removed. SCORES (one row per prompt and setting,
    modality.masking_experiment's second result): error bars of ± 1 standard error of the per-prompt change."""
    settings = [s for s in dict.fromkeys(summary["setting"]) if s != "full"]
    forms = list(dict.fromkeys(summary["form"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    x = np.arange(len(settings))
    width = 0.8 / (len(forms) + 1)
    table = summary.set_index(["setting", "form"])
    for i, form in enumerate(forms):
        d = [float(table.loc[(s, form), "d_answer_nll"]) for s in settings]
        err = [_paired_sem(scores, s, form) for s in settings] if scores is not None else None
        a.bar(x + (i - len(forms) / 2) * width, d, width, yerr=err, capsize=2, color=_modality_color(form, i),
              label=f"{form} prompts' answers")
        share = [float(table.loc[(s, form), "masked_share"]) for s in settings]
        b.bar(x + (i - (len(forms) - 1) / 2) * width, share, width, color=_modality_color(form, i), label=form)
    ppl = [float(np.log(summary.loc[summary["setting"] == s, "text_ppl_ratio"].iloc[0])) for s in settings]
    a.bar(x + (len(forms) / 2) * width, ppl, width, color="0.55", label="text documents (log ppl ratio)")
    a.axhline(0, color="black", lw=0.8)
    a.set(xticks=x, xticklabels=settings, xlabel="experts masked",
          ylabel="change in NLL (nats / token)" + (", ± 1 s.e. over prompts" if scores is not None else ""),
          title="What masking costs each modality")
    b.set(xticks=x, xticklabels=settings, xlabel="experts masked", ylabel="share of the routing removed",
          ylim=(0, 1.02), title="Routing mass the mask removes (unmasked model)")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    fig.tight_layout()
    return fig
