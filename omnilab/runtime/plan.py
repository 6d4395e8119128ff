"""`omnilab plan PATH`: which engine each verb would take, the bytes of each memory tier, and the decode speed to
expect, without loading a weight.

The speed model is the one the engines follow (bench/results/): a resident decode step reads the backbone and
the routed experts from GPU memory and pays a fixed latency per layer (the kernels inside the CUDA graph beyond
their reading: about 40 us a layer in bf16 with the Triton step, from the H100's 251.8 tok/s at 48 layers,
decode_step_h100.md: 3.97 ms a token against 2.07 ms of reading at the 2.96 TB/s `plan` measured there; about
100 us with torch's kernels alone, fp32 or grouped_mm: 150 and 156.8 tok/s on an H100 and an H200); an offload
step adds the misses copied over the host link; the CPU path reads everything from host memory. Bandwidths are
measured here in a few seconds, or taken from `--gpu` presets for a described machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from omnilab.runtime import hardware
from omnilab.units import format_bytes

LAYER_LATENCY_S = {"gpu-resident": 40e-6, "gpu-offload": 250e-6, "cpu-resident": 400e-6, "eager": 2e-3}
TORCH_RESIDENT_LATENCY_S = 100e-6  # the resident step without the Triton kernels (fp32: gather and cuBLAS)
OFFLOAD_LINK_EFFICIENCY = 0.85  # the offload engine's share of the link under uniform routing (bench/results)

# described GPU machines: memory and bandwidths (bytes, bytes/s) when no GPU is here to measure
PRESETS = {
    "h100": {"gpu_bytes": 80e9, "hbm": 3.35e12 * 0.8, "h2d": 54e9, "host_bytes": 128e9},
    "h200": {"gpu_bytes": 141e9, "hbm": 4.8e12 * 0.8, "h2d": 54e9, "host_bytes": 128e9},
}


@dataclass
class Machine:
    """What the plan is for: memory per tier and bandwidths (bytes/s); `measured` says where they came from."""

    gpu_bytes: float  # 0: no GPU
    host_bytes: float
    hbm: float
    h2d: float
    host_bw: float
    cores: int
    measured: str

    @property
    def has_gpu(self) -> bool:
        return self.gpu_bytes > 0


def _timed(fn, nbytes: int, repeats: int = 3, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def measure(device: torch.device, nbytes: int = 1 << 28) -> dict:
    """Bandwidths in bytes/s, measured in a second or two: host memory (a copy reads and writes: 2x bytes) and,
    on a GPU, device memory and pinned host-to-device."""
    n = nbytes // 4
    a, b = torch.empty(n), torch.empty(n)
    out = {"host_bw": _timed(lambda: b.copy_(a), 2 * nbytes)}
    if device.type == "cuda":
        sync = torch.cuda.synchronize
        x, y = torch.empty(4 * n, device=device), torch.empty(4 * n, device=device)
        out["hbm"] = _timed(lambda: y.copy_(x), 2 * 4 * nbytes, sync=sync)
        pinned = torch.empty(n, pin_memory=True)
        z = torch.empty(n, device=device)
        out["h2d"] = _timed(lambda: z.copy_(pinned, non_blocking=True), nbytes, sync=sync)
        del x, y, z, pinned
        torch.cuda.empty_cache()
    return out


def machine_here(device="auto") -> Machine:
    dev = hardware.resolve_device(device)
    m = hardware.machine(dev)
    bw = measure(dev)
    gpu = m.total_bytes if dev.type == "cuda" else 0
    return Machine(gpu, m.host_available_bytes, bw.get("hbm", 0.0), bw.get("h2d", 0.0), bw["host_bw"], m.cores,
                   f"measured here ({m.name})")


def machine_described(gpu: str | None, gpu_memory: float | None, host_memory: float | None, here: Machine) -> Machine:
    """A GPU machine described by a preset (h100, h200) and/or sizes; what is not described is taken from here."""
    preset = PRESETS.get((gpu or "h100").lower())
    if preset is None:
        raise ValueError(f"--gpu {gpu!r}: use one of {', '.join(PRESETS)}")
    return Machine(gpu_memory or preset["gpu_bytes"], host_memory or preset["host_bytes"], preset["hbm"],
                   preset["h2d"], here.host_bw, here.cores,
                   f"described: {(gpu or 'h100').upper()} preset (HBM {preset['hbm'] / 1e12:.2f} TB/s effective, "
                   f"host link {preset['h2d'] / 1e9:.0f} GB/s)")


def token_bytes(config, sizes: dict, context: int = 512, *, experts_per_layer: float | None = None,
                batch: int = 1) -> dict:
    """Bytes one decode step reads: the backbone less the embedding (one row of it), the routed experts (top-k per
    MoE layer, or `experts_per_layer`: the distinct experts of a batched step) and the KV cache of `batch` rows
    at `context` positions."""
    itemsize = sizes["expert"] // (3 * config.hidden_size * config.moe_intermediate_size)
    embed = config.vocab_size * config.hidden_size * itemsize
    backbone = sizes["backbone"] - (0 if config.tie_word_embeddings else embed)
    per_layer = config.num_experts_per_tok if experts_per_layer is None else experts_per_layer
    experts = per_layer * len(config.moe_layers) * sizes["expert"]
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context * itemsize * batch
    return {"backbone": backbone, "experts": experts, "kv": kv, "total": backbone + experts + kv}


def plan(checkpoint, machine: Machine, dtype="auto", context: int = 512) -> dict:
    """Which engine `generate`, `compare` and `trace` would take on `machine`, the bytes of each tier, and the
    decode tokens/s to expect on each engine that fits."""
    config, _ = checkpoint.arch
    device = torch.device("cuda" if machine.has_gpu else "cpu")
    dt = hardware.resolve_dtype(dtype, checkpoint, device)
    sizes = hardware.model_bytes(checkpoint, dt)
    per_token = token_bytes(config, sizes, context)
    L = config.num_hidden_layers
    kv_bytes = per_token["kv"]
    rows = []
    if machine.has_gpu:
        room = machine.gpu_bytes * hardware.GPU_SHARE - sizes["backbone"] - kv_bytes
        resident = room >= sizes["experts"]
        # bf16 on CUDA takes the Triton step (step.default_compute; Triton ships with torch's CUDA wheels)
        latency = LAYER_LATENCY_S["gpu-resident"] if dt == torch.bfloat16 else TORCH_RESIDENT_LATENCY_S
        t = per_token["total"] / machine.hbm + L * latency
        rows.append({"engine": "gpu-resident", "fits": resident, "tokens_per_s": 1 / t,
                     "why": "every expert fits the GPU" if resident else
                     f"the experts ({format_bytes(sizes['experts'])}) exceed the GPU's room "
                     f"({format_bytes(max(room, 0))} after the backbone)"})
        slots = int(max(room, 0) // (sizes["expert"] * len(config.moe_layers)))
        k, E = config.num_experts_per_tok, config.num_experts
        fits = slots >= k and room > 0
        hit = min(slots, E) / E  # uniform routing: the share of routed experts already in a slot
        miss_bytes = (1 - hit) * per_token["experts"]
        t = (miss_bytes / (machine.h2d * OFFLOAD_LINK_EFFICIENCY) + per_token["total"] / machine.hbm
             + L * LAYER_LATENCY_S["gpu-offload"])
        rows.append({"engine": "gpu-offload", "fits": fits, "tokens_per_s": 1 / t, "slots_per_layer": slots,
                     "uniform_hit_rate": hit,
                     "why": f"{slots} expert slots per layer, misses over the host link at "
                            f"{machine.h2d / 1e9:.0f} GB/s (uniform routing)" if fits else
                            f"{slots} slots per layer, fewer than top-{k}"})
    host_room = machine.host_bytes * hardware.HOST_SHARE - sizes["backbone"]
    cpu_fits = host_room >= sizes["experts"]
    t = per_token["total"] / machine.host_bw * 2 + L * LAYER_LATENCY_S["cpu-resident"]
    rows.append({"engine": "cpu-resident", "fits": cpu_fits and not machine.has_gpu, "tokens_per_s": 1 / t,
                 "why": ("a GPU is faster" if machine.has_gpu else "every expert fits host memory") if cpu_fits else
                 f"the experts ({format_bytes(sizes['experts'])}) exceed host memory's room "
                 f"({format_bytes(max(host_room, 0))})"})
    rows.append({"engine": "eager", "fits": True, "tokens_per_s": None,
                 "why": "hooks, faults, multimodal prefill, any budget (experts read from the shards on demand)"})
    chosen = next(r["engine"] for r in rows if r["fits"])
    verbs = {
        "generate": chosen,
        "compare": "eager selective side (every hook point), streamed transformers reference one layer at a time",
        "trace": ("gpu grouped prefill (every expert resident)" if machine.has_gpu and rows[0]["fits"] else
                  "eager prefill through the router hooks, experts under the budget"),
    }
    return {"checkpoint": str(checkpoint.path), "dtype": str(dt).removeprefix("torch."), "machine": asdict(machine),
            "bytes": {"backbone": sizes["backbone"], "experts": sizes["experts"], "expert": sizes["expert"],
                      "kv_at_context": kv_bytes, "context": context, "read_per_token": per_token},
            "engines": rows, "verbs": verbs}


def plan_text(result: dict) -> str:
    """The plan as a person reads it."""
    b, m = result["bytes"], result["machine"]
    lines = [f"{result['checkpoint']} in {result['dtype']}: backbone {format_bytes(b['backbone'])}, experts "
             f"{format_bytes(b['experts'])} ({format_bytes(b['expert'])} each), KV {format_bytes(b['kv_at_context'])} "
             f"at {b['context']} positions; a decoded token reads {format_bytes(b['read_per_token']['total'])}",
             f"machine: {m['measured']}; GPU {format_bytes(m['gpu_bytes'])}, host {format_bytes(m['host_bytes'])}"]
    for row in result["engines"]:
        speed = f"~{row['tokens_per_s']:.1f} tok/s" if row["tokens_per_s"] else "speed varies"
        lines.append(f"  {'*' if row['engine'] == result['verbs']['generate'] else ' '} {row['engine']:<13} "
                     f"{'fits' if row['fits'] else 'no  '}  {speed:>16}  {row['why']}")
    lines += [f"  {verb}: {what}" for verb, what in result["verbs"].items()]
    return "\n".join(lines)
