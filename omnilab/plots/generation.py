"""Figures of notebook 05 (generation experiments): quality against resident expert memory, decoding speed
relative to the full model (with its timing-noise band), and the expert cache's hit rate and reads against its
budget. They draw omnilab.experiments.sweeps.run_sweep's table, one row per setting, coloured by its group.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from omnilab.plots.axes import at_floor, log_floor, mark_floor, spread_labels


_GROUP_STYLE = {"full": ("k", "*"), "top_k": ("C0", "o"), "mask": ("C3", "s"), "salience": ("C4", "D"),
                "budget": ("C2", "^")}


def plot_quality_memory(table: pd.DataFrame):
    """Left: top-1 agreement with the full model against peak resident expert memory (share of all expert
    bytes), one point per setting (omnilab.experiments.sweeps.run_sweep). Right: next-token KL on a symlog axis (cache
    settings sit at exactly 0)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    floor = log_floor(table["kl"])
    for group, rows in table.groupby("group", sort=False):
        color, marker = _GROUP_STYLE.get(group, ("0.5", "o"))
        x = 100 * rows["peak_expert_share"]
        a.scatter(x, rows["top1_agreement"], c=color, marker=marker, s=60 if group != "full" else 160, label=group)
        b.scatter(x, at_floor(rows["kl"], floor), c=color, marker=marker, s=60 if group != "full" else 160, label=group)
    a.set(xlabel="peak resident experts (% of all expert bytes)", ylabel="top-1 agreement with the full model",
          title="Quality against memory", xlim=(0, 105))
    # a log axis with exact zeros (the cache settings: bit-identical) on a labelled floor; a symlog axis put its
    # "0" one decade under its linear threshold, where it read as a small positive KL
    b.set_yscale("log")
    mark_floor(b, floor, bool((table["kl"] <= 0).any()))
    b.set(xlabel="peak resident experts (% of all expert bytes)", ylabel="next-token KL(full || setting), nats (log)",
          title="Divergence from the full model", xlim=(0, 105))
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=5, frameon=False)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    named = table[~table["group"].isin(["budget", "full"])]
    for ax, col in ((a, "top1_agreement"), (b, "kl")):  # the figure laid out once: labels are not in the layout
        spread_labels(ax, list(100 * named["peak_expert_share"]), list(at_floor(named[col], floor) if col == "kl"
                                                                        else named[col]), list(named["name"]),
                       lay_out=ax is a)
    return fig


def plot_speed(table: pd.DataFrame, noise: float = 0.3):
    """Decode speed of each setting relative to the full model in the same run (tokens_per_s / full's), one bar
    per setting coloured by group, with the full model's tokens/s in the label. Timings vary from run to run
    and machine to machine: shown here, kept out of the baselines. One timing per setting is no measurement of a
    speed-up: ratios within 1 ± NOISE (one decode timed once on a shared CPU) are shaded and labelled '≈1x', not
    read as faster or slower."""
    t = table.reset_index(drop=True)
    full = float(t.loc[t["group"] == "full", "tokens_per_s"].iloc[0])
    ratio = t["tokens_per_s"] / full
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(t) + 1.4))
    y = np.arange(len(t))[::-1]
    colors = [_GROUP_STYLE.get(g, ("0.5", "o"))[0] for g in t["group"]]
    ax.barh(y, ratio, color=colors)
    ax.axvspan(1 - noise, 1 + noise, color="0.85", zorder=0, label=f"within timing noise (±{noise:.0%})")
    for yi, r, tps in zip(y, ratio, t["tokens_per_s"]):
        ratio_text = "≈1x" if abs(r - 1) <= noise else f"{r:.2f}x"
        ax.text(r, yi, f" {ratio_text} ({tps:.1f}/s)", va="center", fontsize=7)
    ax.axvline(1.0, color="k", lw=1, ls=":")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_yticks(y, t["name"], fontsize=7)
    ax.set_xlim(0, max(float(ratio.max()), 1 + noise) * 1.35)
    ax.set_xlabel(f"decode tokens/s relative to the full model ({full:.1f} tokens/s, same run)")
    ax.set_ylabel("setting")
    ax.set_title("Decoding speed on this machine (one timing each: differences within the band are noise)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_cache_budget(table: pd.DataFrame):
    """Budget settings: decode hit rate and expert bytes read per decoded token against the cache budget (share
    of expert bytes), one line per eviction policy; salience-weighted routers as points at their budget."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    budget = table[table["group"] == "budget"]
    names = {"lru": "LRU", "lfu": "LFU", "trust": "trust-weighted"}
    for policy, rows in budget.groupby("policy", sort=False):
        rows = rows.sort_values("budget_share")
        a.plot(100 * rows["budget_share"], rows["hit_rate"], "o-", label=names.get(policy, policy))
        b.plot(100 * rows["budget_share"], rows["loaded_bytes_per_token"] / 2**20, "o-", label=names.get(policy, policy))
    sal = table[table["group"] == "salience"]
    if len(sal):
        a.scatter(100 * sal["budget_share"], sal["hit_rate"], c="C4", marker="D", zorder=3, label="salience router (LRU)")
    full = table[table["group"] == "full"]
    if len(full):
        a.axhline(float(full["hit_rate"].iloc[0]), color="k", ls=":", label="all experts fit (cold misses only)")
        b.axhline(float(full["loaded_bytes_per_token"].iloc[0]) / 2**20, color="k", ls=":", label="all experts fit")
    a.set(xlabel="expert cache budget (% of expert bytes)", ylabel="decode hit rate", ylim=(0, 1.02),
          title="Cache hit rate while decoding")
    b.set(xlabel="expert cache budget (% of expert bytes)", ylabel="MiB of experts read per token",
          title="Expert reads while decoding")
    for ax in (a, b):
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
        ax.grid(alpha=0.3)
    if len(sal):
        spread_labels(a, list(100 * sal["budget_share"]), list(sal["hit_rate"]),
                       [f"salience alpha {v:g}" for v in sal["value"]])
    return fig
