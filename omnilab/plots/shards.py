"""Figures of notebooks 01 (shard inspection) and 02 (component extraction): bytes per component, which shard holds
which component, which experts are on disk, and what masking the missing experts costs. They draw what
omnilab.inventory (Inventory.components, shard_map, expert_grid), omnilab.extraction.availability and
omnilab.experiments.masking compute.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from omnilab.plots.axes import plural
from omnilab.units import format_bytes


# -- 01 shard inspection -------------------------------------------------------------------------------


def _short_shard(name: str) -> str:
    """'model-00003-of-00015.safetensors' -> '00003'; other names as they are, without .safetensors."""
    stem = name.removesuffix(".safetensors")
    parts = stem.split("-")
    return parts[1] if len(parts) == 4 and parts[0] == "model" and parts[2] == "of" else stem


def plot_component_bytes(components: pd.DataFrame, title: str = "Bytes per component"):
    """Horizontal bars of each component's share of all bytes (linear, so 58 GB of experts look 45x the 1.3 GB of
    audio tower they are), each labelled with its size, share and tensor count.

    `components`: index component label, columns `tensors` and `bytes`, optionally `files` (Inventory.components
    for a checkpoint, omnilab.extraction.availability.component_bytes for an extraction)."""
    df = components[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(df) + 1.2))
    colors = plt.cm.tab20(np.arange(len(components)) % 20)[::-1]
    total = components["bytes"].sum()
    share = 100 * df["bytes"] / total
    ax.barh(df.index, share, color=colors)
    files = df["files"] if "files" in df else [None] * len(df)
    for y, (n, b, f, x) in enumerate(zip(df["tensors"], df["bytes"], files, share)):
        in_files = f", {plural(int(f), 'file')}" if f is not None else ""
        pct = f"{b / total:.1%}" if b / total >= 0.001 else f"{100 * b / total:.1g}%"
        label = f"{format_bytes(b, short=True)}  {pct}  ({plural(int(n), 'tensor')}{in_files})"
        if x > 45:  # a long bar carries its label inside, so the axis stops at 100%
            ax.text(x - 1, y, label, va="center", ha="right", fontsize=8, color="white")
        else:
            ax.text(x + 1, y, label, va="center", fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("share of all bytes (%, linear)")
    ax.set_ylabel("component")
    ax.set_title(f"{title}: {format_bytes(total, short=True)} in {plural(int(components['tensors'].sum()), 'tensor')}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_shard_map(shard_map: pd.DataFrame, title: str = "Which components live in which shard"):
    """Heatmap of bytes per (shard, component), log colour; cells labelled when there are few enough to read.

    `shard_map`: rows shard files, columns component labels, values bytes (Inventory.shard_map)."""
    from matplotlib.colors import LogNorm

    data = shard_map.to_numpy(dtype=float)
    shown = np.where(data > 0, data, np.nan)
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * cols + 3), max(3, 0.32 * rows + 1.8)))
    positive = data[data > 0]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and positive.min() < positive.max() else None
    im = ax.imshow(shown, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_xticks(range(cols), shard_map.columns, rotation=90, fontsize=8)
    ax.set_yticks(range(rows), [_short_shard(s) for s in shard_map.index], fontsize=8 if rows <= 30 else 6)
    ax.set_ylabel("shard")
    ax.set_xlabel("component")
    if rows * cols <= 600:
        for i, j in zip(*np.nonzero(data)):
            light = norm is not None and norm(data[i, j]) < 0.6
            ax.text(j, i, format_bytes(data[i, j], short=True), ha="center", va="center", fontsize=6.5,
                    color="white" if light else "black")
    fig.colorbar(im, ax=ax, label="bytes (log)", fraction=0.04)
    ax.set_title(f"{title} ({plural(rows, 'shard')})")
    fig.tight_layout()
    return fig


def plot_expert_completeness(grid: np.ndarray, title: str = "Experts present"):
    """Layers x experts: how many of each expert's 3 projections are on disk (0..3); grey rows are dense layers.

    `grid`: float array layers x experts, NaN for layers without experts (Inventory.expert_grid)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    layers, experts = grid.shape
    cmap = ListedColormap(["#d62728", "#ff7f0e", "#ffd92f", "#2ca02c"]).with_extremes(bad="#dddddd")
    fig, ax = plt.subplots(figsize=(min(11, max(5, 0.1 * experts + 3)), min(6, max(2.5, 0.16 * layers + 1.5))))
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], 4),
                   interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, experts // 16)
    ax.set_xticks(range(0, experts, step))
    ax.set_yticks(range(0, layers, max(1, layers // 12)))
    cbar = fig.colorbar(im, ax=ax, ticks=[0, 1, 2, 3], fraction=0.04, label="projections on disk")
    cbar.ax.set_yticklabels(["0/3 missing", "1/3", "2/3", "3/3 complete"])
    valid = ~np.isnan(grid)
    complete, missing = int((grid[valid] == 3).sum()), int((grid[valid] == 0).sum())
    partial = int(valid.sum()) - complete - missing
    ax.set_title(f"{title}: {complete:,} complete, {partial:,} partial, {missing:,} missing")
    fig.tight_layout()
    return fig


# -- 02 component extraction ---------------------------------------------------------------------------


def plot_masking_cost(table: pd.DataFrame, title: str = "What masking missing experts costs"):
    """KL(full || masked) and top-1 agreement with the full model against the share of experts extracted.

    `table`: one row per partial extraction, columns experts_share (0..1), kl, top1_agreement, masked_share
    (share of the full model's routed choices that fell on a missing expert)."""
    t = table.sort_values("experts_share")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = 100 * t["experts_share"]
    a.plot(x, t["kl"], "o-", color="#d62728")
    right = float(x.max())
    for xi, k, m in zip(x, t["kl"], t["masked_share"]):
        near_right = xi > 0.7 * right  # label the rightmost points on their left, inside the axes
        a.annotate(f"{m:.0%} masked", (xi, k), textcoords="offset points", xytext=(-4 if near_right else 4, 6),
                   ha="right" if near_right else "left", fontsize=8)
    a.set_xlim(0, right * 1.05)
    a.set(xlabel="experts extracted (% of each layer's)", ylabel="KL(full || masked), nats / token")
    a.set_ylim(bottom=0, top=max(float(t["kl"].max()) * 1.25, 1e-9))
    a.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    b.plot(x, t["top1_agreement"], "o-", color="#1f77b4")
    b.set(xlabel="experts extracted (% of each layer's)", ylabel="top-1 agreement with the full model", ylim=(0, 1.02))
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
