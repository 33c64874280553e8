"""Every private API of torch, Lightning, torchmetrics, W&B and transformers that mtdetr uses, in one place.

Private APIs carry no promise: a new version may rename or drop them. Each accessor below says what it
reaches, why mtdetr needs it, the versions it was checked on (``CHECKED_ON``) and what happens without
it: a fallback (the public path, slower or coarser), or a one-line :class:`PrivateAPIError` raised at
start-up (callback or module ``setup``, metric construction), never in the middle of a run. Callers
catch that error where a fallback is possible and let it through where there is none.

Nothing here imports Lightning, torchmetrics, W&B or transformers (``modules/`` never imports Lightning):
the objects are passed in and used duck-typed.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

CHECKED_ON = {"torch": "2.14.1", "lightning": "2.6.6", "torchmetrics": "1.9.0", "wandb": "0.31.0",
              "transformers": "5.24.0"}


class PrivateAPIError(RuntimeError):
    """A private API that this version of a library lacks (or calls differently), in one line: what is
    missing, what needs it, the version it was checked on, and what to do."""


def missing(what: str, library: str, needed_for: str, fix: str) -> PrivateAPIError:
    """The one-line error for ``what`` (e.g. ``ModelCheckpoint._save_last_checkpoint``) missing."""
    try:
        installed = importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        installed = "(not installed)"
    return PrivateAPIError(f"{what} is missing or changed in {library} {installed} (a private API, checked on "
                           f"{library} {CHECKED_ON[library]}); {needed_for} needs it: {fix}")


def _method(obj: Any, name: str, params: tuple[str, ...]) -> Callable | None:
    """``obj.<name>`` if it is a callable that takes exactly ``params`` (by these names), else None."""
    fn = getattr(obj, name, None)
    if not callable(fn):
        return None
    try:
        inspect.signature(fn).bind(**dict.fromkeys(params))
    except (TypeError, ValueError):
        return None
    return fn


# torch: oneDNN pre-packed linear weights (modules.packed) ----------------------------------------------
# ``torch.ops.mkldnn._reorder_linear_weight(w)`` packs a weight into oneDNN's blocked layout once, and
# ``torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, scalars, algorithm)`` multiplies with it
# (what torch.compile's CPU freezing uses); F.linear re-packs the weight on every call, which for
# decoding's few rows per step costs as much as the product. Checked on torch 2.14.1. Missing, refusing
# this CPU or called differently: AttributeError / RuntimeError / TypeError, which ``modules.packed``'s
# one-time trial per dtype catches (packing off for that dtype: F.linear); a failure after the trial
# gives one warning and F.linear from then on.
ONEDNN_OPS: Any = torch.ops.mkldnn  # the op namespace (tests replace it to take the ops away)


def onednn_reorder_linear_weight(weight: Tensor) -> Tensor:
    """``weight`` ``[out, in]`` packed for :func:`onednn_linear_pointwise` (an opaque oneDNN tensor)."""
    return ONEDNN_OPS._reorder_linear_weight(weight)


def onednn_linear_pointwise(x: Tensor, packed: Tensor, bias: Tensor | None, attr: str, algorithm: str) -> Tensor:
    """``F.linear(x, weight, bias)`` ``[..., out]`` with the packed weight, then the fused activation
    ``attr`` ("none", "relu", "gelu" with ``algorithm`` "none"/"tanh", "swish")."""
    return ONEDNN_OPS._linear_pointwise(x, packed, bias, attr, [], algorithm)


# torch: a tensor's version counter (modules.packed) ----------------------------------------------------
# ``Tensor._version`` counts in-place changes (autograd's own check); a packed weight is packed again when
# it changed (an optimizer step between two validations). No public equivalent. Checked on torch 2.14.1.
# Missing: AttributeError in ``modules.packed``'s trial, so packing is off (F.linear, always current).
def tensor_version(tensor: Tensor) -> int:
    return tensor._version


# torch: SDPA's kernel choice (modules.transformer.attention_path) --------------------------------------
# ``torch._fused_sdp_choice(q, k, v, mask, dropout_p, is_causal)`` is the dispatcher's own answer to
# "which SDPA kernel would run here" (an ``SDPBackend`` value); the long-sequence path needs to know
# whether SDPA would materialise the [B, H, T, S] scores (math fallback) or not (fused kernels). Checked
# on torch 2.14.1. Missing or raising: None, and ``attention_path`` then picks the chunked explicit
# computation, whose memory is linear in the sequence lengths whatever SDPA would do.
def sdpa_backend_choice(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                        is_causal: bool) -> int | None:
    """The ``torch.nn.attention.SDPBackend`` value SDPA would use for these inputs, or None if unknown."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    try:
        return int(choose(q, k, v, attn_mask, dropout_p, is_causal))
    except (RuntimeError, TypeError, ValueError):
        return None


