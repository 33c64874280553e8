"""DETR's set-prediction loss: Hungarian matching, then classification and box losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss

from .dtypes import at_least_float32
from .matcher import HungarianMatcher, check_class_loss


def num_boxes_across_processes(
    targets: list[dict[str, Tensor]], device: torch.device, across_processes: bool = True
) -> float:
    """Number of target boxes per process, averaged over DDP processes, at least 1.

    Every process divides its box losses by the same number, so gradients average correctly. That is
    one all-reduce per call: ``across_processes=False`` (evaluation, where ranks may run different
    numbers of batches) counts this process's boxes only.
    """
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if across_processes and dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """Matches predictions to targets and returns the **unweighted** loss terms.

    ``loss_ce``: softmax head (``class_loss="ce"``): cross entropy over all queries, unmatched queries labelled no-object
    (index C) and weighted by ``eos_coef``, the mean being the weighted mean; sigmoid head
    (``class_loss="focal"``): sigmoid focal loss summed over queries and classes and divided by the number of
    boxes (Deformable DETR). ``loss_bbox`` (L1) and ``loss_giou`` (1 - GIoU) are summed over matched
    pairs and divided by the number of target boxes.

    Extra terms, each named ``<term>_<part>``: auxiliary decoder layer ``i`` (``loss_ce_0`` ...), each
    matched on its own; the two-stage encoder proposals (``_enc``); the denoising queries (``_dn``,
    ``_dn_0`` ...), whose targets are known, so they are not matched. ``enc_matches`` > 1 matches each
    target box to that many encoder proposals (one-to-many, H-DETR's hybrid matching applied to the
    token proposals: denser supervision of the encoder and trunk; the decoder, whose queries are the
    detections, stays one-to-one, so no NMS is needed). With several query groups
    (Group DETR, ``outputs["num_groups"]``) each group is matched one-to-one on its own and the terms
    are averaged over the groups. ``iou_aware`` (focal head only): IoU-aware classification, the
    varifocal loss of VarifocalNet / RT-DETR: a matched query's target for its box's class is the IoU of
    its box with that box (detached) instead of 1, positives weighted by that IoU and negatives by
    ``alpha * p ** gamma``, so that class scores rank detections by how well they fit (matched and
    encoder terms; the denoising terms keep the focal loss).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        class_loss: str = "ce",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        enc_matches: int = 1,
        iou_aware: bool = False,
    ) -> None:
        super().__init__()
        if enc_matches < 1:
            raise ValueError(f"enc_matches (encoder proposals per target box) must be >= 1, got {enc_matches}")
        self.num_classes, self.matcher, self.eos_coef = num_classes, matcher, eos_coef
        self.enc_matches = int(enc_matches)
        self.class_loss = check_class_loss(class_loss)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        if iou_aware and self.class_loss != "focal":
            raise ValueError("iou_aware (the varifocal loss) needs the sigmoid head: set task.class_loss=focal")
        self.iou_aware = bool(iou_aware)

    def loss_labels(self, logits: Tensor, target_classes: Tensor, num_boxes: float,
                    quality: Tensor | None = None) -> Tensor:
        """``logits`` [B, Q, C+1 or C]; ``target_classes`` [B, Q]: a class, C = no-object, -1 = ignored;
        ``quality`` [B, Q] (focal head): the varifocal loss with these targets for the target classes."""
        logits = at_least_float32(logits)  # half types in float32, float64 kept
        if self.class_loss == "ce":
            weight = logits.new_ones(self.num_classes + 1)  # in the logits' dtype: eos_coef exact in float64
            weight[-1] = self.eos_coef
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight=weight, ignore_index=-1)
        onehot = F.one_hot(target_classes.clamp(min=0), self.num_classes + 1)[..., : self.num_classes]
        onehot = onehot.to(logits.dtype)
        if quality is None:
            loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, "none")
        else:
            score = onehot * quality.to(logits.dtype)[..., None]
            weight = self.focal_alpha * logits.detach().sigmoid().pow(self.focal_gamma) * (1 - onehot) + score
            loss = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none")
        return (loss * (target_classes >= 0)[..., None]).sum() / num_boxes

    def loss_boxes(self, src: Tensor, tgt: Tensor, num_boxes: float, like: Tensor) -> dict[str, Tensor]:
        """Paired boxes ``[N, 4]`` normalised cxcywh."""
        src = at_least_float32(src)  # half types in float32, float64 kept
        tgt = tgt.to(torch.promote_types(src.dtype, tgt.dtype))
        src = src.to(tgt.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        if len(src):
            loss_giou = generalized_box_iou_loss(
                box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum",
                eps=torch.finfo(src.dtype).tiny,  # only guards 0/0: DETR's GIoU, exact in float64
            ) / num_boxes
        else:  # keep the graph connected so every process runs the same backward
            loss_giou = like.sum() * 0.0
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def matched_losses(self, outputs: dict[str, Tensor], targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        """One layer's terms after Hungarian matching."""
        indices = self.matcher(outputs, targets)
        logits, pred = outputs["pred_logits"], outputs["pred_boxes"]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"][tgt]
        src = torch.cat([pred[b, s.to(pred.device)] for b, (s, _) in enumerate(indices)])
        tgt = torch.cat([t["boxes"][i] for t, (_, i) in zip(targets, indices)])
        quality = None
        if self.iou_aware:  # each matched query's IoU with its box
            quality = torch.zeros(logits.shape[:2], dtype=torch.float32, device=logits.device)
            ious = paired_iou(src.detach().float(), tgt.float()).split([len(s) for s, _ in indices])
            for b, ((s, _), iou) in enumerate(zip(indices, ious)):
                quality[b, s.to(logits.device)] = iou
        return {"loss_ce": self.loss_labels(logits, target_classes, num_boxes, quality),
                **self.loss_boxes(src, tgt, num_boxes, pred)}

    def denoising_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        """Terms of the denoising queries of one layer: positives reconstruct their target's class
        and box, contrastive negatives predict no-object, padded slots are ignored."""
        dn = outputs["dn"]
        logits, pred = outputs["pred_logits"], outputs["pred_boxes"]
        b = logits.shape[0]
        classes = torch.full((b, dn.groups, dn.copies, dn.n_max), -1, dtype=torch.int64, device=logits.device)
        src, tgt = [], []
        pred = pred.view(b, dn.groups, dn.copies, dn.n_max, 4)
        for i, t in enumerate(targets):
            n = len(t["labels"])
            classes[i, :, 0, :n] = t["labels"]
            classes[i, :, 1:, :n] = self.num_classes
            src.append(pred[i, :, 0, :n].reshape(-1, 4))
            tgt.append(t["boxes"].repeat(dn.groups, 1))
        n_dn = num_boxes * dn.groups
        return {"loss_ce": self.loss_labels(logits, classes.flatten(1), n_dn),
                **self.loss_boxes(torch.cat(src), torch.cat(tgt), n_dn, pred)}

    def forward(
        self, outputs: dict, targets: list[dict[str, Tensor]], *, across_processes: bool = True
    ) -> dict[str, Tensor]:
        """
        Args:
            outputs: ``pred_logits`` [B, Q, C+1 or C], ``pred_boxes`` [B, Q, 4] and optionally
                ``aux_outputs`` (a list of such dicts for the earlier decoder layers),
                ``num_groups``, ``enc_outputs`` and ``dn_outputs`` (see :class:`modules.detr.DETR`).
            targets: B dicts with ``labels`` [n_b] (0..C-1) and ``boxes`` [n_b, 4] normalised cxcywh.
            across_processes: normalise by the box count averaged over DDP processes (an all-reduce:
                training, where every rank runs every step); False for evaluation, which must run no
                per-batch collective (ranks may hold different numbers of batches).
        """
        num_boxes = num_boxes_across_processes(targets, outputs["pred_logits"].device, across_processes)
        groups = outputs.get("num_groups", 1)
        layers = [outputs, *outputs.get("aux_outputs", [])]
        if groups > 1:  # [B, G*Q] -> [B*G, Q]: image b's group g is "image" b*G+g, with b's targets
            targets_g = [t for t in targets for _ in range(groups)]
            layers = [_split_groups(o, groups) for o in layers]
        else:
            targets_g = targets
        losses: dict[str, Tensor] = {}
        for i, layer in enumerate(layers):
            suffix = "" if i == 0 else f"_{i - 1}"
            terms = self.matched_losses(layer, targets_g, num_boxes * groups)
            losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        if "enc_outputs" in outputs:  # each box matched to enc_matches proposals (repeated targets)
            k = self.enc_matches
            repeated = targets if k == 1 else [
                {"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
            terms = self.matched_losses(outputs["enc_outputs"], repeated, num_boxes * k)
            losses.update({f"{k}_enc": v for k, v in terms.items()})
        if "dn_outputs" in outputs:
            dn = outputs["dn_outputs"]
            for i, layer in enumerate([dn, *dn.get("aux_outputs", [])]):
                suffix = "_dn" if i == 0 else f"_dn_{i - 1}"
                terms = self.denoising_losses({**layer, "dn": dn["dn"]}, targets, num_boxes)
                losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        return losses


def clamped_area(xyxy: Tensor) -> Tensor:
    """Area of each ``[N, 4]`` xyxy box, 0 where a side is negative (an empty intersection or cut)."""
    return (xyxy[:, 2] - xyxy[:, 0]).clamp(min=0) * (xyxy[:, 3] - xyxy[:, 1]).clamp(min=0)


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each box of ``a`` with the box of ``b`` at the same row (``[N, 4]`` cxcywh) -> ``[N]``."""
    a, b = box_convert(a, "cxcywh", "xyxy"), box_convert(b, "cxcywh", "xyxy")
    inter = clamped_area(torch.cat([torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])], 1))
    return inter / (clamped_area(a) + clamped_area(b) - inter).clamp(min=torch.finfo(a.dtype).tiny)


def _split_groups(outputs: dict[str, Tensor], groups: int) -> dict[str, Tensor]:
    out = {}
    for k in ("pred_logits", "pred_boxes"):
        v = outputs[k]
        out[k] = v.reshape(v.shape[0] * groups, v.shape[1] // groups, v.shape[2])
    return out


def weighted_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Sum of ``weights[base] * term`` where ``base`` is the term's name without its suffixes
    (``loss_ce_3``, ``loss_ce_enc``, ``loss_ce_dn_0`` all take the weight of ``loss_ce``)."""
    total = None
    for name, value in losses.items():
        base = "_".join(name.split("_")[:2])
        if base not in weights:
            continue
        term = weights[base] * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"no loss term among {sorted(losses)} has a weight in {sorted(weights)}")
    return total
