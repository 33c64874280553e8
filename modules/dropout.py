"""Dropout whose keep-mask is cheaper than ``torch.bernoulli_``'s on CPU.

On CPU, ``F.dropout`` draws its mask with ``bernoulli_``, one random number per element, a large
share of a small model's bf16 training step. Here one 64-bit draw of ``torch.randint`` gives four
16-bit lanes, and an element is kept when its lane is at or above ``round(p * 2**16)`` of the 65536 values: the drop probability is ``p``
rounded to 1/65536 (0.1 -> 0.100006), and the kept values are scaled by the inverse of the exact
keep probability, so the expectation is unchanged. The mask is stored as bool (1 byte per element;
``F.dropout`` keeps one of the input's dtype) and applied with ``masked_fill`` both ways.

Draws come from torch's default generator: ``torch.manual_seed`` makes them reproducible. On other
devices (CUDA's fused kernel is fast already) and for ``p`` outside (0, 1) this is ``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LANES = 1 << 16


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """(bool mask of ``shape``, True = dropped; the scale ``1 / P(kept)``) for drop probability ``p``."""
    threshold = round(p * _LANES)  # a lane in [-32768, 32767] is kept when >= threshold - 32768
    n = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes < threshold - _LANES // 2, _LANES / (_LANES - threshold)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(mask, 0)  # masked_fill: no bool -> float copy of the mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad.masked_fill(mask, 0).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the cheaper CPU mask (see the module docstring)."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or round(p * _LANES) == 0:
        return F.dropout(x, p, training)
    mask, scale = drop_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, mask, scale)


class Dropout(nn.Dropout):
    """Drop-in ``nn.Dropout`` (same arguments, no parameters, same state dict) using :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
