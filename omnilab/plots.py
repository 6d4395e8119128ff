"""Every figure the notebooks draw. Each function takes computed data (DataFrames, arrays) and returns a
matplotlib Figure; nothing here reads a checkpoint or runs a model. Notebooks never define plot code.

Sections follow the notebooks; `save_figure` (omnilab.regress) writes a figure beside the executed notebook.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "nbagg", "qt", "tk", "macosx")) else None

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# -- 01 shard inspection -------------------------------------------------------------------------------

# -- 02 component extraction ---------------------------------------------------------------------------

# -- 03 activation comparison --------------------------------------------------------------------------

# -- 04 router heatmaps --------------------------------------------------------------------------------

# -- 05 generation experiments -------------------------------------------------------------------------
