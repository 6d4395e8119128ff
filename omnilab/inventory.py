"""Inventory and verify: every tensor of a checkpoint grouped into components and checked against its config.

`inventory(path)` opens a checkpoint (headers only, see checkpoint.py), labels every tensor with its component
(omnilab.arch.classify), and compares what is present with what config.json implies (arch.expected_tensors):

- missing         an expected tensor in no shard (a whole absent expert is one line, not three)
- unexpected      a text-decoder tensor the config does not imply; a tower the config does not have
- partial_expert  an expert with one or two of its three projections (one line per expert)
- shape           a tensor whose shape differs from what the config implies
- dtype           a tensor whose dtype differs from the rest of its model part (text decoder, each tower)

These join the file-level problems the Checkpoint found (missing_shard, not_in_shard, unindexed, truncated,
bad_header, duplicate). A tensor already accounted for by a file-level problem (its shard is missing or
unreadable, or the index points to a shard without it) is not reported again as missing.

Component labels (the keys of `inspect --json`'s `components`) follow the tensor names: for Qwen3-Omni
"thinker.embed", "thinker.attention", "thinker.norms", "thinker.router", "thinker.experts", "thinker.dense_mlp",
"thinker.final_norm", "thinker.lm_head", "thinker.audio", "thinker.vision", "talker" (its code predictor
included), "code2wav"; for Qwen3-MoE the same text labels without "thinker."; anything else "unrecognised".
Nothing here reads a weight, and nothing loops over tensors more than a few times, so the 28,010 tensors of
Qwen3-Omni-30B-A3B take well under a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from omnilab.arch import (ALL_COMPONENTS, EXPERT_PROJECTIONS, QWEN3_MOE, QWEN3_OMNI, TEXT_COMPONENTS, TOWERS, Layout, Qwen3MoeConfig, classify, expected_tensors)
from omnilab.checkpoint import Checkpoint, CheckpointError, ConfigError, Problem, UNREADABLE


def component_label(component: str, layout: Layout) -> str:
    """'experts' -> 'thinker.experts' for Qwen3-Omni, 'experts' for Qwen3-MoE; towers as their name prefix."""
    if layout.prefix.startswith("thinker.") and (component in TEXT_COMPONENTS or component in ("audio", "vision")):
        return f"thinker.{component}"
    return component


def component_order(layout: Layout) -> list[str]:
    """Every component label of a layout, in the order the inventory lists them."""
    return [component_label(c, layout) for c in ALL_COMPONENTS]


def guess_layout(names) -> Layout:
    """The layout implied by tensor names alone (for a checkpoint without a readable config.json)."""
    return QWEN3_OMNI if any(str(n).startswith("thinker.") for n in names) else QWEN3_MOE


@dataclass
class Inventory:
    """One checkpoint, every tensor labelled, and every problem found."""

    checkpoint: Checkpoint
    layout: Layout
    config: Qwen3MoeConfig | None  # None when config.json is absent or not a Qwen3-MoE family config
    table: pd.DataFrame  # the checkpoint's tensor table + component, label, layer, expert, projection
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why

    @cached_property
    def components(self) -> pd.DataFrame:
        """One row per component label present: tensors, bytes, shards (how many files hold some of it)."""
        g = self.table.groupby("label", sort=False)
        df = pd.DataFrame({"tensors": g.size(), "bytes": g["bytes"].sum(), "shards": g["shard"].nunique()})
        order = [c for c in component_order(self.layout) if c in df.index]
        return df.loc[order + [c for c in df.index if c not in order]].rename_axis("component")

    @cached_property
    def shard_map(self) -> pd.DataFrame:
        """Bytes per (shard, component label): rows are shard files, columns component labels."""
        pivot = self.table.pivot_table(index="shard", columns="label", values="bytes", aggfunc="sum", fill_value=0)
        cols = [c for c in self.components.index if c in pivot.columns]
        return pivot.reindex(index=self.checkpoint.shards, columns=cols, fill_value=0).rename_axis(None, axis=1)

    @cached_property
    def expert_grid(self) -> np.ndarray:
        """layers x experts: how many of the 3 projections of each expert are present (0..3); NaN on dense layers.

        Only tensors with the expected names count (an expert index past num_experts is `unexpected`)."""
        if self.config is None:
            return np.zeros((0, 0))
        cfg = self.config
        grid = np.full((cfg.num_hidden_layers, cfg.num_experts), np.nan)
        grid[cfg.moe_layers, :] = 0
        rows = self.table[(self.table.component == "experts") & self.table.projection.notna()]
        layer, expert = rows.layer.to_numpy(int), rows.expert.to_numpy(int)
        ok = (layer < cfg.num_hidden_layers) & (expert < cfg.num_experts)
        layer, expert = layer[ok], expert[ok]
        ok = ~np.isnan(grid[layer, expert])
        np.add.at(grid, (layer[ok], expert[ok]), 1)
        return grid

    @cached_property
    def expert_layers(self) -> pd.DataFrame:
        """Per MoE layer: experts complete (3/3 projections), partial (1-2), missing (0)."""
        grid = self.expert_grid
        moe = [i for i in range(grid.shape[0]) if not np.isnan(grid[i]).all()]
        g = grid[moe]
        return pd.DataFrame({"layer": moe, "complete": (g == 3).sum(1), "partial": ((g > 0) & (g < 3)).sum(1),
                             "missing": (g == 0).sum(1)}).set_index("layer")

    def summary(self) -> dict:
        """What `omnilab inspect --json` prints (without the tokenizer, which vocab.py adds)."""
        ckpt, layers = self.checkpoint, self.expert_layers
        return {
            "path": str(ckpt.path),
            "model_type": self.layout.model_type if self.config is not None else None,
            "shards": len(ckpt.shards),
            "tensors": len(ckpt.tensors),
            "total_bytes": ckpt.total_bytes,
            "file_bytes": ckpt.file_bytes,
            "dtypes": {k: int(v) for k, v in ckpt.tensors["dtype"].value_counts().items()},
            "components": {label: {"tensors": int(r.tensors), "bytes": int(r.bytes), "shards": int(r.shards)}
                           for label, r in self.components.iterrows()},
            "shard_map": {shard: {label: int(b) for label, b in row.items() if b}
                          for shard, row in self.shard_map.iterrows()},
            "experts": None if self.config is None else {
                "component": component_label("experts", self.layout),
                "layers": self.config.num_hidden_layers,
                "moe_layers": len(layers),
                "experts_per_layer": self.config.num_experts,
                "complete": int(layers.complete.sum()),
                "partial": int(layers.partial.sum()),
                "missing": int(layers.missing.sum()),
                "per_layer": [{"layer": int(i), **{k: int(v) for k, v in r.items()}} for i, r in layers.iterrows()],
            },
            "problems": [p.to_dict() for p in self.problems],
            "notes": list(self.notes),
        }


def inventory(checkpoint: str | os.PathLike | Checkpoint, *, check: bool = True) -> Inventory:
    """Label every tensor of a checkpoint and check it against its config.json.

    check=False: label only (problems are then the Checkpoint's file-level ones), e.g. for the expert grid."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    notes: list[str] = []
    cfg, layout = None, None
    config_problems = []
    try:
        cfg, layout = ckpt.arch
    except ConfigError as e:  # a family config whose values cannot work: every model verb refuses it
        config_problems.append(Problem("config", str(e), shard="config.json"))
        notes.append(f"not checked against a config: {e}")
    except CheckpointError as e:  # config.json absent or not a Qwen3-MoE family config (the message names it)
        notes.append(f"not checked against a config: {e}")
    if layout is None:
        layout = guess_layout(ckpt.tensors.name)
    table = _label(ckpt.tensors, layout)
    inv = Inventory(ckpt, layout, cfg, table, list(ckpt.problems) + config_problems, notes)
    if not check:
        return inv
    if cfg is not None:
        inv.problems += _check_config(inv)
    inv.problems += _check_dtypes(inv)
    return inv


def verify(checkpoint: str | os.PathLike | Checkpoint) -> list[Problem]:
    """Every problem with a checkpoint, file-level and against its config (empty when sound)."""
    return inventory(checkpoint).problems


@dataclass
class Report:
    """What `omnilab inspect` / `verify` report on a checkpoint: its inventory, the tokenizer check (None when
    there is no tokenizer) and every problem, the tokenizer's included."""

    inventory: Inventory
    tokenizer: object | None  # omnilab.vocab.TokenizerReport
    problems: list[Problem]


def checkpoint_report(checkpoint: str | os.PathLike | Checkpoint) -> Report:
    """Inventory plus tokenizer check of one checkpoint, with the problems of both in one list."""
    from omnilab.vocab import check_checkpoint_tokenizer

    inv = inventory(checkpoint)
    tok = check_checkpoint_tokenizer(inv)
    problems = list(inv.problems) + (tok.problems() if tok is not None else [])
    return Report(inv, tok, problems)


def problems_frame(problems: list[Problem]) -> pd.DataFrame:
    """Problems as a table (kind, tensor, shard, message), for notebooks."""
    return pd.DataFrame([p.to_dict() for p in problems], columns=["kind", "tensor", "shard", "message"])


# -- labelling -----------------------------------------------------------------------------------------


def _label(tensors: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    specs = [classify(n, layout) for n in tensors.name]
    table = tensors.copy()
    table["component"] = [s.component for s in specs]
    table["label"] = [component_label(s.component, layout) for s in specs]
    table["layer"] = pd.array([s.layer for s in specs], dtype="Int64")
    table["expert"] = pd.array([s.expert for s in specs], dtype="Int64")
    table["projection"] = [s.projection for s in specs]
    return table


# -- checks against config.json ------------------------------------------------------------------------


def _accounted(ckpt: Checkpoint) -> set[str]:
    """Tensor names a file-level problem already reports (unreadable shard, index pointing elsewhere)."""
    names = {p.tensor for p in ckpt.problems if p.kind == "not_in_shard"}
    if ckpt.index is not None:
        lost = {s for s, info in ckpt.shard_info.items() if info["status"] in UNREADABLE}
        if lost:
            names |= {n for n, s in ckpt.index["weight_map"].items() if s in lost}
    return names


def _check_config(inv: Inventory) -> list[Problem]:
    ckpt, cfg, layout, table = inv.checkpoint, inv.config, inv.layout, inv.table
    expected = expected_tensors(cfg, layout)
    present = set(table.name)
    problems: list[Problem] = []

    # missing (and partial experts), in checkpoint order
    unknown = [s for s, info in ckpt.shard_info.items() if info["status"] in UNREADABLE] if ckpt.index is None else []
    if unknown:
        inv.notes.append(f"completeness not checked: {', '.join(unknown)} is unreadable and no index says what it held")
    else:
        accounted = _accounted(ckpt)
        text = table[table.component.isin(TEXT_COMPONENTS) & table.layer.notna()]
        layer_shards = text.groupby("layer")["shard"].agg(lambda s: sorted(set(s)))  # where each layer's others are
        experts: dict[tuple[int, int], list[str]] = {}  # (layer, expert) -> absent projections
        for name, spec in expected.items():
            if name in present or name in accounted:
                continue
            if spec.component == "experts":
                experts.setdefault((spec.layer, spec.expert), []).append(spec.projection)
                continue
            what = f"{spec.component}, shape {list(spec.shape)}"
            if spec.layer is not None:
                others = layer_shards.get(spec.layer, [])  # worth saying only when it points somewhere
                near = f"; the layer's other tensors are in {' and '.join(others)}" if 0 < len(others) <= 2 else ""
                what = f"layer {spec.layer} {what}{near}"
            problems.append(Problem("missing", f"tensor {name} is in no shard ({what})", tensor=name))
        for (layer, e), absent in experts.items():
            stem = f"{layout.prefix}layers.{layer}.mlp.experts.{e}"
            have = [p for p in EXPERT_PROJECTIONS if p not in absent and f"{stem}.{p}.weight" in present]
            if not have:
                if len(absent) == len(EXPERT_PROJECTIONS):
                    problems.append(Problem(
                        "missing", f"expert {e} of layer {layer} is in no shard: "
                                   f"{stem}.{{{','.join(absent)}}}.weight", tensor=f"{stem}.{absent[0]}.weight"))
                continue  # the rest are accounted for by a file-level problem
            shards = sorted({table.at[f"{stem}.{p}.weight", "shard"] for p in have})
            problems.append(Problem(
                "partial_expert", f"expert {e} of layer {layer} has {', '.join(have)} ({', '.join(shards)}) "
                                  f"but not {', '.join(absent)}: {stem}.{absent[0]}.weight is in no shard",
                tensor=f"{stem}.{absent[0]}.weight", shard=shards[0]))

    # unexpected: text-decoder names the config does not imply (towers are checked as wholes below)
    loose = table[~table.component.isin(TOWERS) & ~table.name.isin(expected.keys())]
    for name, shard, comp, layer, e in zip(loose.name, loose.shard, loose.component, loose.layer, loose.expert):
        why = _why_unexpected(cfg, comp, None if pd.isna(layer) else int(layer), None if pd.isna(e) else int(e))
        problems.append(Problem("unexpected", f"tensor {name} in {shard} is not implied by config.json{why}",
                                tensor=name, shard=shard))
    if layout is QWEN3_OMNI:
        problems += _check_towers(ckpt.config, table)

    # shape
    both = table[table.name.isin(expected.keys())]
    for name, shard, dtype, shape in zip(both.name, both.shard, both["dtype"], both["shape"]):
        want = expected[name].shape
        if tuple(shape) != tuple(want):
            problems.append(Problem("shape", f"tensor {name} in {shard} is {dtype}{list(shape)}, "
                                             f"config.json implies {list(want)}", tensor=name, shard=shard))
    return problems


def _why_unexpected(cfg: Qwen3MoeConfig, component: str, layer: int | None, expert: int | None) -> str:
    """A short reason, when the name says why the config does not imply it."""
    if component == "unrecognised":
        return " (unrecognised name)"
    if component == "lm_head" and cfg.tie_word_embeddings:
        return " (tie_word_embeddings is true)"
    if layer is None:
        return ""
    if layer >= cfg.num_hidden_layers:
        return f" (layer {layer}, but num_hidden_layers is {cfg.num_hidden_layers})"
    if expert is not None and expert >= cfg.num_experts:
        return f" (expert {expert}, but num_experts is {cfg.num_experts})"
    if component in ("experts", "router") and not cfg.is_moe_layer(layer):
        return f" (layer {layer} is a dense MLP layer)"
    if component == "dense_mlp" and cfg.is_moe_layer(layer):
        return f" (layer {layer} is a MoE layer)"
    return ""


def _omni_towers(config: dict) -> dict[str, bool]:
    """Which towers a Qwen3-Omni config.json builds (as Qwen3OmniMoeForConditionalGeneration does)."""
    thinker = config.get("thinker_config") or {}
    talk = bool(config.get("enable_audio_output", True)) and "talker_config" in config
    return {"audio": "audio_config" in thinker, "vision": "vision_config" in thinker, "talker": talk,
            "code2wav": talk and "code2wav_config" in config}


def _check_towers(config: dict, table: pd.DataFrame) -> list[Problem]:
    problems = []
    prefixes = dict((c, p) for p, c in QWEN3_OMNI.towers)
    for tower, wanted in _omni_towers(config).items():
        rows = table[table.component == tower]
        if wanted and rows.empty:
            problems.append(Problem("missing", f"no {tower} tensors ({prefixes[tower]}*) although config.json "
                                               f"builds the {tower} tower", tensor=f"{prefixes[tower]}*"))
        elif not wanted and not rows.empty:
            shards = sorted(set(rows.shard))
            problems.append(Problem("unexpected", f"{len(rows)} {tower} tensors ({prefixes[tower]}*, in "
                                                  f"{', '.join(shards)}) but config.json has no {tower} tower",
                                    tensor=rows.name.iloc[0], shard=shards[0]))
    return problems


# -- dtypes ---------------------------------------------------------------------------------------------


def _check_dtypes(inv: Inventory) -> list[Problem]:
    """Within the text decoder and within each tower, every tensor should share one dtype."""
    table = inv.table
    part = table.component.where(table.component.isin(TOWERS), "text")
    problems = []
    for name_of_part, rows in table.groupby(part, sort=False):
        counts = rows["dtype"].value_counts()
        if len(counts) < 2:
            continue
        common = counts.index[0]
        label = "text decoder" if name_of_part == "text" else f"{name_of_part} tower"
        odd = rows[rows["dtype"] != common]
        for name, shard, dtype in zip(odd.name, odd.shard, odd["dtype"]):
            problems.append(Problem("dtype", f"tensor {name} in {shard} is {dtype}; {counts.iloc[0]} of the "
                                             f"{len(rows)} {label} tensors are {common}", tensor=name, shard=shard))
    return problems
