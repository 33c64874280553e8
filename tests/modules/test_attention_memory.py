"""Attention memory linear in the sequence length (modules/transformer.py: attention_path,
chunked_attention): which computation runs, that the blockwise one equals SDPA (values and
gradients, fp32 and bf16, with padding and causal masks, with dropout), and the peak memory of one
attention call at N = 4096 measured as a subprocess's peak RSS."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modules.transformer as tr

ROOT = Path(__file__).resolve().parents[2]


def _qkv(b=2, h=3, t=37, s=37, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, t, d), (b, h, s, d), (b, h, s, d)]
    return [torch.randn(*shape, generator=g).to(dtype).requires_grad_() for shape in shapes]


def _mask(kind, b=2, t=37, s=37):
    if kind is None:
        return None
    if kind == "padding":  # [B, 1, 1, S], True = may attend
        m = torch.ones(b, 1, 1, s, dtype=torch.bool)
        m[1, ..., s - 9:] = False
        return m
    return torch.ones(t, s, dtype=torch.bool).tril(s - t)  # causal [T, S]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask_kind", [None, "padding", "causal"])
@pytest.mark.parametrize("budget", [3_000, 40_000, 10**9], ids=["row-blocks", "head-blocks", "one-block"])
def test_chunked_attention_equals_sdpa(dtype, mask_kind, budget):
    """Outputs and gradients of q, k, v equal SDPA's. fp32: to 1e-5. bf16: both run on the same
    bf16 inputs; ours against SDPA in float32 on them, to 2e-2 (bf16 has 8 bits of mantissa: the
    scores and probabilities are rounded to ~4e-3 relative, the output is a sum of 37 such terms)."""
    q, k, v = _qkv(dtype=dtype)
    mask = _mask(mask_kind)
    out = tr.chunked_attention(q, k, v, mask, 0.0, budget=budget)
    assert out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours = [out, *torch.autograd.grad(out, (q, k, v), grad.to(dtype))]
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask)
    refs = [ref, *torch.autograd.grad(ref, (q32, k32, v32), grad)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)


def test_score_blocks_cover_every_score_once_within_the_budget():
    for b, h, t, pair, budget in [(2, 3, 37, 1000, 3_000), (2, 3, 37, 1000, 900), (2, 3, 37, 1000, 7_000)]:
        seen = torch.zeros(b, h, t, dtype=torch.int64)
        for blk in tr._score_blocks(b, h, t, pair, budget):
            seen[blk] += 1
            rows, heads, queries = (len(range(*s.indices(n))) for s, n in zip(blk, (b, h, t)))
            assert rows * heads * queries * pair // t <= budget
        assert (seen == 1).all()


def test_chunked_attention_dropout_is_unbiased_and_backward_replays_its_draws():
    """Dropout in blocks: averaged over draws the output is the no-dropout output (checked to 4
    standard errors of the mean); and backward sees the forward's mask. out = P_dropped @ v is linear
    in v, so <out, w> = <dL/dv, v> for L = <out, w> exactly when backward uses the same P_dropped."""
    q, k, v = _qkv(b=1, h=2, t=16, s=16)
    torch.manual_seed(0)
    with torch.no_grad():
        clean = tr.chunked_attention(q, k, v, None, 0.0, budget=1700)
        draws = torch.stack([tr.chunked_attention(q, k, v, None, 0.3, budget=1700) for _ in range(200)])
    sem = draws.std(0) / 200**0.5
    assert ((draws.mean(0) - clean).abs() <= 4 * sem + 1e-6).float().mean() > 0.99
    assert not torch.allclose(draws[0], draws[1])  # the draws differ
    w = torch.randn_like(clean)
    out = tr.chunked_attention(q, k, v, None, 0.3, budget=1700)
    (grad_v,) = torch.autograd.grad((out * w).sum(), v)
    torch.testing.assert_close((grad_v * v).sum(), (out * w).sum(), rtol=1e-5, atol=1e-5)


def test_attention_path_is_chosen_by_bytes(monkeypatch):
    """Small calls keep the fast paths (explicit for bf16 / dropout / the caller's wish on CPU, SDPA
    otherwise); large ones take SDPA where torch says its kernel is memory-efficient, else blocks."""
    small = torch.zeros(1, 2, 4, 8)
    big = torch.zeros(1, 8, 4096, 8)  # explicit fp32: 1 x 8 x 4096 x 4096 x 8 bytes = 1 GiB
    kw = dict(attn_mask=None, is_causal=False)
    path = tr.attention_path
    assert path(small, small, small, dropout_p=0.0, prefer_explicit=False, **kw) == "sdpa"
    assert path(small, small, small, dropout_p=0.1, prefer_explicit=False, **kw) == "explicit"
    assert path(small.bfloat16(), small, small, dropout_p=0.0, prefer_explicit=False, **kw) == "explicit"
    assert path(small, small, small, dropout_p=0.0, prefer_explicit=True, **kw) == "explicit"
    assert path(big, big, big, dropout_p=0.0, prefer_explicit=True, need_weights=True, **kw) == "explicit"
    monkeypatch.setattr(tr, "sdpa_memory_efficient", lambda *a: True)
    for dtype, drop, prefer in [(torch.float32, 0.0, False), (torch.bfloat16, 0.0, False), (torch.float32, 0.1, True)]:
        b = big.to(dtype)
        assert path(b, b, b, dropout_p=drop, prefer_explicit=prefer, **kw) == "sdpa"
    assert path(big, big, big, dropout_p=0.0, prefer_explicit=True, keys_transposed=True, **kw) == "chunked"
    monkeypatch.setattr(tr, "sdpa_memory_efficient", lambda *a: False)
    assert path(big, big, big, dropout_p=0.1, prefer_explicit=False, **kw) == "chunked"
    monkeypatch.setattr(tr, "ATTENTION_SCORE_BUDGET", 2**40)
    assert path(big, big, big, dropout_p=0.1, prefer_explicit=False, **kw) == "explicit"


def test_sdpa_memory_efficient_asks_torch():
    """On CPU, torch runs flash attention without dropout and its math fallback with it."""
    q = torch.zeros(1, 2, 64, 8)
    assert tr.sdpa_memory_efficient(q, q, q, None, 0.0, False)
    assert not tr.sdpa_memory_efficient(q, q, q, None, 0.1, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_in_blocks_equals_unblocked(monkeypatch, dtype, causal):
    """The whole layer (projections, masks from a padding mask or is_causal, training mode) gives the
    same output and parameter gradients when its attention runs in blocks. fp32 to 1e-5; bf16 (under
    autocast, the explicit path against the blocked one) to 2e-2 of each tensor's largest magnitude:
    the key/value gradients are sums over blocks rounded to bf16 (8-bit mantissa) at every step."""
    torch.manual_seed(0)
    attn = tr.MultiheadAttention(d_model=32, nhead=4).train()
    x = torch.randn(2, 29, 32)
    pad = torch.zeros(2, 29, dtype=torch.bool)
    pad[0, 20:] = True
    kw = {"is_causal": True} if causal else {"attn_mask": tr._attention_mask(pad, None)}

    def run():
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = attn(x, x, x, **kw)
        out.float().pow(2).sum().backward()
        return [out.float()] + [p.grad.clone() for p in attn.parameters()]

    whole = run()
    monkeypatch.setattr(tr, "ATTENTION_SCORE_BUDGET", 4_000)  # ~1/10 of the explicit bytes
    monkeypatch.setattr(tr, "sdpa_memory_efficient", lambda *a: False)
    blocks = run()
    for a, b in zip(blocks, whole):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert (a - b).abs().max() <= 2e-2 * b.abs().max()


# ------------------------------------------------------------------ peak memory of one call, N = 4096
_RSS_SCRIPT = r"""
import json, resource, sys, torch
import modules.transformer as tr
dtype, path, drop, masked = getattr(torch, sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
if path == "chunked":  # as where SDPA's kernel would not be memory-efficient (dropout, math fallback)
    tr.sdpa_memory_efficient = lambda *a: False
B, H, N, D = 1, 4, 4096, 8
torch.manual_seed(0)
taken = []
choose = tr.attention_path
tr.attention_path = lambda *a, **kw: taken.append(choose(*a, **kw)) or taken[-1]
def call(n):
    attn = tr.MultiheadAttention(d_model=H * D, nhead=H, dropout=drop).train()
    x = torch.randn(B, n, H * D, requires_grad=True)
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[:, n // 3:] = masked
    mask = tr._attention_mask(pad, None) if masked else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        out = attn(x, x, x, mask)
    out.float().sum().backward()
budget, tr.ATTENTION_SCORE_BUDGET = tr.ATTENTION_SCORE_BUDGET, 0
call(64)  # the same path once, small: first-call buffers, thread pools and lazy imports before the baseline
tr.ATTENTION_SCORE_BUDGET = budget
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = peak()
taken.clear()
call(N)
print(json.dumps({"path": taken, "peak_mib": peak() - start, "n2_fp32_mib": B * H * N * N * 4 / 2**20}))
"""


def _peak_of_one_call(dtype: str, path: str, drop: float, masked: bool) -> dict:
    # glibc keeps freed blocks under its dynamic mmap threshold (up to 32 MiB) in the heap, where
    # fragmentation inflates RSS by whatever the allocator caches; a fixed 1 MiB threshold returns
    # them, so the peak is that of the live tensors
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": str(2**20),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, dtype, path, str(drop), str(int(masked))],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BOUND_MIB = 192  # one [1, 4, 4096, 4096] float32 score buffer is 256 MiB; the explicit path holds >= 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
def test_attention_peak_rss_linear_in_n_default_path(dtype, masked):
    """Forward + backward of one self-attention layer at N = 4096 as shipped (SDPA's flash kernel here)."""
    r = _peak_of_one_call(dtype, "default", 0.0, masked)
    assert r["path"] == ["sdpa"]
    print(r)
    assert r["peak_mib"] < BOUND_MIB < r["n2_fp32_mib"], r


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
@pytest.mark.parametrize("drop", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_attention_peak_rss_linear_in_n_blocks(dtype, masked, drop):
    """The same call where SDPA would fall back to its math path (forced): the explicit computation
    in blocks. With dropout this is the shipped path on CPU."""
    r = _peak_of_one_call(dtype, "chunked", drop, masked)
    assert r["path"] == ["chunked"]
    print(r)
    assert r["peak_mib"] < BOUND_MIB < r["n2_fp32_mib"], r
