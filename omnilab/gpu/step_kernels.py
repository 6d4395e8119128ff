"""The decode step's dense GEMVs and router as Triton kernels (step.py's compute="triton" for decode-sized bf16
steps, batch 1 to 64): `linear` (x [N <= 64, K] @ w.T, fp32 accumulation), `linear_qkv` (q, k and v in one launch
from the three separate weight tensors: no concatenated copy) and `route_topk` (softmax, top-k and the
renormalisation of a token's router logits in one program). Each is one torch.library.custom_op with a fake impl,
so torch.compile keeps it whole; no host sync and no allocation that depends on data (CUDA-graph capturable).

Follows gpt-fast's and vLLM's batch-1 decode (skinny GEMMs as GEMVs streaming the weight once) and fused_moe.py's
token mode (`_gate_up_by_choice`: a program per block of weight rows, [BLOCK_M, BLOCK_K] tiles along contiguous
rows, reduced with tl.sum, not tl.dot, which needs M >= 16). At M = 1 cuBLAS picks split-K kernels near 3x the HBM
floor of these weights (bench/results/step_profile_h100.txt); torch.topk of 128 values is two kernels (~9 us).
Steps of 3 to 64 rows (batched decode) take tl.dot instead, x's rows padded with zeros to 16, 32 or 64 (tl.dot's
least is 16) and the weight still read once: at B = 8 cuBLAS took 33 us a layer for q/k/v/o, about 3x the floor
of their 38 MB (bench/results/batched_h100_run2.md).
differs from transformers: the sums of a dot product, of the softmax and of the renormalisation run in another
order (fp32 either way); top-k ties go to the lower expert id (each labelled inline).
bench/step_kernels.py times them against F.linear / step.route and sweeps the block sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # the kernels take at most this many rows of x (a decode step of batch <= 64; step.py: F.linear past)
SUM_ROWS = 2  # steps of at most this many rows take the tl.sum GEMVs (QKV, WIDE, NARROW), more the tl.dot ones
# block sizes for H100 / H200 in bf16; bench/step_kernels.py --sweep measures them. First choices, not yet timed,
# from the sm_90 code (Triton 3.9, compiled here without a GPU): these loops are not software-pipelined (no cp.async
# whatever num_stages), so a program keeps one iteration's tile in flight, and the bytes in flight per SM are
# programs x tile bytes; 8 KB tiles (16-byte loads, several per thread) and ACC2D (elementwise fp32 accumulation,
# one reduction after the loop, as fused_moe's ACC2D) keep barriers and cross-warp reductions out of the loop
QKV = dict(BLOCK_M=8, BLOCK_K=512, num_warps=8, num_stages=2, ACC2D=True)  # q|k|v [5120, 2048]: 640 programs
WIDE = dict(BLOCK_M=4, BLOCK_K=1024, num_warps=4, num_stages=2, ACC2D=True)  # o_proj [2048, 4096]: 512 programs
NARROW = dict(BLOCK_M=1, BLOCK_K=2048, num_warps=8, num_stages=1, ACC2D=False)  # the router [128, 2048]: 128
# programs, each its row in one read (a loop over K would be latency-bound: a program a row already leaves SMs idle)
NARROW_M = 256  # weights of at most this many rows take NARROW, more WIDE
# 3 to 64 rows: tl.dot tiles of [BLOCK_N, BLOCK_K] x [BLOCK_K, BLOCK_M], software-pipelined over K (num_stages
# cp.async stages in flight): enough programs to fill 132 SMs where the rows allow (q|k|v 5120 rows / 32 = 160,
# o_proj 2048 / 16 = 128) and 8 KB of weight a stage; a sweep at 32 rows on an H100 found nothing faster end to end
# (bench/results/batched_h100_run3.md: 1,580 tok/s against these tables' 1,595)
DOT_QKV = dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=4)
DOT_WIDE = dict(BLOCK_M=16, BLOCK_K=256, num_warps=4, num_stages=4)
DOT_NARROW = dict(BLOCK_M=16, BLOCK_K=256, num_warps=4, num_stages=3)  # the router: 8 programs whatever the blocks
ROUTE_WARPS = 1  # route_topk: one warp a token (E <= 256 values in registers, warp-shuffle reductions)


@triton.jit
def _dot_rows(wt, xt, acc, acc2, ACC2D: tl.constexpr):
    """acc [BLOCK_M] + the rows of wt [BLOCK_M, BLOCK_K] . those of xt (x's row repeated) in fp32 (ACC2D: acc2
    [BLOCK_M, BLOCK_K] accumulates the products elementwise instead, reduced once after the loop)."""
    # differs from transformers: fp32 products summed along K in tile order (cuBLAS: its own split-K order)
    prod = wt.to(tl.float32) * xt.to(tl.float32)  # [BLOCK_M, BLOCK_K]
    if ACC2D:  # compile-time, as fused_moe's ACC2D
        acc2 += prod
    else:
        acc += tl.sum(prod, 1)
    return acc, acc2


@triton.jit
def _rows(x, w, y, row0, M, K, sx, sw, sy, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
          ACC2D: tl.constexpr, EVEN_K: tl.constexpr):
    """y[n, m] = w[m] . x[n] for the BLOCK_M weight rows m = row0.. and the N (1 or 2) rows of x, each weight tile
    read once for both, fp32 accumulation, written once in y's dtype. Rows past M are clamped to M - 1 for the loads
    (no mask along a row) and not stored. x's row is loaded as a [BLOCK_M, BLOCK_K] tile of repeated rows (L1 hits),
    in the weight tile's own register layout: a [BLOCK_K] load broadcast over the rows is a layout conversion
    through shared memory, with barriers, every iteration (seen in the sm_90 TTGIR / PTX)."""
    m = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]: rows of w (columns of y)
    wr = w + tl.minimum(m, M - 1).to(tl.int64)[:, None] * sw  # [BLOCK_M, 1]: the weight rows
    xr = x + 0 * m[:, None]  # [BLOCK_M, 1]: x row 0 for every weight row
    acc0 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # x row 0
    acc1 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # x row 1 (N = 2; unused otherwise)
    acc0_2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # ACC2D's accumulators (unused otherwise)
    acc1_2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x1p = xr + (N - 1) * sx + kk[None, :]  # [BLOCK_M, BLOCK_K]: x row 1 (N = 1: row 0 again, never read)
        if EVEN_K:  # compile-time: K a multiple of BLOCK_K, no mask along the contiguous axis
            wt = tl.load(wr + kk[None, :])  # [BLOCK_M, BLOCK_K]
            x0 = tl.load(xr + kk[None, :])  # [BLOCK_M, BLOCK_K]: x row 0, repeated
            x1 = tl.load(x1p) if N == 2 else x0
        else:
            km = kk[None, :] < K  # [1, BLOCK_K]
            wt = tl.load(wr + kk[None, :], mask=km, other=0.0)
            x0 = tl.load(xr + kk[None, :], mask=km, other=0.0)
            x1 = tl.load(x1p, mask=km, other=0.0) if N == 2 else x0
        acc0, acc0_2 = _dot_rows(wt, x0, acc0, acc0_2, ACC2D)
        if N == 2:  # compile-time: the second row reuses the weight tile
            acc1, acc1_2 = _dot_rows(wt, x1, acc1, acc1_2, ACC2D)
    if ACC2D:
        acc0, acc1 = tl.sum(acc0_2, 1), tl.sum(acc1_2, 1)  # [BLOCK_M]
    tl.store(y + m, acc0.to(y.dtype.element_ty), mask=m < M)
    if N == 2:
        tl.store(y + sy + m, acc1.to(y.dtype.element_ty), mask=m < M)


@triton.jit
def _rows_dot(x, w, y, row0, M, K, sx, sw, sy, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """y[n, m] = w[m] . x[n] for the BLOCK_M weight rows m = row0.. and the N (3 to 64) rows of x by tl.dot, x's
    rows padded with zeros to BLOCK_N (>= 16: tl.dot's least), each weight tile read once, fp32 accumulation,
    written once in y's dtype. Rows past M are clamped to M - 1 for the loads and not stored."""
    m = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]: rows of w (columns of y)
    n = tl.arange(0, BLOCK_N)  # [BLOCK_N]: rows of x (and of y); those past N read as zeros
    kk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    wp = w + tl.minimum(m, M - 1).to(tl.int64)[None, :] * sw + kk[:, None]  # [BLOCK_K, BLOCK_M]: w's tile, transposed
    xp = x + n[:, None] * sx + kk[None, :]  # [BLOCK_N, BLOCK_K]
    nm = n[:, None] < N  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # compile-time: K a multiple of BLOCK_K
            xt = tl.load(xp, mask=nm, other=0.0)  # [BLOCK_N, BLOCK_K]
            wt = tl.load(wp)  # [BLOCK_K, BLOCK_M]
        else:
            km = (k0 + kk) < K  # [BLOCK_K]
            xt = tl.load(xp, mask=nm & km[None, :], other=0.0)
            wt = tl.load(wp, mask=km[:, None], other=0.0)
        # differs from transformers: fp32 products summed along K in the MMA's order (cuBLAS: its own); fp32 inputs
        # stay fp32 ("ieee", not TF32), as F.linear with TF32 off
        if x.dtype.element_ty == tl.float32:  # compile-time
            acc = tl.dot(xt, wt, acc, input_precision="ieee")  # [BLOCK_N, BLOCK_M]
        else:
            acc = tl.dot(xt, wt, acc)  # [BLOCK_N, BLOCK_M]
        xp += BLOCK_K
        wp += BLOCK_K
    tl.store(y + n[:, None] * sy + m[None, :], acc.to(y.dtype.element_ty), mask=nm & (m[None, :] < M))


