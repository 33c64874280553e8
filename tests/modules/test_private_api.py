"""Every private API in ``modules.private_api`` taken away (deleted, raising, or with another signature):
the fallback gives the same results, or the run stops at start-up with a one-line error."""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import wandb
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision

from modules import packed, private_api
from modules import transformer as tr
from modules.private_api import PrivateAPIError
from tasks.base import BaseTask
from tasks.checkpointing import ModelCheckpoint
from tasks.metrics import CocoDetectionMetric, make_module_metrics_uneven_safe, make_uneven_safe
from tasks.multitask import MultiTask
from tasks.runtime import close_loggers
from tests.modules.test_packed import FakeOps


def one_line(err: BaseException, *words: str) -> str:
    text = str(err)
    assert "\n" not in text and all(w in text for w in words), text
    return text


# torch: oneDNN ops and the version counter (modules.packed) ---------------------------------------------
def _packed_vs_plain(monkeypatch, ops) -> None:
    """With ``ops`` as the oneDNN namespace, decoding-style linears inside ``packed_linears`` equal
    ``F.linear`` exactly (the fallback is F.linear itself)."""
    monkeypatch.setattr(private_api, "ONEDNN_OPS", ops)
    monkeypatch.setattr(packed, "_available", {})
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    with torch.no_grad(), packed.packed_linears():
        assert torch.equal(packed.linear(x, w, b, "relu"), F.relu(F.linear(x, w, b)))


def test_onednn_ops_missing_packing_falls_back_to_f_linear(monkeypatch):
    _packed_vs_plain(monkeypatch, types.SimpleNamespace())  # a torch without the mkldnn ops
    assert packed._available == {torch.float32: False}


def test_tensor_version_missing_turns_packing_off(monkeypatch):
    """Ops that work (fake, so on any CPU) but no version counter: a packed weight could go stale after an
    in-place change, so packing is off."""
    def no_version(tensor):
        raise AttributeError("'Tensor' object has no attribute '_version'")

    _packed_vs_plain(monkeypatch, FakeOps())
    assert packed._available == {torch.float32: True}  # control: with the counter, the fake ops pack
    monkeypatch.setattr(private_api, "tensor_version", no_version)
    _packed_vs_plain(monkeypatch, FakeOps())
    assert packed._available == {torch.float32: False}


# torch: SDPA's kernel choice (modules.transformer) ------------------------------------------------------
def test_sdpa_choice_missing_or_raising_means_the_chunked_path(monkeypatch):
    big = torch.zeros(1, 8, 4096, 8)  # explicit fp32 scores: 1 GiB, over the budget
    kw = dict(attn_mask=None, is_causal=False, dropout_p=0.0, prefer_explicit=False)
    flash = lambda *a: torch.nn.attention.SDPBackend.FLASH_ATTENTION.value  # noqa: E731
    monkeypatch.setattr(torch, "_fused_sdp_choice", flash, raising=False)
    assert tr.attention_path(big, big, big, **kw) == "sdpa"  # control: torch says fused
    monkeypatch.delattr(torch, "_fused_sdp_choice")
    assert private_api.sdpa_backend_choice(big, big, big, None, 0.0, False) is None
    assert tr.attention_path(big, big, big, **kw) == "chunked"

    def raises(*args):
        raise RuntimeError("no kernel query for this device")

    monkeypatch.setattr(torch, "_fused_sdp_choice", raises, raising=False)
    assert tr.attention_path(big, big, big, **kw) == "chunked"


def test_attention_without_the_sdpa_choice_gives_the_same_output(monkeypatch):
    """A layer whose scores exceed the budget, torch's choice missing: blocks, same output to 1e-5 (fp32)."""
    torch.manual_seed(0)
    attn = tr.MultiheadAttention(d_model=32, nhead=4).eval()
    x = torch.randn(2, 29, 32)
    with torch.no_grad():
        want = attn(x, x, x, is_causal=True)
        monkeypatch.delattr(torch, "_fused_sdp_choice")
        monkeypatch.setattr(tr, "ATTENTION_SCORE_BUDGET", 4_000)
        torch.testing.assert_close(attn(x, x, x, is_causal=True), want, rtol=1e-5, atol=1e-5)


# Lightning: ModelCheckpoint's last-checkpoint writer (tasks.checkpointing) ------------------------------
def _fit(tmp_path, callback) -> L.Trainer:
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                        callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(BoringModel())
    return trainer


def test_last_checkpoint_writer_missing_stops_before_the_first_step(tmp_path, monkeypatch):
    monkeypatch.delattr(LightningModelCheckpoint, "_save_last_checkpoint")
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None)
    trainer = None
    with pytest.raises(PrivateAPIError) as info:
        trainer = _fit(tmp_path, callback)
    one_line(info.value, "ModelCheckpoint._save_last_checkpoint", "lightning", "save_last=false")
    assert trainer is None and not (tmp_path / "ckpt").exists()  # nothing trained, nothing written


def test_last_checkpoint_writer_with_another_signature_stops_at_setup(tmp_path, monkeypatch):
    monkeypatch.setattr(LightningModelCheckpoint, "_monitor_candidates", lambda self, trainer, extra: {})
    with pytest.raises(PrivateAPIError) as info:
        _fit(tmp_path, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None))
    one_line(info.value, "ModelCheckpoint._monitor_candidates")


