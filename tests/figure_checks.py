"""What a figure draws, checked on the rendered figure (Agg): a reusable checker for every plot function.

`check_figure(fig)` draws the figure once and asserts, for every visible data axes:
- the axis limits contain every data point drawn (line vertices, scatter offsets, bar ends): nothing clipped;
- on a log axis, the limits span no more than `max_log_pad` decades beyond the data drawn, and no point sits
  more than `max_log_gap` decades below the rest (exact zeros drawn at a floor far below the data);
- a linear x axis whose ticks run to 100 (a share axis) does not run far past its last tick;
- every text of the axes (labels on bars, annotations) lies inside the axes, or at least inside the figure;
- a legend inside the axes covers no data point;
- no two texts of the same axes overlap, nor two tick labels of the same axis.
Each check can be turned off by name for a figure whose design needs it (`skip={"texts_inside"}`).
`legend_covers(ax)` and `overlapping_texts(ax)` answer two of those questions for one axes, for a test that asks
them directly.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PathCollection
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.transforms import Bbox

TOL_PX = 2.0


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison and not hasattr(ax, "_colorbar")]


def _points(ax) -> np.ndarray:
    """Every data point the axes draws, in data coordinates (n x 2): line vertices, scatter offsets, bar ends."""
    pts = []
    for line in ax.lines:
        if line.get_visible() and line.get_transform() == ax.transData:
            pts.append(np.asarray(line.get_xydata(), float))
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and coll.get_visible() and len(coll.get_offsets()):
            pts.append(np.asarray(coll.get_offsets(), float))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible() and patch.get_transform() == ax.transData:
            x, y, w, h = patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()
            if np.isfinite([x, y, w, h]).all() and (w or h):
                pts.append(np.array([[x, y], [x + w, y + h]], float))
    pts = [p.reshape(-1, 2) for p in pts if p.size]
    pts = np.concatenate(pts) if pts else np.empty((0, 2))
    return pts[np.isfinite(pts).all(axis=1)]


def _bbox(artist, renderer) -> Bbox | None:
    try:
        box = artist.get_window_extent(renderer)
    except Exception:  # noqa: BLE001 - an artist without extent
        return None
    return _bbox_of(box)


def _text_bbox(text, renderer) -> Bbox | None:
    """The box of a text's letters (an annotation's own extent also holds its leader line to the point)."""
    if _bbox(text, renderer) is None:  # also places an annotation's text
        return None
    return _bbox_of(Text.get_window_extent(text, renderer))


def _bbox_of(box) -> Bbox | None:
    return box if box.width > 0 and box.height > 0 else None


def _overlap(a: Bbox, b: Bbox, tol: float = TOL_PX) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tol) and (min(a.y1, b.y1) - max(a.y0, b.y0) > tol)


def _inside(inner: Bbox, outer: Bbox, tol: float = TOL_PX) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.x1 <= outer.x1 + tol and inner.y0 >= outer.y0 - tol
            and inner.y1 <= outer.y1 + tol)


def overlapping_texts(ax, renderer=None) -> list[tuple[str, str]]:
    """The pairs of visible texts of AX (annotations, labels on bars) whose drawn boxes overlap."""
    renderer = renderer or _renderer(ax.figure)
    boxes = [(t.get_text(), _text_bbox(t, renderer)) for t in ax.texts if t.get_visible() and t.get_text().strip()]
    boxes = [(s, b) for s, b in boxes if b is not None]
    return [(boxes[i][0], boxes[j][0]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if _overlap(boxes[i][1], boxes[j][1])]


def legend_covers(ax, renderer=None) -> int:
    """How many of AX's data points (see _points) its legend's box covers, in display coordinates (0 without one)."""
    renderer = renderer or _renderer(ax.figure)
    legend = ax.get_legend()
    if legend is None or not legend.get_visible():
        return 0
    pts = _points(ax)
    if not len(pts):
        return 0
    lb = legend.get_window_extent(renderer)
    disp = ax.transData.transform(pts)
    return int(((disp[:, 0] > lb.x0) & (disp[:, 0] < lb.x1) & (disp[:, 1] > lb.y0) & (disp[:, 1] < lb.y1)).sum())


def _renderer(fig):
    """The figure drawn once, for every question asked of it (ask them of a finished figure): drawing sets an
    annotation's leader, which marks the figure stale again, so `stale` cannot tell."""
    if not getattr(fig, "_figure_checks_drawn", False):
        fig.canvas.draw()
        fig._figure_checks_drawn = True
    return fig.canvas.get_renderer()


