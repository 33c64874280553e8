"""Hungarian matching between predicted and ground-truth boxes (DETR's bipartite assignment)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .dtypes import at_least_float32

# How a DETR head classifies, one setting from the config (``task.class_loss``) to the postprocess:
# "ce": softmax over C classes + no-object, cross entropy (DETR); "focal": C independent sigmoids,
# the focal loss and matching cost (Deformable DETR).
CLASS_LOSSES = ("ce", "focal")


def check_class_loss(class_loss: str) -> str:
    if class_loss not in CLASS_LOSSES:
        raise ValueError(f"class_loss must be one of {', '.join(CLASS_LOSSES)}, got {class_loss!r}")
    return class_loss


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``cost_class * class_cost + cost_bbox * L1(boxes) + cost_giou * (-GIoU)``.

    The class cost is ``-p(class)`` for a softmax head (``class_loss="ce"``, DETR) or, for a sigmoid
    head (``class_loss="focal"``), the focal loss of calling the query that class minus the focal loss of calling it
    background (Deformable DETR), so matching and loss agree on what a good query is.

    The cost is computed per image ([Q, n_b] each), not for all queries x all targets of the batch,
    so its size grows with the batch linearly instead of quadratically.
    """

    def __init__(
        self,
        *,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        class_loss: str = "ce",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        check_class_loss(class_loss)
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0: the assignment would be arbitrary")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_loss, self.focal_alpha, self.focal_gamma = class_loss, focal_alpha, focal_gamma

    def class_scores(self, logits: Tensor) -> Tensor:
        """``[B, Q, C(+1)]`` logits -> per-class scores whose negative is the classification cost."""
        if self.class_loss == "ce":
            return logits.softmax(-1)
        p, a, g = logits.sigmoid(), self.focal_alpha, self.focal_gamma
        # -log(p) and -log(1-p) from the logits: exact where p rounds to 0 or 1
        pos = a * (1 - p) ** g * F.softplus(-logits)
        neg = (1 - a) * p**g * F.softplus(logits)
        return neg - pos

    def cost_matrices(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], n_max: int) -> Tensor:
        """Each image's ``[Q, n_b]`` cost, computed for the whole batch at once as ``[B, Q, n_max]``
        (targets padded to the batch's largest count; columns past ``n_b`` are garbage and unused).
        Still per image: the size is B x Q x n_max, not (B x Q) x (all targets of the batch)."""
        b, q = logits.shape[:2]
        labels = logits.new_zeros((b, n_max), dtype=torch.int64)
        tgt = logits.new_tensor([0.5, 0.5, 1.0, 1.0]).expand(b, n_max, 4).clone()  # valid dummy boxes
        for i, t in enumerate(targets):
            n = len(t["labels"])
            labels[i, :n] = t["labels"]
            tgt[i, :n] = t["boxes"]
        scores = self.class_scores(logits)  # [B, Q, C+1]
        cost = -self.cost_class * scores.gather(2, labels[:, None, :].expand(b, q, n_max))
        cost += self.cost_bbox * torch.cdist(boxes, tgt, p=1)
        pairs_p = box_convert(boxes, "cxcywh", "xyxy")[:, :, None, :].expand(b, q, n_max, 4).reshape(-1, 4)
        pairs_t = box_convert(tgt, "cxcywh", "xyxy")[:, None, :, :].expand(b, q, n_max, 4).reshape(-1, 4)
        # eps only guards 0/0 (torchvision's default 1e-7 would shift a float64 GIoU by ~1e-6)
        giou = 1 - generalized_box_iou_loss(pairs_p, pairs_t, reduction="none", eps=torch.finfo(boxes.dtype).tiny)
        return cost - self.cost_giou * giou.view(b, q, n_max)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` [B, Q, C+1] and ``pred_boxes`` [B, Q, 4] (normalised cxcywh).
            targets: B dicts with ``labels`` [n_b] and ``boxes`` [n_b, 4] (normalised cxcywh).
        Returns:
            B pairs ``(query_idx, target_idx)`` of int64 tensors of length ``min(Q, n_b)``.
        """
        # half types in float32, float64 kept (DETR's assignment is exact at 1e-7 in float64)
        logits, boxes = at_least_float32(outputs["pred_logits"]), at_least_float32(outputs["pred_boxes"])
        if logits.shape[0] != len(targets):
            raise ValueError(f"{logits.shape[0]} images of predictions but {len(targets)} targets")
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if max(sizes, default=0) == 0:
            return [(empty, empty) for _ in targets]
        cost = self.cost_matrices(logits, boxes, targets, max(sizes)).cpu()  # [B, Q, n_max]
        indices = []
        for b, n in enumerate(sizes):
            if n == 0:
                indices.append((empty, empty))
                continue
            c = cost[b, :, :n]
            if not torch.isfinite(c).all():
                raise FloatingPointError(
                    "matching cost has NaN/Inf: the model's predictions diverged (lower the learning "
                    "rate or check the input normalisation)"
                )
            rows, cols = linear_sum_assignment(c.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
