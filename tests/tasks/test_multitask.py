"""task=multitask: detection + multi-label + translation on ONE Seq2SeqTransformer.

fast_dev_run through the real config, the gradient of every task's loss reaching the same shared
Parameter objects, a checkpoint round trip with resume, and the task order of the training loader."""

from __future__ import annotations

import collections

import pytest
import torch
from hydra.utils import instantiate

from datamodules.multitask import MultiTaskDataModule, TaskScheduleLoader, task_schedule
from tasks.multitask import MultiTask
from tasks.runtime import to_plain
from train import train

TINY = [
    "task=multitask",
    "model.shared.d_model=32",
    "model.shared.nhead=4",
    "model.shared.num_encoder_layers=1",
    "model.shared.num_decoder_layers=2",
    "model.shared.dim_feedforward=64",
    "model.detection.num_queries=8",
    "model.detection.dn_groups=2",
    "model.translation.max_length=64",
    "decoding.translation.max_len_b=4",
    "decoding.translation.max_len_a=0.5",
    "data.steps_per_epoch=6",
    "data.detection.num_train=8",
    "data.detection.num_val=4",
    "data.detection.num_test=4",
    "data.detection.image_size=32",
    "data.detection.batch_size=4",
    "data.multilabel.num_train=8",
    "data.multilabel.num_val=4",
    "data.multilabel.num_test=4",
    "data.multilabel.image_size=32",
    "data.multilabel.batch_size=4",
    "data.translation.vocab_size=400",
    "data.translation.max_train_examples=32",
    "data.translation.max_eval_examples=8",
    "data.translation.max_tokens=256",
    "trainer.precision=32-true",
    "task.warmup_steps=2",
]
SCORE_METRICS = {"detection/val/mAP", "multilabel/val/mAP", "translation/val/BLEU",
                 "detection/test/mAP", "multilabel/test/mAP", "translation/test/BLEU", "val/score", "test/score"}


@pytest.mark.slow
def test_fast_dev_run_multitask(make_cfg):
    """Three training steps (one per task, round-robin), every task's validation and test loader."""
    metrics = train(make_cfg(*TINY, "trainer.fast_dev_run=3", "logger=csv", tiny=False))
    assert SCORE_METRICS <= set(metrics)
    for name in ("detection", "multilabel", "translation"):
        assert torch.isfinite(torch.tensor(metrics[f"{name}/train/loss"]))
        assert f"{name}/val/loss" in metrics and f"{name}/test/loss" in metrics
    # children log only under their prefix, with no dataloader_idx suffix
    assert not [k for k in metrics if "dataloader_idx" in k or k.startswith(("train/", "val/mAP", "val/BLEU"))]
    scores = [metrics["detection/val/mAP"], metrics["multilabel/val/mAP"], metrics["translation/val/BLEU"] / 100]
    assert metrics["val/score"] == pytest.approx(sum(scores) / 3, abs=1e-6)


def _build(make_cfg, *overrides):
    cfg = make_cfg(*TINY, *overrides, tiny=False)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    task = instantiate(cfg.task, model=to_plain(cfg.model), data_info=dm.data_info)
    return dm, task


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")
def test_every_task_loss_reaches_the_same_shared_parameters(make_cfg):
    torch.manual_seed(0)
    dm, task = _build(make_cfg)
    shared = list(task.transformer.parameters())
    shared_ids = {id(p) for p in shared}
    assert task.task_names == ["detection", "multilabel", "translation"]
    own: dict[str, list] = {}
    for name in task.task_names:
        view = task.task(name).model.transformer
        assert view.shared is task.transformer  # the very same instance, not a copy
        own[name] = list(task.task(name).parameters())
        assert not shared_ids & {id(p) for p in own[name]}  # not registered again under the child
    # each parameter exactly once in the model and in the optimizer groups; the shared ones in "shared"
    groups = {g["name"]: g["params"] for g in task.param_groups()}
    assert [id(p) for p in groups["shared"]] == [id(p) for p in shared]
    assert sum(len(g) for g in groups.values()) == len(list(task.parameters()))
    assert not [k for k in task.state_dict() if ".transformer.shared." in k]

    batches: dict = {}
    for name, batch in dm.train_dataloader():
        batches.setdefault(name, batch)
        if len(batches) == 3:
            break
    task.train()
    grads = {}
    for name in task.task_names:
        task.zero_grad(set_to_none=True)
        task.training_step((name, batches[name]), 0).backward()
        no_grad = [n for n, p in task.transformer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not no_grad, f"{name}: shared parameters without gradient: {no_grad}"
        grads[name] = [p.grad.clone() for p in shared]
        assert task.task(name).model.transformer.embedding.grad.abs().sum() > 0
        for other in task.task_names:  # the other tasks' adapters, queries, heads are untouched
            if other != name:
                assert all(p.grad is None for p in own[other]), f"{name}'s loss reached {other}'s parameters"
    for a, b in ((0, 1), (0, 2), (1, 2)):  # three different gradients on the same Parameters
        ga, gb = grads[task.task_names[a]], grads[task.task_names[b]]
        assert any(not torch.allclose(x, y) for x, y in zip(ga, gb))


@pytest.mark.slow
def test_checkpoint_round_trip_and_exact_resume(make_cfg, tmp_path):
    """last.ckpt loads with weights_only=True into a MultiTask; 1 epoch + ckpt_path=last + 1 epoch
    gives the weights of 2 epochs straight (task order, each task's data position, optimizer, schedule)."""
    common = [*TINY, "logger=none", "test=false", "trainer.limit_val_batches=1", "model.shared.dropout=0.1",
              "task.scheduler=inverse_sqrt"]  # cosine would depend on max_epochs, which differs here
    out = tmp_path / "outputs" / "multitask"
    train(make_cfg(*common, "trainer.max_epochs=2", f"paths.output_dir={out / 'straight'}", tiny=False))
    train(make_cfg(*common, "trainer.max_epochs=1", f"paths.output_dir={out / 'half'}", tiny=False))
    (out / "straight" / "checkpoints" / "last.ckpt").rename(out / "straight" / "last.ckpt")  # not found by =last
    half = torch.load(out / "half" / "checkpoints" / "last.ckpt", weights_only=True)
    assert half["mtdetr"]["task"] == "multitask" and half["global_step"] == 6
    loaded = MultiTask.load_from_checkpoint(out / "half" / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, half["state_dict"][k]), k
    assert loaded.detection.model.transformer.shared is loaded.transformer

    train(make_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last", f"paths.output_dir={out / 'resumed'}",
                   tiny=False))
    a = torch.load(out / "straight" / "last.ckpt", weights_only=True)
    b = torch.load(out / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    diff = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])
    assert diff <= 1e-6


