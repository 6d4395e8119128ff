"""The trace prefill's Triton glue (omnilab.gpu.prefill_kernels) on cuda in bf16, the real thinker's shapes (hidden
2048, 32 / 4 heads of 128, expert 768, top-8): each kernel against the torch ops it replaces (equal but for rare
one-step flips: on the GPU exp and rsqrt are not torch's to the last fp32 ulp, and fp32 sums run in another order),
padded and whole; TracePrefill takes the Triton glue by default for a bf16 cuda model and records the torch glue's
routing, padded and whole batches, as does the fused glue (gate|up's gather and SiLU inside one Triton GEMM); and
gate_up_rows, that glue's GEMM. (In Triton's CPU interpreter: tests/test_prefill_kernels.py.)"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from omnilab.gpu import prefill_kernels as pk  # noqa: E402
from omnilab.gpu.prefill import (AUTO_BATCH_TOKENS, TracePrefill, activation_bytes_per_token,  # noqa: E402
                                  batch_tokens_for)
from omnilab.model.decoder import RMSNorm, SelectiveMoE  # noqa: E402
from omnilab.model.rope import rotate_half  # noqa: E402

H, NH, NKV, HD, I, K = 2048, 32, 4, 128, 768, 8
BF16 = torch.bfloat16


def close(got, want, equal: float = 0.99) -> None:
    """bf16: at least `equal` of the elements bit-equal to the torch ops', the rest within bf16 noise."""
    assert got.dtype == want.dtype and got.shape == want.shape
    same = float((got == want).float().mean())
    rel = float((got.float() - want.float()).norm() / want.float().norm())
    assert same >= equal and rel < 2e-3, (same, rel)


def norm(D, gen):
    n = RMSNorm(D, 1e-6).cuda().requires_grad_(False)
    n.weight.data = (torch.rand(D, device="cuda", generator=gen) + 0.5).to(BF16)
    return n


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(0)


@pytest.mark.parametrize("rows", [1, 4099])
def test_rms_norm_and_add_rms_norm(gen, rows):
    n = norm(H, gen)
    x = (torch.randn(rows, H, device="cuda", generator=gen) * 3).to(BF16)
    close(pk.rms_norm(x, n.weight, n.eps), n(x))
    a = torch.randn(rows, H, device="cuda", generator=gen).to(BF16)
    h = x.clone()
    out = pk.add_rms_norm(h, a, n.weight, n.eps)
    assert torch.equal(h, x + a)  # the residual sum, rounded once, in place
    close(out, n(x + a))


@pytest.mark.parametrize("heads", [NH, NKV])
def test_norm_rope(gen, heads):
    B, T = 3, 517
    n = norm(HD, gen)
    q = torch.randn(B, T, heads, HD, device="cuda", generator=gen).to(BF16)
    angle = torch.arange(T, device="cuda")[:, None] * 10000.0 ** (-torch.arange(0, HD, 2, device="cuda") / HD)
    angle = torch.cat((angle, angle), -1).expand(B, T, HD)  # [B, T, hd], rope_cos_sin's
    cos, sin = angle.cos().to(BF16), angle.sin().to(BF16)
    want = n(q).transpose(1, 2)
    want = want * cos[:, None] + rotate_half(want) * sin[:, None]
    close(pk.norm_rope(q, n.weight, cos, sin, n.eps).transpose(1, 2), want)


def test_silu_mul(gen):
    gu = (torch.randn(8 * 1237, 2 * I, device="cuda", generator=gen) * 2).to(BF16)
    close(pk.silu_mul(gu, I), F.silu(gu[:, :I]) * gu[:, I:])