def test_without_save_last_the_writer_is_not_needed(tmp_path, monkeypatch):
    """``save_last=false``: our code calls none of the private methods (each accessor raises if called)."""
    def gone(*args):
        raise AttributeError("not in this Lightning")

    for name in ("check_last_checkpoint_writer", "save_last_checkpoint", "saves_on_train_epoch_end"):
        monkeypatch.setattr(private_api, name, gone)
    trainer = _fit(tmp_path, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=False, monitor=None))
    assert trainer.current_epoch == 2 and not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_with_the_writer_last_checkpoint_is_the_last_epoch(tmp_path):
    """Control for the tests above: the real writer runs and ``last.ckpt`` holds the last epoch."""
    _fit(tmp_path, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, monitor=None))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 1


# Lightning: DDPStrategy's kwargs (tasks.multitask) ------------------------------------------------------
def test_ddp_kwargs_missing_is_a_one_line_error_at_setup():
    strategy = DDPStrategy(find_unused_parameters=False)
    task = types.SimpleNamespace(trainer=types.SimpleNamespace(strategy=strategy))  # what setup reads
    MultiTask.setup(task, "fit")
    assert private_api.ddp_kwargs(strategy)["find_unused_parameters"] is True
    del strategy._ddp_kwargs
    with pytest.raises(PrivateAPIError) as info:
        MultiTask.setup(task, "fit")
    one_line(info.value, "DDPStrategy._ddp_kwargs", "find_unused_parameters=true")


# Lightning + W&B: the logger's run, without starting one (tasks.runtime) --------------------------------
def test_wandb_logger_run_is_none_before_a_run_and_wandb_run_without_the_attribute(tmp_path, monkeypatch):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    assert private_api.wandb_logger_run(logger) is None
    close_loggers([logger])  # finishes nothing, starts nothing
    assert private_api.wandb_logger_run(logger) is None and wandb.run is None
    current = types.SimpleNamespace(finished=False)
    monkeypatch.setattr(wandb, "run", current)
    assert private_api.wandb_logger_run(types.SimpleNamespace()) is current  # a logger without _experiment


# torchmetrics: list-state sync across uneven ranks (tasks.metrics) --------------------------------------
def _map_metric() -> MeanAveragePrecision:
    return MeanAveragePrecision(iou_type="bbox", backend="pycocotools")


def test_metric_states_missing_error_under_ddp_and_no_change_in_one_process(monkeypatch):
    metric = _map_metric()
    monkeypatch.delattr(metric, "_reductions")
    with pytest.raises(PrivateAPIError) as info:
        make_uneven_safe(metric)
    one_line(info.value, "Metric._reductions/_defaults", "torchmetrics", "one device")
    assert make_uneven_safe(metric, required=False) is metric
    assert not getattr(metric, "_mtdetr_uneven_safe", False)


def test_metric_sync_missing_or_changed(monkeypatch):
    monkeypatch.delattr(Metric, "_sync_dist")
    coco = CocoDetectionMetric()  # one process: built, unpatched, computes without a sync
    boxes = torch.tensor([[1.0, 2.0, 11.0, 12.0]])
    coco.update(torch.tensor([[1.0, 32.0, 32.0]]), [{"boxes": boxes, "scores": torch.ones(1), "labels": torch.ones(1)}],
                [{"boxes": boxes, "labels": torch.ones(1)}])
    assert float(coco.compute()["AP"]) == pytest.approx(1.0)
    with pytest.raises(PrivateAPIError) as info:  # under DDP: RunGuard.setup's call
        make_module_metrics_uneven_safe(torch.nn.ModuleDict({"val_map": coco}))
    one_line(info.value, "Metric._sync_dist", "torchmetrics")
    monkeypatch.setattr(Metric, "_sync_dist", lambda self, fn=None, group=None: None, raising=False)
    with pytest.raises(PrivateAPIError, match="Metric._sync_dist"):  # another signature
        make_uneven_safe(CocoDetectionMetric(), required=True)


def test_patched_sync_gathers_list_states_in_a_one_rank_group(tmp_path):
    """The wrapped ``_sync_dist`` really runs (a one-process gloo group makes torchmetrics sync): the
    list states go through our gather, the others through torchmetrics, and mAP is unchanged."""
    import torch.distributed as dist

    from tests.tasks.test_metrics import _images

    preds, targets = _images(4, 1)
    plain = _map_metric()
    plain.update(preds, targets)
    want = plain.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        metric = make_uneven_safe(_map_metric())
        assert metric._mtdetr_uneven_safe
        metric.update(preds, targets)
        got = metric.compute()
    finally:
        dist.destroy_process_group()
    assert float(got["map"]) == float(want["map"]) and float(got["map_50"]) == float(want["map_50"])


# Lightning: the task's trainer without LightningModule._trainer (tasks.base) ---------------------------
def test_attached_trainer_is_none_outside_a_trainer():
    task = BaseTask()
    assert task.attached_trainer is None
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    task.trainer = trainer
    assert task.attached_trainer is trainer


# benchmarks: transformers' attention implementation, torch's CPU flash-attention ops -------------------
def test_benchmark_accessors_without_the_private_names(monkeypatch):
    assert private_api.hf_attention_implementation(types.SimpleNamespace()) is None
    assert private_api.hf_attention_implementation(types.SimpleNamespace(_attn_implementation="sdpa")) == "sdpa"
    monkeypatch.setattr(torch.ops, "aten", types.SimpleNamespace())
    assert private_api.cpu_flash_attention_ops() == {}


def test_the_error_names_the_installed_and_the_checked_version():
    err = private_api.missing("Metric._x", "torchmetrics", "something", "do this")
    one_line(err, "Metric._x", f"torchmetrics {private_api.CHECKED_ON['torchmetrics']}", "something needs it: do this")
