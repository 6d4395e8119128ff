"""Which experts an extraction (or any checkpoint) holds: the availability map, what was not extracted, and
bytes per component."""

from __future__ import annotations

import os

import pandas as pd

from omnilab.arch import ALL_COMPONENTS, classify
from omnilab.checkpoint import Checkpoint
from omnilab.extraction.manifest import is_extraction, manifest_table, read_manifest
from omnilab.inventory import Inventory, inventory


def _inventory_of(path: str | os.PathLike | Checkpoint | Inventory) -> Inventory:
    """An Inventory as given, or one labelling (not checking) the checkpoint at `path`."""
    return path if isinstance(path, Inventory) else inventory(path, check=False)


def availability(path: str | os.PathLike | Checkpoint | Inventory) -> pd.DataFrame:
    """Layers x experts of the text decoder: how many of an expert's three projections are present (0..3).

    Works on any checkpoint folder (an extraction or the original shards), an open Checkpoint or its Inventory
    (its `expert_grid`); rows are the MoE layers. Raises CheckpointError when config.json is unusable."""
    inv = _inventory_of(path)
    cfg = inv.config
    if cfg is None:
        inv.checkpoint.arch  # raises CheckpointError naming config.json
    layers = cfg.moe_layers
    return pd.DataFrame(inv.expert_grid[layers].astype(int), index=pd.Index(layers, name="layer"),
                        columns=pd.Index(range(cfg.num_experts), name="expert"))


def availability_text(avail: pd.DataFrame) -> str:
    """The availability map as text, one line per layer: '#' an expert with all 3 projections, '1'/'2' some,
    '.' none. For `omnilab verify` on a partial extraction."""
    lines = [f"experts 0..{avail.shape[1] - 1} per layer ('#' complete, '1'/'2' projections present, '.' absent):"]
    width = len(str(avail.index.max())) if len(avail) else 1
    for layer, row in avail.iterrows():
        cells = "".join("#" if n >= 3 else "." if n == 0 else str(int(n)) for n in row)
        lines.append(f"  layer {layer:>{width}} {cells}  {int((row >= 3).sum())}/{len(row)}")
    return "\n".join(lines)


def not_extracted(path: str | os.PathLike, manifest: dict | None = None) -> set[str]:
    """Source tensors an extraction left out on purpose (its selection): expected to be absent, not problems.
    `manifest`: the folder's manifest.json when already read."""
    return set((manifest if manifest is not None else read_manifest(path)).get("missing", []))


def missing_summary(path: str | os.PathLike | Checkpoint | Inventory, manifest: dict | None = None) -> str:
    """One line: what an extraction (or any checkpoint folder) lacks, experts by layer and other components.

    `path` may be an open Checkpoint or its Inventory; `manifest`: the extraction's manifest.json when already read."""
    inv = _inventory_of(path)
    ck = inv.checkpoint
    cfg, layout = ck.arch
    avail = availability(inv)
    n = avail.size
    full = int((avail == 3).sum().sum())
    partial = int(((avail > 0) & (avail < 3)).sum().sum())
    parts = []
    if full < n:
        parts.append(f"experts: {full} of {n} (layer x expert) present" + (f", {partial} with missing projections" if partial else ""))
    if manifest is None and is_extraction(ck.path):
        manifest = read_manifest(ck.path)
    if manifest is not None:
        missing = manifest.get("missing", [])
    else:
        from omnilab.arch import expected_tensors

        missing = sorted(set(expected_tensors(cfg, layout)) - set(ck.tensors.name))
    other: dict[str, int] = {}
    for name in missing:
        c = classify(name, layout).component
        if c != "experts":
            other[c] = other.get(c, 0) + 1
    if other:
        parts.append("missing " + ", ".join(f"{c} ({k} tensors)" for c, k in sorted(other.items(), key=lambda kv: ALL_COMPONENTS.index(kv[0]) if kv[0] in ALL_COMPONENTS else 99)))
    if not parts:
        return "complete: every tensor of the source is present"
    return "partial: " + "; ".join(parts)


def component_bytes(path: str | os.PathLike) -> pd.DataFrame:
    """Bytes, tensors and files per component of an extraction, in inventory order."""
    table = manifest_table(path)
    out = table.groupby("component").agg(tensors=("name", "size"), files=("file", "nunique"), bytes=("bytes", "sum"))
    order = [c for c in ALL_COMPONENTS if c in out.index] + [c for c in out.index if c not in ALL_COMPONENTS]
    return out.loc[order]
