"""Every figure the notebooks draw. Each function takes computed data (DataFrames, arrays) and returns a
matplotlib Figure; nothing here reads a checkpoint or runs a model. Notebooks never define plot code.

Sections follow the notebooks; `save_figure` (omnilab.regress) writes a figure beside the executed notebook.
"""

from __future__ import annotations

import os
import textwrap

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "nbagg", "qt", "tk", "macosx")) else None

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from omnilab.model.generate import until_stop  # noqa: E402
from omnilab.model.hooks import LAYER_POINTS  # noqa: E402
from omnilab.units import format_bytes  # noqa: E402

# -- 01 shard inspection -------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


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
        in_files = f", {_plural(int(f), 'file')}" if f is not None else ""
        pct = f"{b / total:.1%}" if b / total >= 0.001 else f"{100 * b / total:.1g}%"
        label = f"{format_bytes(b, short=True)}  {pct}  ({_plural(int(n), 'tensor')}{in_files})"
        if x > 45:  # a long bar carries its label inside, so the axis stops at 100%
            ax.text(x - 1, y, label, va="center", ha="right", fontsize=8, color="white")
        else:
            ax.text(x + 1, y, label, va="center", fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("share of all bytes (%, linear)")
    ax.set_ylabel("component")
    ax.set_title(f"{title}: {format_bytes(total, short=True)} in {_plural(int(components['tensors'].sum()), 'tensor')}")
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
    ax.set_title(f"{title} ({_plural(rows, 'shard')})")
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


# -- 03 activation comparison --------------------------------------------------------------------------

_POINT_ORDER = [p for p in LAYER_POINTS if p != "mlp.hook_topk_indices"]  # the float-valued points, in forward order
_FLOOR = 1e-12  # the floor when nothing drawn is above zero


def _log_floor(*series) -> float:
    """Where exact zeros go on a log axis: one decade below the smallest positive value drawn (a fixed floor
    such as 1e-12 stretched the axis over ten empty decades and squashed the data into the top band)."""
    values = np.concatenate([np.asarray(v, dtype=float).ravel() for v in series]) if series else np.array([])
    positive = values[np.isfinite(values) & (values > 0)]
    return float(10 ** (np.floor(np.log10(positive.min())) - 1)) if positive.size else _FLOOR


def _at_floor(values, floor: float) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return np.where(v > 0, v, floor)


def _mark_floor(ax, floor: float, any_zero: bool = True) -> None:
    """A log y axis that starts just under FLOOR; when zeros are drawn there, a dotted line labelled 'exact 0'."""
    ax.set_ylim(bottom=floor / 2)
    if any_zero:
        ax.axhline(floor, color="0.55", lw=0.7, ls=":", zorder=0)
        ax.annotate("exact 0", (1, floor), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.35")


def plot_rel_err_by_layer(table: pd.DataFrame, title: str = "rel_err per hook point across layers",
                          tol: float | None = 1e-5):
    """One line per hook point (x: layer, y: rel_err = ||sel - ref|| / ||ref||, log scale); a dashed line at tol.
    `table` is `Comparison.table` (columns name, layer, point, rel_err)."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    layered = table.dropna(subset=["layer"])
    drawn = table[table.point != "mlp.hook_topk_indices"].rel_err
    floor = _log_floor(drawn, [tol] if tol else [])
    for point in _POINT_ORDER:
        t = layered[layered.point == point]
        if len(t):
            ax.plot(t.layer.astype(int), _at_floor(t.rel_err, floor), marker="o", ms=3, label=point)
    for name, marker in (("hook_embed", "s"), ("ln_final.hook_normalized", "D"), ("hook_logits", "^")):
        row = table[table.name == name]
        if len(row):
            x = -0.5 if name == "hook_embed" else layered.layer.max() + 0.5
            ax.scatter([x], _at_floor(row.rel_err, floor), marker=marker, color="black", zorder=3, label=name)
    if tol:
        ax.axhline(tol, color="red", ls="--", lw=1, label=f"tolerance {tol:g}")
    ax.set_yscale("log")
    _mark_floor(ax, floor, bool((drawn <= 0).any()))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("rel_err (log; exact zeros on the dotted line)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def plot_routing_agreement(table: pd.DataFrame, title: str = "Router top-k set agreement per layer"):
    """Bars: mean |ref set ∩ selective set| / k per MoE layer (1.0 = the same experts for every token)."""
    t = table[table.point == "mlp.hook_topk_indices"]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(t) + 2), 3))
    colors = ["tab:green" if a == 1.0 else "tab:orange" for a in t.topk_agreement]
    ax.bar(t.layer.astype(int), t.topk_agreement, color=colors)
    for x, a in zip(t.layer.astype(int), t.topk_agreement):  # the value itself: 0.998 and 1.0 look alike
        ax.text(x, a + 0.02, "1" if a == 1.0 else f"{a:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.15)  # from zero: a bar's height is its agreement
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("top-k agreement")
    same = len(t) and bool((t.topk_agreement == 1.0).all())
    ax.set_title(f"{title}{': the same experts everywhere' if same else ''}", fontsize=10)
    fig.tight_layout()
    return fig


def _loop(seq: list[int]) -> tuple[int, int] | None:
    """(start, period) of the shortest cycle the tail of SEQ repeats at least twice, earliest start; None if none."""
    n = len(seq)
    for period in range(1, n // 2 + 1):
        start = n - period
        while start > 0 and seq[start - 1] == seq[start - 1 + period]:
            start -= 1
        if n - start >= 2 * period:
            return start, period
    return None


def plot_continuations(reference: list[int], selective: list[int], labels: dict[int, str] | None = None,
                       prompt: str | None = None, title: str = "Greedy continuation",
                       pieces: tuple[list[str], list[str]] | None = None, stop=()):
    """Two rows of generated tokens, cell by cell; green where the selective model matches the reference. Each cell
    shows `pieces` (per position: the text each token adds when the sequence is decoded as it streams), else `labels` (id ->
    text), else the id; spaces as '·', newlines as '⏎'. When the reference settles into a loop, as greedy decoding of
    a small model does, the title says where and how long. `stop`: token ids that end a text (e.g.
    `model.stop_tokens`, the tokenizer's `<|endoftext|>`): each row is drawn up to and including its first one, where
    a reader's generation ends (what follows is the model starting another text); the title's count of identical
    tokens still covers everything generated."""
    generated = len(reference)
    same = next((j for j, (a, b) in enumerate(zip(reference, selective)) if a != b), min(len(reference), len(selective)))
    reference, selective = until_stop(reference, stop), until_stop(selective, stop)
    stopped = len(reference) < generated or len(selective) < generated
    if pieces is not None:
        pieces = (list(pieces[0])[:len(reference)], list(pieces[1])[:len(selective)])
    n = max(len(reference), len(selective), 1)
    fig, ax = plt.subplots(figsize=(min(max(0.55 * n + 1.8, 7), 20), 3.0))  # a cell holds 13 characters at 8 pt
    for row, seq in enumerate((reference, selective)):
        for j in range(n):
            tok = seq[j] if j < len(seq) else None
            ok = tok is not None and j < len(reference) and j < len(selective) and reference[j] == selective[j]
            ax.add_patch(plt.Rectangle((j, 1 - row), 1, 1, color="#c8e6c9" if ok else "#ffcdd2", ec="white"))
            if tok is None:
                text = ""
            elif pieces is not None:
                text = pieces[row][j]
            else:
                text = labels.get(tok, str(tok)) if labels else str(tok)
            text = text.replace(" ", "·").replace("\n", "⏎")
            ax.text(j + 0.5, 1.5 - row, text if len(text) <= 14 else text[:13] + "…", ha="center", va="center",
                    fontsize=9 if len(text) <= 2 else 8, rotation=90 if len(text) > 2 else 0)
    loop = _loop(list(reference))
    if loop:
        ax.axvspan(loop[0], n, ymin=0.5, ymax=1.0, fill=False, ec="0.3", ls="--", lw=1)
    ax.set_xlim(0, n)
    ax.set_ylim(0, 2)
    ax.set_yticks([1.5, 0.5], ["reference\n(transformers)", "selective"])
    ax.set_xlabel("generated token (the text it adds)" if pieces is not None or labels else "generated token id")
    head = f"{title}{f' of {prompt!r}' if prompt else ''}: identical for {same} of {generated} tokens"
    if stopped:
        ends = ", ".join(f"{name} at token {len(seq)}" for name, seq in (("reference", reference),
                                                                            ("selective", selective)))
        head += f"\ndrawn up to the end-of-text token, where the text ends ({ends} of {generated} generated)"
    tail = (f"\nfrom token {loop[0]} the reference repeats a {loop[1]}-token loop (dashed)"
            " — greedy decoding of a small model" if loop else "")
    width = int((fig.get_figwidth() - 1.5) * 72 / (0.62 * 9))  # characters of a 9 pt line across the axes
    ax.set_title("\n".join(textwrap.fill(line, width) for line in (head + tail).split("\n")), fontsize=9)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def plot_fault(table: pd.DataFrame, fault: str, first_divergence: str | None, injected_layer: int | None = None,
               tol: float | None = None):
    """One fault: rel_err of every hook in forward order (log), the injected layer shaded, the first divergent
    hook called out."""
    fig, ax = plt.subplots(figsize=(9, 3.4))
    x = np.arange(len(table))
    floor = _log_floor(table.rel_err, [tol] if tol else [])
    y = _at_floor(table.rel_err, floor)
    ax.plot(x, y, color="tab:blue", lw=1)
    ax.scatter(x, y, c=["tab:red" if d else "tab:blue" for d in table.divergent], s=10, zorder=3)
    if injected_layer is not None:
        idx = np.flatnonzero(table.layer.to_numpy() == injected_layer)
        if len(idx):
            ax.axvspan(idx[0] - 0.5, idx[-1] + 0.5, color="orange", alpha=0.15, label=f"layer {injected_layer} (injected)")
    if tol:
        ax.axhline(tol, color="gray", ls="--", lw=1, label=f"divergence threshold {tol:g}")
    if first_divergence is not None:
        i = int(np.flatnonzero(table.name.to_numpy() == first_divergence)[0])
        ax.annotate(f"first divergence:\n{first_divergence}", xy=(i, y[i]), xytext=(0.02, 0.93),
                    textcoords="axes fraction", va="top", fontsize=8,
                    arrowprops=dict(arrowstyle="->", color="tab:red"))
    layer_starts = table.index[table.point == "hook_resid_pre"]
    ax.set_xticks([table.index.get_loc(i) for i in layer_starts],
                  [f"L{int(table.layer[i])}" for i in layer_starts], fontsize=7)
    ax.set_yscale("log")
    _mark_floor(ax, floor, bool((table.rel_err <= 0).any()))
    ax.set_ylabel("rel_err (log; exact zeros on the dotted line)")
    ax.set_xlabel("hook point, in forward order (ticks: each layer's first hook)")
    ax.set_title(f"fault: {fault}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def plot_dtype_errors(tables: dict[str, pd.DataFrame], title: str = "Errors by dtype, every hook in forward order"):
    """Several comparisons (label -> Comparison.table), rel_err per hook on one log axis: e.g. bf16 selective vs
    bf16 transformers beside transformers' own bf16 vs fp32, so bf16 rounding is shown, not hidden."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    drawn = [t[t.point != "mlp.hook_topk_indices"].rel_err for t in tables.values()]
    floor = _log_floor(*drawn)
    for (label, t), ls in zip(tables.items(), ["-", "-", "--", ":", "-."] * 4):
        t = t[t.point != "mlp.hook_topk_indices"]
        ax.plot(np.arange(len(t)), _at_floor(t.rel_err, floor), lw=1.4, ls=ls, label=label)
    first = next(iter(tables.values()))
    first = first[first.point != "mlp.hook_topk_indices"].reset_index(drop=True)
    starts = first.index[first.point == "hook_resid_pre"]
    ax.set_xticks(list(starts), [f"L{int(first.layer[i])}" for i in starts], fontsize=7)
    ax.set_yscale("log")
    _mark_floor(ax, floor, any(bool((d <= 0).any()) for d in drawn))
    ax.set_ylabel("rel_err (log; exact zeros on the dotted line)")
    ax.set_xlabel("hook point, in forward order (ticks: each layer's first hook)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


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


def router_explorer(table: pd.DataFrame, load: pd.DataFrame):
    """An ipywidgets explorer (layer slider, domain dropdown) over plot_layer_domain; returns the widget, its first
    figure drawn (unattended runs: the first figure alone, see _explorer)."""
    layers = sorted(load.index)
    domains = list(dict.fromkeys(d for _, d in table.index))
    return _explorer(layers, [(d, d) for d in domains], ("layer", "domain"),
                     lambda layer, domain: (plot_layer_domain(table, load, layer, domain),))


def headless() -> bool:
    """True in an unattended run (`omnilab regress`, the nbval tests: OMNILAB_HEADLESS=1), where no one can move a
    slider: explorers then draw their first view into the cell's output and open no widget."""
    return bool(os.environ.get("OMNILAB_HEADLESS"))


def _explorer(layers, choices, labels, view):
    """A layer slider and a dropdown of (label, value) choices above an Output that shows view(layer, value) ->
    (figure, more objects to display...), redrawn on every change and drawn once now. The figure is drawn outside
    the Output's context: an ipywidgets Output swallows an exception raised inside it (it shows it in the widget),
    so the first draw's error fails the cell, and a later one reaches the kernel's log, instead of vanishing.
    display() renders under any backend (plt.show(fig) is wrong under Agg)."""
    from IPython.display import display

    def show(fig, *more) -> None:
        try:
            display(fig)
            for item in more:
                display(item)
        finally:
            plt.close(fig)

    if headless():
        show(*view(layers[0], choices[0][1]))
        return None
    import ipywidgets as widgets

    out = widgets.Output()
    slider = widgets.SelectionSlider(options=layers, value=layers[0], description=labels[0])
    dropdown = widgets.Dropdown(options=choices, value=choices[0][1], description=labels[1])

    def draw(change=None):
        shown = view(slider.value, dropdown.value)
        out.clear_output(wait=True)
        with out:
            show(*shown)

    draw()
    slider.observe(draw, names="value")
    dropdown.observe(draw, names="value")
    return widgets.VBox([widgets.HBox([slider, dropdown]), out])


# -- 05 generation experiments -------------------------------------------------------------------------

def _text_box(text, renderer):
    """The box of a text's letters in pixels; an annotation's own extent also holds its leader to the point."""
    text.get_window_extent(renderer)  # an annotation places its text here
    return matplotlib.text.Text.get_window_extent(text, renderer)


def _spread_labels(ax, xs, ys, names, gap_pt: float = 9.0, fontsize: float = 7, lay_out: bool = True):
    """Label points beside them, apart and inside the axes: in y order, each label is tried level with its point,
    then GAP_PT / 2 up, as far down, a step further up, ... and kept at the first place where it overlaps no text
    already drawn and stays inside the axes (a label only pushed up left the axes at the top), with a thin leader
    when moved. Points right of 70% of the width are labelled on their left. Call once the axes' scales and
    limits are final: this lays the figure out first (LAY_OUT False: the caller just did, and added nothing to
    the layout since), and the labels are kept out of the layout (axes moved after would move labels placed apart
    onto each other)."""
    ax.autoscale_view()
    if lay_out:
        ax.figure.draw_without_rendering()
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = gap_pt / 9 * ax.figure.dpi / 72  # pixels kept free around a label
    px = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    placed = [_text_box(t, renderer) for t in ax.texts if t.get_visible() and t.get_text().strip()]
    shifts = [0.0] + [sign * k * gap_pt / 2 for k in range(1, 81) for sign in (1, -1)]

    def place(i, shift, left):
        return ax.annotate(names[i], (xs[i], ys[i]), xytext=(-6 if left else 6, shift - 2), textcoords="offset points",
                           fontsize=fontsize, ha="right" if left else "left",
                           arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5) if abs(shift) > 1 else None,
                           in_layout=False)

    for i in sorted(range(len(px)), key=lambda i: px[i, 1]):
        left = px[i, 0] > frame.x0 + 0.7 * frame.width
        for shift in shifts:
            note = place(i, shift, left)
            box = _text_box(note, renderer).padded(pad)
            if box.y0 >= frame.y0 and box.y1 <= frame.y1 and not any(box.overlaps(b) for b in placed):
                break
            note.remove()
        else:  # no free place within 40 gaps: level with the point
            note = place(i, 0.0, left)
            box = _text_box(note, renderer).padded(pad)
        placed.append(box)


_GROUP_STYLE = {"full": ("k", "*"), "top_k": ("C0", "o"), "mask": ("C3", "s"), "salience": ("C4", "D"),
                "budget": ("C2", "^")}


def plot_quality_memory(table: pd.DataFrame):
    """Left: top-1 agreement with the full model against peak resident expert memory (share of all expert
    bytes), one point per setting (omnilab.experiments.sweeps.run_sweep). Right: next-token KL on a symlog axis (cache
    settings sit at exactly 0)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    floor = _log_floor(table["kl"])
    for group, rows in table.groupby("group", sort=False):
        color, marker = _GROUP_STYLE.get(group, ("0.5", "o"))
        x = 100 * rows["peak_expert_share"]
        a.scatter(x, rows["top1_agreement"], c=color, marker=marker, s=60 if group != "full" else 160, label=group)
        b.scatter(x, _at_floor(rows["kl"], floor), c=color, marker=marker, s=60 if group != "full" else 160, label=group)
    a.set(xlabel="peak resident experts (% of all expert bytes)", ylabel="top-1 agreement with the full model",
          title="Quality against memory", xlim=(0, 105))
    # a log axis with exact zeros (the cache settings: bit-identical) on a labelled floor; a symlog axis put its
    # "0" one decade under its linear threshold, where it read as a small positive KL
    b.set_yscale("log")
    _mark_floor(b, floor, bool((table["kl"] <= 0).any()))
    b.set(xlabel="peak resident experts (% of all expert bytes)", ylabel="next-token KL(full || setting), nats (log)",
          title="Divergence from the full model", xlim=(0, 105))
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=5, frameon=False)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    named = table[~table["group"].isin(["budget", "full"])]
    for ax, col in ((a, "top1_agreement"), (b, "kl")):  # the figure laid out once: labels are not in the layout
        _spread_labels(ax, list(100 * named["peak_expert_share"]), list(_at_floor(named[col], floor) if col == "kl"
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
        _spread_labels(a, list(100 * sal["budget_share"]), list(sal["hit_rate"]),
                       [f"salience alpha {v:g}" for v in sal["value"]])
    return fig


# ---------------------------------------------------------------------------------------------------
# Streamed comparison: local against chained, and the bf16 noise floor (issue 11)
# ---------------------------------------------------------------------------------------------------


def plot_local_vs_chained(result, points=("hook_mlp_out", "hook_resid_post"), injected_layer: int | None = None,
                          title: str | None = None):
    """Per layer, the selective model's rel_err in the chained view (each side on its own activations) and the
    local view (each reference layer fed the selective model's input), log scale. In bf16 a second panel sets
    the chained error beside transformers' own bf16-vs-fp32 error (the noise floor) and the divergence
    threshold (NOISE_FACTOR x that floor). `result` is an omnilab.reference.compare.StreamedComparison."""
    bf16 = result.noise is not None
    fig, axes = plt.subplots(1, 2 if bf16 else 1, figsize=(12 if bf16 else 7, 4.2), squeeze=False)
    ax = axes[0, 0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tables = [result.chained.table, result.local.table] + ([result.noise.table] if bf16 else [])
    floor = _log_floor(*[t[t.point.isin(points)].rel_err for t in tables],
                       *([result.chained.table[result.chained.table.point.isin(points)].threshold] if bf16 else []))
    # chained and local often agree: each view sits a little to its side of the layer, with its own marker
    for k, point in enumerate(points):
        for view, table, style, dx, marker in (("chained", result.chained.table, "-", -0.12, "o"),
                                                ("local", result.local.table, "--", 0.12, "s")):
            t = table[table.point == point]
            ax.plot(t.layer.astype(int) + dx, _at_floor(t.rel_err, floor), style, marker=marker, ms=4,
                    mfc="none" if view == "local" else None, color=colors[k % len(colors)], label=f"{point} ({view})")
    for view, first, marker in (("chained", result.first_divergence, "v"), ("local", result.local_first_divergence, "x")):
        if first is not None:
            row = (result.chained if view == "chained" else result.local).table.set_index("name").loc[first]
            if row.layer == row.layer:  # a layer hook (not embed / final)
                dx = -0.12 if view == "chained" else 0.12
                ax.scatter([int(row.layer) + dx], [max(row.rel_err, floor)], marker=marker, s=80, color="red", zorder=4,
                           label=f"first divergence ({view}): {first}")
    if injected_layer is not None:
        ax.axvspan(injected_layer - 0.4, injected_layer + 0.4, color="orange", alpha=0.2, label="fault injected")
    ax.set_yscale("log")
    _mark_floor(ax, floor, any(bool((t[t.point.isin(points)].rel_err <= 0).any()) for t in tables[:2]))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (chained left of it, local right)")
    ax.set_ylabel("rel_err vs transformers (log)")  # the floor line says "exact 0"; a longer label ran off the figure
    ax.set_title(title or f"Chained against local ({str(result.dtype).removeprefix('torch.')})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.15), ncol=2)
    if bf16:
        ax = axes[0, 1]
        noise = result.noise.table.set_index("name")
        for k, point in enumerate(points):
            t = result.chained.table[result.chained.table.point == point]
            layers = t.layer.astype(int)
            ax.plot(layers, _at_floor(t.rel_err, floor), marker="o", ms=3, color=colors[k % len(colors)],
                    label=f"{point}: selective bf16 vs transformers bf16")
            ax.plot(layers, _at_floor(noise.rel_err.reindex(t.name), floor), ":", color=colors[k % len(colors)],
                    label=f"{point}: transformers bf16 vs its fp32 (noise)")
            ax.fill_between(layers, floor / 2, _at_floor(t.threshold, floor), color=colors[k % len(colors)], alpha=0.08)
        ax.set_yscale("log")
        _mark_floor(ax, floor, any(bool((t[t.point.isin(points)].rel_err <= 0).any()) for t in tables))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("rel_err (log)")
        ax.set_title(f"bf16 against transformers' own noise (shaded: below {result.noise_factor:g} x noise)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.15))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------
# 06 modality routing (issue 14): the same prompts as text, speech and image
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# 04 per-token routing: which expert each token of one document went to
# ---------------------------------------------------------------------------------------------------


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


def token_routing_explorer(trace: pd.DataFrame, tokenizer=None, docs: list[int] | None = None):
    """An ipywidgets view over plot_token_routing: a layer slider and a document dropdown; under the figure, the
    table of every token's top-k experts and weights. TOKENIZER decodes the trace's token ids (None: ids)."""
    from omnilab.tokenizer import stream_pieces

    E = int(trace.attrs["num_experts"])
    layers = sorted(int(v) for v in trace["layer"].unique())
    docs = docs if docs is not None else sorted(int(v) for v in trace["doc"].unique())
    names = trace.drop_duplicates("doc").set_index("doc")["domain"].astype(str)
    cache: dict[int, list[str] | None] = {}

    def pieces(doc: int):
        if doc not in cache:
            ids = trace[(trace["doc"] == doc) & (trace["layer"] == layers[0]) & (trace["rank"] == 0)] \
                .sort_values("position")["token_id"].tolist()
            cache[doc] = stream_pieces(tokenizer, ids) if tokenizer is not None else None
        return cache[doc]

    def view(layer: int, doc: int):
        table = token_routing_table(trace, doc, layer, pieces(doc))
        return plot_token_routing(table, E, layer, title=f"doc {doc} ({names.get(doc, '?')}): top expert per token "
                                                         f"at layer {layer}"), table

    return _explorer(layers, [(f"doc {d} ({names.get(d, '?')})", d) for d in docs], ("layer", "document"), view)