# Lightning: ModelCheckpoint's last-checkpoint writer (tasks.checkpointing.ModelCheckpoint) -------------
# Lightning writes ``last.ckpt`` only together with a top-k checkpoint; ours refreshes it every epoch by
# calling the pieces Lightning uses itself: ``_should_skip_saving_checkpoint(trainer)``,
# ``_monitor_candidates(trainer)``, ``_save_last_checkpoint(trainer, monitor_candidates)`` and
# ``_should_save_on_train_epoch_end(trainer)`` (which hook ends an epoch). Checked on lightning 2.6.6.
# Missing or with other parameters: a PrivateAPIError at the callback's ``setup`` (before the first step);
# with ``save_last`` off nothing is needed.
_CHECKPOINT_METHODS = {"_should_skip_saving_checkpoint": ("trainer",), "_monitor_candidates": ("trainer",),
                       "_save_last_checkpoint": ("trainer", "monitor_candidates"),
                       "_should_save_on_train_epoch_end": ("trainer",)}


def check_last_checkpoint_writer(callback: Any) -> None:
    """Raise :class:`PrivateAPIError` unless ``callback`` (a Lightning ``ModelCheckpoint``) has the methods
    :func:`save_last_checkpoint` and :func:`saves_on_train_epoch_end` call."""
    for name, params in _CHECKPOINT_METHODS.items():
        if _method(callback, name, params) is None:
            raise missing(f"ModelCheckpoint.{name}", "lightning", "refreshing last.ckpt every epoch",
                          f"install lightning=={CHECKED_ON['lightning']}, or set callbacks.model_checkpoint.save_last=false")


def save_last_checkpoint(callback: Any, trainer: Any) -> None:
    """Write ``callback``'s ``last.ckpt`` now, unless Lightning would skip saving at this point
    (sanity check, fast_dev_run, a step already saved)."""
    if not callback._should_skip_saving_checkpoint(trainer):
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def saves_on_train_epoch_end(callback: Any, trainer: Any) -> bool:
    """Whether ``callback`` saves at the end of the training epoch (else: after validation)."""
    return bool(callback._should_save_on_train_epoch_end(trainer))


