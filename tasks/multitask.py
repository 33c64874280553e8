"""Several tasks trained together on ONE Seq2SeqTransformer: detection, multi-label, translation.

``MultiTask`` builds one shared ``Seq2SeqTransformer`` from ``model.shared``, then each child task
(``DetectionTask``, ``MultiLabelTask``, ``TranslationTask``) from its own settings as the single-task run
would, handing its model a :class:`modules.multitask.TaskTransformer` over the shared one (task
embedding + the task's position convention) instead of a transformer of its own. Each child keeps its
adapter, queries, head, loss and metrics.

Training: every step is one task's batch, ``(task name, batch)`` from
``datamodules.multitask.MultiTaskDataModule`` (round-robin or weighted order); the parent runs that
child's ``training_step`` and scales its loss by ``loss_weights[task]``. Validation/test: one loader per
task (``dataloader_idx`` = position in ``data_info``). Children log through the parent under their
own prefix (``detection/val/mAP``, ``translation/train/loss``, ...); the parent adds ``val/score`` /
``test/score``, the mean over tasks of detection mAP, multi-label mAP and BLEU / 100 (the default
checkpoint monitor).

Optimisation: one AdamW over all parameters, each exactly once: group ``shared`` (the transformer,
``lr``), and per task ``<task>/main`` (its adapter, queries, head, task embedding, at the child's own
``lr``) and ``<task>/backbone`` (its CNN trunk, the child's ``lr_backbone``). Warm-up, schedule,
weight decay, betas and gradient clipping are the parent's (the children's are not used).
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor

from modules import private_api
from modules.multitask import TaskTransformer
from modules.transformer import Seq2SeqTransformer

from .base import BaseTask
from .detection import DetectionTask
from .multilabel import MultiLabelTask
from .translation import TranslationTask

TASKS: dict[str, type[BaseTask]] = {
    "detection": DetectionTask,
    "multilabel": MultiLabelTask,
    "translation": TranslationTask,
}
# the metric of each task that enters val/score (and test/score), and its scale to [0, 1]
SCORES: dict[str, tuple[str, float]] = {"detection": ("mAP", 1.0), "multilabel": ("mAP", 1.0), "translation": ("BLEU", 0.01)}


def check_multitask_settings(shared: dict | None, model: dict, data_info: dict, tasks: dict, named: set[str],
                             loss_weights: dict) -> None:
    """One-line ``ValueError`` for a multitask config that cannot be built: no shared transformer, an
    unknown task, a task without data / settings / model config, a loss weight of no task, or a task
    model whose width differs from the shared one."""
    if shared is None:
        raise ValueError("model.shared (the shared Seq2SeqTransformer's sizes) is missing")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in task.tasks; known: {sorted(TASKS)}")
    if not tasks or set(tasks) != set(data_info):
        raise ValueError(f"task.tasks has {sorted(tasks)} but the data module provides {sorted(data_info)}: "
                         "every task needs its data (data.<task>) and its settings (task.tasks.<task>)")
    missing = sorted(set(tasks) - set(model))
    if missing:
        raise ValueError(f"no model config for task(s) {missing}: set model.<task>")
    extra = sorted(set(loss_weights) - named)
    if extra:
        raise ValueError(f"task.loss_weights names {extra}, which are not in task.tasks ({sorted(named)})")
    for name in tasks:
        width = model[name].get("d_model")
        if width is not None and width != shared.get("d_model"):
            raise ValueError(f"model.{name}.d_model={width} differs from model.shared.d_model={shared.get('d_model')}: "
                             "the task's adapter and head must match the shared width")


class MultiTask(BaseTask):
    """Detection + multi-label + translation (any non-empty subset) on one shared Transformer.

    Args:
        model: ``shared`` (arguments of :class:`modules.transformer.Seq2SeqTransformer`) and one entry per
            task: that task's ``model`` config (its ``d_model`` must equal the shared one; it gets the
            shared transformer instead of one of its own, so transformer sizes there are not used).
        data_info: one entry per task, from ``MultiTaskDataModule.data_info``; its order is the order of
            the validation/test loaders.
        tasks: one entry per task: the task class's settings (loss, matching, metrics; ``lr`` and
            ``lr_backbone`` set that task's parameter groups).
        loss_weights: factor on each task's training loss (missing: 1).
        task_embedding: where each task's learned embedding is added: ``decoder`` (its decoder input),
            ``both`` (encoder input too) or ``none`` (ablation).
        **optim: optimizer / schedule settings of :class:`tasks.base.BaseTask` (``lr`` is the shared
            transformer's).
    """

    task_name = "multitask"

    def __init__(
        self,
        *,
        model: dict,
        data_info: dict,
        tasks: dict,
        loss_weights: dict | None = None,
        task_embedding: str = "decoder",
        **optim,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters()
        named = set(tasks)  # a task set to None is dropped (its loss weight may stay in the config)
        tasks = {k: v for k, v in tasks.items() if v is not None}
        model = dict(model)
        shared_cfg = model.pop("shared", None)
        check_multitask_settings(shared_cfg, model, data_info, tasks, named, loss_weights or {})
        self.task_names: list[str] = list(data_info)
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in self.task_names}
        self.transformer = Seq2SeqTransformer(**shared_cfg)
        for name in self.task_names:
            view = TaskTransformer(shared=self.transformer, pos_at_every_layer=TASKS[name].positions_at_every_layer,
                                   embed=task_embedding)
            child = TASKS[name](model=model[name], data_info=data_info[name], transformer=view, **tasks[name])
            child.log_through(self, name)
            setattr(self, name, child)  # a direct child: Lightning hands it the trainer
        self._logged: dict[str, Tensor] = {}
        self._score_keys = {f"{n}/{stage}/{SCORES[n][0]}" for n in self.task_names for stage in ("val", "test")}

    def task(self, name: str) -> BaseTask:
        return getattr(self, name)

    # optimisation ---------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.transformer.parameters() if p.requires_grad], "lr": self.lr,
                   "name": "shared"}]
        for name in self.task_names:
            for group in self.task(name).param_groups():  # the child's parameters exclude the shared ones
                groups.append({**group, "name": f"{name}/{group['name']}"})
        seen: set[int] = set()
        for group in groups:
            ids = {id(p) for p in group["params"]}
            if ids & seen:
                raise RuntimeError(f"parameter group {group['name']} repeats parameters of another group")
            seen |= ids
        missing = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing:
            raise RuntimeError(f"parameters in no optimizer group: {missing[:5]}")
        return [g for g in groups if g["params"]]

    def setup(self, stage: str) -> None:
        """Under DDP, have it look for unused parameters: each step trains one task, so the other tasks'
        adapters, queries and heads get no gradient (DDP would otherwise fail at the next step). Runs
        before the strategy wraps the model."""
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy):
            private_api.ddp_kwargs(strategy)["find_unused_parameters"] = True  # one-line error if missing

    # steps ----------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[str, dict], batch_idx: int) -> Tensor:
        name, data = batch
        loss = self.task(name).training_step(data, batch_idx)
        return loss * self.loss_weights[name]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        return self.task(self.task_names[dataloader_idx]).validation_step(batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        return self.task(self.task_names[dataloader_idx]).test_step(batch, batch_idx)

    # epoch hooks: the children's, then the combined score -------------------------------------------
    def log(self, name: str, value, *args, **kwargs) -> None:
        if name in self._score_keys:  # read back by _log_score
            self._logged[name] = value
        super().log(name, value, *args, **kwargs)

    def _log_score(self, stage: str) -> None:
        values = []
        for name in self.task_names:
            metric, scale = SCORES[name]
            value = self._logged.get(f"{name}/{stage}/{metric}")
            if value is not None:
                values.append(torch.as_tensor(value, dtype=torch.float32, device=self.device).detach() * scale)
        if values:
            self.log(f"{stage}/score", torch.stack(values).mean(), prog_bar=True)

    def _children(self, hook: str) -> None:
        for name in self.task_names:
            getattr(self.task(name), hook)()

    def on_train_epoch_start(self) -> None:
        self._children("on_train_epoch_start")

    def on_train_epoch_end(self) -> None:
        self._children("on_train_epoch_end")

    def on_validation_epoch_start(self) -> None:
        self._children("on_validation_epoch_start")

    def on_test_epoch_start(self) -> None:
        self._children("on_test_epoch_start")

    def on_validation_epoch_end(self) -> None:
        self._logged = {}
        self._children("on_validation_epoch_end")
        self._log_score("val")

    def on_test_epoch_end(self) -> None:
        self._logged = {}
        self._children("on_test_epoch_end")
        self._log_score("test")
