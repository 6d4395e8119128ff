"""Which engine runs a call: the one place that decides, for every face.

Engines, fastest first on each device (the table ENGINES): on a GPU the resident fast path (every expert in a
slot pool, static KV, CUDA graph), then the offload decoder (a slab of expert slots per layer, the rest copied
from pinned host memory); on a CPU the resident grouped path (the same step, no graph); everywhere the eager
`SelectiveMoE` (hooks with Python callbacks, faults, any routing). `choose` walks the table and returns the first
engine that accepts the call, with every faster engine's refusal, so a result can say why it was not faster.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from omnilab.model.experts import POLICIES
from omnilab.model.faults import acts_on_weights
from omnilab.model.routing import RoutingOptions
from omnilab.units import format_bytes


@dataclass(frozen=True)
class Call:
    """What one call asks of an engine. routing: the call's RoutingOptions (None: the model's own). The resident
    engines take ragged and sampled calls; the offload engine refuses sampling."""

    batch: int = 1
    ragged: bool = False
    sampling: bool = False
    routing: RoutingOptions | None = None
    multimodal: bool = False
    max_len: int = 0


@dataclass
class Choice:
    """The engine that runs a call and, for each faster engine, why it did not (engine -> reason)."""

    engine: str
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def refusal(self) -> str | None:
        """The fastest refused engine and its reason, as one line (None when the fastest engine runs)."""
        return next((f"{name}: {why}" for name, why in self.refused.items()), None)

    def describe(self) -> str:
        return f"engine {self.engine}" + (f" ({self.refusal})" if self.refusal else "")


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {key: built engine}


def engines(model) -> dict:
    """The engines built for `model` so far (key -> FastDecoder, OffloadDecoder, slot pool, host tier)."""
    return _ENGINES.setdefault(model, {})


def _eager_needs(model, call: Call) -> str | None:
    """What only the eager path does: Python hooks, faults on weights, multimodal prefill."""
    if model.hooks:
        return f"hooks are registered ({', '.join(sorted(model.hooks))}); Python callbacks run on the eager path"
    if any(acts_on_weights(f) for f in model.faults):
        return "faults act on the weights as loaded"
    if call.multimodal:
        return "multimodal prompts (towers, M-RoPE positions) are prefilled on the eager path"
    return None


def _all_experts_fit(model) -> str | None:
    cache = model.cache
    total = cache.store.total_bytes
    if cache.budget_bytes < total:
        return (f"the expert budget {format_bytes(cache.budget_bytes)} is below the {format_bytes(total)} of all "
                f"experts")
    return None


def _resident(model, call: Call) -> str | None:
    from omnilab.gpu.fast import fast_path_refusal
    from omnilab.gpu.slots import all_experts_room_refusal

    why = _eager_needs(model, call) or _all_experts_fit(model) or fast_path_refusal(model, call.routing)
    if why:
        return why
    if "pool" not in engines(model):  # once built, the pool is what uses the memory
        return all_experts_room_refusal(model)
    return None


def _offload(model, call: Call) -> str | None:
    from omnilab.gpu.fast import plain_routing_refusal

    why = _eager_needs(model, call) or plain_routing_refusal(model, call.routing)
    if why:
        return why
    if type(model.cache.policy) not in POLICIES.values():  # its slots keep a fresh policy of that class per layer
        return (f"the expert cache's policy is {type(model.cache.policy).__name__}, not one of "
                f"{', '.join(POLICIES)} (the offload engine makes one of those per MoE layer)")
    if call.sampling:
        return "sampling"
    return None


# (engine, the device type it runs on or None for any, its refusal for a model and a call: None when it runs it);
# fastest first; the last accepts every call
ENGINES = (
    ("gpu-resident", "cuda", _resident),
    ("gpu-offload", "cuda", _offload),
    ("cpu-resident", "cpu", _resident),
    ("eager", None, lambda model, call: None),
)


def choose(model, call: Call = Call(), engine: str = "auto") -> Choice:
    """The fastest engine for `model` (a SelectiveMoE on its device) and `call`; `engine` names one to insist on
    (its refusal is then a ValueError naming it)."""
    candidates = [(name, check) for name, device, check in ENGINES if device in (None, model.device.type)]
    if engine != "auto":
        named = dict(candidates)
        if engine not in named:
            raise ValueError(f"engine {engine!r}: on {model.device.type} use auto or one of {', '.join(named)}")
        why = named[engine](model, call)
        if why:
            raise ValueError(f"engine {engine} cannot run this call: {why}")
        return Choice(engine)
    refused = {}
    for name, check in candidates:
        why = check(model, call)
        if why is None:
            return Choice(name, refused)
        refused[name] = why
    raise AssertionError("the eager engine accepts every call")


def capture_choice() -> Choice:
    """The engine of a call that records every hook point (compare's selective side, the fault gallery): eager,
    since the fast engines record only routing and chosen activations into device buffers."""
    return Choice("eager", {"fast engines": "every hook point is recorded through Python hooks, which only the "
                                            "eager engine runs"})


def choose_prefill(model, prefill: str = "auto") -> Choice:
    """The prefill of a corpus trace: "grouped_mm" (omnilab.gpu.prefill: every expert resident, one grouped GEMM
    per projection, routing into device buffers) or "eager" (the model's router hooks, any budget). prefill:
    "auto" takes the grouped one on CUDA when nothing refuses it; "grouped_mm" insists (its refusal is a
    ValueError); "eager" asks for the eager one."""
    from omnilab.gpu.prefill import prefill_refusal

    if prefill == "eager":
        return Choice("eager", {"grouped_mm": "--prefill eager asks for the eager path"})
    refusal = prefill_refusal(model, experts_given="pool" in engines(model))  # the runtime's pool: no new copy
    if refusal is None and prefill == "auto" and model.device.type != "cuda":
        refusal = ("taken by auto on CUDA only: on a CPU the eager prefill keeps a trace identical to the "
                   "notebooks' (ask for the grouped one with --prefill grouped_mm)")
    if refusal and prefill == "grouped_mm":
        raise ValueError(f"--prefill grouped_mm: {refusal}")
    return Choice("eager", {"grouped_mm": refusal}) if refusal else Choice("grouped_mm")
