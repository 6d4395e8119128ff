"""The figure defects of issue 27, each on a small table built to show it: every test here asserts what the figure
draws (limits, artists, texts, legend boxes against data points in display coordinates) and failed on the figure
as it was drawn before its fix."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from omnilab import plots  # noqa: E402
from omnilab.model.hooks import LAYER_POINTS  # noqa: E402

from tests.figure_checks import check_figure, legend_covers, overlapping_texts  # noqa: E402

TOPK = "mlp.hook_topk_indices"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _hooks(rel_err, layers: int = 4, agreement=lambda layer: 1.0, threshold: float = 1e-5) -> pd.DataFrame:
    """A Comparison.table: every hook of LAYERS layers, rel_err(layer, point) at the float hooks, the top-k hook's
    rel_err 1 - agreement(layer) as compare_activations writes it."""
    rows = []
    for layer in range(layers):
        for point in LAYER_POINTS:
            agree = agreement(layer)
            rows.append(dict(name=f"blocks.{layer}.{point}", layer=layer, point=point, topk_agreement=agree,
                             rel_err=1.0 - agree if point == TOPK else rel_err(layer, point), threshold=threshold))
    table = pd.DataFrame(rows)
    table["divergent"] = table.rel_err > table.threshold
    return table


def _zero_in_layer_0(layer: int, point: str) -> float:
    """Layer 0 bit-identical (exact zeros), later layers between 1e-4 and 1e-2."""
    return 0.0 if layer == 0 else 10 ** (-4 + 0.6 * layer + 0.1 * LAYER_POINTS.index(point))


def _smallest_positive(*series) -> float:
    values = np.concatenate([np.asarray(s, dtype=float).ravel() for s in series])
    return float(values[np.isfinite(values) & (values > 0)].min())


def assert_zeros_under_the_data(ax, smallest: float, zeros: bool = True) -> None:
    """A log y axis that starts at most two decades under SMALLEST (the least positive value drawn), so the data
    fill the axis; where zeros are drawn, a text names their floor."""
    assert ax.get_yscale() == "log", ax.get_yscale()
    bottom = ax.get_ylim()[0]
    decades = np.log10(smallest) - np.log10(bottom)
    assert decades <= 2, f"{ax.get_title()!r}: the axis starts {decades:.1f} decades under the data"
    if zeros:
        assert "exact 0" in [t.get_text() for t in ax.texts]


# -- 01 / 02 component bytes ---------------------------------------------------------------------------


def test_component_bytes_axis_stops_at_100_percent():
    components = pd.DataFrame({"tensors": [18_000, 400, 3], "bytes": [58e9, 1.3e9, 2e6]},
                              index=["experts", "audio tower", "norms"])
    fig = plots.plot_component_bytes(components)
    ax = fig.axes[0]
    assert ax.get_xlim()[1] <= 100, ax.get_xlim()  # a share axis: nothing past 100%
    check_figure(fig)  # every size label inside the axes, none over another


# -- 03 exact zeros on log axes ------------------------------------------------------------------------


def test_dtype_errors_zeros_sit_one_decade_under_the_data():
    a, b = _hooks(_zero_in_layer_0), _hooks(lambda layer, point: 2 * _zero_in_layer_0(layer, point))
    fig = plots.plot_dtype_errors({"bf16 selective vs bf16 transformers": a, "transformers bf16 vs fp32": b})
    float_hooks = a[a.point != TOPK].rel_err
    assert_zeros_under_the_data(fig.axes[0], _smallest_positive(float_hooks))
    check_figure(fig)


def test_fault_zeros_sit_one_decade_under_the_data():
    table = _hooks(_zero_in_layer_0)
    first = table[table.divergent].name.iloc[0]
    fig = plots.plot_fault(table, "zeroed expert", first, injected_layer=1, tol=1e-5)
    assert_zeros_under_the_data(fig.axes[0], _smallest_positive(table.rel_err, [1e-5]))
    check_figure(fig)


def _streamed(chained: pd.DataFrame, local: pd.DataFrame, noise: pd.DataFrame | None = None, factor: float = 10.0):
    """What plot_local_vs_chained reads of a StreamedComparison."""
    if noise is not None:  # bf16: each hook's threshold is FACTOR x transformers' own bf16-vs-fp32 error
        chained = chained.assign(threshold=factor * noise.rel_err.to_numpy())
    return SimpleNamespace(dtype=torch.bfloat16 if noise is not None else torch.float32,
                           chained=SimpleNamespace(table=chained), local=SimpleNamespace(table=local),
                           noise=None if noise is None else SimpleNamespace(table=noise), noise_factor=factor,
                           first_divergence=None, local_first_divergence=None)


def test_noise_floor_panel_holds_its_data_in_the_axis():
    """bf16: the right panel (chained error, transformers' own noise, the shaded threshold) starts near its data,
    zeros or none (the shading once reached down to 1e-12 and squashed the lines into the top band)."""
    points = ("hook_mlp_out", "hook_resid_post")
    chained = _hooks(lambda layer, point: 10 ** (-2.5 + 0.2 * layer))
    noise = _hooks(lambda layer, point: 10 ** (-3 + 0.2 * layer))
    result = _streamed(chained, chained, noise)
    fig = plots.plot_local_vs_chained(result, points=points)
    right = fig.axes[1]
    drawn = [t[t.point.isin(points)].rel_err for t in (chained, noise)]
    assert_zeros_under_the_data(right, _smallest_positive(*drawn), zeros=False)
    zeros = _hooks(_zero_in_layer_0)
    fig = plots.plot_local_vs_chained(_streamed(zeros, zeros, noise), points=points)
    drawn = [t[t.point.isin(points)].rel_err for t in (zeros, noise)]
    for ax in fig.axes:
        assert_zeros_under_the_data(ax, _smallest_positive(*drawn))
    check_figure(fig, skip={"texts_overlap"})  # "exact 0" sits on its floor line, under a point there


# -- 03 routing agreement ------------------------------------------------------------------------------


def test_routing_agreement_bars_start_at_zero_and_say_their_value():
    """Every layer in agreement: bars of full height on an axis from 0, not 1.0 on 0.90-1.01; one layer at 0.875
    says so in digits (0.998 and 1.0 look alike)."""
    table = _hooks(_zero_in_layer_0, layers=6, agreement=lambda layer: 0.875 if layer == 4 else 1.0)
    fig = plots.plot_routing_agreement(table)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1.0
    bars = [p for p in ax.patches if isinstance(p, matplotlib.patches.Rectangle)]
    agreement = table[table.point == TOPK].topk_agreement.to_numpy()
    assert sorted(b.get_height() for b in bars) == sorted(agreement)
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == len(bars) and f"{0.875:.3f}" in labels
    check_figure(fig)


# -- 03 greedy continuation ----------------------------------------------------------------------------


def _cell_texts(fig) -> list:
    return [t for t in fig.axes[0].texts if t.get_text()]


def test_continuation_text_is_readable():
    """Token text at a size one reads (it was 6 pt), one token per cell, no two texts over each other."""
    labels = {i: f" w{i}" for i in range(10)} | {1: "a", 2: "\n"}
    fig = plots.plot_continuations([1, 2, 3, 4, 5, 6], [1, 2, 3, 7, 8, 9], labels)
    texts = _cell_texts(fig)
    assert len(texts) == 12
    assert min(t.get_fontsize() for t in texts) >= 8, sorted({t.get_fontsize() for t in texts})
    check_figure(fig)


def test_continuation_stops_at_the_end_of_text_token():
    """Each row is drawn up to and including its first stop token (<|endoftext|>): what follows is the model starting
    another document, not the continuation; the title says how many were generated, and its count of identical
    tokens covers them all."""
    eot = 0
    reference, selective = [5, 6, eot, 7, 8, 9], [5, 6, 3, eot, 8, 9]
    labels = {eot: "<|endoftext|>"} | {i: f" w{i}" for i in range(3, 10)}
    fig = plots.plot_continuations(reference, selective, labels, stop=[eot])
    ax = fig.axes[0]
    drawn = [t.get_text() for t in _cell_texts(fig)]
    cut = (reference.index(eot) + 1, selective.index(eot) + 1)
    assert len(drawn) == sum(cut) and ax.get_xlim()[1] == max(cut)
    assert drawn.count("<|endoftext|>") == 2 and not {"·w7", "·w9"} & set(drawn)
    same = next(j for j, (a, b) in enumerate(zip(reference, selective)) if a != b)
    assert f"identical for {same} of {len(reference)} tokens" in ax.get_title() and "end-of-text" in ax.get_title()
    check_figure(fig)


# -- 03 local vs chained: two series at the same layer -------------------------------------------------


def test_local_and_chained_markers_are_dodged():
    """Chained and local agree (the usual case): their markers at each layer must not sit on top of each other."""
    table = _hooks(lambda layer, point: 10 ** (-6 + 0.1 * layer))
    fig = plots.plot_local_vs_chained(_streamed(table, table.copy()), points=("hook_mlp_out",))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    chained, local = lines["hook_mlp_out (chained)"], lines["hook_mlp_out (local)"]
    a = ax.transData.transform(chained.get_xydata())
    b = ax.transData.transform(local.get_xydata())
    size_px = max(chained.get_markersize(), local.get_markersize()) * fig.dpi / 72
    assert len(a) == len(b) == 4
    assert np.hypot(*(a - b).T).min() >= size_px, "a chained marker covers its local one"
    check_figure(fig)


# -- legends over the data -----------------------------------------------------------------------------


def test_router_entropy_legend_covers_no_line():
    """Eight domains whose lines cross the whole axes: no place inside it is free for a legend."""
    rng = np.random.default_rng(0)
    layers = np.arange(16)
    entropy = pd.DataFrame({f"domain {d}": rng.uniform(0.2, 2.9, len(layers)) for d in range(8)}, index=layers)
    fig = plots.plot_router_entropy(entropy, max_bits=3.0)
    assert legend_covers(fig.axes[0]) == 0
    check_figure(fig)


def test_modality_overlap_legend_covers_no_point():
    rng = np.random.default_rng(1)
    pairs = ["text-audio", "text-image", "audio-image"]
    rows = [dict(layer=layer, pair=pair, load_overlap=rng.uniform(0.05, 0.95), baseline_load_overlap=rng.uniform(0.05, 0.95),
                 coactivation_corr=rng.uniform(-0.9, 0.9), baseline_coactivation_corr=rng.uniform(-0.9, 0.9))
            for layer in range(12) for pair in pairs]
    fig = plots.plot_modality_overlap(pd.DataFrame(rows).set_index(["layer", "pair"]))
    assert [legend_covers(ax) for ax in fig.axes] == [0, 0]
    check_figure(fig)


def _modality_specialization_data(layers: int = 6):
    rng = np.random.default_rng(2)
    spec = pd.DataFrame({"mi_bits": rng.uniform(0.2, 0.6, layers), "baseline_mean": rng.uniform(0.01, 0.03, layers),
                         "baseline_std": np.full(layers, 0.005), "domain_entropy_bits": np.full(layers, 1.58)},
                        index=pd.Index(range(layers), name="layer"))
    counts = {m: rng.integers(1, 6, layers) for m in ("text", "audio", "image")}
    single = pd.DataFrame({**counts, **{f"baseline_{m}": np.zeros(layers) for m in counts},
                           "experts": np.full(layers, 32)}, index=spec.index)
    return spec, single


def test_modality_specialization_legends_bars_and_the_zero_baseline():
    """Legends cover no bar; the stacked bars fit under the top of the axis; the shuffled baseline, 0 single-modality
    experts in every layer, is drawn above the bottom of the axis where it can be seen."""
    spec, single = _modality_specialization_data()
    fig = plots.plot_modality_specialization(spec, single)
    left, right = fig.axes
    assert legend_covers(left) == 0 and legend_covers(right) == 0
    stacked = single[["text", "audio", "image"]].sum(axis=1).max()
    bottom, top = right.get_ylim()
    assert top >= stacked
    baseline = [line for line in right.lines if np.allclose(line.get_ydata(), 0)]
    assert baseline, "no baseline drawn at 0"
    y0_px = right.transData.transform((0, 0))[1]
    assert y0_px - right.get_window_extent().y0 >= 3, "the baseline at 0 lies on the bottom of the axis"
    check_figure(fig)


# -- 05 quality and memory, speed ----------------------------------------------------------------------


def _sweep(names_kl_share: list[tuple[str, str, float, float, float]]) -> pd.DataFrame:
    rows = [dict(name="full", group="full", kl=0.0, top1_agreement=1.0, peak_expert_share=1.0, tokens_per_s=40.0)]
    rows += [dict(name=n, group=g, kl=kl, top1_agreement=max(0.0, 1 - kl / 3), peak_expert_share=share,
                  tokens_per_s=tps) for n, g, kl, share, tps in names_kl_share]
    return pd.DataFrame(rows)


def test_quality_memory_zero_kl_on_a_labelled_floor_and_labels_apart():
    """Cache settings have KL exactly 0: drawn on a log axis on a floor named 'exact 0' a decade under the least KL
    (a symlog axis put its '0' one decade under 1e-4, read as a small KL); settings of about the same memory and
    quality get labels that do not overlap."""
    table = _sweep([("top-1", "top_k", 0.66, 0.25, 50.0), ("top-2", "top_k", 0.14, 0.26, 50.0),
                    ("top-3", "top_k", 0.036, 0.27, 50.0), ("experts 0-7", "mask", 0.7, 0.25, 50.0),
                    ("salience a=0.25", "salience", 0.05, 0.25, 50.0), ("salience a=0.5", "salience", 0.1, 0.26, 50.0),
                    ("salience a=0.75", "salience", 0.2, 0.31, 50.0), ("top-4", "top_k", 0.2, 0.35, 50.0)]
                   + [(f"budget {s:.0%} lru", "budget", 0.0, s, 30.0) for s in (0.125, 0.25, 0.5)])
    fig = plots.plot_quality_memory(table)
    a, b = fig.axes[:2]
    assert_zeros_under_the_data(b, _smallest_positive(table.kl))
    assert "0" not in [t.get_text().strip("$\\mathdefault{}") for t in b.get_yticklabels()]
    assert overlapping_texts(a) == [] and overlapping_texts(b) == []
    check_figure(fig)


def test_speed_inside_the_timing_noise_is_not_called_a_speed_up():
    """One timing per setting: ratios within the band are labelled ≈1x (no '1.20x faster'), ratios outside it are
    stated; the band itself is drawn."""
    table = _sweep([("top-2", "top_k", 0.1, 1.0, 48.0), ("mask", "mask", 0.5, 0.5, 33.0),
                    ("top-1", "top_k", 0.6, 1.0, 80.0)])
    noise = 0.3  # plot_speed's band by default: ratios within 1 ± 0.3
    fig = plots.plot_speed(table)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    ratio = table.set_index("name").tokens_per_s / 40.0
    for name, r in ratio.items():
        stated = [t for t in texts if f"{r:.2f}x" in t]
        assert bool(stated) == (abs(r - 1) > noise), (name, r, texts)
    assert sum("≈1x" in t for t in texts) == int(((ratio - 1).abs() <= noise).sum())
    spans = [p for p in ax.patches if p.get_transform() != ax.transData]  # axvspan: x in data, y the whole axes
    assert any(np.isclose(p.get_x(), 1 - noise) and np.isclose(p.get_x() + p.get_width(), 1 + noise) for p in spans), \
        "no band drawn over the timing noise"
    check_figure(fig)


# -- 06 masking: the difference it rests on, with its error --------------------------------------------


def test_modality_masking_bars_carry_the_per_prompt_standard_error():
    forms, settings = ("text", "audio"), ("full", "audio-specific", "random")
    rng = np.random.default_rng(3)
    scores = pd.DataFrame([dict(setting=s, form=f, id=j, answer_nll=1.0 + (0 if s == "full" else rng.uniform(0, 1)))
                           for s in settings for f in forms for j in range(5)])
    nll = scores.set_index(["setting", "form", "id"]).answer_nll.sort_index()
    rows, sem = [], {}
    for s in settings:
        for f in forms:
            d = nll[s, f] - nll["full", f]  # per prompt, the same prompts
            sem[s, f] = float(d.std(ddof=1) / np.sqrt(len(d)))
            rows.append(dict(setting=s, form=f, d_answer_nll=float(d.mean()), masked_share=0.0 if s == "full" else 0.3,
                             text_ppl_ratio=1.0 if s == "full" else 1.2))
    fig = plots.plot_modality_masking(pd.DataFrame(rows), scores)
    ax = fig.axes[0]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    half = sorted(round(abs(seg[1][1] - seg[0][1]) / 2, 9) for c in bars for seg in c.get_segments())
    want = sorted(round(sem[s, f], 9) for s in settings[1:] for f in forms)
    assert half == want
    assert "s.e." in ax.get_ylabel()
    check_figure(fig)
