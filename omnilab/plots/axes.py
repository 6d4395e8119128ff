"""Axis helpers the figures share: exact zeros on a log axis (`log_floor`, `at_floor`, `mark_floor`: zeros drawn one
decade under the smallest value, on a dotted line labelled 'exact 0'), point labels spread apart inside the axes
(`spread_labels`), counted nouns in labels (`plural`). Each works on one matplotlib Axes; none draws a figure.
"""

from __future__ import annotations

import matplotlib
import numpy as np


_FLOOR = 1e-12  # the floor when nothing drawn is above zero


def log_floor(*series) -> float:
    """Where exact zeros go on a log axis: one decade below the smallest positive value drawn (a fixed floor
    such as 1e-12 stretched the axis over ten empty decades and squashed the data into the top band)."""
    values = np.concatenate([np.asarray(v, dtype=float).ravel() for v in series]) if series else np.array([])
    positive = values[np.isfinite(values) & (values > 0)]
    return float(10 ** (np.floor(np.log10(positive.min())) - 1)) if positive.size else _FLOOR


def at_floor(values, floor: float) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return np.where(v > 0, v, floor)


def mark_floor(ax, floor: float, any_zero: bool = True) -> None:
    """A log y axis that starts just under FLOOR; when zeros are drawn there, a dotted line labelled 'exact 0'."""
    ax.set_ylim(bottom=floor / 2)
    if any_zero:
        ax.axhline(floor, color="0.55", lw=0.7, ls=":", zorder=0)
        ax.annotate("exact 0", (1, floor), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="0.35")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _text_box(text, renderer):
    """The box of a text's letters in pixels; an annotation's own extent also holds its leader to the point."""
    text.get_window_extent(renderer)  # an annotation places its text here
    return matplotlib.text.Text.get_window_extent(text, renderer)


def spread_labels(ax, xs, ys, names, gap_pt: float = 9.0, fontsize: float = 7, lay_out: bool = True):
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