@triton.jit
def _block(x, w, y, row0, M, K, sx, sw, sy, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_K: tl.constexpr, ACC2D: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr):
    """A program's BLOCK_M weight rows by tl.sum (N <= SUM_ROWS) or by tl.dot (DOT: more rows)."""
    if DOT:  # compile-time
        _rows_dot(x, w, y, row0, M, K, sx, sw, sy, N, BLOCK_N, BLOCK_M, BLOCK_K, EVEN_K)
    else:
        _rows(x, w, y, row0, M, K, sx, sw, sy, N, BLOCK_M, BLOCK_K, ACC2D, EVEN_K)


@triton.jit
def _gemv(x, w, y, M, K, sx, sw, sy, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_K: tl.constexpr, ACC2D: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr):
    """Program (block of BLOCK_M weight rows): y[:, rows] = x @ w[rows].T."""
    _block(x, w, y, tl.program_id(0) * BLOCK_M, M, K, sx, sw, sy, N, BLOCK_N, BLOCK_M, BLOCK_K, ACC2D, EVEN_K, DOT)


@triton.jit
def _gemv_qkv(x, wq, wk, wv, q, k, v, Mq, Mk, Mv, K, sx, swq, swk, swv, sq, sk, sv, N: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC2D: tl.constexpr,
              EVEN_K: tl.constexpr, DOT: tl.constexpr):
    """Program p: a block of BLOCK_M rows of q_proj (the first cdiv(Mq, BLOCK_M) programs), then of k_proj, then of
    v_proj, each writing its own output: three GEMVs of one x in one launch, the weights read where they are."""
    p = tl.program_id(0)
    pq = tl.cdiv(Mq, BLOCK_M)
    pk = pq + tl.cdiv(Mk, BLOCK_M)
    if p < pq:
        _block(x, wq, q, p * BLOCK_M, Mq, K, sx, swq, sq, N, BLOCK_N, BLOCK_M, BLOCK_K, ACC2D, EVEN_K, DOT)
    elif p < pk:
        _block(x, wk, k, (p - pq) * BLOCK_M, Mk, K, sx, swk, sk, N, BLOCK_N, BLOCK_M, BLOCK_K, ACC2D, EVEN_K, DOT)
    else:
        _block(x, wv, v, (p - pk) * BLOCK_M, Mv, K, sx, swv, sv, N, BLOCK_N, BLOCK_M, BLOCK_K, ACC2D, EVEN_K, DOT)


