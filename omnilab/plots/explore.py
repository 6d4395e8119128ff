"""The ipywidgets explorers of notebook 04: a layer slider and a dropdown over one of routing.py's figures
(`router_explorer`: a domain; `token_routing_explorer`: a document, with its table of top-k experts). In an
unattended run (`headless`: OMNILAB_HEADLESS=1, set by `omnilab regress` and the nbval phase) an explorer draws
its first view into the cell's output and opens no widget.
"""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import pandas as pd

from omnilab.plots.routing import plot_layer_domain, plot_token_routing, token_routing_table


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


def router_explorer(table: pd.DataFrame, load: pd.DataFrame):
    """An ipywidgets explorer (layer slider, domain dropdown) over plot_layer_domain; returns the widget, its first
    figure drawn (unattended runs: the first figure alone, see _explorer)."""
    layers = sorted(load.index)
    domains = list(dict.fromkeys(d for _, d in table.index))
    return _explorer(layers, [(d, d) for d in domains], ("layer", "domain"),
                     lambda layer, domain: (plot_layer_domain(table, load, layer, domain),))


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
