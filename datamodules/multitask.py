"""Several data modules as one, for ``task=multitask``: one task's batch per training step.

``MultiTaskDataModule`` holds one data module per task (``data.detection``, ``data.multilabel``,
``data.translation``: any of the usual data configs). Its training loader, ``TaskScheduleLoader``,
yields ``(task name, batch)``, one task per step, in an order set by ``mode``:

- ``round_robin``: deterministic; equal weights alternate strictly (det, ml, tr, det, ...); unequal
  weights interleave smoothly in proportion (smooth weighted round-robin: weights 2:1:1 give
  det, ml, tr, det, det, ml, tr, det, ...).
- ``weighted``: each step's task drawn at random with probability proportional to its weight, from a
  generator seeded by (seed, epoch): the same order on every process and after a resume.

Each task's loader runs as an endless stream: when it is exhausted its next epoch starts (its own
epoch counter, so its shuffling moves on). An epoch of the schedule is ``steps_per_epoch`` steps
(default: the sum of the tasks' loader lengths). Where every task's batch goes is a pure function of
(seed, epoch, step), so a resumed run (``ckpt_path=...``) continues exactly: the data module stores the
position in the checkpoint and each task's loader is put at the batch it would have reached.

Validation and test: Lightning's ``CombinedLoader(mode="sequential")`` over the tasks' loaders, in the
order of ``data_info`` (``validation_step`` gets the task's position as ``dataloader_idx``).

Lightning wraps the training loader in its ``CombinedLoader`` (one iterable, ``max_size_cycle``) and
calls ``set_epoch`` through its ``sampler`` attribute, like any DataLoader's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader

from .base import position_state
from .sampling import EpochPosition, restore_position

MODES = ("round_robin", "weighted")


def task_schedule(mode: str, weights: Sequence[float], steps: int, seed: int = 0, epoch: int = 0) -> list[int]:
    """The task index of each of ``steps`` training steps (see the module docstring)."""
    n = len(weights)
    if mode == "round_robin":
        total, credit, out = float(sum(weights)), [0.0] * n, []
        for _ in range(steps):  # smooth weighted round-robin (as in nginx): largest credit runs
            for i, w in enumerate(weights):
                credit[i] += w
            k = max(range(n), key=lambda i: (credit[i], -i))
            credit[k] -= total
            out.append(k)
        return out
    if mode == "weighted":
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        return torch.multinomial(torch.tensor(weights, dtype=torch.float64), steps, replacement=True,
                                 generator=g).tolist()
    raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")


def _set_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` on a loader's sampler and batch sampler (each object once)."""
    objects = {}
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if obj is not None and callable(getattr(obj, "set_epoch", None)):
            objects[id(obj)] = obj
    for obj in objects.values():
        obj.set_epoch(epoch)


class _TaskStream:
    """One task's loader as an endless stream of batches, starting ``start`` batches in (counted over
    the loader's epochs: epoch ``start // len``, batch ``start % len``)."""

    def __init__(self, loader: Iterable, start: int) -> None:
        self.loader, self.length = loader, len(loader)  # type: ignore[arg-type]
        if self.length == 0:
            raise ValueError("a task's training loader is empty")
        self.epoch, offset = divmod(start, self.length)
        self.iterator = self._open(offset)

    def _open(self, offset: int) -> Iterator:
        if callable(getattr(self.loader, "load_state_dict", None)):  # datamodules.sampling.ResumableDataLoader
            self.loader.load_state_dict({"epoch": self.epoch, "batches_done": offset, "epoch_batches": self.length})
            return iter(self.loader)
        _set_epoch(self.loader, self.epoch)
        return itertools.islice(iter(self.loader), offset, None)

    def __next__(self) -> Any:
        try:
            return next(self.iterator)
        except StopIteration:
            self.epoch += 1
            self.iterator = self._open(0)
            return next(self.iterator)


