"""The trace prefill's glue as Triton kernels (prefill.py's glue="triton", bf16 on CUDA): the elementwise work
around the grouped expert GEMMs and the dense projections, each one pass over its tensors where torch's eager
modules take several kernels (and strided views, index_put and dtype copies) per op:
- `rms_norm`: omnilab.model.decoder.RMSNorm (normalised in fp32, cast, scaled in the input dtype), a block of
  rows per program; `add_rms_norm`: the residual add h += a (in place) and the norm of the sum, in one pass;
- `norm_rope`: q_norm / k_norm and the rotary embedding of one projection's heads (q * cos + rotate_half(q) * sin);
- `silu_mul`: F.silu(gate) * up of the fused gate|up grouped GEMM's [M, 2I] output into a contiguous [M, I];
- `gate_up_rows`: that grouped GEMM and silu_mul in one kernel (glue "fused"): each slot-sorted row reads its
  token's row of x where the GEMM loads it (no [M, H] gathered copy) and SiLU * up is its epilogue (no [M, 2I]);
- `combine_into`: the down grouped GEMM's rows (slot-sorted) weighted, gathered back to their tokens, summed over
  the k choices and added into the residual stream's rows, in place (no y * w, no index_put, no scatter).

Follows vLLM's fused_add_rms_norm and silu_and_mul (csrc/layernorm_kernels.cu, csrc/activation_kernels.cu), its
moe_sum and its fused_moe kernel's row gather (a block of one expert's sorted rows, each loading its token's row),
and liger-kernel's Triton RMSNorm / RoPE (one program per block of rows, fp32 arithmetic in registers).
differs from vLLM: every intermediate the eager modules round to the model's dtype is rounded here too, at the same
point (`_round`: RMSNorm's cast before the weight, silu before the product, q * cos and rotate_half(q) * sin
before their sum, each choice's weighted output before the sum over k, the mix before the residual add), so a
kernel's output equals the eager ops' up to the order of fp32 sums (a norm's mean, the sum over k) and fp32 ulps of
rsqrt and exp; in fp32 every rounding is the identity. Plain launchers, no custom_op (the prefill is not compiled);
no host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_BLOCK_ELEMENTS = 4096  # rms_norm / norm_rope: rows per program so that a program holds ~4K elements
SILU_BLOCK = dict(BLOCK_M=16, BLOCK_N=256, num_warps=4)  # silu_mul: [16, 256] tiles of act
# gate_up_rows: [BLOCK_M rows of one slot, BLOCK_N columns of I] per program, gate and up accumulated side by side;
# the fastest of bench/prefill_gemm.py's twelve block sizes on an H100 at 16,384 tokens (1,807 us against
# the Triton glue's gather + grouped_mm + silu_mul at 1,858 us; bench/results/prefill_gemm_h100.txt)
GATE_UP_ROWS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
COMBINE_BLOCK_H = 512  # combine_into: columns of H per program, the k rows of y loaded together ([KP, 512])
# Every launch compiles without floating-point contraction: with it, LLVM turns a rounded product followed by a sum
# (`_round(n * cos) - _round(n2 * sin)`) into one fma.rn.bf16, a single rounding where the eager ops round twice (on
# an H100 norm_rope then matched the eager ops in 78% of elements; the PTX of tests/test_prefill_kernels.py's sm_90
# build shows the fma). The kernels are memory-bound: contraction buys them nothing.
EXACT = dict(enable_fp_fusion=False)


@triton.jit
def _round(x, DT: tl.constexpr):
    """x (fp32) rounded to DT and widened back: the rounding an eager op in DT makes between two steps."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _rms_norm(x, a, w, out, R, D, sx, sa, so, eps, RESID: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Program (block of BLOCK_R rows): out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps) cast to x's dtype).
    RESID: first x[r] += a[r] (rounded to x's dtype, written back in place), and the norm is of that sum."""
    DT: tl.constexpr = x.dtype.element_ty
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m = (r < R)[:, None] & (d < D)[None, :]  # [BLOCK_R, BLOCK_D]
    xp = x + r.to(tl.int64)[:, None] * sx + d[None, :]
    v = tl.load(xp, mask=m, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]
    if RESID:  # h + a in h's dtype, as the eager residual add; the residual stream keeps the rounded sum
        v = _round(v + tl.load(a + r.to(tl.int64)[:, None] * sa + d[None, :], mask=m, other=0.0).to(tl.float32),
                   DT)
        tl.store(xp, v.to(DT), mask=m)
    # differs from eager: the mean's fp32 sum in tl.sum's order (torch's mean: its reduction's)
    inv = tl.math.rsqrt(tl.sum(v * v, 1) / D + eps)  # [BLOCK_R]
    n = _round(v * inv[:, None], DT)  # normalised in fp32, cast to the input dtype (RMSNorm's x32.to(x.dtype))
    wt = tl.load(w + d, mask=d < D, other=0.0).to(tl.float32)  # [BLOCK_D]
    tl.store(out + r.to(tl.int64)[:, None] * so + d[None, :], (wt[None, :] * n).to(DT), mask=m)


@triton.jit
def _norm_rope(x, w, cos, sin, out, R, HEADS, HALF, sx, sc, so, eps, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Program (block of BLOCK_R head rows r = token * HEADS + head): the head's RMSNorm (as _rms_norm), then
    n * cos + rotate_half(n) * sin with the token's cos / sin; rotate_half(n) = (-n[HALF:], n[:HALF])."""
    DT: tl.constexpr = x.dtype.element_ty
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]: one half of a head
    m = (r < R)[:, None] & (d < HALF)[None, :]  # [BLOCK_R, BLOCK_D]
    xr = x + r.to(tl.int64)[:, None] * sx + d[None, :]
    x1 = tl.load(xr, mask=m, other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_D]: the first half
    x2 = tl.load(xr + HALF, mask=m, other=0.0).to(tl.float32)  # the second half
    # differs from eager: the mean's fp32 sum over the two halves in tl.sum's order
    inv = tl.math.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]  # [BLOCK_R, 1]
    w1 = tl.load(w + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_D]
    w2 = tl.load(w + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    n1 = _round(w1 * _round(x1 * inv, DT), DT)  # the norm's output, rounded as RMSNorm's is
    n2 = _round(w2 * _round(x2 * inv, DT), DT)
    cr = (r // HEADS).to(tl.int64)[:, None] * sc + d[None, :]  # [BLOCK_R, BLOCK_D]: the token's cos / sin row
    c1 = tl.load(cos + cr, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos + cr + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin + cr, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin + cr + HALF, mask=m, other=0.0).to(tl.float32)
    # q * cos and rotate_half(q) * sin each rounded, then their sum (three eager ops in the model's dtype)
    o1 = _round(n1 * c1, DT) - _round(n2 * s1, DT)
    o2 = _round(n2 * c2, DT) + _round(n1 * s2, DT)
    orow = out + r.to(tl.int64)[:, None] * so + d[None, :]
    tl.store(orow, o1.to(DT), mask=m)
    tl.store(orow + HALF, o2.to(DT), mask=m)


@triton.jit
def _silu_mul(gu, act, M, I, sg, sa, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, column block): act[m, n] = silu(gu[m, n]) * gu[m, I + n], silu in fp32."""
    DT: tl.constexpr = act.dtype.element_ty
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m = (r < M)[:, None] & (n < I)[None, :]
    gp = gu + r[:, None] * sg + n[None, :]
    g = tl.load(gp, mask=m, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_N]: the gate columns
    u = tl.load(gp + I, mask=m, other=0.0).to(tl.float32)  # the up columns
    s = _round(g / (1.0 + tl.exp(-g)), DT)  # F.silu: x / (1 + exp(-x)) in fp32, rounded to the dtype
    tl.store(act + r[:, None] * sa + n[None, :], (s * u).to(DT), mask=m)


@triton.jit
def _gate_up_rows(x, tok, ends, block_slot, block_start, w, act, I, H, sx, sws, swr, swc, sa,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (I block, row block b): act[r, n] = silu(gate_s[n] . x[tok[r]]) * (up_s[n] . x[tok[r]]) for the
    rows r of block b, all routed to slot s = block_slot[b] (-1: past the last block, nothing to do). The two
    dot products accumulate in fp32 and are rounded to the dtype as the grouped GEMM's [M, 2I] output is, then
    _silu_mul's arithmetic."""
    DT: tl.constexpr = act.dtype.element_ty
    b = tl.program_id(1)
    s = tl.load(block_slot + b)
    if s < 0:
        return
    r = tl.load(block_start + b) + tl.arange(0, BLOCK_M)  # [BLOCK_M]: sorted rows
    valid = r < tl.load(ends + s)
    t = tl.load(tok + r, mask=valid, other=0).to(tl.int64)  # [BLOCK_M]: each row's token
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]: columns of I
    xr = x + t[:, None] * sx  # [BLOCK_M, 1]
    wg = w + s.to(tl.int64) * sws + n[None, :] * swr  # [1, BLOCK_N]: the gate rows; the up rows are I further
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_K):
        h = h0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        a = tl.load(xr + h[None, :], mask=valid[:, None] & (h < H)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        wm = (h < H)[:, None] & (n < I)[None, :]  # [BLOCK_K, BLOCK_N]
        g = tl.dot(a, tl.load(wg + h[:, None] * swc, mask=wm, other=0.0), g)
        u = tl.dot(a, tl.load(wg + I * swr + h[:, None] * swc, mask=wm, other=0.0), u)
    # differs from TritonGlue: the products' fp32 sums in tl.dot's order (grouped_mm: CUTLASS's), then rounded alike
    g, u = _round(g, DT), _round(u, DT)
    out = _round(g / (1.0 + tl.exp(-g)), DT) * u  # F.silu in fp32 rounded to the dtype, then the product
    tl.store(act + r.to(tl.int64)[:, None] * sa + n[None, :], out.to(DT), mask=valid[:, None] & (n < I)[None, :])


@triton.jit
def _combine(y, inv, w, h, rows, H, sy, sw, sh, TOP_K: tl.constexpr, KP: tl.constexpr, BLOCK_H: tl.constexpr,
             ROWS: tl.constexpr):
    """Program (token t, H block): h[row(t), n] += sum_j w[t, j] * y[inv[t * k + j], n], row(t) = rows[t]
    (ROWS) or t. Each weighted output rounded to h's dtype, the k summed in fp32, the mix rounded, then added."""
    DT: tl.constexpr = h.dtype.element_ty
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    j = tl.arange(0, KP)  # [KP]: the token's choices (KP = k rounded up to a power of two)
    c = t.to(tl.int64) * TOP_K + j  # [KP]: choice ids t * k + j
    pos = tl.load(inv + c, mask=j < TOP_K, other=0).to(tl.int64)  # [KP]: where each choice's row is in y
    wt = tl.load(w + t.to(tl.int64) * sw + j, mask=j < TOP_K, other=0.0).to(tl.float32)  # [KP]
    m = (j < TOP_K)[:, None] & (n < H)[None, :]  # [KP, BLOCK_H]
    v = tl.load(y + pos[:, None] * sy + n[None, :], mask=m, other=0.0).to(tl.float32)  # [KP, BLOCK_H]
    p = _round(v * wt[:, None], DT)  # y * w in the dtype (step.expert_mix's weighted rows)
    # differs from step.expert_mix: the k summed in tl.sum's order (torch: its reduction's), fp32 both
    mix = _round(tl.sum(p, 0), DT)  # [BLOCK_H]: the token's mix, rounded as expert_mix returns it
    if ROWS:
        row = tl.load(rows + t).to(tl.int64)
    else:
        row = t.to(tl.int64)
    hp = h + row * sh + n
    tl.store(hp, (tl.load(hp, mask=n < H, other=0.0).to(tl.float32) + mix).to(DT), mask=n < H)


def _rows_block(width: int) -> tuple[int, int]:
    """(rows per program, the row's block) for a row of `width` elements."""
    block = triton.next_power_of_2(width)
    return max(1, ROWS_BLOCK_ELEMENTS // block), block


def _check_weight(x: torch.Tensor, w: torch.Tensor, width: int, what: str) -> None:
    if x.stride(-1) != 1 or w.shape != (width,) or w.dtype != x.dtype:
        raise ValueError(f"{what}: x {tuple(x.shape)} {x.dtype} (unit last stride), weight {tuple(w.shape)} "
                         f"{w.dtype} (want [{width}] in x's dtype)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (rows with a unit last stride), weight [D] (x's dtype) -> RMSNorm(x) [..., D], a new tensor:
    omnilab.model.decoder.RMSNorm's arithmetic in one pass."""
    D = x.shape[-1]
    _check_weight(x, weight, D, "rms_norm")
    flat = x.reshape(-1, D)  # [R, D]
    return _norm_rows(flat, flat, weight, eps, resid=False).view(x.shape)


def add_rms_norm(h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h [..., D] += a (h's dtype, in place: h must be contiguous and own its memory), then RMSNorm(h) [..., D] (a
    new tensor): `h = h + a; x = norm(h)` in one pass."""
    D = h.shape[-1]
    _check_weight(h, weight, D, "add_rms_norm")
    if not h.is_contiguous() or a.shape != h.shape or a.dtype != h.dtype:
        raise ValueError(f"add_rms_norm: h {tuple(h.shape)} {h.dtype} (contiguous), a {tuple(a.shape)} {a.dtype}")
    flat, af = h.view(-1, D), a.reshape(-1, D)  # [R, D] each
    return _norm_rows(flat, af, weight, eps, resid=True).view(h.shape)


def _norm_rows(flat: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float, resid: bool) -> torch.Tensor:
    """The _rms_norm launch over rows flat [R, D] (resid: flat += a first, in place) -> the norm [R, D], new."""
    out = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device)  # [R, D]
    R, D = flat.shape
    br, bd = _rows_block(D)
    _rms_norm[(triton.cdiv(R, br),)](flat, a, weight, out, R, D, flat.stride(0), a.stride(0), out.stride(0),
                                     float(eps), RESID=resid, BLOCK_R=br, BLOCK_D=bd, **EXACT)
    return out


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """x [B, T, heads, hd] (a projection's heads, contiguous), weight [hd], cos / sin [B, T, hd] (x's dtype) ->
    [B, T, heads, hd]: RMSNorm over each head, then n * cos + rotate_half(n) * sin (the eager Attention's q_norm /
    k_norm and RoPE before its transpose)."""
    B, T, heads, hd = x.shape
    _check_weight(x, weight, hd, "norm_rope")
    if hd % 2 or not x.is_contiguous() or cos.shape != (B, T, hd) or sin.shape != cos.shape \
            or not (cos.dtype == sin.dtype == x.dtype):
        raise ValueError(f"norm_rope: x {tuple(x.shape)} {x.dtype} (contiguous, even head_dim), cos "
                         f"{tuple(cos.shape)} {cos.dtype}, sin {tuple(sin.shape)} {sin.dtype} (want [B, T, hd])")
    flat = x.view(-1, hd)  # [B * T * heads, hd]: row r is token r // heads
    c, s = cos.reshape(B * T, hd).contiguous(), sin.reshape(B * T, hd).contiguous()  # [B * T, hd]
    out = torch.empty_like(flat)  # [B * T * heads, hd]
    R = flat.shape[0]
    br, bd = _rows_block(hd // 2)
    _norm_rope[(triton.cdiv(R, br),)](flat, weight, c, s, out, R, heads, hd // 2, flat.stride(0), c.stride(0),
                                      out.stride(0), float(eps), BLOCK_R=br, BLOCK_D=bd, **EXACT)
    return out.view(B, T, heads, hd)


def silu_mul(gu: torch.Tensor, I: int) -> torch.Tensor:
    """gu [M, 2I] (gate columns then up columns; rows with a unit last stride) -> F.silu(gu[:, :I]) * gu[:, I:],
    [M, I] contiguous in gu's dtype."""
    M = gu.shape[0]
    if gu.dim() != 2 or gu.shape[1] != 2 * I or gu.stride(-1) != 1:
        raise ValueError(f"silu_mul: gu {tuple(gu.shape)} strides {gu.stride()}, want [M, {2 * I}] rows")
    act = torch.empty(M, I, dtype=gu.dtype, device=gu.device)  # [M, I]
    c = SILU_BLOCK
    _silu_mul[(triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(I, c["BLOCK_N"]))](gu, act, M, I, gu.stride(0),
                                                                            act.stride(0), **c, **EXACT)
    return act


def gate_up_rows(x: torch.Tensor, tok: torch.Tensor, ends: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """x [N, H] (rows with a unit last stride), tok [M] (the token of each slot-sorted row), ends [S] (int32: slot
    s holds rows [ends[s - 1], ends[s]), as torch._grouped_mm's offs), gate_up [S, 2I, H] (gate rows first) ->
    silu_mul(grouped_mm(x[tok], gate_up.transpose(1, 2), offs=ends), I), [M, I] contiguous in x's dtype."""
    M, (S, I2, H) = tok.shape[0], gate_up.shape
    I = I2 // 2
    if (x.dim() != 2 or x.shape[1] != H or x.stride(1) != 1 or ends.shape != (S,) or ends.dtype != torch.int32
            or gate_up.dtype != x.dtype or tok.dim() != 1):
        raise ValueError(f"gate_up_rows: x {tuple(x.shape)} {x.dtype}, tok {tuple(tok.shape)}, ends "
                         f"{tuple(ends.shape)} {ends.dtype}, gate_up {tuple(gate_up.shape)} {gate_up.dtype}")
    act = torch.empty(M, I, dtype=x.dtype, device=x.device)  # [M, I]
    if M == 0:
        return act
    c = GATE_UP_ROWS
    BM = c["BLOCK_M"]
    # each slot's rows cut into blocks of BM: block b's slot and first row, without a host sync (the grid is the
    # most blocks there can be, cdiv(M, BM) + S; the blocks past the last have slot -1)
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))  # [S]
    blocks = (ends - starts + BM - 1) // BM  # [S]
    last = torch.cumsum(blocks, 0)  # [S]: one past each slot's last block
    nb = triton.cdiv(M, BM) + S
    b = torch.arange(nb, device=x.device, dtype=last.dtype)  # [nb]
    slot = torch.searchsorted(last, b, right=True)  # [nb]: S past the last block
    known = slot.clamp_max(S - 1)
    block_start = (starts[known] + (b - (last - blocks)[known]) * BM).to(torch.int32)  # [nb]
    block_slot = torch.where(slot < S, slot, -1).to(torch.int32)  # [nb]
    grid = (triton.cdiv(I, c["BLOCK_N"]), nb)
    _gate_up_rows[grid](x, tok, ends, block_slot, block_start, gate_up, act, I, H, x.stride(0), *gate_up.stride(),
                        act.stride(0), **c, **EXACT)
    return act


def combine_into(h: torch.Tensor, y: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor,
                 rows: torch.Tensor | None = None) -> None:
    """The expert mix added into the residual stream, in place. h [R, H] (rows with a unit last stride), y [N * k, H]
    (each choice's expert output, in any order), inv [N * k] (the row of y holding choice t * k + j), weights [N, k],
    rows [N] (h's row of token t; None: row t) -> h[rows[t]] += sum_j weights[t, j] * y[inv[t * k + j]], rounded as
    step.expert_mix's grouped_mm then `h + mix` round. Rows not in `rows` are untouched."""
    N, k = weights.shape
    H = h.shape[1]
    if (h.dim() != 2 or y.shape != (N * k, H) or inv.shape != (N * k,) or h.stride(1) != 1 or y.stride(1) != 1
            or y.dtype != h.dtype or weights.dtype != h.dtype or (rows is None and h.shape[0] < N)
            or (rows is not None and rows.shape != (N,))):
        raise ValueError(f"combine_into: h {tuple(h.shape)} {h.dtype}, y {tuple(y.shape)} {y.dtype}, inv "
                         f"{tuple(inv.shape)}, weights {tuple(weights.shape)} {weights.dtype}, rows "
                         f"{None if rows is None else tuple(rows.shape)}")
    if N == 0:
        return
    grid = (N, triton.cdiv(H, COMBINE_BLOCK_H))
    _combine[grid](y, inv, weights, h, inv if rows is None else rows, H, y.stride(0), weights.stride(0),
                   h.stride(0), TOP_K=k, KP=triton.next_power_of_2(k), BLOCK_H=COMBINE_BLOCK_H,
                   ROWS=rows is not None, **EXACT)