@triton.jit
def _route_topk(logits, weights, experts, E, sl, sw, se, TOP_K: tl.constexpr, KP: tl.constexpr,
                EP: tl.constexpr, NORM: tl.constexpr):
    """Program (token t): the softmax of its E logits in fp32, the TOP_K largest by TOP_K argmax passes (descending;
    among equal probabilities the lower expert id first), optionally renormalised over the k, in registers."""
    t = tl.program_id(0)
    e = tl.arange(0, EP)  # [EP]: expert ids (EP = E rounded up to a power of two)
    z = tl.load(logits + t.to(tl.int64) * sl + e, mask=e < E, other=float("-inf")).to(tl.float32)  # [EP]
    # the exponentials in fp64, rounded to fp32 (as torch's expf, ~1 ulp): Triton's fp32 exp is ex2.approx of a
    # rounded x * log2(e) (a few ulp); the sum and the division in fp32, as torch's softmax
    p = tl.exp((z - tl.max(z, 0)).to(tl.float64)).to(tl.float32)  # [EP]; the padding: exp(-inf) = 0
    # differs from transformers: the softmax's sum in tl.sum's order (torch's softmax kernel: its own), fp32 both
    probs = p / tl.sum(p, 0)  # [EP]
    left = tl.where(e < E, probs, -1.0)  # [EP]: the padding is never chosen (probabilities are >= 0)
    j = tl.arange(0, KP)  # [KP]: ranks (KP = k rounded up to a power of two)
    top = tl.zeros((KP,), dtype=tl.float32)
    ids = tl.zeros((KP,), dtype=tl.int64)
    for i in tl.static_range(TOP_K):
        best = tl.max(left, 0)
        # differs from torch.topk (which promises no order among ties): equal probabilities go to the lower id
        pick = tl.minimum(tl.min(tl.where(left == best, e, EP), 0), E - 1)  # clamped: a NaN row stays in range
        top = tl.where(j == i, best, top)
        ids = tl.where(j == i, pick, ids)
        left = tl.where(e == pick, -2.0, left)  # taken
    if NORM:  # ranks past TOP_K hold 0
        # differs from transformers: the k weights summed in tl.sum's order (torch: its reduction's)
        top = top / tl.sum(top, 0)
    tl.store(weights + t.to(tl.int64) * sw + j, top.to(weights.dtype.element_ty), mask=j < TOP_K)
    tl.store(experts + t.to(tl.int64) * se + j, ids, mask=j < TOP_K)


