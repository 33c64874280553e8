"""Fixed (non-learned) position encodings: 1-D sinusoidal for token sequences, 2-D sine for feature maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor

POSITION_LAYOUTS = ("interleaved", "halves")


def sinusoidal_positions(
    length: int, dim: int, device=None, dtype=torch.float32, offset: int = 0, layout: str = "interleaved"
) -> Tensor:
    """Transformer sinusoidal positions for positions ``offset .. offset+length-1``.

    Returns ``[length, dim]``. The frequencies are the Transformer paper's; ``layout`` places them:
    ``"interleaved"`` (the paper's): even channels hold sines, odd channels cosines; ``"halves"``
    (fairseq, Marian / opus-mt): the sines in the first ``ceil(dim / 2)`` channels, the cosines after.
    """
    if layout not in POSITION_LAYOUTS:
        raise ValueError(f"position layout must be one of {POSITION_LAYOUTS}, got {layout!r}")
    position = torch.arange(offset, offset + length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    sin, cos = torch.sin(position * div), torch.cos(position * div[: dim // 2])
    if layout == "halves":
        return torch.cat([sin, cos], dim=1).to(dtype)
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2], pe[:, 1::2] = sin, cos
    return pe.to(dtype)


def sine_positions_2d(
    pixel_mask: Tensor, dim: int, temperature: float = 10000.0, normalize: bool = True, scale: float = 2 * math.pi,
    offset: float = 0.0,
) -> Tensor:
    """2-D sine positions of a feature map, as in DETR.

    Args:
        pixel_mask: ``[B, H, W]`` bool, True on padding. Positions count only un-padded pixels, so a
            padded image gets the same encoding as the same image alone.
        dim: output channels (half for y, half for x); must be even.
        offset: subtracted from the cell count (1, 2, ...) before normalising: 0 is DETR's convention
            (cells at 1/n .. 1 of the image), 0.5 Deformable DETR's (cell centres).

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
        y = (y - offset) / (y[:, -1:, :] + eps) * scale
        x = (x - offset) / (x[:, :, -1:] + eps) * scale
    return torch.cat((sine_embed(y, dim // 2, temperature), sine_embed(x, dim // 2, temperature)), dim=-1)


def sine_embed(values: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine features of scalars: ``[...]`` -> ``[..., dim]`` (sines of even and cosines of odd
    frequencies, interleaved as DETR does). ``sine_positions_2d`` is this on each axis."""
    t = torch.arange(dim, device=values.device, dtype=torch.float32)
    t = temperature ** (2 * torch.div(t, 2, rounding_mode="floor") / dim)
    p = values.float()[..., None] / t
    return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_embed_boxes(boxes: Tensor, dim: int, scale: float = 2 * math.pi) -> Tensor:
    """Positional features of normalised boxes ``[..., 4]`` (cx, cy, w, h in [0, 1]) -> ``[..., 2*dim]``:
    ``dim / 2`` channels per coordinate, ordered (cy, cx, h, w) so that the centre part lines up with
    the channels of :func:`sine_positions_2d` (y first, then x) at the same location."""
    if dim % 2:
        raise ValueError(f"box sine features need an even dimension, got {dim}")
    cx, cy, w, h = (boxes * scale).unbind(-1)
    return torch.cat([sine_embed(v, dim // 2) for v in (cy, cx, h, w)], dim=-1)
