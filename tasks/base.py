"""What every task shares: optimizer and LR schedule, parameter groups, gradient clipping, checkpoint hygiene."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

CHECKPOINT_KEY = "mtdetr"


SCHEDULERS = ("cosine", "constant", "inverse_sqrt", "step")


def lr_multiplier(name: str, step: int, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """LR multiplier at ``step``: linear warm-up from ~0 to 1 over ``warmup_steps``, then
    ``cosine``: decay to ``min_lr_ratio`` at ``total_steps`` (constant when the total is unknown);
    ``inverse_sqrt``: ``sqrt(warmup / step)`` (the Transformer paper's schedule); ``constant``: 1;
    ``step``: 1, then ``min_lr_ratio`` for the last third of the run (DETR: 10x drop at epoch 200 of 300)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / (step + 1))
    if name == "constant" or not math.isfinite(total_steps) or total_steps <= warmup_steps:
        return 1.0
    if name == "step":
        return 1.0 if step < total_steps * 2 / 3 else min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BaseTask(L.LightningModule):
    """Base LightningModule.

    Args:
        lr: learning rate of everything but the image trunk.
        lr_backbone: learning rate of the CNN trunk (DETR: 10x lower); 0 freezes it.
        weight_decay, betas: AdamW settings.
        warmup_steps: linear warm-up length in optimizer steps.
        scheduler: "cosine" (warm-up then cosine decay over the whole run), "inverse_sqrt" (warm-up then
            1/sqrt(step)), "constant" (warm-up only) or "step" (DETR's: ``min_lr_ratio`` x for the last
            third of the run).
        min_lr_ratio: final LR as a fraction of the peak for "cosine".
        grad_clip: max global gradient norm (0 or None = no clipping).
        fit_warmup: when a time budget shortens a cosine / step schedule
            (:class:`tasks.callbacks.FitScheduleToTime`), shorten its warm-up too, keeping its share of the
            plan; off: the warm-up keeps its length.
    """

    task_name = "base"

    def __init__(
        self,
        *,
        lr: float = 1e-4,
        lr_backbone: float = 1e-5,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        scheduler: str = "cosine",
        min_lr_ratio: float = 0.01,
        grad_clip: float | None = 0.1,
        fit_warmup: bool = False,
    ) -> None:
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        self.lr, self.lr_backbone, self.weight_decay, self.betas = lr, lr_backbone, weight_decay, tuple(betas)
        self.warmup_steps, self.scheduler_name, self.min_lr_ratio = warmup_steps, scheduler, min_lr_ratio
        self.grad_clip, self.fit_warmup = grad_clip, fit_warmup

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained with ``lr_backbone`` (override: e.g. the CNN trunk)."""
        return iter(())

    def param_groups(self) -> list[dict]:
        """AdamW parameter groups: ``main`` (``lr``) and, when the task has a trunk, ``backbone``
        (``lr_backbone``; with ``lr_backbone == 0`` the trunk is frozen instead)."""
        backbone = {id(p) for p in self.backbone_parameters() if p.requires_grad}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone]
        groups = [{"params": rest, "lr": self.lr, "name": "main"}]
        if backbone and self.lr_backbone > 0:
            params = [p for p in self.parameters() if id(p) in backbone]
            groups.append({"params": params, "lr": self.lr_backbone, "name": "backbone"})
        elif backbone:  # lr_backbone == 0: freeze instead of wasting backward passes
            for p in self.backbone_parameters():
                p.requires_grad_(False)
        return groups

    def configure_optimizers(self):
        groups = self.param_groups()
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        planned = float(self.trainer.estimated_stepping_batches)  # inf: no plan (max_epochs=-1, max_steps=-1)
        name, warmup, floor = self.scheduler_name, self.warmup_steps, self.min_lr_ratio
        has_length = name in ("cosine", "step")  # inverse_sqrt / constant: no length to fit
        total = planned if has_length else math.inf

        def schedule(step: int) -> float:
            fitted = self.schedule_steps  # the length fitted to a time budget, if any
            if not has_length or fitted is None or fitted >= total:
                return lr_multiplier(name, step, warmup, total, floor)
            # cosine / step: a budget that stops the run before its plan's end (or a run with no planned end)
            # ends the schedule with the budget; fit_warmup: the warm-up keeps its share of a finite plan
            # (100 warm-up steps of a 600-step plan are 24 of 141)
            short_warmup = warmup
            if self.fit_warmup and math.isfinite(planned):
                short_warmup = min(warmup, math.ceil(warmup * fitted / planned))
            return lr_multiplier(name, step, short_warmup, fitted, floor)

        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    schedule_steps: int | None = None  # set by tasks.callbacks.FitScheduleToTime

    def training_steps(self) -> float:
        """The optimiser steps this run trains for: its plan (inf without one), or the shorter length a
        time budget fitted (``schedule_steps``)."""
        planned = float(self.trainer.estimated_stepping_batches)
        return planned if self.schedule_steps is None else min(planned, float(self.schedule_steps))

    # multitask: a child task logs through its parent -----------------------------------------------
    _log_parent: L.LightningModule | None = None
    _log_prefix: str = ""

    def log_through(self, parent: L.LightningModule, prefix: str) -> None:
        """Make this task a child of ``parent`` (``tasks.multitask.MultiTask``), which Lightning drives:
        from now on this task's ``log``/``log_dict`` go to the parent's ``log`` as ``<prefix>/<name>``
        (no ``dataloader_idx`` suffix: the prefix already says which task, hence which loader)."""
        object.__setattr__(self, "_log_parent", parent)  # a plain reference: not a submodule (no cycle)
        self._log_prefix = prefix

    def log(self, name: str, value, *args, **kwargs) -> None:
        if self._log_parent is not None:
            kwargs["add_dataloader_idx"] = False
            return self._log_parent.log(f"{self._log_prefix}/{name}", value, *args, **kwargs)
        return super().log(name, value, *args, **kwargs)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # what a checkpoint needs to be used on its own (eval.py, predict.py, tasks.api.load) -------------
    data_config: dict | None = None
    preprocessing: dict | None = None

    def remember_data(self, config: dict | None, preprocessing: dict | None) -> None:
        """Keep the data module's config (plain dict with ``_target_``) and its effective preprocessing
        (``tasks.runtime.data_settings``) for the checkpoint, so that a checkpoint alone evaluates and
        predicts with the training run's scales, max size and tokenizer."""
        self.data_config, self.preprocessing = config, preprocessing

    @property
    def attached_trainer(self) -> L.Trainer | None:
        """The trainer running this task, or None outside one (Lightning's ``trainer`` raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def check_finite(self, loss: Tensor, terms: dict[str, Tensor] | None = None) -> None:
        """Stop training with a one-line error when the loss is NaN or infinite (``terms``: the loss's
        parts, named in the message); the checkpoints already written stay untouched."""
        if bool(torch.isfinite(loss)):
            return
        parts = f" (terms: { {k: round(float(v), 4) for k, v in terms.items()} })" if terms else ""
        raise FloatingPointError(
            f"training loss is {loss.item()} at global step {self.global_step}{parts}. Lower the learning rate "
            "or check the data; the last good checkpoint is in the run's checkpoints/ folder.")

    def log_samples_table(self, key: str, columns: list[str], rows: Callable[[], list[list]]) -> None:
        """A W&B table of validation samples (``rows()`` builds it, only when a W&B logger is there), once
        per validation epoch on the first process, not during the sanity check."""
        if not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=key, columns=columns, data=rows(), step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # plain values only: checkpoints must load with torch.load(weights_only=True)
        wandb_id = next((lg.version for lg in self.loggers if isinstance(lg, WandbLogger)), None)
        trainer = self.attached_trainer
        metrics = {k: float(v) for k, v in (trainer.callback_metrics.items() if trainer is not None else ())
                   if isinstance(v, float | int) or (torch.is_tensor(v) and v.numel() == 1)}
        checkpoint[CHECKPOINT_KEY] = {"task": self.task_name, "wandb_run_id": wandb_id, "data": self.data_config,
                                      "preprocessing": self.preprocessing, "metrics": metrics}
