"""The expert mix as fused Triton kernels (step.expert_mix's compute="triton"): each routed expert's gate|up and
down read once per step, SiLU * up and the routing-weighted sum over the k choices fused, fp32 accumulation, no
host sync (CUDA-graph capturable); one torch.library.custom_op with a fake impl, so torch.compile keeps it whole.
Follows vLLM's fused_moe (vllm/model_executor/layers/fused_moe/fused_moe.py). differs from vLLM: no
moe_align_block_size (a program finds its slot's choices itself), gate and up in one kernel, a GEMV "token" mode
for batch-1 steps, ieee fp32 dots; the three modes and why are in docs/DESIGN.md ("The fused expert mix").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKEN_MAX_N = 2  # steps of at most this many tokens take mode "token" (the experts of a token are distinct)
SCAN_MAX_CHOICES = 512  # steps of at most this many choices (N * k) scan the slot ids in-kernel ("scan")
# block sizes for H100 / H200 in bf16; bench/expert_mix.py measures them. The token mode's are the best pair of
# bench/tune_token_mix.py on an H100 (bench/results/tune_token_mix_h100.txt: the whole batch-1 mix 31.4 us, 1.39x
# its HBM floor, against 72.8 us for the first choices, 32/128 and 8/128 at 4 warps); the slot modes' first choices.
# the GEMV programs read [BLOCK_N, BLOCK_K] weight tiles along contiguous rows
TOKEN_GATE_UP = dict(BLOCK_N=8, BLOCK_K=256, num_warps=8, num_stages=4, ACC2D=False)  # over I x H
TOKEN_DOWN = dict(BLOCK_N=2, BLOCK_K=256, num_warps=2, num_stages=2, ACC2D=False)  # over H x I, times the k choices
SLOT_GATE_UP = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4)
SLOT_DOWN = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4)
SORTED_BLOCK_M = 64  # prefill-sized steps: more rows per read of a slot's tile


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    """acc + a [M, K] @ b.T (b [N, K]) in fp32; fp32 operands without tf32."""
    if IEEE:
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _span(slots, bounds, s, M, MP: tl.constexpr, SCAN: tl.constexpr):
    """Where slot s's choices are: (0, count) in scan order, or its [begin, end) in the sorted order."""
    if SCAN:
        c = tl.arange(0, MP)
        hit = tl.load(slots + c, mask=c < M, other=-1) == s  # [MP]
        start, end = tl.full((), 0, tl.int32), tl.sum(hit.to(tl.int32), 0)
    else:
        start, end = tl.load(bounds + s), tl.load(bounds + s + 1)
    return start, end


@triton.jit
def _chunk(slots, order, s, r0, end, M, BLOCK_M: tl.constexpr, MP: tl.constexpr, SCAN: tl.constexpr):
    """The choice ids [BLOCK_M] at positions r0.. of slot s's choices, and which of them exist."""
    r = r0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    if SCAN:  # the r-th choice routed to s: a one-hot over the step's choices
        c = tl.arange(0, MP)
        hit = tl.load(slots + c, mask=c < M, other=-1) == s  # [MP]
        rank = tl.cumsum(hit.to(tl.int32), 0) - 1  # [MP]: position among s's choices
        sel = hit[None, :] & (rank[None, :] == r[:, None])  # [BLOCK_M, MP]
        choice = tl.sum(tl.where(sel, c[None, :], 0), 1)
    else:
        choice = tl.load(order + r, mask=r < end, other=0)
    return choice, r < end


@triton.jit
def _gate_up_by_slot(x, slots, order, bounds, w, act, M, I, H, sx, sws, swr, swc, sa, TOP_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr,
                     SCAN: tl.constexpr, IEEE: tl.constexpr):
    """Program (slot s, I block): act[c, n] = silu(gate_s[n] . x[c // k]) * (up_s[n] . x[c // k]) for every
    choice c routed to s, BLOCK_M choices at a time (one read of the slot's tile per chunk)."""
    s = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]: columns of I
    start, end = _span(slots, bounds, s, M, MP, SCAN)
    wg = w + s.to(tl.int64) * sws + n[:, None] * swr  # [BLOCK_N, 1]: the gate rows; the up rows are I further
    for r0 in range(start, end, BLOCK_M):  # no iteration for a slot nothing routed to
        choice, valid = _chunk(slots, order, s, r0, end, M, BLOCK_M, MP, SCAN)
        xr = x + (choice // TOP_K)[:, None].to(tl.int64) * sx  # [BLOCK_M, 1]: the tokens' rows
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_K):
            h = h0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            wm = (n[:, None] < I) & (h[None, :] < H)
            a = tl.load(xr + h[None, :], mask=valid[:, None] & (h[None, :] < H), other=0.0)  # [BLOCK_M, BLOCK_K]
            g = _mm(a, tl.load(wg + h[None, :] * swc, mask=wm, other=0.0), g, IEEE)
            u = _mm(a, tl.load(wg + I * swr + h[None, :] * swc, mask=wm, other=0.0), u, IEEE)
        out = g * tl.sigmoid(g) * u  # silu(gate) * up
        tl.store(act + choice[:, None].to(tl.int64) * sa + n[None, :], out.to(act.dtype.element_ty),
                 mask=valid[:, None] & (n[None, :] < I))


