"""Linear layers with pre-packed weights for CPU inference (decoding).

``F.linear`` on CPU hands float32 weights to MKL's GEMM, which re-packs the weight matrix on every
call; for the small row counts of step-by-step decoding (one token per sentence or beam) that
repacking costs as much as the multiplication. oneDNN can pack a weight once into its blocked
layout and multiply with it many times (private torch ops, reached through
``modules.private_api``: ``onednn_reorder_linear_weight``, ``onednn_linear_pointwise``). The
arithmetic stays float32 (a different summation order: float32 rounding differences only).

Used only inside ``with packed_linears():`` (the decoding functions open it), without autograd, for
float32 CPU weights, in float32 or under bfloat16 autocast (the weight packed in bfloat16 once
instead of cast on every call), and only where the ops run in that dtype: each dtype is checked once
with a real trial call of every form used (each activation, with and without bias) against
``F.linear`` (oneDNN's bfloat16 packing needs AVX512-BF16/AVX-NE-CONVERT, an AVX2 CPU refuses it).
An op that is missing, refuses the trial, disagrees with ``F.linear`` or fails later turns packing
off for that dtype (with one warning when it fails mid-run); everything else is ``F.linear``. Packed
weights are keyed by the weight's address, shape, strides and dtype and checked against its version
counter (``private_api.tensor_version``), so a weight changed in place is packed again; they live as
long as the context, or as long as its ``owner``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from . import private_api

_local = threading.local()  # per thread: .active, one dict of packed weights per open context
_by_owner: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> its packed weights
_lock = threading.Lock()
_available: dict[torch.dtype, bool] = {}  # per dtype: whether the ops run and agree with F.linear


def _ops_work(dtype: torch.dtype = torch.float32) -> bool:
    """Whether packed linears run in ``dtype`` here (decided once per dtype by :func:`_trial`)."""
    if dtype not in _available:
        _available[dtype] = _trial(dtype)
    return _available[dtype]


def _trial(dtype: torch.dtype) -> bool:
    """One packed call of each form :func:`linear` uses, in ``dtype``, against ``F.linear`` in the
    same dtype: ~1e-5 relative for float32; for bfloat16 2e-2 (8-bit mantissa, rounded once or twice)."""
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((3, 8), (5, 8), (5,)))
    try:  # (autocast off: under it F.linear would answer in bfloat16)
        if not torch.backends.mkldnn.is_available():
            return False
        with torch.inference_mode(False):  # (inference tensors have no version counter)
            private_api.tensor_version(torch.zeros(1))  # packing is safe only where in-place changes show
        with torch.autocast("cpu", enabled=False):
            packed = private_api.onednn_reorder_linear_weight(w)
            for activation, bias in ((None, b), ("relu", None), ("gelu", b), ("silu", b)):
                attr, algorithm = _ONEDNN_ATTR.get(activation, ("none", ""))
                y = private_api.onednn_linear_pointwise(x, packed, bias, attr, algorithm)
                want = F.linear(x, w, bias)
                want = want if activation is None else _ACTIVATIONS[activation](want)
                if y.dtype != dtype or not torch.allclose(y.float(), want.float(), rtol=tol, atol=tol):
                    return False
    except (AttributeError, RuntimeError, TypeError):  # missing, refusing this CPU, another signature
        return False
    return True


def _contexts() -> list[dict]:
    if not hasattr(_local, "active"):
        _local.active = []
    return _local.active


@contextlib.contextmanager
def packed_linears(enabled: bool = True, owner: object | None = None) -> Iterator[None]:
    """Within the block, :func:`linear` packs each float32 CPU weight once and reuses it.

    With an ``owner`` (the model), the packed weights outlive the block and serve the owner's next
    blocks (a validation loop decodes batch after batch) for as long as the owner lives; a weight
    changed in place since (an optimizer step) is packed again, replacing its old packing."""
    if not enabled:
        yield
        return
    cache: dict = {}
    if owner is not None:
        with _lock:
            cache = _by_owner.setdefault(owner, cache)
    active = _contexts()
    active.append(cache)
    try:
        yield
    finally:
        active.pop()


_ACTIVATIONS = {None: None, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}
_ONEDNN_ATTR = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "silu": ("swish", "")}  # (attr, algorithm)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` followed by ``activation`` (None, "relu", "gelu" (erf form) or
    "silu" (swish, Marian's));
    inside :func:`packed_linears`, with a packed weight and the activation fused when it applies.

    Under CPU bfloat16 autocast the packed weight is the bfloat16 cast that autocast would make on
    every call, and the result is what autocast's ``F.linear`` gives (bfloat16, the same values)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(k for k in _ACTIVATIONS if k)} or None, got {activation!r}")
    dtype = _packed_dtype(x, weight)
    if dtype is None:
        return _unpacked(x, weight, bias, activation)
    try:
        return _packed_linear(x, weight, bias, activation, dtype)
    except RuntimeError as err:  # passed the trial, fails here: F.linear from now on, for this dtype
        out = _unpacked(x, weight, bias, activation)  # (raises the caller's own error, if it is one)
        _available[dtype] = False
        warnings.warn(f"modules.packed: oneDNN packed linear failed in {dtype} ({err}); using F.linear instead",
                      RuntimeWarning, stacklevel=2)
        return out


def _unpacked(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    out = F.linear(x, weight, bias)
    return out if activation is None else _ACTIVATIONS[activation](out)


def _packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                   dtype: torch.dtype) -> Tensor:
    cache = _contexts()[-1]
    key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), dtype)
    entry = cache.get(key)
    version = private_api.tensor_version(weight)
    if entry is None or entry[0] != version:
        # the entry holds a tensor sharing the weight's memory: that memory cannot be freed and reused
        # by another weight with the same address and shape while the packed copy is kept
        packed = private_api.onednn_reorder_linear_weight(weight.to(dtype).contiguous())
        entry = cache[key] = (version, weight.detach(), packed)
    attr, algorithm = _ONEDNN_ATTR.get(activation, ("none", ""))
    bias = None if bias is None else bias.to(dtype)
    return private_api.onednn_linear_pointwise(x.to(dtype).contiguous(), entry[2], bias, attr, algorithm)


def _packed_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype to run a packed linear in here (float32, or bfloat16 under CPU autocast), or None."""
    if not _contexts() or x.device.type != "cpu" or weight.dtype != torch.float32 or torch.is_grad_enabled():
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        ok = dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    else:
        dtype, ok = torch.float32, x.dtype == torch.float32
    return dtype if ok and _ops_work(dtype) else None
