"""The precision that losses, matching and metrics compute in."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half type (float16, bfloat16: autocast's outputs) or not floating
    point; float32 and float64 unchanged, so a float64 call keeps float64's exactness."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
