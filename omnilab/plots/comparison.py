"""Figures of notebook 03 (activation comparison): rel_err per hook point and layer, router top-k agreement, the
greedy continuations side by side, a fault's divergence, errors by dtype, and the streamed comparison's chained
and local views beside the bf16 noise floor. They draw omnilab.model.hooks' Comparison.table (hook names in
LAYER_POINTS' forward order) and omnilab.reference.compare's StreamedComparison.
"""

from __future__ import annotations

import textwrap

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from omnilab.model.generate import until_stop
from omnilab.model.hooks import LAYER_POINTS
from omnilab.plots.axes import at_floor, log_floor, mark_floor


_POINT_ORDER = [p for p in LAYER_POINTS if p != "mlp.hook_topk_indices"]  # the float-valued points, in forward order


def plot_rel_err_by_layer(table: pd.DataFrame, title: str = "rel_err per hook point across layers",
                          tol: float | None = 1e-5):
    """One line per hook point (x: layer, y: rel_err = ||sel - ref|| / ||ref||, log scale); a dashed line at tol.
    `table` is `Comparison.table` (columns name, layer, point, rel_err)."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    layered = table.dropna(subset=["layer"])
    drawn = table[table.point != "mlp.hook_topk_indices"].rel_err
    floor = log_floor(drawn, [tol] if tol else [])
    for point in _POINT_ORDER:
        t = layered[layered.point == point]
        if len(t):
            ax.plot(t.layer.astype(int), at_floor(t.rel_err, floor), marker="o", ms=3, label=point)
    for name, marker in (("hook_embed", "s"), ("ln_final.hook_normalized", "D"), ("hook_logits", "^")):
        row = table[table.name == name]
        if len(row):
            x = -0.5 if name == "hook_embed" else layered.layer.max() + 0.5
            ax.scatter([x], at_floor(row.rel_err, floor), marker=marker, color="black", zorder=3, label=name)
    if tol:
        ax.axhline(tol, color="red", ls="--", lw=1, label=f"tolerance {tol:g}")
    ax.set_yscale("log")
    mark_floor(ax, floor, bool((drawn <= 0).any()))
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
    floor = log_floor(table.rel_err, [tol] if tol else [])
    y = at_floor(table.rel_err, floor)
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
    mark_floor(ax, floor, bool((table.rel_err <= 0).any()))
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
    floor = log_floor(*drawn)
    for (label, t), ls in zip(tables.items(), ["-", "-", "--", ":", "-."] * 4):
        t = t[t.point != "mlp.hook_topk_indices"]
        ax.plot(np.arange(len(t)), at_floor(t.rel_err, floor), lw=1.4, ls=ls, label=label)
    first = next(iter(tables.values()))
    first = first[first.point != "mlp.hook_topk_indices"].reset_index(drop=True)
    starts = first.index[first.point == "hook_resid_pre"]
    ax.set_xticks(list(starts), [f"L{int(first.layer[i])}" for i in starts], fontsize=7)
    ax.set_yscale("log")
    mark_floor(ax, floor, any(bool((d <= 0).any()) for d in drawn))
    ax.set_ylabel("rel_err (log; exact zeros on the dotted line)")
    ax.set_xlabel("hook point, in forward order (ticks: each layer's first hook)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


# -- streamed comparison: local against chained, and the bf16 noise floor (issue 11) -------------------


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
    floor = log_floor(*[t[t.point.isin(points)].rel_err for t in tables],
                       *([result.chained.table[result.chained.table.point.isin(points)].threshold] if bf16 else []))
    # chained and local often agree: each view sits a little to its side of the layer, with its own marker
    for k, point in enumerate(points):
        for view, table, style, dx, marker in (("chained", result.chained.table, "-", -0.12, "o"),
                                                ("local", result.local.table, "--", 0.12, "s")):
            t = table[table.point == point]
            ax.plot(t.layer.astype(int) + dx, at_floor(t.rel_err, floor), style, marker=marker, ms=4,
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
    mark_floor(ax, floor, any(bool((t[t.point.isin(points)].rel_err <= 0).any()) for t in tables[:2]))
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
            ax.plot(layers, at_floor(t.rel_err, floor), marker="o", ms=3, color=colors[k % len(colors)],
                    label=f"{point}: selective bf16 vs transformers bf16")
            ax.plot(layers, at_floor(noise.rel_err.reindex(t.name), floor), ":", color=colors[k % len(colors)],
                    label=f"{point}: transformers bf16 vs its fp32 (noise)")
            ax.fill_between(layers, floor / 2, at_floor(t.threshold, floor), color=colors[k % len(colors)], alpha=0.08)
        ax.set_yscale("log")
        mark_floor(ax, floor, any(bool((t[t.point.isin(points)].rel_err <= 0).any()) for t in tables))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("rel_err (log)")
        ax.set_title(f"bf16 against transformers' own noise (shaded: below {result.noise_factor:g} x noise)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.15))
    fig.tight_layout()
    return fig
