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

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from modules import private_api


def _gather_lists(metric: Metric, names: list[str], group: Any) -> None:
    """Replace each list state ``names`` of ``metric`` by the concatenation of every rank's list (rank
    order), with one ``all_gather_object`` per state: any lengths."""
    world = dist.get_world_size(group)
    for name in names:
        local = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in getattr(metric, name)]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local, group=group)
        setattr(metric, name, [t.to(metric.device) if isinstance(t, torch.Tensor) else t for part in gathered for t in part])


def make_uneven_safe(metric: Metric, *, required: bool = True) -> Metric:
    """Patch ``metric`` (in place) so its list states sync across ranks whatever their lengths.

    It uses torchmetrics' private sync hooks (``modules.private_api``); where they are missing a
    one-line ``PrivateAPIError``, or with ``required=False`` (one process: no sync needed) the metric
    unchanged."""
    if getattr(metric, "_mtdetr_uneven_safe", False):
        return metric
    try:
        names = private_api.metric_list_states(metric)
        if names:
            private_api.override_list_sync(metric, names, _gather_lists)
            metric._mtdetr_uneven_safe = True
    except private_api.PrivateAPIError:
        if required:
            raise
    return metric


def make_module_metrics_uneven_safe(module: torch.nn.Module) -> int:
    """``make_uneven_safe`` on every torchmetrics ``Metric`` inside ``module`` (called at setup under DDP:
    a missing private hook is a one-line error there); returns how many changed."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, Metric) and not getattr(sub, "_mtdetr_uneven_safe", False):
            count += getattr(make_uneven_safe(sub), "_mtdetr_uneven_safe", False)
    return count


class CocoDetectionMetric(Metric):
    """Official COCO box AP over a split (``tasks.coco_eval``), computed on the gathered detections.

    ``update`` takes each image's id and detections (original pixels, the file's category ids) and its
    ground-truth boxes. ``compute`` runs ``COCOeval`` against ``self.ground_truth`` (a pycocotools
    ``COCO`` of the split's annotations, with crowd regions and areas), set by the task before
    ``compute``; without it, against the boxes passed to ``update`` (no crowd, area = w*h). Only the
    images seen are evaluated (a ``limit_val_batches`` run scores its subset). Under DDP the list
    states gather with ``make_uneven_safe`` (any number of images per rank), so the result equals one
    process's.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("images", default=[], dist_reduce_fx=None)  # float64 [n_img, 3]: id, height, width
        self.add_state("detections", default=[], dist_reduce_fx=None)  # float64 [n, 7]: id, cat, xyxy, score
        self.add_state("truths", default=[], dist_reduce_fx=None)  # float64 [m, 6]: id, cat, xyxy
        self.ground_truth = None
        make_uneven_safe(self, required=False)  # under DDP RunGuard.setup requires it

    def update(self, images: Tensor, detections: list[dict[str, Tensor]], truths: list[dict[str, Tensor]]) -> None:
        """``images`` ``[B, 3]`` (image id, height, width); per image ``detections`` ``boxes [n, 4]`` xyxy
        pixels, ``scores [n]``, ``labels [n]`` category ids; ``truths`` ``boxes [m, 4]``, ``labels [m]``."""
        self.images.append(images.detach().to(torch.float64))
        for image_id, det, gt in zip(images[:, 0].tolist(), detections, truths):
            n, m = len(det["boxes"]), len(gt["boxes"])
            self.detections.append(torch.cat([
                det["boxes"].new_full((n, 1), image_id, dtype=torch.float64), det["labels"][:, None].double(),
                det["boxes"].detach().double(), det["scores"][:, None].detach().double()], 1))
            self.truths.append(torch.cat([
                gt["boxes"].new_full((m, 1), image_id, dtype=torch.float64), gt["labels"][:, None].double(),
                gt["boxes"].detach().double()], 1))

    def coco_detections(self) -> list[dict[str, Any]]:
        """The detections as COCO result dicts (``bbox`` = [x, y, w, h])."""
        rows = torch.cat(self.detections).cpu().tolist() if self.detections else []
        return [{"image_id": int(r[0]), "category_id": int(r[1]), "bbox": [r[2], r[3], r[4] - r[2], r[5] - r[3]],
                 "score": r[6]} for r in rows]

    def image_ids(self) -> list[int]:
        return sorted({int(i) for t in self.images for i in t[:, 0].tolist()})

    def _fallback_ground_truth(self):
        from .coco_eval import ground_truth_coco

        images = {int(r[0]): (int(r[1]), int(r[2])) for t in self.images for r in t.tolist()}
        rows = torch.cat(self.truths).cpu().tolist() if self.truths else []
        cats = sorted({int(r[1]) for r in rows} | {int(r[1]) for t in self.detections for r in t.tolist()})
        return ground_truth_coco({
            "images": [{"id": i, "height": h, "width": w} for i, (h, w) in images.items()],
            "categories": [{"id": c, "name": str(c)} for c in cats],
            "annotations": [{"id": j + 1, "image_id": int(r[0]), "category_id": int(r[1]),
                             "bbox": [r[2], r[3], r[4] - r[2], r[5] - r[3]]} for j, r in enumerate(rows)]})

    def evaluation(self):
        """The ``tasks.coco_eval.CocoEvaluation`` of everything gathered (call after ``compute`` syncs)."""
        from .coco_eval import evaluate_detections, ground_truth_coco

        gt = ground_truth_coco(self.ground_truth) if self.ground_truth is not None else self._fallback_ground_truth()
        return evaluate_detections(gt, self.coco_detections(), self.image_ids())

    def compute(self) -> dict[str, Tensor]:
        if not self.images:
            return {}
        return {k: torch.tensor(v) for k, v in self.evaluation().stats.items()}
