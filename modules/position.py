"""Fixed (non-learned) position encodings: 1-D sinusoidal for token sequences, 2-D sine for feature maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32, offset: int = 0) -> Tensor:
    """Transformer sinusoidal positions for positions ``offset .. offset+length-1``.

    Returns ``[length, dim]``; even channels hold sines, odd channels cosines.
    """
    position = torch.arange(offset, offset + length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div[: dim // 2])
    return pe.to(dtype)


def sine_positions_2d(
    pixel_mask: Tensor, dim: int, temperature: float = 10000.0, normalize: bool = True, scale: float = 2 * math.pi
) -> Tensor:
    """2-D sine positions of a feature map, as in DETR.

    Args:
        pixel_mask: ``[B, H, W]`` bool, True on padding. Positions count only un-padded pixels, so a
            padded image gets the same encoding as the same image alone.
        dim: output channels (half for y, half for x); must be even.

    Returns:
        ``[B, H, W, dim]`` float32.
    """
    if dim % 2:
        raise ValueError(f"2-D sine positions need an even dimension, got {dim}")
    not_mask = (~pixel_mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    if normalize:
        eps = 1e-6
        y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    half = dim // 2
    t = torch.arange(half, device=pixel_mask.device, dtype=torch.float32)
    t = temperature ** (2 * torch.div(t, 2, rounding_mode="floor") / half)
    px = x[..., None] / t
    py = y[..., None] / t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3)
