"""The selective model as the faces meet it (`ol.load`, `ol.SelectiveMoE`): device, dtype and expert budget
default to "auto" (omnilab.runtime.hardware), and `generate` goes through the runtime, which picks the engine.
The eager model itself is omnilab.model.decoder.SelectiveMoE; this subclass adds nothing to its forward."""

from __future__ import annotations

from omnilab.checkpoint import Checkpoint
from omnilab.model import decoder
from omnilab.model.loading import load_model
from omnilab.runtime import hardware
from omnilab.runtime.generate import generate


class SelectiveMoE(decoder.SelectiveMoE):
    """omnilab.model.decoder.SelectiveMoE whose `generate` runs on the engine the runtime chooses; the result's
    `engine` and `refusal` say which and why."""

    @classmethod
    def from_checkpoint(cls, path, **options) -> "SelectiveMoE":
        """`load(path, ...)`: device, dtype and expert_budget default to "auto"."""
        return load(path, model_class=cls, **options)

    def generate(self, prompts, max_new_tokens: int = 32, **options):
        """omnilab.runtime.generate.generate (greedy, temperature, top_k, top_p, stop_tokens, vocab_limit, seed,
        routing, engine, progress)."""
        return generate(self, prompts, max_new_tokens, **options)


def load(path, *, device="auto", dtype="auto", expert_budget="auto", model_class: type = SelectiveMoE,
         **options) -> SelectiveMoE:
    """Open a checkpoint folder as omnilab.model.loading.load_model does, with "auto" defaults: device cuda when a GPU
    is visible; dtype the checkpoint's own on a GPU, float32 on a CPU; expert_budget every expert when they fit
    the free memory, else what fits (bytes, a size such as "8GB", None for all). The choices are in
    `model.placement` (one line)."""
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(path)
    dev = hardware.resolve_device(device)
    dt = hardware.resolve_dtype(dtype, checkpoint, dev)
    sizes = hardware.model_bytes(checkpoint, dt)
    budget = hardware.resolve_budget(expert_budget, all_experts_bytes=sizes["experts"],
                                     resident_bytes=sizes["backbone"], device=dev)
    model = load_model(model_class, checkpoint, dtype=dt, device=dev, expert_budget=budget, **options)
    model.placement = hardware.placement_line(dev, dt, budget, sizes, asked=(device, dtype, expert_budget))
    return model