@triton.jit
def _down_by_slot(act, slots, order, bounds, weights, w, y, M, I, H, sa, sws, swr, swc, sy,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr,
                  SCAN: tl.constexpr, IEEE: tl.constexpr):
    """Program (slot s, H block): y[c, n] = weight[c] * (down_s[n] . act[c]) in fp32 for every choice c on s."""
    s = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]: rows of H
    start, end = _span(slots, bounds, s, M, MP, SCAN)
    wd = w + s.to(tl.int64) * sws + n[:, None] * swr  # [BLOCK_N, 1]
    for r0 in range(start, end, BLOCK_M):
        choice, valid = _chunk(slots, order, s, r0, end, M, BLOCK_M, MP, SCAN)
        ar = act + choice[:, None].to(tl.int64) * sa  # [BLOCK_M, 1]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            a = tl.load(ar + i[None, :], mask=valid[:, None] & (i[None, :] < I), other=0.0)  # [BLOCK_M, BLOCK_K]
            acc = _mm(a, tl.load(wd + i[None, :] * swc, mask=(n[:, None] < H) & (i[None, :] < I), other=0.0),
                      acc, IEEE)
        rw = tl.load(weights + choice, mask=valid, other=0.0).to(tl.float32)  # [BLOCK_M]
        tl.store(y + choice[:, None].to(tl.int64) * sy + n[None, :], acc * rw[:, None],
                 mask=valid[:, None] & (n[None, :] < H))


@triton.jit
def _gate_up_by_choice(x, slots, w, act, I, H, sx, sws, swr, swc, sa, TOP_K: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC2D: tl.constexpr):
    """Program (choice c, I block), a GEMV: act[c, n] = silu(gate_s[n] . x[c // k]) * (up_s[n] . x[c // k]).
    ACC2D: products accumulate elementwise in [BLOCK_N, BLOCK_K] and are reduced once after the loop (no
    cross-lane reduction per tile); else each tile is reduced as it is read."""
    c = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]: columns of I
    s = tl.load(slots + c).to(tl.int64)
    wg = w + s * sws + n[:, None] * swr  # [BLOCK_N, 1]
    xr = x + (c // TOP_K).to(tl.int64) * sx
    g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    g2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # ACC2D's accumulators (unused otherwise)
    u2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_K):
        h = h0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        wm = (n[:, None] < I) & (h[None, :] < H)
        a = tl.load(xr + h, mask=h < H, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_K]
        gw = tl.load(wg + h[None, :] * swc, mask=wm, other=0.0).to(tl.float32) * a  # [BLOCK_N, BLOCK_K]
        if ACC2D:  # compile-time branches: one of the two accumulations exists in the kernel
            g2 += gw
        else:
            g += tl.sum(gw, 1)
        uw = tl.load(wg + I * swr + h[None, :] * swc, mask=wm, other=0.0).to(tl.float32) * a
        if ACC2D:
            u2 += uw
        else:
            u += tl.sum(uw, 1)
    if ACC2D:
        g, u = tl.sum(g2, 1), tl.sum(u2, 1)  # [BLOCK_N]
    tl.store(act + c.to(tl.int64) * sa + n, (g * tl.sigmoid(g) * u).to(act.dtype.element_ty), mask=n < I)


