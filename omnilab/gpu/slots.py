"""Pools of expert slots on the device: per MoE layer `slots` experts of one dtype. `SlotPool` stacks them in
transformers' fused layout (gate_up [S, 2I, H], down [S, H, I]; the fast path and the trace prefill, S = E);
`SlabPool` holds one slab per layer, a slot being one expert's down | gate | up (the offloaded decoder, S < E).
"""

from __future__ import annotations

import torch

from omnilab.model.experts import read_expert
from omnilab.units import format_bytes


def all_experts_room_refusal(model, margin: float = 1.0) -> str | None:
    """Why a pool of every expert does not fit `model`'s CUDA device now (None when it fits, and on the CPU): its
    free memory plus the eager cache's copies (let go when the pool is built: runtime.generate.resident_pool)
    against all the experts' bytes times `margin` (room for what runs beside them). The one check of the resident
    fast path (runtime.choose) and of the trace prefill (gpu.prefill)."""
    if model.device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(model.device)
    free += model.cache.stats.resident_bytes
    need = model.cache.store.total_bytes
    if free < need * margin:
        extra = f" (and {margin - 1:.0%} beside them)" if margin > 1 else ""
        return f"all experts need {format_bytes(need)}{extra}, {model.device} has {format_bytes(free)} free"
    return None


class ExpertSlots:
    """What every pool of expert slots shares (SlotPool, SlabPool): `slots` experts per
    MoE layer of one dtype on one device, and the byte accounting."""

    def __init__(self, config, slots: int, dtype: torch.dtype, device):
        if not 1 <= slots <= config.num_experts:
            raise ValueError(f"slot pool: {slots} slots per layer, need 1..{config.num_experts}")
        self.config, self.slots, self.dtype, self.device = config, slots, dtype, torch.device(device)
        self.layers = list(config.moe_layers)

    @property
    def expert_bytes(self) -> int:
        c = self.config
        return 3 * c.hidden_size * c.moe_intermediate_size * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.expert_bytes * self.slots * len(self.layers)


class SlotPool(ExpertSlots):
    """Stacked expert weights on one device, per MoE layer: gate_up [S, 2I, H], down [S, H, I], slot_of [E]."""

    def __init__(self, config, slots: int, dtype: torch.dtype, device):
        super().__init__(config, slots, dtype, device)
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up = {i: torch.empty(slots, 2 * I, H, dtype=dtype, device=device) for i in self.layers}
        self.down = {i: torch.empty(slots, H, I, dtype=dtype, device=device) for i in self.layers}
        self.slot_of = {i: torch.full((E,), -1, dtype=torch.long, device=device) for i in self.layers}
        self.expert_in = {i: [-1] * slots for i in self.layers}  # host mirror: slot -> expert (-1 empty)

    def put(self, layer: int, expert: int, slot: int, gate, up, down, non_blocking: bool = False) -> None:
        """Copy one expert's projections (nn.Linear layout: gate/up [I, H], down [H, I]) into a slot."""
        I = self.config.moe_intermediate_size
        old = self.expert_in[layer][slot]
        if old >= 0:
            self.slot_of[layer][old] = -1
        self.gate_up[layer][slot, :I].copy_(gate, non_blocking=non_blocking)
        self.gate_up[layer][slot, I:].copy_(up, non_blocking=non_blocking)
        self.down[layer][slot].copy_(down, non_blocking=non_blocking)
        self.slot_of[layer][expert] = slot
        self.expert_in[layer][slot] = expert

    @classmethod
    def all_resident(cls, checkpoint, config, layout, dtype: torch.dtype, device) -> "SlotPool":
        """Every expert of every MoE layer, slot = expert, read tensor by tensor from the checkpoint's shards."""
        pool = cls(config, config.num_experts, dtype, device)
        for layer in pool.layers:
            for e in range(config.num_experts):
                g, u, d = read_expert(checkpoint, layout, layer, e)
                pool.put(layer, e, e, g, u, d)
        return pool


SLOT_ORDER = (2, 0, 1)  # a slot holds (gate, up, down)[j] for j in this order: down | gate | up


class SlabPool(ExpertSlots):
    """The GPU slots: per MoE layer one slab [S, 3 * I * H], a slot being one expert's down | gate | up (the order
    of a name-sorted safetensors shard, so a miss from the shard maps is a single copy), and the two views
    step.expert_mix reads, down [S, H, I] and gate_up [S, 2I, H] (strided: the slot's stride is 3 * I * H).
    differs from SlotPool: one allocation per layer and slot-contiguous experts, no device slot_of."""

    def __init__(self, config, slots: int, dtype: torch.dtype, device):
        super().__init__(config, slots, dtype, device)
        H, I = config.hidden_size, config.moe_intermediate_size
        self.slab = {i: torch.empty(slots, 3 * I * H, dtype=dtype, device=device) for i in self.layers}
        self.down = {i: t[:, :H * I].view(slots, H, I) for i, t in self.slab.items()}  # [S, H, I]
        self.gate_up = {i: t[:, H * I:].view(slots, 2 * I, H) for i, t in self.slab.items()}  # [S, 2I, H]
