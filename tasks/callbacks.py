"""Callbacks: render detections of a few validation images to PNG and to W&B."""

from __future__ import annotations

import os
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes, make_grid, save_image

from modules.backbone import IMAGENET_MEAN, IMAGENET_STD


class DetectionVisualizer(L.Callback):
    """After each validation, draws predicted (score >= ``score_threshold``) and ground-truth boxes of
    the first ``num_images`` validation images: ``<run>/predictions/epoch{E}.png`` and, with a W&B
    logger, ``wandb.Image(..., boxes=...)`` under ``val/predictions``."""

    def __init__(self, *, num_images: int = 4, score_threshold: float = 0.5, dirname: str = "predictions") -> None:
        self.num_images, self.score_threshold, self.dirname = num_images, score_threshold, dirname
        self._batch: tuple | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not isinstance(outputs, dict) or "outputs" not in outputs:
            return
        n = self.num_images
        raw = outputs["outputs"]
        self._batch = (
            batch["images"][:n].detach().float().cpu(),
            [t["size"].tolist() for t in batch["targets"][:n]],
            pl_module.model.class_probs(raw["pred_logits"][:n].detach()).cpu(),
            raw["pred_boxes"][:n].detach().float().cpu(),
            [{k: t[k].cpu() for k in ("labels", "boxes")} for t in batch["targets"][:n]],
        )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._batch is None or not trainer.is_global_zero:
            return
        images, sizes, probs, boxes, targets = self._batch
        self._batch = None
        names = list(pl_module.data_info.get("class_names", []))
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        drawn, wandb_images = [], []
        for img, (h, w), prob, box, tgt in zip(images, sizes, probs, boxes, targets):
            pixels = (img[:, :h, :w] * std + mean).clamp(0, 1)
            score, label = prob.max(-1)
            keep = score >= self.score_threshold
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            pred_xyxy = box_convert(box[keep], "cxcywh", "xyxy") * scale
            gt_xyxy = box_convert(tgt["boxes"].float(), "cxcywh", "xyxy") * scale
            u8 = (pixels * 255).to(torch.uint8)
            if len(gt_xyxy):
                u8 = draw_bounding_boxes(u8, gt_xyxy, colors="lime", width=1)
            if len(pred_xyxy):
                pred_text = [f"{self._name(names, int(c))} {s:.2f}" for c, s in zip(label[keep], score[keep])]
                u8 = draw_bounding_boxes(u8, pred_xyxy, labels=pred_text, colors="red", width=1)
            drawn.append(u8.float() / 255)
            wandb_images.append((pixels, box[keep], label[keep], score[keep], tgt))
        if not drawn:
            return
        out_dir = os.path.join(trainer.default_root_dir, self.dirname)
        os.makedirs(out_dir, exist_ok=True)
        hmax, wmax = max(d.shape[1] for d in drawn), max(d.shape[2] for d in drawn)
        padded = [torch.nn.functional.pad(d, (0, wmax - d.shape[2], 0, hmax - d.shape[1])) for d in drawn]
        save_image(make_grid(padded, nrow=len(padded), padding=2), os.path.join(
            out_dir, f"epoch{trainer.current_epoch:03d}.png"))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, wandb_images, names, trainer.global_step)

    @staticmethod
    def _name(names: list[str], label: int) -> str:
        return names[label] if label < len(names) else str(label)

    def _log_wandb(self, logger: WandbLogger, items: list, names: list[str], step: int) -> None:
        import wandb

        class_labels = {i: n for i, n in enumerate(names)} or None

        def box_data(boxes: Tensor, labels: Tensor, scores: Tensor | None) -> list[dict]:
            xyxy = box_convert(boxes.float(), "cxcywh", "xyxy").clamp(0, 1)
            data = []
            for j, (b, c) in enumerate(zip(xyxy.tolist(), labels.tolist())):
                entry = {
                    "position": {"minX": b[0], "minY": b[1], "maxX": b[2], "maxY": b[3]},
                    "class_id": int(c),
                    "box_caption": self._name(names, int(c)),
                }
                if scores is not None:
                    entry["scores"] = {"score": float(scores[j])}
                    entry["box_caption"] += f" {float(scores[j]):.2f}"
                data.append(entry)
            return data

        images = []
        for pixels, pbox, plabel, pscore, tgt in items:
            boxes = {
                "predictions": {"box_data": box_data(pbox, plabel, pscore), "class_labels": class_labels},
                "ground_truth": {"box_data": box_data(tgt["boxes"], tgt["labels"], None),
                                 "class_labels": class_labels},
            }
            images.append(wandb.Image(pixels.permute(1, 2, 0).numpy(), boxes=boxes))
        logger.experiment.log({"val/predictions": images, "trainer/global_step": step})


class FitScheduleToTime(L.Callback):
    """When a time budget will stop the run before its planned steps, fit the LR schedule's length to
    the steps that fit in the budget, so that a cosine (or step) schedule still decays to its end
    (Ultralytics' ``time=`` does the same by re-planning its epochs).

    Every ``every_n_steps`` optimiser steps: ``steps that fit = step + remaining seconds x steps per
    second so far`` (this process's rate, validation time included), and the task's
    ``schedule_steps`` (read by its LR schedule at each step) becomes the smaller of that and the
    planned total. The budget is ``trainer.max_time`` (Lightning's ``Timer``: its time survives a
    resume), or ``budget_seconds`` measured by ``clock`` (a benchmark that pauses its own clock); no
    budget: nothing changes. The fitted length is saved in checkpoints, so a resumed run continues
    the same schedule until its next estimate."""

    def __init__(self, *, every_n_steps: int = 20, budget_seconds: float | None = None, clock=None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if budget_seconds is not None and clock is None:
            raise ValueError("budget_seconds needs the clock that measures it")
        self.every_n_steps, self.budget_seconds = every_n_steps, budget_seconds
        self.clock = clock or time.perf_counter  # seconds; also measures the step rate
        self.fitted: int | None = None

    def _remaining(self, trainer: L.Trainer) -> float | None:
        if self.budget_seconds is not None:
            return self.budget_seconds - self.clock()
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        return None if timer is None else timer.time_remaining()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step, self.start_time = trainer.global_step, self.clock()
        if self.fitted is not None:  # resumed: the schedule it had
            pl_module.schedule_steps = self.fitted

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        done = trainer.global_step - self.start_step
        if done < self.every_n_steps or trainer.global_step % self.every_n_steps:
            return
        remaining = self._remaining(trainer)
        if remaining is None or remaining <= 0:  # no budget, or spent: the last estimate stays
            return
        rate = done / max(self.clock() - self.start_time, 1e-9)
        fit = trainer.global_step + remaining * rate
        planned = float(trainer.estimated_stepping_batches)
        self.fitted = int(fit) if fit < planned else None
        pl_module.schedule_steps = self.fitted

    def state_dict(self) -> dict:
        return {"fitted": self.fitted}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fitted = state_dict.get("fitted")
