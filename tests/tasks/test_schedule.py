"""The LR schedule fitted to a time budget (tasks.callbacks.FitScheduleToTime), in real Lightning
runs of a tiny task: the budget's clock is given, so the steps that fit are known exactly."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tasks.base import BaseTask
from tasks.callbacks import FitScheduleToTime


class Tiny(BaseTask):
    def __init__(self, warmup_steps: int = 0, scheduler: str = "cosine", fit_warmup: bool = True) -> None:
        super().__init__(lr=1.0, warmup_steps=warmup_steps, scheduler=scheduler, min_lr_ratio=0.01, grad_clip=None,
                         fit_warmup=fit_warmup)
        self.layer = torch.nn.Linear(2, 1)
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.layer(batch[0]).pow(2).mean()


def fit(callbacks, max_steps: int = 100, holder: dict | None = None, warmup_steps: int = 0,
        scheduler: str = "cosine", fit_warmup: bool = True, max_epochs: int | None = None) -> Tiny:
    """Train ``Tiny``; ``holder["trainer"]`` is the trainer (for ``step_clock``)."""
    task = Tiny(warmup_steps, scheduler, fit_warmup)
    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=1)
    trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    if holder is not None:
        holder["trainer"] = trainer
    trainer.fit(task, loader)
    return task


def step_clock(holder: dict):
    """One second per optimiser step: the budget's clock, read off the trainer."""
    return lambda: float(holder["trainer"].global_step)


def test_a_budget_that_stops_the_run_early_gets_the_whole_schedule():
    holder: dict = {}
    callback = FitScheduleToTime(every_n_steps=5, budget_seconds=40.0, clock=step_clock(holder))
    task = fit([callback], max_steps=100, holder=holder)
    # 40 steps fit in the budget (1 s each) out of the planned 100: the cosine ends at step 40
    assert task.schedule_steps == callback.fitted == 40
    assert task.lrs[39] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(39 / 40 * math.pi)))
    assert task.lrs[45] == pytest.approx(0.01)  # past the budget (a run that was not stopped): the floor
    assert callback.state_dict() == {"fitted": 40}


def test_a_budget_that_stops_the_run_early_shortens_the_warm_up_with_it():
    holder: dict = {}
    callback = FitScheduleToTime(every_n_steps=5, budget_seconds=40.0, clock=step_clock(holder))
    task = fit([callback], max_steps=100, holder=holder, warmup_steps=20)
    # planned: 20 warm-up steps of 100; fitted from step 5 on: 40 steps, so 8 warm-up steps of 40
    # the LR of step 5 was set before the estimate at its end: the planned warm-up up to there
    assert task.lrs[4] == pytest.approx(5 / 20) and task.lrs[5] == pytest.approx(6 / 20)
    assert task.lrs[6] == pytest.approx(7 / 8) and task.lrs[7] == pytest.approx(1.0)
    assert task.lrs[8] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(0 / 32 * math.pi)))
    assert task.lrs[39] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(31 / 32 * math.pi)))


def test_without_fit_warmup_the_warm_up_keeps_its_length():
    holder: dict = {}
    callback = FitScheduleToTime(every_n_steps=5, budget_seconds=40.0, clock=step_clock(holder))
    task = fit([callback], max_steps=100, holder=holder, warmup_steps=20, fit_warmup=False)
    assert task.lrs[6] == pytest.approx(7 / 20) and task.lrs[19] == pytest.approx(1.0)
    assert task.lrs[39] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(19 / 20 * math.pi)))


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.should_stop = trainer.global_step >= self.step


def test_a_run_with_no_planned_end_gets_its_schedule_from_the_budget():
    """max_epochs=-1, max_steps=-1 (no plan) and a time budget: the cosine ends with the budget (it was
    constant before); the warm-up has no share of a plan to keep, so it keeps its length."""
    holder: dict = {}
    callback = FitScheduleToTime(every_n_steps=5, budget_seconds=40.0, clock=step_clock(holder))
    task = fit([callback, StopAt(42)], max_steps=-1, max_epochs=-1, holder=holder, warmup_steps=10)
    assert callback.fitted == 40
    assert task.lrs[9] == pytest.approx(1.0)
    assert task.lrs[39] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(29 / 30 * math.pi)))
    assert task.lrs[41] == pytest.approx(0.01)


def test_inverse_sqrt_keeps_its_warm_up_under_a_budget():
    """inverse_sqrt has no length to fit: its warm-up sets its decay, sqrt(warm-up / step), and stays."""
    holder: dict = {}
    callback = FitScheduleToTime(every_n_steps=5, budget_seconds=40.0, clock=step_clock(holder))
    task = fit([callback], max_steps=100, holder=holder, warmup_steps=20, scheduler="inverse_sqrt")
    assert callback.fitted == 40
    assert task.lrs[9] == pytest.approx(10 / 20) and task.lrs[39] == pytest.approx(math.sqrt(20 / 40))


def test_a_budget_with_room_to_spare_leaves_the_planned_schedule():
    holder: dict = {}
    callback = FitScheduleToTime(every_n_steps=5, budget_seconds=1000.0, clock=step_clock(holder))
    task = fit([callback], max_steps=30, holder=holder)
    assert task.schedule_steps is None and callback.fitted is None
    assert task.lrs[29] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(29 / 30 * math.pi)))


def test_without_a_budget_nothing_changes():
    task = fit([FitScheduleToTime(every_n_steps=5)], max_steps=20)
    assert task.schedule_steps is None


def test_a_resumed_run_continues_the_fitted_schedule():
    callback = FitScheduleToTime(every_n_steps=5)
    callback.load_state_dict({"fitted": 12})
    task = fit([callback], max_steps=20)
    assert task.lrs[11] > 0.01 and task.lrs[12] == pytest.approx(0.01)


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps"):
        FitScheduleToTime(every_n_steps=0)


def test_a_budget_needs_its_clock():
    with pytest.raises(ValueError, match="clock"):
        FitScheduleToTime(budget_seconds=10.0)