@triton.jit
def _down_by_token(act, slots, weights, w, out, I, H, sa, sws, swr, swc, so, TOP_K: tl.constexpr,
                   KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC2D: tl.constexpr):
    """Program (token t, H block): out[t, n] = sum_j weight[t, j] * (down_s(t,j)[n] . act[t * k + j]), the k
    choices' tiles loaded together ([KP, BLOCK_N, BLOCK_K]: more bytes in flight than one GEMV at a time), fp32
    accumulation (ACC2D: elementwise, reduced once after the loop), written once in out's dtype."""
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]: rows of H
    j = tl.arange(0, KP)  # [KP]: the token's choices (KP = k rounded up to a power of two)
    c = (t * TOP_K + j).to(tl.int64)  # [KP]
    s = tl.load(slots + c, mask=j < TOP_K, other=0).to(tl.int64)  # [KP]
    wd = w + s[:, None, None] * sws + n[None, :, None] * swr  # [KP, BLOCK_N, 1]
    part = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
    part3 = tl.zeros((KP, BLOCK_N, BLOCK_K), dtype=tl.float32)  # ACC2D's accumulator (unused otherwise)
    for i0 in range(0, I, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        a = tl.load(act + c[:, None] * sa + i[None, :], mask=(j[:, None] < TOP_K) & (i[None, :] < I), other=0.0)
        m = (j[:, None, None] < TOP_K) & (n[None, :, None] < H) & (i[None, None, :] < I)
        d = tl.load(wd + i[None, None, :] * swc, mask=m, other=0.0)  # [KP, BLOCK_N, BLOCK_K]
        prod = d.to(tl.float32) * a.to(tl.float32)[:, None, :]  # [KP, BLOCK_N, BLOCK_K]
        if ACC2D:  # a compile-time branch, as in _gate_up_by_choice
            part3 += prod
        else:
            part += tl.sum(prod, 2)
    if ACC2D:
        part = tl.sum(part3, 2)  # [KP, BLOCK_N]
    rw = tl.load(weights + c, mask=j < TOP_K, other=0.0).to(tl.float32)  # [KP]
    tl.store(out + t.to(tl.int64) * so + n, tl.sum(part * rw[:, None], 0).to(out.dtype.element_ty), mask=n < H)


@torch.library.custom_op("omnilab::fused_expert_mix", mutates_args=())
def _fused(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
           down: torch.Tensor, mode: str) -> torch.Tensor:
    N, H = x.shape
    k = slots.shape[1]
    S, I = down.shape[0], down.shape[2]
    M = N * k
    flat = slots.reshape(M)  # [M]: choice c = token * k + j
    wflat = weights.reshape(M)  # [M]
    act = torch.empty(M, I, dtype=x.dtype, device=x.device)  # [M, I]: silu(gate) * up of every choice
    gu, dn = gate_up.stride(), down.stride()
    if mode == "token":
        out = torch.empty(N, H, dtype=x.dtype, device=x.device)
        c1, c2 = TOKEN_GATE_UP, TOKEN_DOWN
        _gate_up_by_choice[(M, triton.cdiv(I, c1["BLOCK_N"]))](
            x, flat, gate_up, act, I, H, x.stride(0), *gu, act.stride(0), TOP_K=k, **c1)
        _down_by_token[(N, triton.cdiv(H, c2["BLOCK_N"]))](
            act, flat, wflat, down, out, I, H, act.stride(0), *dn, out.stride(0), TOP_K=k,
            KP=triton.next_power_of_2(k), **c2)
        return out
    scan = mode == "scan"
    if scan:
        order = bounds = flat  # unread
    else:
        sorted_slots, order = torch.sort(flat, stable=True)  # [M]: choices grouped by slot
        ids = torch.arange(S + 1, device=x.device, dtype=sorted_slots.dtype)  # [S + 1]
        bounds = torch.searchsorted(sorted_slots, ids).to(torch.int32)  # [S + 1]: slot s holds [bounds[s], bounds[s+1])
    MP = triton.next_power_of_2(M) if scan else 1
    ieee = x.dtype == torch.float32
    y = torch.empty(M, H, dtype=torch.float32, device=x.device)  # [M, H]: each choice's weighted output
    c1, c2 = SLOT_GATE_UP, SLOT_DOWN
    if not scan:
        c1, c2 = dict(c1, BLOCK_M=SORTED_BLOCK_M), dict(c2, BLOCK_M=SORTED_BLOCK_M)
    if ieee:  # fp32 tiles are twice the bytes: the pipelined stages must fit in shared memory
        c1, c2 = dict(c1, BLOCK_K=32), dict(c2, BLOCK_K=32)
    _gate_up_by_slot[(S, triton.cdiv(I, c1["BLOCK_N"]))](
        x, flat, order, bounds, gate_up, act, M, I, H, x.stride(0), *gu, act.stride(0), TOP_K=k, MP=MP,
        SCAN=scan, IEEE=ieee, **c1)
    _down_by_slot[(S, triton.cdiv(H, c2["BLOCK_N"]))](
        act, flat, order, bounds, wflat, down, y, M, I, H, act.stride(0), *dn, y.stride(0), MP=MP, SCAN=scan,
        IEEE=ieee, **c2)
    return y.view(N, k, H).sum(dim=1).to(x.dtype)  # [N, H]: the k choices of a token summed in fp32


@_fused.register_fake
def _(x, slots, weights, gate_up, down, mode):
    return x.new_empty(x.shape)  # [N, H]


def fused_expert_mix(x, slots, weights, gate_up, down, mode: str | None = None) -> torch.Tensor:
    """x [N, H], slots [N, k] (slot ids into the pool), weights [N, k] (x's dtype), gate_up [S, 2I, H] (gate rows
    first), down [S, H, I] -> sum over k of weight * down_s @ (silu(gate_s @ x) * up_s @ x), [N, H] in x's dtype.
    mode: "token", "scan" or "sorted" (default: by N and N * k, see TOKEN_MAX_N and SCAN_MAX_CHOICES)."""
    N, k = slots.shape
    if mode is None:
        mode = "token" if N <= TOKEN_MAX_N else "scan" if N * k <= SCAN_MAX_CHOICES else "sorted"
    if mode not in ("token", "scan", "sorted"):
        raise ValueError(f"fused expert mix: mode {mode!r}, use token, scan or sorted")
    if not (gate_up.dtype == down.dtype == x.dtype == weights.dtype):
        raise ValueError(f"fused expert mix: dtypes differ ({x.dtype}, {weights.dtype}, {gate_up.dtype}, "
                         f"{down.dtype})")
    return _fused(x.contiguous(), slots.contiguous(), weights.contiguous(), gate_up, down, mode)
