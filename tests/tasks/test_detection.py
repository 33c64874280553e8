"""DetectionTask: the learning test (overfit a couple of images) and evaluation plumbing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.detection import MeanAveragePrecision

from datamodules.coco import CocoDataModule
from datamodules.shapes import generate_shapes_dataset
from modules.criterion import weighted_loss
from tasks.detection import DetectionTask, queries_for

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(backbone="resnet18", frozen_bn=False, trainable_layers=5, stride=16, d_model=64, nhead=4,
             num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=128, dropout=0.0, num_queries=10)


def overfit_batch(tmp_path):
    root = generate_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=1, num_test=0, image_size=64,
                                   min_objects=1, max_objects=3, seed=3)
    dm = CocoDataModule(root=str(root), train_json="train.json", val_json="train.json", batch_size=2,
                        num_workers=0, train_scales=[64], val_scale=64, max_size=64)
    dm.setup("fit")
    return dm, next(iter(dm.val_dataloader()))  # deterministic transform: the same batch each time


def evaluate(task: DetectionTask, batch: dict) -> dict[str, float]:
    task.eval()
    with torch.no_grad():
        outputs = task(batch["images"], batch["pixel_mask"])
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    task.update_map(metric, outputs, batch["targets"])
    task.train()
    return {k: float(v) for k, v in metric.compute().items() if k in ("map", "map_50")}


def default_recipe() -> tuple[dict, dict]:
    """The shipped recipe's technique switches (configs/model/detr_small.yaml) and loss settings
    (configs/task_settings/detection.yaml), so the learning test follows the default."""
    model = OmegaConf.load(ROOT / "configs" / "model" / "detr_small.yaml")
    task = OmegaConf.load(ROOT / "configs" / "task_settings" / "detection.yaml")
    switches = {k: model[k] for k in ("anchor_queries", "box_refine", "num_groups", "two_stage", "dn_groups", "position_offset",
                                      "dn_label_noise", "dn_box_noise", "dn_contrastive")}
    losses = {k: task[k] for k in ("class_loss", "focal_alpha", "focal_gamma", "cost_class", "cost_bbox",
                                   "cost_giou", "loss_ce", "loss_bbox", "loss_giou")}
    return switches, losses


@pytest.mark.parametrize("recipe,bf16", [("original", False), ("default", True)],
                         ids=["original-fp32", "default-recipe-bf16-autocast"])
@pytest.mark.slow
def test_detr_overfits_two_images(tmp_path, recipe, bf16):
    """Set prediction learns: two images with 1-3 shapes each reach mAP@0.5 >= 0.9 within 300 steps,
    with DETR's original losses and queries in float32, and with the shipped recipe (focal loss, anchor
    queries refined per layer, query groups, two-stage, denoising) under the bf16 autocast that the
    default CPU run uses."""
    torch.manual_seed(0)
    dm, batch = overfit_batch(tmp_path)
    switches, losses = default_recipe() if recipe == "default" else ({}, {})
    task = DetectionTask(model={**SMALL, **switches}, data_info=dm.data_info, lr=1e-3, lr_backbone=1e-3, **losses)
    before = evaluate(task, batch)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-3, weight_decay=1e-4)
    start, result, steps = time.time(), before, 0
    for steps in range(1, 301):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = task.criterion(task(batch["images"], batch["pixel_mask"], batch["targets"]), batch["targets"])
            loss = weighted_loss(terms, task.loss_weights)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 0.1)
        opt.step()
        if steps % 50 == 0:
            result = evaluate(task, batch)
            if result["map_50"] >= 0.9:
                break
    print(f"overfit ({recipe}, {'bf16' if bf16 else 'fp32'}): {steps} steps, {time.time() - start:.1f}s, before {before}, after {result}")
    assert before["map_50"] < 0.2
    assert result["map_50"] >= 0.9, f"did not overfit in {steps} steps: {result}"


def test_predictions_map_back_to_file_category_ids(tmp_path):
    dm, batch = overfit_batch(tmp_path)
    task = DetectionTask(model=SMALL, data_info=dm.data_info)
    # a perfect prediction of the ground truth scores mAP 1 only if ids and coordinates map back correctly
    t = batch["targets"][0]
    assert dm.data_info["category_ids"] == [1, 2, 3]
    gt = task._ground_truth(t)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update([{"boxes": gt["boxes"], "scores": torch.ones(len(gt["boxes"])), "labels": gt["labels"]}], [gt])
    assert float(metric.compute()["map"]) == 1.0
    assert set(gt["labels"].tolist()) <= {1, 2, 3}
    h, w = t["orig_size"].tolist()
    assert gt["boxes"][:, 2].max() <= w + 1e-3 and gt["boxes"][:, 3].max() <= h + 1e-3


def test_evaluation_against_the_json_uses_the_files_category_ids(tmp_path):
    """Perfect predictions, made in contiguous label space, score mAP 1 against the *file's* boxes and
    (non-contiguous, unordered) category ids — and 0 if the label -> id mapping were the identity."""
    from tests.datamodules.test_coco import write_coco

    cats = [{"id": 90, "name": "zebra", "supercategory": "x"}, {"id": 7, "name": "cat", "supercategory": "x"}]
    images = [("a.png", 100, 80), ("b.png", 60, 90)]
    anns = [(1, 90, [10.0, 20.0, 30.0, 40.0]), (1, 7, [50.0, 10.0, 40.0, 60.0]), (2, 7, [5.0, 5.0, 10.0, 20.0])]
    write_coco(tmp_path, images, anns, "train.json", categories=cats)
    write_coco(tmp_path, images, anns, "val.json", categories=cats, write_images=False)
    dm = CocoDataModule(root=str(tmp_path), batch_size=2, num_workers=0, train_scales=[64], val_scale=64, max_size=100)
    dm.setup("fit")
    assert dm.data_info["category_ids"] == [7, 90]
    batch = next(iter(dm.val_dataloader()))
    task = DetectionTask(model=SMALL, data_info=dm.data_info)
    q, c = SMALL["num_queries"], dm.data_info["num_classes"]
    logits, boxes = torch.full((2, q, c + 1), -10.0), torch.full((2, q, 4), 0.5)
    logits[..., -1] = 10.0  # unused queries: no object
    for b, t in enumerate(batch["targets"]):
        n = len(t["labels"])
        boxes[b, :n] = t["boxes"]
        logits[b, torch.arange(n), t["labels"]] = 10.0
        logits[b, :n, -1] = -10.0
    preds = task.predictions({"pred_logits": logits, "pred_boxes": boxes}, batch["targets"])
    by_image = {1: [], 2: []}
    for image_id, cat, (x, y, w, h) in anns:
        by_image[image_id].append((cat, [x, y, x + w, y + h]))
    gts = [{"labels": torch.tensor([c for c, _ in by_image[int(t["image_id"])]]),
            "boxes": torch.tensor([bx for _, bx in by_image[int(t["image_id"])]])} for t in batch["targets"]]

    def score(mapping):
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        metric.update([{**p, "labels": mapping(p["labels"])} for p in preds], gts)
        return float(metric.compute()["map"])

    assert score(lambda labels: task.category_ids[labels]) > 0.99
    assert score(lambda labels: labels) < 0.01


def test_auto_queries_follow_the_most_crowded_training_image():
    info = {"num_classes": 2, "class_names": ["a", "b"], "category_ids": [1, 2]}
    assert queries_for("auto", {**info, "max_boxes_per_image": 1}) == 20  # at least 20
    assert queries_for("auto", {**info, "max_boxes_per_image": 14}) == 30  # 1.5 x 14 = 21, rounded up to 30
    assert queries_for("auto", {**info, "max_boxes_per_image": 60}) == 90
    task = DetectionTask(model={**SMALL, "num_queries": "auto"}, data_info={**info, "max_boxes_per_image": 40})
    assert task.model.num_queries == 60 and task.hparams["model"]["num_queries"] == 60  # the checkpoint rebuilds 60
    with pytest.raises(ValueError, match="set model.num_queries to a number"):
        queries_for("auto", info)  # a data source that does not count boxes
    with pytest.raises(ValueError, match="a number or auto"):
        queries_for("many", info)
    with pytest.warns(UserWarning, match="has 40 boxes but model.num_queries=10"):
        assert queries_for(10, {**info, "max_boxes_per_image": 40}) == 10
