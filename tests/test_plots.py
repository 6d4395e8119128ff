"""Every figure function in omnilab.plots draws labelled axes from data of the shape the notebooks pass it:
an x label, a y label (or category tick labels, or a labelled axis it shares y with), a title, something drawn,
and a label on every colour bar. Plus the labels a researcher reads: sizes, plurals, decoded tokens, loops."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from omnilab import plots  # noqa: E402
from omnilab.experiments import cache_sim, routing  # noqa: E402
from omnilab.trace import record as routing_trace  # noqa: E402
from omnilab.inventory import inventory  # noqa: E402
from omnilab.model.decoder import SelectiveMoE  # noqa: E402
from omnilab.model.hooks import compare  # noqa: E402
from omnilab.reference.whole import Reference  # noqa: E402
from omnilab.units import format_bytes  # noqa: E402

from tests.figure_checks import check_figure  # noqa: E402

E, K, L = 8, 2, 3
DOMAINS = ["en", "fr", "python"]


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]


def _numeric(label: str) -> bool:
    try:
        float(label.get_text().replace("−", "-"))
        return True
    except ValueError:
        return False


def assert_labelled(fig, skip=frozenset()):
    """The labels below, then what the figure draws (figure_checks.check_figure)."""
    colorbars = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison and ax not in colorbars]
    assert axes, "no axes drawn"
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    for ax in axes:
        assert ax.get_xlabel().strip(), f"axes {ax.get_title()!r} has no x label"
        ticks = [t for t in ax.get_yticklabels() if t.get_text()]
        shared = [s for s in ax.get_shared_y_axes().get_siblings(ax) if s.get_ylabel().strip()]
        assert ax.get_ylabel().strip() or (ticks and not any(_numeric(t) for t in ticks)) or shared, \
            f"axes {ax.get_title()!r} has no y label"
        assert ax.get_title().strip() or suptitle.strip(), "no title"
        assert ax.lines or ax.patches or ax.images or ax.collections, f"axes {ax.get_title()!r} draws nothing"
    for cb in colorbars:
        assert cb.get_ylabel().strip() or cb.get_xlabel().strip(), "a colour bar without a label"
    check_figure(fig, skip=skip)


# -- data of the shapes the notebooks pass -------------------------------------------------------------


@pytest.fixture(scope="module")
def trace():
    rng = np.random.default_rng(0)
    parts = []
    for doc in range(6):
        domain = DOMAINS[doc % len(DOMAINS)]
        ids = rng.integers(0, 12, 40)
        experts = np.array([[rng.choice(E, K, replace=False) for _ in ids] for _ in range(L)])
        weights = np.full(experts.shape, 0.5)
        entropy = rng.uniform(0.5, 2.5, (L, len(ids)))
        parts.append(routing_trace.trace_rows(doc, domain, ids, experts, weights, entropy))
    return routing_trace.concat_traces(parts, num_experts=E, top_k=K, num_layers=L)


@pytest.fixture(scope="module")
def comparison(make_checkpoint):
    path = make_checkpoint("moe")
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    return compare(Reference.from_checkpoint(path), SelectiveMoE.from_checkpoint(path), ids)


@pytest.fixture
def sweep_table():
    rows = [dict(name="full", group="full", value=None, budget_share=None, policy=None, kl=0.0, top1_agreement=1.0,
                 hit_rate=0.2, loaded_bytes_per_token=2**20, peak_expert_share=1.0, tokens_per_s=40.0)]
    for k, kl, agree in ((1, 0.66, 0.6), (2, 0.14, 0.8), (3, 0.036, 0.89)):
        rows.append(dict(name=f"top-{k}", group="top_k", value=k, budget_share=None, policy=None, kl=kl,
                         top1_agreement=agree, hit_rate=0.2, loaded_bytes_per_token=2**19, peak_expert_share=1.0,
                         tokens_per_s=50.0 + k))
    rows.append(dict(name="experts 0-7", group="mask", value=None, budget_share=None, policy=None, kl=2.7,
                     top1_agreement=0.23, hit_rate=0.98, loaded_bytes_per_token=2**16, peak_expert_share=0.25,
                     tokens_per_s=60.0))
    for share in (0.125, 0.25, 0.5):
        for policy, boost in (("lru", 0.0), ("lfu", 0.03), ("trust", 0.08)):
            rows.append(dict(name=f"budget {share:.1%} {policy}", group="budget", value=share, budget_share=share,
                             policy=policy, kl=0.0, top1_agreement=1.0, hit_rate=min(1, share * 1.4 + boost),
                             loaded_bytes_per_token=(1 - share) * 2**20, peak_expert_share=share,
                             tokens_per_s=30.0 + share))
    for alpha in (0.25, 0.5):
        rows.append(dict(name=f"salience a={alpha}", group="salience", value=alpha, budget_share=0.25, policy="lru",
                         kl=0.05 * alpha * 4, top1_agreement=0.9 - alpha / 4, hit_rate=0.45 + alpha / 10,
                         loaded_bytes_per_token=2**18, peak_expert_share=0.25, tokens_per_s=35.0))
    return pd.DataFrame(rows)


# -- 01 / 02 -------------------------------------------------------------------------------------------


def test_component_bytes_shares_sizes_and_plurals(tiny_omni):
    components = inventory(tiny_omni).components
    fig = plots.plot_component_bytes(components)
    texts = _texts(fig)
    assert fig.axes[0].get_xscale() == "linear"
    assert not any("BB" in t or "(1 tensors" in t for t in texts), texts
    one = pd.DataFrame({"tensors": [1, 3], "bytes": [512, 58_000_000_000]}, index=["tiny", "experts"])
    fig1 = plots.plot_component_bytes(one)
    texts1 = _texts(fig1)
    assert any("512 B" in t and "(1 tensor)" in t for t in texts1) and any("58 GB" in t for t in texts1), texts1
    assert_labelled(fig)
    assert_labelled(fig1)


def test_short_bytes():
    assert [format_bytes(n, short=True) for n in (512, 1500, 27_385_314, 70_519_637_090)] == \
        ["512 B", "1.5 kB", "27.4 MB", "70.5 GB"]


def test_shard_map_and_expert_completeness(tiny_omni):
    inv = inventory(tiny_omni)
    assert_labelled(plots.plot_shard_map(inv.shard_map))
    assert_labelled(plots.plot_expert_completeness(inv.expert_grid))


def test_masking_cost():
    table = pd.DataFrame({"experts_share": [0.25, 0.5, 1.0], "kl": [2.0, 1.5, 0.0],
                          "top1_agreement": [0.2, 0.4, 1.0], "masked_share": [0.7, 0.5, 0.0]})
    assert_labelled(plots.plot_masking_cost(table))


# -- 03 ------------------------------------------------------------------------------------------------


def test_comparison_figures(comparison):
    assert_labelled(plots.plot_rel_err_by_layer(comparison.table))
    assert_labelled(plots.plot_routing_agreement(comparison.table))
    assert_labelled(plots.plot_dtype_errors({"a": comparison.table, "b": comparison.table}))
    name = comparison.table.name.iloc[5]
    table = comparison.table.assign(divergent=comparison.table.index >= 5)
    fig = plots.plot_fault(table, "zeroed expert", name, injected_layer=1, tol=1e-5)
    assert "forward order" in fig.axes[0].get_xlabel()
    assert_labelled(fig)


def test_continuations_show_decoded_text_and_the_loop():
    reference = [5, 6, 7, 8, 9, 8, 9, 8, 9, 8, 9]
    selective = reference[:6] + [1, 2, 3, 4, 5]
    labels = {i: f" w{i}" for i in range(10)} | {9: "\n"}
    fig = plots.plot_continuations(reference, selective, labels, prompt="Hi")
    texts = _texts(fig)
    assert "·w5" in texts and "⏎" in texts
    title = fig.axes[0].get_title()
    assert "identical for 6 of 11" in title and "from token 3" in title and "2-token loop" in title, title
    streamed = plots.plot_continuations([1, 2], [1, 3], pieces=(["a", "é"], ["a", "…"]))
    assert {"a", "é", "…"} <= set(_texts(streamed)) and "adds" in streamed.axes[0].get_xlabel()
    assert_labelled(streamed)
    assert_labelled(fig)
    plain = plots.plot_continuations([1, 2, 3, 4], [1, 2, 3, 4])
    assert "loop" not in plain.axes[0].get_title() and "token id" in plain.axes[0].get_xlabel()
    assert_labelled(plain)


def test_loop_detection():
    assert plots._loop([1, 2, 3, 4]) is None
    assert plots._loop([1, 2, 3, 4, 3, 4, 3, 4]) == (2, 2)
    assert plots._loop([7, 7, 7, 7]) == (0, 1)


# -- 04 ------------------------------------------------------------------------------------------------


def test_router_figures(trace):
    load = routing.expert_load(trace)
    assert_labelled(plots.plot_expert_load(load))
    lifts = {layer: routing.domain_lift(trace, layer) for layer in routing.layers_of(trace)}
    fig = plots.plot_domain_expert(lifts)
    assert "saturate" in fig._suptitle.get_text()
    assert_labelled(fig)
    spec = routing.specialization(trace, shuffles=2)
    tokens = routing.token_specialization(trace, min_count=2)
    domains = routing.token_specialization(trace, by="domain", min_count=2)
    assert_labelled(plots.plot_specialization(spec, tokens, domains))
    assert_labelled(plots.plot_coactivation({layer: routing.coactivation(trace, layer) for layer in (0, 2)}))
    assert_labelled(plots.plot_same_expert(routing.same_expert_rate(trace)))
    curve = cache_sim.hit_rate_curve(trace, sizes=[2, 6, 12])
    fig = plots.plot_hit_rates(curve, per_token_share=L * K / (L * E))
    assert any("evicts" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert_labelled(fig)
    assert_labelled(plots.plot_router_entropy(routing.entropy_table(trace), max_bits=3.0))
    table = routing.domain_expert(trace)
    assert_labelled(plots.plot_layer_domain(table, load, 1, "fr"))


def test_router_explorer_draws_and_its_errors_are_raised(trace, monkeypatch):
    import ipywidgets

    monkeypatch.delenv("OMNILAB_HEADLESS", raising=False)
    load = routing.expert_load(trace)
    table = routing.domain_expert(trace)
    assert isinstance(plots.router_explorer(table, load), ipywidgets.VBox)
    with pytest.raises(KeyError):  # a callback that fails is an error of the cell, not text inside a widget
        plots.router_explorer(table.drop(index=0, level=0), load)
    plt.close("all")


def test_explorers_in_an_unattended_run_draw_their_first_view_and_open_no_widget(trace, monkeypatch):
    import IPython.display
    import ipywidgets

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append(obj))
    monkeypatch.setattr(ipywidgets.Widget, "__init__", lambda *a, **k: pytest.fail("a widget was opened"))
    monkeypatch.setenv("OMNILAB_HEADLESS", "1")
    load, table = routing.expert_load(trace), routing.domain_expert(trace)
    assert plots.router_explorer(table, load) is None
    assert len(shown) == 1 and isinstance(shown[0], plt.Figure)
    assert shown[0].axes[0].get_title() == plots.plot_layer_domain(table, load, min(load.index),
                                                                    table.index[0][1]).axes[0].get_title()
    assert plots.token_routing_explorer(trace) is None
    assert isinstance(shown[1], plt.Figure) and isinstance(shown[2], pd.DataFrame)  # the figure, then its table
    plt.close("all")


# -- 05 ------------------------------------------------------------------------------------------------


def test_sweep_figures(sweep_table):
    assert_labelled(plots.plot_quality_memory(sweep_table))
    assert_labelled(plots.plot_cache_budget(sweep_table))
    fig = plots.plot_speed(sweep_table)
    assert "full" in fig.axes[0].get_xlabel()
    texts = _texts(fig)  # 50-53 tokens/s against 40: 1.25-1.33x, within a single timing's noise, is not a speed-up
    assert any(t.startswith(" ≈1x (51.0/s)") for t in texts) and not any("1.27x" in t for t in texts), texts
    assert any(t.startswith(" 1.50x") for t in texts), texts  # 60 tokens/s: outside the band, stated
    assert_labelled(fig)


def test_every_figure_function_is_tested():
    import importlib
    import inspect
    import pathlib
    import pkgutil

    source = "".join(p.read_text() for p in pathlib.Path(__file__).parent.glob("test_*.py"))
    room = [importlib.import_module(f"{plots.__name__}.{m.name}") for m in pkgutil.iter_modules(plots.__path__)]
    drawn = [name for module in room for name, f in inspect.getmembers(module, inspect.isfunction)
             if name.startswith("plot_") and f.__module__ == module.__name__]  # defined in one of the room's modules
    assert drawn and [n for n in drawn if getattr(plots, n, None) is None] == []  # each one also omnilab.plots.<name>
    assert [n for n in drawn if f"plots.{n}(" not in source] == []


def test_token_routing_reads_the_trace(trace, monkeypatch):
    import ipywidgets

    monkeypatch.delenv("OMNILAB_HEADLESS", raising=False)
    table = plots.token_routing_table(trace, 1, 2, pieces=[f"t{i}" for i in range(40)])
    rows = trace[(trace["doc"] == 1) & (trace["layer"] == 2)].sort_values(["position", "rank"])
    assert len(table) == 40 and table.loc[3, "text"] == "t3"
    assert table.loc[3, "experts"] == rows[rows.position == 3]["expert"].tolist()
    assert table.loc[3, "top_expert"] == int(rows[(rows.position == 3) & (rows["rank"] == 0)]["expert"].iloc[0])
    fig = plots.plot_token_routing(table, E, 2)
    ax = fig.axes[0]
    drawn = {t.get_text() for t in ax.texts}
    assert {f"t{i}" for i in range(40)} <= drawn
    colors = plots._expert_colors(E)
    box = [p for p in ax.patches][3]  # the fourth token's box carries its top expert's colour
    assert np.allclose(box.get_facecolor()[:3], colors[table.loc[3, "top_expert"]][:3])
    assert_labelled(fig, skip={"texts_overlap"})
    with pytest.raises(KeyError):
        plots.token_routing_table(trace, 99, 2)
    assert isinstance(plots.token_routing_explorer(trace), ipywidgets.VBox)
    plt.close("all")
