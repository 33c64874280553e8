"""Image models as ONNX graphs: fixed tensor inputs and outputs, post-processing inside the graph.

The wrappers take ``images`` float32 ``[B, 3, H, W]`` (already normalised with the model's mean/std)
and ``pixel_mask`` bool ``[B, H, W]`` (True = padding), the same contract as the data modules. The
CPU speed paths of training and decoding cannot enter the graph: the model is exported in eval mode
(no dropout), in float32 (no bf16 attention path), and pre-packed weights exist only inside decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


class DetectorForExport(nn.Module):
    """A DETR with its post-processing: ``boxes`` ``[B, K, 4]`` xyxy **normalised** to [0, 1] of each
    image's valid (unpadded) region — multiply by its width/height for pixels — ``scores`` ``[B, K]``
    and ``labels`` ``[B, K]`` (int64, 0..C-1), the ``K = top_k`` best per image, best first. With
    ``postprocess=False`` the raw heads ``pred_logits`` ``[B, Q, C(+1)]``, ``pred_boxes`` ``[B, Q, 4]``
    (normalised cxcywh)."""

    def __init__(self, *, detr: nn.Module, top_k: int, postprocess: bool = True) -> None:
        super().__init__()
        self.detr, self.postprocess = detr, postprocess
        self.class_loss = detr.class_loss
        per_image = detr.num_queries * (detr.num_classes if self.class_loss == "focal" else 1)
        self.top_k = min(int(top_k), per_image)

    def output_names(self) -> list[str]:
        return ["boxes", "scores", "labels"] if self.postprocess else ["pred_logits", "pred_boxes"]

    def forward(self, images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.detr(images, pixel_mask)
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        if not self.postprocess:
            return logits, boxes
        boxes = box_convert(boxes, "cxcywh", "xyxy").clamp(0.0, 1.0)
        if self.class_loss == "focal":
            num_classes = logits.shape[-1]
            scores, index = logits.sigmoid().flatten(1).topk(self.top_k, dim=1)
            labels, query = index % num_classes, torch.div(index, num_classes, rounding_mode="floor")
        else:
            best, labels = logits.softmax(-1)[..., :-1].max(-1)
            scores, query = best.topk(self.top_k, dim=1)
            labels = labels.gather(1, query)
        boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))
        return boxes, scores, labels


class TaggerForExport(nn.Module):
    """A parallel-decoder multi-label model: ``scores`` ``[B, C]`` per-class probabilities (sigmoid),
    or the raw ``logits`` ``[B, C]`` with ``postprocess=False``."""

    def __init__(self, *, model: nn.Module, postprocess: bool = True) -> None:
        super().__init__()
        self.model, self.postprocess = model, postprocess

    def output_names(self) -> list[str]:
        return ["scores"] if self.postprocess else ["logits"]

    def forward(self, images: Tensor, pixel_mask: Tensor) -> Tensor:
        logits = self.model(images, pixel_mask).float()
        return logits.sigmoid() if self.postprocess else logits
