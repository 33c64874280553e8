"""Metric synchronisation that tolerates ranks holding different numbers of samples.

Evaluation under DDP uses ``datamodules.sampling.EvalSampler``: every validation/test sample is seen
exactly once over all ranks, so ranks may hold different numbers of images (DistributedSampler would
instead repeat samples and count them twice). torchmetrics gathers per-sample *list* states without a
reduction (``MeanAveragePrecision``'s boxes, scores, labels, ...) with one ``all_gather`` per list
element, which needs equal lengths on every rank. ``make_uneven_safe`` replaces that, for one metric
instance, by one ``all_gather_object`` per state (any lengths); sum/mean/cat states keep torchmetrics'
own path, which already handles uneven ranks.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric


def _uneven_list_states(metric: Metric) -> list[str]:
    return [name for name, fx in metric._reductions.items() if fx is None and isinstance(metric._defaults[name], list)]


def make_uneven_safe(metric: Metric) -> Metric:
    """Patch ``metric`` (in place) so its list states sync across ranks whatever their lengths."""
    names = _uneven_list_states(metric)
    if not names or getattr(metric, "_mtdetr_uneven_safe", False):
        return metric
    original = metric._sync_dist

    def _sync_dist(self: Metric, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        group = process_group or self.process_group
        world = dist.get_world_size(group)
        for name in names:
            local = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in getattr(self, name)]
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, local, group=group)
            merged = [t.to(self.device) if isinstance(t, torch.Tensor) else t for part in gathered for t in part]
            setattr(self, name, merged)
        reductions = self._reductions
        self._reductions = {k: v for k, v in reductions.items() if k not in names}
        try:
            original(dist_sync_fn=dist_sync_fn, process_group=process_group)
        finally:
            self._reductions = reductions

    metric._sync_dist = types.MethodType(_sync_dist, metric)
    metric._mtdetr_uneven_safe = True
    return metric


def make_module_metrics_uneven_safe(module: torch.nn.Module) -> int:
    """``make_uneven_safe`` on every torchmetrics ``Metric`` inside ``module``; returns how many changed."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, Metric) and _uneven_list_states(sub) and not getattr(sub, "_mtdetr_uneven_safe", False):
            make_uneven_safe(sub)
            count += 1
    return count
