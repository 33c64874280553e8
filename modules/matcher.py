"""Hungarian matching between predicted and ground-truth boxes (DETR's bipartite assignment)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``cost_class * (-p(class)) + cost_bbox * L1(boxes) + cost_giou * (-GIoU)``.

    The cost is computed per image ([Q, n_b] each), not for all queries x all targets of the batch,
    so its size grows with the batch linearly instead of quadratically.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0: the assignment would be arbitrary")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def class_scores(self, logits: Tensor) -> Tensor:
        """``[B, Q, C+1]`` logits -> per-class scores whose negative is the classification cost."""
        return logits.softmax(-1)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` [B, Q, C+1] and ``pred_boxes`` [B, Q, 4] (normalised cxcywh).
            targets: B dicts with ``labels`` [n_b] and ``boxes`` [n_b, 4] (normalised cxcywh).
        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 tensors of length ``min(Q, n_b)``.
        """
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if logits.shape[0] != len(targets):
            raise ValueError(f"{logits.shape[0]} images of predictions but {len(targets)} targets")
        scores = self.class_scores(logits)  # [B, Q, C+1], once for the batch
        boxes_xyxy = box_convert(boxes, "cxcywh", "xyxy")
        indices = []
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            tgt_boxes = t["boxes"].float()
            cost = -self.cost_class * scores[b][:, t["labels"]]
            cost += self.cost_bbox * torch.cdist(boxes[b], tgt_boxes, p=1)
            cost -= self.cost_giou * generalized_box_iou(boxes_xyxy[b], box_convert(tgt_boxes, "cxcywh", "xyxy"))
            cost = cost.cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    "matching cost has NaN/Inf: the model's predictions diverged (lower the learning "
                    "rate or check the input normalisation)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
