"""Every figure the notebooks draw (the plots room, `ol.plots`): each function takes computed data (DataFrames,
arrays) and returns a matplotlib Figure; nothing here reads a checkpoint or runs a model, and notebooks never
define plot code. `save_figure` (omnilab.notebook) writes a figure beside the executed notebook.

This room, one module per notebook, every name reachable here (`ol.plots.plot_fault`):
- axes.py: the axis helpers the figures share (exact zeros on a log axis, labels spread apart, plurals).
- shards.py: notebooks 01 and 02 (bytes per component, shard map, experts on disk, masking cost).
- comparison.py: notebook 03 (rel_err per hook, top-k agreement, continuations, faults, dtypes, local vs chained).
- routing.py: notebook 04 (router heatmaps and statistics; each token of a document on its top expert).
- explore.py: notebook 04's ipywidgets explorers, and `headless` (unattended runs draw the first view only).
- generation.py: notebook 05 (quality against memory, decoding speed, cache budget).
- modality.py: notebook 06 (expert load, specialization, overlap and masking by modality).
"""

import matplotlib

# Agg unless a notebook or GUI backend is already chosen; here, before any module of this room imports pyplot
matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "nbagg", "qt", "tk", "macosx")) else None

from omnilab.plots.comparison import (_loop, plot_continuations, plot_dtype_errors, plot_fault,  # noqa: E402
                                      plot_local_vs_chained, plot_rel_err_by_layer, plot_routing_agreement)
from omnilab.plots.explore import headless, router_explorer, token_routing_explorer  # noqa: E402
from omnilab.plots.generation import plot_cache_budget, plot_quality_memory, plot_speed  # noqa: E402
from omnilab.plots.modality import (_paired_sem, plot_modality_load, plot_modality_masking,  # noqa: E402
                                    plot_modality_overlap, plot_modality_specialization)
from omnilab.plots.routing import (_expert_colors, plot_coactivation, plot_domain_expert,  # noqa: E402
                                   plot_expert_load, plot_hit_rates, plot_layer_domain, plot_router_entropy,
                                   plot_same_expert, plot_specialization, plot_token_routing, token_routing_table)
from omnilab.plots.shards import (plot_component_bytes, plot_expert_completeness, plot_masking_cost,  # noqa: E402
                                  plot_shard_map)

# _loop, _expert_colors, _paired_sem: private, here for the tests that check them (tests/test_plots.py, test_modality.py)
__all__ = [
    "plot_component_bytes", "plot_shard_map", "plot_expert_completeness", "plot_masking_cost",
    "plot_rel_err_by_layer", "plot_routing_agreement", "plot_continuations", "plot_fault", "plot_dtype_errors",
    "plot_local_vs_chained",
    "plot_expert_load", "plot_domain_expert", "plot_specialization", "plot_coactivation", "plot_same_expert",
    "plot_hit_rates", "plot_router_entropy", "plot_layer_domain", "token_routing_table", "plot_token_routing",
    "router_explorer", "token_routing_explorer", "headless",
    "plot_quality_memory", "plot_speed", "plot_cache_budget",
    "plot_modality_load", "plot_modality_specialization", "plot_modality_overlap", "plot_modality_masking",
]
