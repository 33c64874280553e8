"""Object detection: DETR on the shared Transformer, Hungarian set loss, official COCO AP (COCOeval)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_convert

from modules.criterion import SetCriterion, weighted_loss
from modules.detr import build_detr, postprocess
from modules.dtypes import at_least_float32
from modules.matcher import CLASS_LOSSES, HungarianMatcher

from .base import BaseTask
from .metrics import CocoDetectionMetric

MIN_QUERIES, QUERIES_PER_BOX = 20, 1.5  # num_queries=auto: at least 20, 1.5x the most crowded training image


def queries_for(num_queries: int | str | None, data_info: dict) -> int | None:
    """``model.num_queries``, with ``auto`` sized to the data: ``QUERIES_PER_BOX`` x the most boxes in one
    training image (``data_info["max_boxes_per_image"]``), rounded up to a multiple of 10, at least
    ``MIN_QUERIES`` (DETR's 100 queries for COCO's most crowded images of ~60 boxes is the same margin).
    A fixed number below that count is kept but named: those images' extra boxes cannot be matched."""
    most = data_info.get("max_boxes_per_image")
    if num_queries == "auto":
        if most is None:
            raise ValueError("model.num_queries=auto needs the training split's boxes per image, which this data "
                             "source does not report: set model.num_queries to a number")
        return max(MIN_QUERIES, 10 * math.ceil(QUERIES_PER_BOX * most / 10))
    if isinstance(num_queries, str):
        raise ValueError(f"model.num_queries must be a number or auto, got {num_queries!r}")
    if num_queries is not None and most is not None and most > num_queries:
        rank_zero_warn(f"a training image has {most} boxes but model.num_queries={num_queries}: at most "
                       f"{num_queries} of them can be matched and detected; raise it (or use auto)")
    return num_queries