def _blocks(M: int) -> tuple[dict, dict]:
    """A weight of M rows: its (tl.sum, tl.dot) block tables."""
    return (NARROW, DOT_NARROW) if M <= NARROW_M else (WIDE, DOT_WIDE)


DOT_SHARED_BYTES = 200 * 1024  # the tl.dot path's pipelined tiles in at most this much shared memory (sm_90: 227 KB)


def _launch_args(x: torch.Tensor, K: int, sum_table: dict, dot_table: dict) -> dict:
    """The kernels' compile-time arguments for x [N, K]: sum_table's blocks (tl.sum) for N <= SUM_ROWS, else
    dot_table's (tl.dot)."""
    N = x.shape[0]
    if N <= SUM_ROWS:
        return dict(N=N, BLOCK_N=1, DOT=False, EVEN_K=K % sum_table["BLOCK_K"] == 0, **sum_table)
    c = dot_table
    block_n = max(16, triton.next_power_of_2(N))  # x's rows padded to tl.dot's least (16) or the next power of two
    # fewer stages where the tiles would not fit: Triton asked the H100 for up to (stages - 1) x 2 x a stage's x and
    # weight tiles (bf16, 32 rows, BLOCK_M 32, BLOCK_K 256, 5 stages: 256 KB; fp32, 64 rows, 16, 256, 4: 240 KB)
    stage = (block_n + c["BLOCK_M"]) * c["BLOCK_K"] * x.element_size()
    return dict(N=N, BLOCK_N=block_n, DOT=True, EVEN_K=K % c["BLOCK_K"] == 0, ACC2D=False,
                **{**c, "num_stages": max(1, min(c["num_stages"], 1 + DOT_SHARED_BYTES // (2 * stage)))})


def _rowwise(w: torch.Tensor) -> torch.Tensor:
    return w if w.stride(-1) == 1 else w.contiguous()  # a module's weight is contiguous: never copied there


@torch.library.custom_op("omnilab::gemv", mutates_args=())
def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x, w = x.contiguous(), _rowwise(w)  # the kernels read rows with unit stride (no copy for a module's weight)
    N, K = x.shape
    M = w.shape[0]
    y = torch.empty(N, M, dtype=x.dtype, device=x.device)  # [N, M]
    args = _launch_args(x, K, *_blocks(M))
    _gemv[(triton.cdiv(M, args["BLOCK_M"]),)](x, w, y, M, K, x.stride(0), w.stride(0), y.stride(0), **args)
    return y


@_linear.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])  # [N, M]


@torch.library.custom_op("omnilab::gemv_qkv", mutates_args=())
def _linear_qkv(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor,
                wv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, wq, wk, wv = x.contiguous(), _rowwise(wq), _rowwise(wk), _rowwise(wv)
    N, K = x.shape
    Mq, Mk, Mv = wq.shape[0], wk.shape[0], wv.shape[0]
    q, k, v = (torch.empty(N, M, dtype=x.dtype, device=x.device) for M in (Mq, Mk, Mv))  # [N, M] each
    args = _launch_args(x, K, QKV, DOT_QKV)
    grid = (sum(triton.cdiv(M, args["BLOCK_M"]) for M in (Mq, Mk, Mv)),)
    _gemv_qkv[grid](x, wq, wk, wv, q, k, v, Mq, Mk, Mv, K, x.stride(0), wq.stride(0), wk.stride(0), wv.stride(0),
                    q.stride(0), k.stride(0), v.stride(0), **args)
    return q, k, v


@_linear_qkv.register_fake
def _(x, wq, wk, wv):
    return tuple(x.new_empty(x.shape[0], w.shape[0]) for w in (wq, wk, wv))  # [N, M] each


@torch.library.custom_op("omnilab::route_topk", mutates_args=())
def _route(logits: torch.Tensor, k: int, norm_topk_prob: bool,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    N, E = logits.shape
    weights = torch.empty(N, k, dtype=dtype, device=logits.device)  # [N, k]
    experts = torch.empty(N, k, dtype=torch.int64, device=logits.device)  # [N, k]
    _route_topk[(N,)](logits, weights, experts, E, logits.stride(0), weights.stride(0), experts.stride(0),
                      TOP_K=k, KP=triton.next_power_of_2(k), EP=triton.next_power_of_2(E), NORM=norm_topk_prob,
                      num_warps=ROUTE_WARPS)
    return weights, experts


@_route.register_fake
def _(logits, k, norm_topk_prob, dtype):
    N = logits.shape[0]
    return logits.new_empty(N, k, dtype=dtype), logits.new_empty(N, k, dtype=torch.int64)  # [N, k] each


def _check(x: torch.Tensor, *ws: torch.Tensor) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"step GEMV: x {tuple(x.shape)}, want [N, K] with N <= {MAX_ROWS}")
    for w in ws:
        if w.dim() != 2 or w.shape[1] != x.shape[1] or w.dtype != x.dtype:
            raise ValueError(f"step GEMV: weight {tuple(w.shape)} {w.dtype} against x {tuple(x.shape)} {x.dtype}")


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, K] (N <= MAX_ROWS), w [M, K] (x's dtype, bf16 or fp32) -> x @ w.T [N, M] in x's dtype, fp32
    accumulation; F.linear without bias (TF32 off)."""
    _check(x, w)
    return _linear(x, w)


def linear_qkv(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor):
    """x [N, K] (N <= MAX_ROWS) and three weights [Mq | Mk | Mv, K] -> (x @ wq.T, x @ wk.T, x @ wv.T), [N, M] each,
    in one launch."""
    _check(x, wq, wk, wv)
    return _linear_qkv(x, wq, wk, wv)


def route_topk(logits: torch.Tensor, k: int, norm_topk_prob: bool, dtype: torch.dtype):
    """router logits [N, E] (E <= 256, any float dtype) -> (weights [N, k] in dtype, experts [N, k] int64):
    step.route(logits, k, norm_topk_prob, dtype) without an override, in one kernel (a program per token)."""
    E = logits.shape[-1]
    if logits.dim() != 2 or not 1 <= k <= E or E > 256:
        raise ValueError(f"route_topk: logits {tuple(logits.shape)}, k {k} (want [N, E], 1 <= k <= E <= 256)")
    return _route(logits, int(k), bool(norm_topk_prob), dtype)