# Lightning: DDPStrategy's DistributedDataParallel kwargs (tasks.multitask.MultiTask.setup) -------------
# A multitask step trains one task, so the other tasks' parameters get no gradient and DDP needs
# ``find_unused_parameters=True``; the strategy is built from config before the task can say so, and
# ``DDPStrategy._ddp_kwargs`` is where the kwargs wait until the model is wrapped. Checked on lightning
# 2.6.6. Missing: a PrivateAPIError at the module's ``setup`` naming the config that sets it instead.
def ddp_kwargs(strategy: Any) -> dict:
    """The dict of kwargs ``strategy`` (a Lightning ``DDPStrategy``) passes to DistributedDataParallel."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):
        raise missing("DDPStrategy._ddp_kwargs", "lightning", "task=multitask under DDP (find_unused_parameters)",
                      "set trainer.strategy to DDPStrategy with find_unused_parameters=true")
    return kwargs


# Lightning: WandbLogger's run, without creating one (tasks.runtime.close_loggers) ----------------------
# ``WandbLogger.experiment`` starts a W&B run when there is none; closing the loggers must finish the run
# that exists and start none, so it reads ``WandbLogger._experiment``. Checked on lightning 2.6.6 with
# wandb 0.31.0. Missing: W&B's current run (``wandb.run``, public), which is the logger's run unless the
# user's own code started another; None when W&B was never imported.
def wandb_logger_run(logger: Any) -> Any:
    """The W&B run ``logger`` (a Lightning ``WandbLogger``) started, or None if it started none."""
    if hasattr(logger, "_experiment"):
        return logger._experiment
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None)


# torchmetrics: syncing list states across ranks of different sizes (tasks.metrics.make_uneven_safe) -----
# A metric's list states without a reduction (per-image boxes) are gathered by torchmetrics with one
# all_gather per element, which needs equal lengths on every rank; evaluation ranks hold different image
# counts. mtdetr finds those states from ``Metric._reductions`` and ``Metric._defaults`` and wraps
# ``Metric._sync_dist(dist_sync_fn, process_group)`` to gather them itself first. Checked on torchmetrics
# 1.9.0. Missing or with other parameters: a PrivateAPIError, raised at setup only where it matters (DDP;
# one process needs no sync and keeps torchmetrics' own path).
def metric_list_states(metric: Any) -> list[str]:
    """Names of ``metric``'s list states that torchmetrics syncs without a reduction."""
    reductions, defaults = getattr(metric, "_reductions", None), getattr(metric, "_defaults", None)
    if not isinstance(reductions, dict) or not isinstance(defaults, dict):
        raise _metrics_missing("Metric._reductions/_defaults")
    return [name for name, fx in reductions.items() if fx is None and isinstance(defaults.get(name), list)]


def override_list_sync(metric: Any, names: list[str], gather: Callable[[Any, list[str], Any], None]) -> None:
    """Make ``metric``'s sync call ``gather(metric, names, process_group)`` for the list states ``names``
    (it sets them to the gathered lists), then torchmetrics' own sync for the other states."""
    original = _method(metric, "_sync_dist", ("dist_sync_fn", "process_group"))
    if original is None:
        raise _metrics_missing("Metric._sync_dist")

    def sync(self: Any, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        gather(self, names, process_group or self.process_group)
        reductions = self._reductions
        self._reductions = {k: v for k, v in reductions.items() if k not in names}
        try:
            original(dist_sync_fn=dist_sync_fn, process_group=process_group)
        finally:
            self._reductions = reductions

    metric._sync_dist = types.MethodType(sync, metric)


def _metrics_missing(what: str) -> PrivateAPIError:
    return missing(what, "torchmetrics", "evaluation under DDP (ranks with different image counts)",
                   f"install torchmetrics=={CHECKED_ON['torchmetrics']}, or evaluate on one device")


# transformers: the attention implementation a config resolved (benchmarks/translation_speed.py) ---------
# The benchmark records which attention a Marian model really runs ("eager", "sdpa"), which transformers
# keeps in ``PretrainedConfig._attn_implementation``. Checked on transformers 5.24.0. Missing: None
# (the benchmark's record then says "unknown"; nothing is computed from it).
def hf_attention_implementation(config: Any) -> str | None:
    return getattr(config, "_attn_implementation", None)


# torch: the CPU flash-attention kernels' ops (benchmarks/detection_speed.py FLOP counts) ----------------
# FlopCounterMode has no formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
# backward), the kernels CPU SDPA runs; the benchmark counts them like SDPA. Checked on torch 2.14.1.
# Missing: left out (nothing to count: that torch does not run them).
def cpu_flash_attention_ops() -> dict[str, Any]:
    """``{"forward": op, "backward": op}`` for the CPU flash-attention ops this torch has."""
    aten, names = torch.ops.aten, {"forward": "_scaled_dot_product_flash_attention_for_cpu",
                                   "backward": "_scaled_dot_product_flash_attention_for_cpu_backward"}
    return {kind: getattr(aten, name) for kind, name in names.items() if hasattr(aten, name)}