def test_gate_up_rows(gen):
    """The fused glue's gate|up: one Triton GEMM reading each sorted row's token from x, SiLU * up in its epilogue,
    against the Triton glue's x[perm // k], torch._grouped_mm and silu_mul's torch ops; 128 slots, one empty."""
    from omnilab.gpu.step import sort_choices

    N, S = 1237, 128
    x = torch.randn(N, H, device="cuda", generator=gen).to(BF16)
    gate_up = (torch.randn(S, 2 * I, H, device="cuda", generator=gen) / H ** 0.5).to(BF16)
    slots = torch.rand(N, S - 1, device="cuda", generator=gen).topk(K, dim=-1).indices  # [N, K]: slot 127 empty
    perm, offs = sort_choices(slots, torch.arange(S, device="cuda"))
    gu = torch._grouped_mm(x[perm // K], gate_up.transpose(1, 2), offs=offs)  # [N * K, 2I]
    close(pk.gate_up_rows(x, (perm // K).to(torch.int32), offs, gate_up), F.silu(gu[:, :I]) * gu[:, I:])


@pytest.mark.parametrize("padded", [False, True])
def test_combine_into(gen, padded):
    N = 1237
    M = N * K
    y = torch.randn(M, H, device="cuda", generator=gen).to(BF16)
    perm = torch.randperm(M, device="cuda", generator=gen)
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(M, device="cuda"))
    w = torch.rand(N, K, device="cuda", generator=gen).softmax(-1).to(BF16)
    R = 2 * N if padded else N
    h = torch.randn(R, H, device="cuda", generator=gen).to(BF16)
    rows = torch.randperm(R, device="cuda", generator=gen)[:N] if padded else None
    yw = y * w.reshape(-1)[perm][:, None]  # step.expert_mix's grouped_mm, then h + mix at the real rows
    out = torch.empty_like(yw)
    out[perm] = yw
    mix = out.view(N, K, H).sum(dim=1)
    want = h.clone()
    if padded:
        want[rows] = want[rows] + mix
    else:
        want += mix
    got = h.clone()
    pk.combine_into(got, y, inv, w, rows)
    close(got, want)
    if padded:
        other = torch.ones(R, dtype=torch.bool, device="cuda")
        other[rows] = False
        assert torch.equal(got[other], h[other])


@pytest.fixture(scope="module")
def prefills(make_checkpoint):
    model = SelectiveMoE.from_checkpoint(make_checkpoint("omni"), device="cuda", dtype=BF16, tokenizer=False)
    default = TracePrefill(model)
    return default, TracePrefill(model, default.experts, glue="torch")


@pytest.mark.parametrize("glue", ["triton", "fused"])
@pytest.mark.parametrize("batch", ["padded", "whole"])
def test_record_triton_glue_equals_torch_glue(prefills, batch, glue):
    default, torch_glue = prefills
    assert (default.glue, torch_glue.glue) == ("fused", "torch")  # bf16 on cuda: the fused Triton glue by default
    triton_glue = default if glue == default.glue else TracePrefill(default.model, default.experts, glue=glue)
    gen = np.random.default_rng(0)
    lengths = gen.integers(1, 200, 24) if batch == "padded" else np.full(24, 64)
    vocab = triton_glue.config.vocab_size
    ids = [gen.integers(0, vocab, int(n)).tolist() for n in lengths]
    docs = gen.permutation(24).tolist() if batch == "padded" else list(range(24))
    a, b = (p.record(ids, docs, pad_id=0) for p in (torch_glue, triton_glue))
    assert a.experts.shape == b.experts.shape == (len(triton_glue.layers), int(lengths.sum()), a.experts.shape[2])
    assert (a.experts == b.experts).mean() > 0.995, (a.experts == b.experts).mean()
    assert abs(a.weights - b.weights).mean() < 1e-3 and abs(a.entropy - b.entropy).mean() < 1e-3


@pytest.mark.parametrize("spin", [False, True])
def test_layers_read_as_they_arrive_equal_the_whole_routing(prefills, spin):
    """A writer thread reads each layer's routing the moment its event says it is on the host (PendingRouting.layer,
    events blocking by default, spinning with spin=True) while the next batch's kernels queue: every layer equals the
    routing of the same batch waited for whole."""
    import threading

    default = prefills[0]
    recorder = TracePrefill(default.model, default.experts, spin=spin)
    gen = np.random.default_rng(1)
    vocab = recorder.config.vocab_size
    batches = [[gen.integers(0, vocab, int(n)).tolist() for n in gen.integers(16, 256, 32)] for _ in range(3)]
    want = [recorder.record(ids, list(range(len(ids)))) for ids in batches]
    got = {}

    def read(b, pending):
        got[b] = [tuple(x.copy() for x in pending.layer(j)) for j in range(len(recorder.layers))]

    threads = []
    for b, ids in enumerate(batches):  # each batch's layers read in a thread while this one queues the next batch
        threads.append(threading.Thread(target=read, args=(b, recorder.record_async(ids, list(range(len(ids)))))))
        threads[-1].start()
    for t in threads:
        t.join()
    for b, w in enumerate(want):
        for j in range(len(recorder.layers)):
            experts, weights, entropy = got[b][j]
            assert np.array_equal(experts, w.experts[j]) and np.array_equal(weights, w.weights[j]), (b, j)
            assert np.array_equal(entropy, w.entropy[j]), (b, j)


def test_flash_attention_no_cudnn_and_the_same_routing(prefills):
    """The prefill's attention is FlashAttention by default (cuDNN's plans one shape at a time: no cuDNN kernel
    runs), and routes as torch's own SDPA choice does but for bf16 rounding."""
    default = prefills[0]
    assert default.attention == "flash"
    other = TracePrefill(default.model, default.experts, attention="torch")
    gen = np.random.default_rng(2)
    lengths = gen.integers(1, 300, 16)
    ids = [gen.integers(0, default.config.vocab_size, int(n)).tolist() for n in lengths]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        a = default.record(ids, list(range(16)))
    names = [e.name for e in prof.events()]
    assert any("flash" in n.lower() for n in names) and not any("cudnn" in n.lower() for n in names), \
        sorted({n for n in names if "attention" in n.lower() or "sdpa" in n.lower()})
    b = other.record(ids, list(range(16)))
    assert (a.experts == b.experts).mean() > 0.99 and abs(a.weights - b.weights).mean() < 2e-3


def test_batch_tokens_for_bounds_a_batchs_peak(prefills):
    """--batch-tokens auto sizes batches by activation_bytes_per_token: a batch's peak GPU memory beyond the
    weights stays under it, and not far under (the estimate is not a blanket margin)."""
    default = prefills[0]
    m = default.model
    per_token = activation_bytes_per_token(m.config, m.dtype)
    gen = np.random.default_rng(3)
    ids = [gen.integers(0, default.config.vocab_size, 256).tolist() for _ in range(16)]  # 4096 tokens, no padding
    default.record(ids, list(range(16)))  # warm: kernels compiled, workspaces made
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    default.record(ids, list(range(16)))
    peak = torch.cuda.max_memory_allocated() - base
    assert per_token * 4096 / 8 < peak <= per_token * 4096, (peak, per_token * 4096)
    assert batch_tokens_for(m) in AUTO_BATCH_TOKENS
