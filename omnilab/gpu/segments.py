"""The arithmetic of the offloaded decode step's segments (offload_step.py), on plain tensors (no modules), so one
torch.compile'd copy serves every layer: segment a (`attention_router`), one routed choice (`expert_choice`), and
step="slot"'s expert on its slot's own views (`expert_on_slot`, or its halves `expert_gate_up`, `expert_down`),
a missed expert on the host's cores (`expert_on_host`, hybrid offload),
the layer's sum (`mix_sum`) and the sum folded into the next layer's segment a (`sum_attention_router`).
Follows the fast path's step (step.py). differs from transformers: as step.py; and one routed choice at a time
(`expert_choice`, two plain GEMMs on the slot gathered from the slab) instead of the grouped GEMM, so each starts
the moment its expert is resident.
"""

from __future__ import annotations

import torch.nn.functional as F

from omnilab.gpu.step import Consts, attention, rms_norm, route


def attention_router(h, w, cos, sin, mask, pos, keys, values, forced, c: Consts):
    """Segment a: h [1, 1, H] -> (h after attention [1, 1, H], normed x [1, H], weights [1, k], experts [1, k])."""
    h = h + attention(h, w, cos, sin, mask, pos, keys, values, c)
    x = rms_norm(w.post_norm, h, c.eps).reshape(1, -1)  # [1, H]
    weights, experts = route(F.linear(x, w.router), c.top_k, c.norm_topk_prob, x.dtype, forced)  # [1, k]
    return h, x, weights, experts


def expert_choice(x, slot, weight, slab, H: int, I: int):
    """One routed choice of a decode step: weight [1, 1] * the expert in `slot` ([1], on the device) applied to
    x [1, H] -> [1, H]. differs from step.expert_mix: one choice at a time (so each can start the moment its
    expert is resident), the slot gathered from the slab and two plain GEMMs instead of the grouped GEMM; the
    arithmetic per choice is the same (on CPU the rows are bitwise equal, tests/test_offload.py)."""
    w = slab.index_select(0, slot)  # [1, 3 * I * H]: the slot's down | gate | up
    down, gate_up = w[0, :H * I].view(H, I), w[0, H * I:].view(2 * I, H)
    gu = F.linear(x, gate_up)  # [1, 2I]
    return F.linear(F.silu(gu[:, :I]) * gu[:, I:], down) * weight  # [1, H]


def expert_on_slot(x, gate_up, down, I: int):
    """One expert on its slot's own views, unweighted: x [1, H], gate_up [2I, H], down [H, I] -> [1, H]. The
    step="slot" decode captures one graph per (layer, slot), so the slot is a fixed address: no gather of the
    slot's 9.4 MB as in expert_choice (its arithmetic otherwise: the same two GEMMs, silu(gate) * up between)."""
    gu = F.linear(x, gate_up)  # [1, 2I]
    return F.linear(F.silu(gu[:, :I]) * gu[:, I:], down)  # [1, H]


def expert_on_host(x, gate, up, down):
    """One expert on the host's cores (hybrid offload: a miss computed where its weights lie instead of copied):
    x [1, H] (host), the host tier's gate [I, H], up [I, H], down [H, I] -> [1, H], unweighted. differs from
    expert_choice: gate and up as two GEMMs on the CPU (its own accumulation order: within the dtype's noise).
    The weights are cast to x's dtype (the model's) when the tier holds another (a copy each call: slow)."""
    gate, up, down = (w.to(x.dtype) for w in (gate, up, down))
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)  # [1, H]


def expert_gate_up(x, gate_up, I: int):
    """The first half of expert_on_slot, x [1, H] -> silu(gate) * up [1, I]: computed while the slot's down
    projection is still copying (the layer's last miss)."""
    gu = F.linear(x, gate_up)  # [1, 2I]
    return F.silu(gu[:, :I]) * gu[:, I:]  # [1, I]


def expert_down(act, down):
    """The second half of expert_on_slot: act [1, I] -> [1, H]."""
    return F.linear(act, down)


def mix_sum(h, outputs, slots, weights):
    """A layer's expert mix into the residual: h [1, 1, H] + sum over the k choices of weight * the output of the
    choice's slot (outputs [S, H], one row per slot; slots [k]; weights [1, k]); as step="choice"'s sum after
    its choice segments: each output times its weight, the k products summed in one reduction, then the residual."""
    k = slots.shape[0]
    rows = outputs.index_select(0, slots) * weights.reshape(k, 1)  # [k, H]: each choice's weighted output
    return h + rows.view(1, k, -1).sum(dim=1).view(1, 1, -1)  # [1, 1, H]


def sum_attention_router(h, outputs, slots, weights_prev, w, cos, sin, mask, pos, keys, values, forced, c: Consts):
    """The previous layer's mix_sum, then segment a (attention_router): one graph per layer in step="slot"."""
    return attention_router(mix_sum(h, outputs, slots, weights_prev), w, cos, sin, mask, pos, keys, values, forced, c)
