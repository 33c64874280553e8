"""DETR's set-prediction loss: Hungarian matching, then classification and box losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .matcher import HungarianMatcher


def num_boxes_across_processes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Number of target boxes per process, averaged over DDP processes, at least 1.

    Every process divides its box losses by the same number, so gradients average correctly.
    """
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """Matches predictions to targets and returns the **unweighted** loss terms.

    ``loss_ce``: cross entropy over all queries, unmatched queries labelled no-object (index C) and
    weighted by ``eos_coef``; the mean is the weighted mean. ``loss_bbox`` (L1) and ``loss_giou``
    (1 - GIoU) are summed over matched pairs and divided by the number of target boxes. Each auxiliary
    decoder layer ``i`` is matched on its own and adds ``loss_ce_i``, ``loss_bbox_i``, ``loss_giou_i``.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1) -> None:
        super().__init__()
        self.num_classes, self.matcher, self.eos_coef = num_classes, matcher, eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, outputs: dict[str, Tensor], targets: list[dict], indices: list) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"][tgt]
        loss = F.cross_entropy(logits.float().transpose(1, 2), target_classes, weight=self.empty_weight)
        return {"loss_ce": loss}

    def loss_boxes(
        self, outputs: dict[str, Tensor], targets: list[dict], indices: list, num_boxes: float
    ) -> dict[str, Tensor]:
        pred = outputs["pred_boxes"]
        src = torch.cat([pred[b, s.to(pred.device)] for b, (s, _) in enumerate(indices)]).float()
        tgt = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)]).float()
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        if len(src):
            loss_giou = generalized_box_iou_loss(
                box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
            ) / num_boxes
        else:  # keep the graph connected so every process runs the same backward
            loss_giou = pred.sum() * 0.0
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def single_layer(
        self, outputs: dict[str, Tensor], targets: list[dict], num_boxes: float
    ) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        return {
            **self.loss_labels(outputs, targets, indices),
            **self.loss_boxes(outputs, targets, indices, num_boxes),
        }

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """
        Args:
            outputs: ``pred_logits`` [B, Q, C+1], ``pred_boxes`` [B, Q, 4] and optionally
                ``aux_outputs``, a list of such dicts for the earlier decoder layers.
            targets: B dicts with ``labels`` [n_b] (0..C-1) and ``boxes`` [n_b, 4] normalised cxcywh.
        """
        num_boxes = num_boxes_across_processes(targets, outputs["pred_logits"].device)
        losses = self.single_layer(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.single_layer(aux, targets, num_boxes).items()})
        return losses


def weighted_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Sum of ``weights[base] * term`` where ``base`` is the term's name without its layer suffix."""
    total = None
    for name, value in losses.items():
        base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        if base not in weights:
            continue
        term = weights[base] * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"no loss term among {sorted(losses)} has a weight in {sorted(weights)}")
    return total
