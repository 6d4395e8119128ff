"""omnilab: a workbench for huge Mixture-of-Experts checkpoints (Qwen3-Omni-30B-A3B, Qwen3-MoE).

Open a checkpoint without reading its weights, account for every tensor, run it with only the experts the
router picks under a memory budget, and compare it with transformers at every hook point.

The public face, for notebooks and scripts: `import omnilab as ol`, then

- checkpoints: `ol.Checkpoint`, `ol.checkpoint_report`, `ol.verify`, `ol.problems_frame`, `ol.format_bytes`,
  `ol.parse_size`, `ol.stream_pieces`, `ol.load_tokenizer`; the module `ol.inventory`;
- extraction: `ol.extract`, `ol.verify_extraction`, `ol.read_manifest`, `ol.manifest_table`, `ol.parse_range`,
  `ol.availability`, `ol.component_bytes`, `ol.missing_summary`;
- the selective model: `ol.SelectiveMoE` (`ol.load(path, ...)` is `SelectiveMoE.from_checkpoint`; device, dtype
  and expert_budget default to "auto", and `generate` runs on the engine `ol.choose(model, ol.Call(...))` picks),
  `ol.RoutingOptions`, `ol.Generation`, `ol.until_stop` (a continuation up to its end-of-text token, e.g.
  `model.stop_tokens`), `ol.MissingExpertError`; hooks `ol.capture`, `ol.run_with_cache`,
  `ol.compare`, `ol.first_difference`; the modules `ol.hooks`, `ol.faults`, `ol.multimodal`;
- against transformers: `ol.Reference`, `ol.compare_checkpoints` (streamed, any scale), `ol.reference_continuation`
  (a greedy continuation checked in one streamed pass), `ol.fault_gallery`, `ol.gallery_table`;
- experiments, as modules: `ol.eval_data`, `ol.measures`, `ol.masking`, `ol.routing` (routing statistics),
  `ol.cache_sim`, `ol.sweeps`, `ol.modality`; figures `ol.plots`;
- corpus traces: the room `ol.trace` (`ol.trace.trace_corpus`, `ol.trace.TraceDataset`), and `ol.routing_trace`
  (omnilab.trace.record: `record_trace`, `route`, `trace_rows`);
  tiny and broken checkpoints `ol.synth`, `ol.breakage`;
- what a notebook saves and prints: `ol.notebook_out_dir`, `ol.repo_path`, `ol.save_figure`, `ol.save_metrics`,
  `ol.say`; `ol.release_memory` (after dropping a model: garbage collection and malloc_trim).

Every name is imported on first use (PEP 562 `__getattr__`), so `import omnilab` reads neither torch nor pandas.
No name of the face is also a module directly under omnilab/ (tests/test_face.py checks it), so `ol.X` is one
thing whatever has been imported before.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_NAMES = {
    **dict.fromkeys(("Checkpoint", "CheckpointError", "Problem"), "omnilab.checkpoint"),
    **dict.fromkeys(("checkpoint_report", "problems_frame", "verify"), "omnilab.inventory"),
    **dict.fromkeys(("format_bytes", "parse_size"), "omnilab.units"),
    **dict.fromkeys(("stream_pieces", "load_tokenizer"), "omnilab.tokenizer"),
    "extract": "omnilab.extraction.write",
    "verify_extraction": "omnilab.extraction.verify",
    **dict.fromkeys(("read_manifest", "manifest_table"), "omnilab.extraction.manifest"),
    "parse_range": "omnilab.extraction.plan",
    **dict.fromkeys(("availability", "component_bytes", "missing_summary"), "omnilab.extraction.availability"),
    **dict.fromkeys(("SelectiveMoE", "load"), "omnilab.runtime.model"),
    **dict.fromkeys(("choose", "Call"), "omnilab.runtime.choose"),
    **dict.fromkeys(("Generation", "until_stop"), "omnilab.model.generate"),
    "RoutingOptions": "omnilab.model.routing",
    "MissingExpertError": "omnilab.model.experts",
    **dict.fromkeys(("capture", "run_with_cache", "compare", "first_difference"), "omnilab.model.hooks"),
    "Reference": "omnilab.reference.whole",
    **dict.fromkeys(("compare_checkpoints", "reference_continuation"), "omnilab.reference.compare"),
    **dict.fromkeys(("fault_gallery", "gallery_table"), "omnilab.experiments.fault_gallery"),
    **dict.fromkeys(("notebook_out_dir", "repo_path", "save_figure", "save_metrics", "say"), "omnilab.notebook"),
    "release_memory": "omnilab.memory",
}

# name -> module, for the modules a notebook calls into
_MODULES = {
    "inventory": "omnilab.inventory",
    "plots": "omnilab.plots",
    "hooks": "omnilab.model.hooks",
    "faults": "omnilab.model.faults",
    "multimodal": "omnilab.model.multimodal",
    **{name: f"omnilab.experiments.{name}" for name in (
        "eval_data", "measures", "masking", "routing", "cache_sim", "sweeps", "modality")},
    "trace": "omnilab.trace",
    "routing_trace": "omnilab.trace.record",
    "synth": "omnilab.testing.synth",
    "breakage": "omnilab.testing.breakage",
}

__all__ = ["__version__", *_NAMES, *_MODULES]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'omnilab' has no attribute {name!r}")
    globals()[name] = value  # imported once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
