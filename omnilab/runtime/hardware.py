"""What this machine offers the engines, and the "auto" values of device, dtype and expert budget.

Every face resolves `device="auto"`, `dtype="auto"` and `expert_budget="auto"` here, so a notebook, the CLI and
`ol.load` pick the same thing on the same machine, and say what they picked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from omnilab.dtypes import STORED_DTYPES, as_dtype
from omnilab.units import format_bytes, parse_size

# the share of free memory an "auto" budget may fill (the rest: activations, KV cache, the allocator's slack)
GPU_SHARE, HOST_SHARE = 0.85, 0.6


@dataclass(frozen=True)
class Machine:
    """One snapshot: the device kind, its free / total memory in bytes, the host's available memory and cores."""

    device: torch.device
    name: str
    free_bytes: int
    total_bytes: int
    host_available_bytes: int
    cores: int

    def describe(self) -> str:
        return (f"{self.name}: {format_bytes(self.free_bytes)} free of {format_bytes(self.total_bytes)}; host "
                f"{format_bytes(self.host_available_bytes)} available, {self.cores} cores")


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_device(device="auto") -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; a named device this torch build cannot use -> one-line
    ValueError naming --device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a torch device (auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise ValueError(f"--device {device}: no CUDA device available ({build}); use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: omnilab runs on cpu or cuda")
    return dev


def machine(device="auto") -> Machine:
    dev = resolve_device(device)
    host = host_available_bytes()
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return Machine(dev, torch.cuda.get_device_name(dev), free, total, host, cores())
    return Machine(dev, "cpu", host, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), host, cores())


def checkpoint_dtype(checkpoint) -> torch.dtype:
    """The dtype the checkpoint's experts are stored in (bf16 for the real model), float32 when not a float."""
    config, layout = checkpoint.arch
    from omnilab.arch import expert_tensor

    layer = config.moe_layers[0] if config.moe_layers else None
    if layer is None:
        return torch.float32
    name = expert_tensor(layout, layer, 0, "gate_proj")
    return STORED_DTYPES.get(str(checkpoint.tensors.at[name, "dtype"]), torch.float32) if name in checkpoint else torch.float32


def resolve_dtype(dtype, checkpoint, device: torch.device) -> torch.dtype:
    """"auto" -> on a GPU the checkpoint's own dtype (bf16 for the real model), on a CPU float32 (exact parity
    with transformers' fp32 reference; the embedded model is fp32 anyway)."""
    if str(dtype) != "auto":
        return as_dtype(dtype)
    return checkpoint_dtype(checkpoint) if device.type == "cuda" else torch.float32


def resolve_budget(budget, *, all_experts_bytes: int, resident_bytes: int, device: torch.device) -> int | None:
    """An expert budget in bytes, or None when every expert is to be resident.

    budget: None or "all" (every expert), "auto" (every expert if they fit in GPU_SHARE of the free device memory,
    or HOST_SHARE of the host's on a CPU, after the backbone `resident_bytes`; else what fits), an int or a size
    string ("8GB")."""
    if budget is None or budget == "all":
        return None
    if budget != "auto":
        size = parse_size(budget) if isinstance(budget, str) else int(budget)
        return None if size >= all_experts_bytes else size
    m = machine(device)
    room = int((m.free_bytes * GPU_SHARE if device.type == "cuda" else m.host_available_bytes * HOST_SHARE)
               - resident_bytes)
    return None if room >= all_experts_bytes else max(room, 0)


def model_bytes(checkpoint, dtype: torch.dtype) -> dict:
    """Bytes of the thinker text model in `dtype`, from its config: {"experts": every routed expert,
    "backbone": everything else the selective model holds (embedding, attention, norms, routers, dense MLPs,
    lm_head), "expert": one expert}."""
    import math

    from omnilab.arch import expected_tensors

    config, layout = checkpoint.arch
    size = torch.empty((), dtype=dtype).element_size()
    numel = {"experts": 0, "backbone": 0}
    for spec in expected_tensors(config, layout).values():
        numel["experts" if spec.component == "experts" else "backbone"] += math.prod(spec.shape)
    expert = 3 * config.hidden_size * config.moe_intermediate_size * size
    return {"experts": numel["experts"] * size, "backbone": numel["backbone"] * size, "expert": expert}


def placement_line(device: torch.device, dtype: torch.dtype, budget: int | None, sizes: dict, asked=()) -> str:
    """One line saying what was picked: device, dtype, expert budget against all experts, and what was asked."""
    share = "every expert" if budget is None else f"{format_bytes(budget)} of {format_bytes(sizes['experts'])}"
    asked = ", ".join(f"{name}={value}" for name, value in zip(("device", "dtype", "expert_budget"), asked)
                      if str(value) == "auto")
    return (f"{device.type}, {str(dtype).removeprefix('torch.')}, experts: {share} "
            f"(backbone {format_bytes(sizes['backbone'])})" + (f"; auto: {asked}" if asked else ""))