def check_figure(fig, skip: set[str] | frozenset = frozenset(), max_log_pad: float = 1.5,
                 max_log_gap: float = 4.0, close: bool = True) -> None:
    renderer = _renderer(fig)
    try:
        for ax in _data_axes(fig):
            name = ax.get_title() or (fig._suptitle.get_text() if fig._suptitle else "")
            pts = _points(ax)
            x0, x1 = sorted(ax.get_xlim())
            y0, y1 = sorted(ax.get_ylim())
            if "limits" not in skip and len(pts):
                ex, ey = 1e-9 * max(1, x1 - x0), 1e-9 * max(1, y1 - y0)
                out = pts[(pts[:, 0] < x0 - ex) | (pts[:, 0] > x1 + ex) | (pts[:, 1] < y0 - ey) | (pts[:, 1] > y1 + ey)]
                assert not len(out), f"{name!r}: {len(out)} points outside the axis limits, e.g. {out[:3].tolist()} " \
                                     f"(x {x0:g}..{x1:g}, y {y0:g}..{y1:g})"
            for axis, lo, hi, col in (("x", x0, x1, 0), ("y", y0, y1, 1)):
                scale = ax.get_xscale() if axis == "x" else ax.get_yscale()
                if scale == "log" and len(pts) and "log_span" not in skip:
                    vals = np.sort(pts[:, col][pts[:, col] > 0])
                    if len(vals):
                        decades = np.log10(vals)
                        assert np.log10(vals[0]) - np.log10(lo) <= max_log_pad, \
                            f"{name!r}: the log {axis} axis starts {np.log10(vals[0] / lo):.1f} decades below the data"
                        gaps = np.diff(decades)
                        assert not len(gaps) or gaps.max() <= max_log_gap, \
                            f"{name!r}: log {axis} data has a gap of {gaps.max():.1f} decades (zeros at a floor?)"
                if scale == "linear" and axis == "x" and "share_axis" not in skip:
                    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
                    if ticks and max(ticks) == 100:
                        assert hi <= 100 * 1.1, f"{name!r}: the x axis runs to {hi:g} with ticks to 100"
            ax_box = ax.get_window_extent(renderer)
            texts = [t for t in ax.texts if t.get_visible() and t.get_text().strip()]
            boxes = [(t.get_text(), _text_bbox(t, renderer)) for t in texts]
            boxes = [(s, b) for s, b in boxes if b is not None]
            if "texts_inside" not in skip:
                for s, b in boxes:
                    assert _inside(b, ax_box), f"{name!r}: text {s!r} is drawn outside the axes"
            if "texts_overlap" not in skip:
                pairs = overlapping_texts(ax, renderer)
                assert not pairs, f"{name!r}: texts {pairs[0][0]!r} and {pairs[0][1]!r} overlap"
            if "ticks_overlap" not in skip:
                for axis in (ax.xaxis, ax.yaxis):
                    tb = [(t.get_text(), _bbox(t, renderer)) for t in axis.get_ticklabels() if t.get_visible()
                          and t.get_text().strip()]
                    tb = [(s, b) for s, b in tb if b is not None]
                    for (s1, b1), (s2, b2) in zip(tb, tb[1:]):
                        assert not _overlap(b1, b2), f"{name!r}: tick labels {s1!r} and {s2!r} overlap"
            if "legend" not in skip:
                covered = legend_covers(ax, renderer)
                assert not covered, f"{name!r}: the legend covers {covered} data points"
    finally:
        if close:
            plt.close(fig)


__all__ = ["check_figure", "legend_covers", "overlapping_texts"]
