"""Peak CUDA memory of one attention call (forward + backward) at N = 4,096 tokens, every path.

The CUDA side of ``tests/modules/test_attention_memory.py`` (which measures the CPU side by
subprocess RSS): ``modules.transformer.MultiheadAttention`` self-attention over ``[2, 4096, 256]``,
8 heads, fp32 and bf16 autocast, with and without a padding mask, with and without attention
dropout, in training mode. Reports ``torch.cuda.max_memory_allocated`` above the inputs against the
bytes one ``[B, H, N, N]`` fp32 score buffer takes, and the largest difference of the output from
``F.scaled_dot_product_attention`` on the same projections (dropout 0 only).

    PYTHONPATH=. python benchmarks/gpu_attention_memory.py [--n 4096] [--out FILE]

Needs a CUDA device; prints one JSON document.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import emit_json  # noqa: E402
from modules.transformer import MultiheadAttention  # noqa: E402


def one_call(n: int, dtype: torch.dtype, padding: bool, dropout: float, device: torch.device) -> dict:
    torch.manual_seed(0)
    b, d, h = 2, 256, 8
    attn = MultiheadAttention(d_model=d, nhead=h, dropout=dropout).to(device).train()
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    mask = None
    if padding:
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=device)
        mask[1, ..., n // 2:] = False
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = attn(x, x, x, attn_mask=mask)
    out.float().sum().backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    record = {"n": n, "dtype": str(dtype).removeprefix("torch."), "padding": padding, "dropout": dropout,
              "peak_mib": round(peak / 2**20, 1), "nxn_fp32_scores_mib": round(b * h * n * n * 4 / 2**20, 1)}
    if dropout == 0.0:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            q, k, v = attn._project_qkv(x, x, x)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            ref = attn.out_proj(ref.transpose(1, 2).reshape(b, n, d))
        record["max_abs_diff_vs_sdpa"] = float((out.detach().float() - ref.float()).abs().max())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_attention_memory.py: no CUDA device")
    device = torch.device("cuda")
    rows = [one_call(args.n, dtype, padding, dropout, device)
            for dtype, padding, dropout in itertools.product([torch.float32, torch.bfloat16], [False, True], [0.0, 0.1])]
    for r in rows:
        print(r, file=sys.stderr)
    emit_json({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