class TaskScheduleLoader(EpochPosition):
    """Training batches ``(task name, batch)``, one task per step, over the tasks' own loaders.

    ``set_epoch(e)`` selects epoch e (Lightning calls it through ``sampler``); ``resume(k)`` skips the
    first k steps of the current epoch once (a mid-epoch restart); another ``set_epoch`` forgets it.
    """

    def __init__(self, loaders: dict[str, Iterable], mode: str = "round_robin",
                 weights: Sequence[float] | None = None, steps_per_epoch: int | None = None, seed: int = 0) -> None:
        if not loaders:
            raise ValueError("no task loaders")
        self.names = list(loaders)
        self.loaders = [loaders[n] for n in self.names]
        self.weights = [1.0] * len(self.names) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.names) or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"need one weight >= 0 per task ({self.names}), not all 0; got {self.weights}")
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        self.mode, self.seed = mode, int(seed)
        self.steps_per_epoch = int(steps_per_epoch or sum(len(dl) for dl in self.loaders))  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise ValueError(f"data.steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.epoch, self.skip = 0, 0
        self.sampler = self  # Lightning's set_epoch goes to dataloader.sampler

    def __len__(self) -> int:
        return self.steps_per_epoch

    def schedule(self, epoch: int) -> list[int]:
        """Task index per step of ``epoch``."""
        return task_schedule(self.mode, self.weights, self.steps_per_epoch, self.seed, epoch)

    def batches_before(self, epoch: int, step: int) -> list[int]:
        """How many batches each task has trained before ``step`` of ``epoch``."""
        counts = [0] * len(self.names)
        for e in range(epoch + 1):
            for k in self.schedule(e)[: step if e == epoch else None]:
                counts[k] += 1
        return counts

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        # a generator: runs at the first next(), after Lightning's set_epoch for this epoch
        epoch, skip = self.epoch, self.take_skip()
        order = self.schedule(epoch)
        start = self.batches_before(epoch, skip)
        streams: dict[int, _TaskStream] = {}
        for k in order[skip:]:
            if k not in streams:  # opened on first use: a task never scheduled costs nothing
                streams[k] = _TaskStream(self.loaders[k], start[k])
            yield self.names[k], next(streams[k])


class MultiTaskDataModule(L.LightningDataModule):
    """One data module per task (keyword = task name), trained one task per step.

    Args:
        mode: ``round_robin`` or ``weighted`` (see the module docstring).
        weights: ``{task: weight}`` (missing: 1): the share of training steps each task gets.
        steps_per_epoch: training steps per epoch, all tasks together (default: the sum of the tasks'
            training loader lengths).
        seed: seed of the weighted order (the run's ``seed``).
        **datamodules: ``detection=..., multilabel=..., translation=...`` (instantiated data modules;
            None drops a task).
    """

    def __init__(self, *, mode: str = "round_robin", weights: dict[str, float] | None = None,
                 steps_per_epoch: int | None = None, seed: int | None = 0, **datamodules: Any) -> None:
        super().__init__()
        self.datamodules: dict[str, L.LightningDataModule] = {}
        for name, dm in datamodules.items():
            if dm is None:
                continue
            if not isinstance(dm, L.LightningDataModule):
                raise TypeError(f"data.{name} must be a data module config (with _target_), got {type(dm).__name__}; "
                                f"the multitask data settings are {['mode', 'weights', 'steps_per_epoch', 'seed']}")
            self.datamodules[name] = dm
        if not self.datamodules:
            raise ValueError("no task data modules: set data.detection / data.multilabel / data.translation")
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(datamodules))  # a dropped task (None) may keep its weight
        if unknown:
            raise ValueError(f"data.weights names {unknown}, which are not data modules here ({list(datamodules)})")
        self.mode, self.steps_per_epoch, self.seed = mode, steps_per_epoch, int(seed or 0)
        self.weights = [float(weights.get(name, 1.0)) for name in self.datamodules]
        self._pending_resume: dict | None = None

    @property
    def task_names(self) -> list[str]:
        return list(self.datamodules)

    def prepare_data(self) -> None:
        for dm in self.datamodules.values():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for dm in self.datamodules.values():
            dm.setup(stage)

    @property
    def data_info(self) -> dict[str, dict]:
        """``{task: that data module's data_info}``, in loader order."""
        return {name: dm.data_info for name, dm in self.datamodules.items()}

    # loaders --------------------------------------------------------------------------------------
    def train_dataloader(self) -> TaskScheduleLoader:
        loader = TaskScheduleLoader({n: dm.train_dataloader() for n, dm in self.datamodules.items()},
                                    self.mode, self.weights, self.steps_per_epoch, self.seed)
        state, self._pending_resume = self._pending_resume, None
        if state:
            restore_position(loader, state)
        elif self.trainer is not None:
            loader.set_epoch(self.trainer.current_epoch)
        return loader

    def val_dataloader(self) -> CombinedLoader:
        return CombinedLoader([dm.val_dataloader() for dm in self.datamodules.values()], mode="sequential")

    def test_dataloader(self) -> CombinedLoader:
        return CombinedLoader([dm.test_dataloader() for dm in self.datamodules.values()], mode="sequential")

    # resume position (see datamodules/base.py: restored before the loader is built) ------------------
    def state_dict(self) -> dict:
        return position_state(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_resume = dict(state_dict) if state_dict else None