@pytest.mark.slow
def test_ddp_cpu_multitask_runs_end_to_end(tmp_path):
    """`task=multitask trainer=ddp_cpu`: two gloo processes, one task per step (the other tasks' parameters
    get no gradient that step, which DDP must be told to expect), validation and test of every task."""
    import csv

    from tests.conftest import run_train_script

    run = tmp_path / "run"
    proc = run_train_script([*TINY, "trainer=ddp_cpu", "logger=csv", "trainer.max_epochs=1",
                             "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0", f"paths.log_dir={tmp_path}",
                             f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "train_ddp_process_1.log").is_file()  # the second process really ran
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6  # two steps of each task
    with open(run / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k for row in rows for k, v in row.items() if v not in (None, "")}
    assert SCORE_METRICS <= logged
    assert {f"{name}/train/loss" for name in ("detection", "multilabel", "translation")} <= logged


def _names(loader) -> list[str]:
    return [name for name, _ in loader]


def test_round_robin_and_weighted_task_order():
    loaders = {"det": [f"d{i}" for i in range(2)], "ml": [f"m{i}" for i in range(3)], "tr": [f"t{i}" for i in range(5)]}
    rr = TaskScheduleLoader(loaders, "round_robin", steps_per_epoch=9)
    batches = list(rr)
    assert _names(rr) == ["det", "ml", "tr"] * 3
    # each task's loader runs as an endless stream: det cycles through its 2 batches
    assert [b for n, b in batches if n == "det"] == ["d0", "d1", "d0"]
    assert len(TaskScheduleLoader(loaders)) == 10  # default epoch: the sum of the loader lengths

    smooth = TaskScheduleLoader(loaders, "round_robin", weights=[2, 1, 1], steps_per_epoch=8)
    assert _names(smooth) == ["det", "ml", "tr", "det"] * 2  # smooth: det never twice in a row here

    def weighted(seed, epoch, weights=(3, 1, 0), steps=3000):
        loader = TaskScheduleLoader(loaders, "weighted", weights=list(weights), steps_per_epoch=steps, seed=seed)
        loader.set_epoch(epoch)
        return _names(loader)

    order = weighted(0, 0)
    counts = collections.Counter(order)
    assert counts["tr"] == 0 and abs(counts["det"] / len(order) - 0.75) < 0.03
    assert weighted(0, 0) == order  # a function of (seed, epoch): every process, every resume
    assert weighted(0, 1) != order and weighted(1, 0) != order
    assert task_schedule("weighted", [1, 1], 50, seed=3, epoch=2) == task_schedule("weighted", [1, 1], 50, 3, 2)


def test_resume_mid_epoch_continues_every_task_stream():
    """Skipping k steps of epoch e yields exactly the rest of that epoch, each task's loader at the batch
    it had reached (counted over the earlier epochs too)."""
    loaders = {"det": [f"d{i}" for i in range(2)], "ml": [f"m{i}" for i in range(3)], "tr": [f"t{i}" for i in range(5)]}
    for mode in ("round_robin", "weighted"):
        full = TaskScheduleLoader(loaders, mode, weights=[1, 2, 1], steps_per_epoch=7, seed=5)
        full.set_epoch(2)
        expected = list(full)
        for k in (0, 3, 6):
            resumed = TaskScheduleLoader(loaders, mode, weights=[1, 2, 1], steps_per_epoch=7, seed=5)
            resumed.set_epoch(2)
            resumed.resume(k)
            assert list(resumed) == expected[k:], (mode, k)
        # the streams over epochs 0..2 are each task's loader cycled
        every = []
        for epoch in range(3):
            full.set_epoch(epoch)
            every += list(full)
        for name, items in loaders.items():
            got = [b for n, b in every if n == name]
            assert got == (items * 10)[: len(got)]


def test_data_module_rejects_misspelled_settings():
    with pytest.raises(TypeError, match="data.mdoe"):
        MultiTaskDataModule(mdoe="weighted")