class DetectionTask(BaseTask):
    """DETR training and evaluation.

    Args:
        model: keyword arguments of :func:`modules.detr.build_detr` (the ``model`` config group).
        data_info: what the data module read from the dataset: ``num_classes``, ``class_names`` and
            ``category_ids`` (label i is category ``category_ids[i]`` of the COCO JSON).
        class_loss: ``ce`` (softmax over C classes + no-object, DETR) or ``focal`` (per-class sigmoid
            with the focal loss and the focal matching cost, Deformable DETR / DINO).
        focal_alpha, focal_gamma: focal loss parameters.
        cost_class, cost_bbox, cost_giou: Hungarian matching costs.
        eos_coef: weight of the no-object class in the classification loss (``ce`` only).
        loss_ce, loss_bbox, loss_giou: loss weights (applied to every decoder layer).
        top_k: detections kept per image for evaluation.
        enc_matches: two-stage only: encoder proposals matched to each target box (1: one-to-one, DINO;
            more: one-to-many supervision of the encoder, see :class:`modules.criterion.SetCriterion`).
        iou_aware: focal head only: IoU-aware classification (the varifocal loss; ``SetCriterion``).
        transformer: an existing transformer for the model to use instead of building its own (the
            multitask run passes its view of the shared one; the model config's transformer sizes are
            then not used).
        **optim: optimizer / schedule settings of :class:`tasks.base.BaseTask`.
    """

    task_name = "detection"
    positions_at_every_layer = True  # DETR-style positions in every layer (else once at the input)

    def __init__(
        self,
        *,
        model: dict,
        data_info: dict,
        transformer: nn.Module | None = None,
        class_loss: str = "ce",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        eos_coef: float = 0.1,
        loss_ce: float = 1.0,
        loss_bbox: float = 5.0,
        loss_giou: float = 2.0,
        top_k: int = 100,
        enc_matches: int = 1,
        iou_aware: bool = False,
        **optim,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters(ignore=["transformer"])
        self.data_info = data_info
        if class_loss not in CLASS_LOSSES:
            raise ValueError(f"task.class_loss must be one of {', '.join(CLASS_LOSSES)}, got {class_loss!r}")
        if "class_loss" in model or "sigmoid_classes" in model:
            raise ValueError("set task.class_loss (ce|focal), not a model key: the loss and the head share it")
        model = {**model, "num_queries": queries_for(model.get("num_queries"), data_info)}
        self.model = build_detr(num_classes=data_info["num_classes"], class_loss=class_loss, transformer=transformer,
                                **model)
        # weights sources are read once: the checkpoint keeps the architecture built (settings left null
        # come from model.init_from's source) and no source, so that it rebuilds without them
        self.hparams["model"] = {**model, **self.model.settings, "init_from": None, "pretrained_backbone": None}
        matcher = HungarianMatcher(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou,
                                   class_loss=class_loss, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
        self.criterion = SetCriterion(num_classes=data_info["num_classes"], matcher=matcher, eos_coef=eos_coef,
                                      class_loss=class_loss, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                                      enc_matches=enc_matches, iou_aware=iou_aware)
        self.loss_weights = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        self.top_k = top_k
        self.register_buffer(
            "category_ids", torch.as_tensor(data_info["category_ids"], dtype=torch.int64), persistent=False
        )
        self.val_map, self.test_map = CocoDetectionMetric(), CocoDetectionMetric()  # official COCO AP

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.adapter.body.parameters()

    def forward(self, images: Tensor, pixel_mask: Tensor, targets: list[dict] | None = None) -> dict:
        return self.model(images, pixel_mask, targets)

    def _losses(self, batch: dict, training: bool = True) -> tuple[dict, dict[str, Tensor], Tensor]:
        """Evaluation (``training=False``) normalises by this process's box count: no collective per
        batch, since the unpadded evaluation sampler may give ranks different numbers of batches."""
        outputs = self(batch["images"], batch["pixel_mask"], batch["targets"])
        losses = self.criterion(outputs, batch["targets"], across_processes=training)
        return outputs, losses, weighted_loss(losses, self.loss_weights)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        _, losses, loss = self._losses(batch)
        self.check_finite(loss, losses)
        bs = len(batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
        return loss

    def predictions(self, outputs: dict, targets: list[dict]) -> list[dict[str, Tensor]]:
        """Detections in the original image's absolute xyxy pixels, labels as contiguous indices."""
        sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
        return postprocess(outputs, sizes, top_k=self.top_k, class_loss=self.model.class_loss)

    def _eval_step(self, batch: dict, metric: CocoDetectionMetric, prefix: str) -> dict:
        outputs, losses, loss = self._losses(batch, training=False)
        bs = len(batch["targets"])
        self.log(f"{prefix}/loss", loss, batch_size=bs, sync_dist=True)
        for k in ("loss_ce", "loss_bbox", "loss_giou"):
            self.log(f"{prefix}/{k}", losses[k], batch_size=bs, sync_dist=True)
        preds = self.update_coco(metric, outputs, batch["targets"])
        return {"loss": loss, "outputs": outputs, "preds": preds}

    def update_coco(self, metric: CocoDetectionMetric, outputs: dict, targets: list[dict],
                    category_ids: Tensor | None = None) -> list[dict]:
        """Add one batch to the split's COCO metric (original pixels, the file's category ids:
        ``category_ids[label]``, default the training JSON's); returns the detections (contiguous labels)."""
        preds = self.predictions(outputs, targets)
        images = torch.tensor([[t["image_id"], *t["orig_size"].tolist()] for t in targets])
        cat = self.category_ids if category_ids is None else category_ids.to(self.category_ids.device)
        metric.update(images, [{**p, "labels": cat[p["labels"]]} for p in preds],
                      [{**self._ground_truth(t), "labels": cat[t["labels"]]} for t in targets])
        return preds

    def update_map(self, metric: MeanAveragePrecision, outputs: dict, targets: list[dict]) -> list[dict]:
        """Add one batch to a COCO mAP metric, in the file's category ids and original pixels;
        returns the detections (contiguous labels)."""
        preds = self.predictions(outputs, targets)
        cat = self.category_ids
        metric.update(
            [{"boxes": p["boxes"], "scores": p["scores"], "labels": cat[p["labels"]]} for p in preds],
            [self._ground_truth(t) for t in targets],
        )
        return preds

    def _ground_truth(self, target: dict) -> dict[str, Tensor]:
        h, w = target["orig_size"].tolist()
        boxes = box_convert(at_least_float32(target["boxes"]), "cxcywh", "xyxy") * target["boxes"].new_tensor([w, h, w, h])
        return {"boxes": boxes, "labels": self.category_ids[target["labels"]]}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, self.val_map, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch, self.test_map, "test")

    def ground_truth(self, split: str):
        """The pycocotools ``COCO`` of a split's annotations held by the data module (crowd regions and
        areas included; a multitask run's detection data module), or None (the metric then scores the
        batches' boxes)."""
        dm = getattr(self.attached_trainer, "datamodule", None)
        dm = getattr(dm, "datamodules", {}).get(self.task_name, dm)
        return getattr(getattr(dm, f"{split}_dataset", None), "coco", None)

    def _log_map(self, metric: CocoDetectionMetric, prefix: str) -> None:
        metric.ground_truth = self.ground_truth(prefix)
        result = metric.compute()
        metric.reset()
        names = {"AP": "mAP", "AP50": "mAP_50", "AP75": "mAP_75", "AP_small": "mAP_small",
                 "AP_medium": "mAP_medium", "AP_large": "mAP_large", "AR100": "mAR_100"}
        for key, name in names.items():
            if key not in result:  # no image evaluated
                continue
            value = result[key].float().to(self.device)
            if key in ("AP", "AP50", "AP75"):  # always logged (-1 = no ground truth -> 0)
                self.log(f"{prefix}/{name}", value.clamp(min=0.0), prog_bar=key != "AP75", sync_dist=True)
            elif value >= 0:  # -1: no object of that size in this split
                self.log(f"{prefix}/{name}", value, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")
