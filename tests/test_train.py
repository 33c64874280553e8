"""End-to-end runs of train.py's ``train()`` on the composed Hydra config (tiny sizes, CPU)."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException

from tasks.runtime import ConfigError
from tests.conftest import run_train_script
from train import train


@pytest.mark.slow
def test_fast_dev_run_detection(make_cfg):
    metrics = train(make_cfg("trainer.fast_dev_run=true", "logger=csv"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"val/mAP", "val/mAP_50", "val/mAP_75", "test/mAP"} <= set(metrics)


@pytest.mark.slow
def test_run_writes_checkpoints_that_load_weights_only(make_cfg, tmp_path, caplog):
    cfg = make_cfg("logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    with caplog.at_level(logging.INFO, logger="mtdetr"):
        train(cfg)
    ckpt_dir = tmp_path / "outputs" / "detection" / "run1" / "checkpoints"
    names = sorted(os.listdir(ckpt_dir))
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    # the end-of-run message names both, although testing the best (from the first epoch, saved
    # before last.ckpt existed) restored the checkpoint callback's state of that moment
    best = next(n for n in names if n.startswith("best-"))
    assert f"checkpoints: best={ckpt_dir / best} last={ckpt_dir / 'last.ckpt'}" in caplog.text
    assert f"ckpt_path={ckpt_dir / 'last.ckpt'}" in caplog.text
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert ckpt["mtdetr"]["task"] == "detection"
    assert ckpt["hyper_parameters"]["data_info"]["class_names"] == ["circle", "square", "triangle"]
    assert (tmp_path / "outputs" / "detection" / "run1" / "predictions" / "epoch000.png").is_file()


@pytest.mark.slow
def test_resume_continues_epoch_step_and_wandb_run(make_cfg, tmp_path):
    common = ["logger=wandb", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    train(make_cfg(*common, "trainer.max_epochs=1", run="first"))
    first = torch.load(tmp_path / "outputs/detection/first/checkpoints/last.ckpt", weights_only=True)
    assert first["epoch"] == 0 and first["global_step"] == 2
    run_id = first["mtdetr"]["wandb_run_id"]
    assert run_id
    time.sleep(1.1)  # distinct mtime for ckpt_path=last
    train(make_cfg(*common, "trainer.max_epochs=2", "ckpt_path=last", run="second"))
    second = torch.load(tmp_path / "outputs/detection/second/checkpoints/last.ckpt", weights_only=True)
    assert second["epoch"] == 1 and second["global_step"] == 4
    assert second["mtdetr"]["wandb_run_id"] == run_id
    # the optimizer and LR schedule were restored, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 4
    assert any(run_id in name for name in os.listdir(tmp_path / "outputs/detection/second/wandb"))


@pytest.mark.slow
def test_misspelled_keys_are_errors(make_cfg, tmp_path):
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        make_cfg("trainer.max_epoch=1")
    # typos inside YAML files: top-level keys against the schema, the rest against class signatures
    (tmp_path / "cfg" / "experiment").mkdir(parents=True)
    (tmp_path / "cfg" / "experiment" / "top.yaml").write_text("# @package _global_\nsedd: 1\n")
    (tmp_path / "cfg" / "experiment" / "nested.yaml").write_text("# @package _global_\ntrainer:\n  max_epoch: 1\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'cfg'}]"
    with pytest.raises(ConfigCompositionException, match="sedd"):
        make_cfg(search, "experiment=top")
    with pytest.raises(InstantiationException, match="max_epoch"):
        train(make_cfg(search, "experiment=nested", "logger=none"))
    with pytest.raises(InstantiationException, match="lrr"):
        train(make_cfg("+task.lrr=1", "logger=none", "trainer.fast_dev_run=true"))
    with pytest.raises(InstantiationException, match="d_modle"):
        train(make_cfg("+model.d_modle=1", "logger=none", "trainer.fast_dev_run=true"))
    with pytest.raises(InstantiationException, match="batchsize"):
        train(make_cfg("+data.batchsize=1", "logger=none", "trainer.fast_dev_run=true"))


@pytest.mark.slow
def test_bad_checkpoint_paths_are_explained(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint matches"):
        train(make_cfg("ckpt_path=last", "logger=none"))
    with pytest.raises(ConfigError, match="no such file"):
        train(make_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}", "logger=none"))
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        train(make_cfg(f"ckpt_path={junk}", "logger=none"))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "mtdetr": {"task": "translation"}}, foreign)
    with pytest.raises(ConfigError, match="task='translation'"):
        train(make_cfg(f"ckpt_path={foreign}", "logger=none"))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(ConfigError, match="not an mtdetr"):
        train(make_cfg(f"ckpt_path={plain}", "logger=none"))


def test_missing_data_root_is_explained(make_cfg, tmp_path):
    with pytest.raises(Exception, match="data.root|root"):
        train(make_cfg("data=coco", "logger=none", tiny=False))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(make_cfg("data=coco", f"data.root={tmp_path / 'nowhere'}", "logger=none", tiny=False))



DDP_TINY = ["logger=csv", "data.image_size=64", "model.d_model=32", "model.nhead=4", "model.num_encoder_layers=1",
            "model.num_decoder_layers=1", "model.dim_feedforward=64", "callbacks.progress_bar.refresh_rate=0"]


def _ddp_paths(tmp_path, run) -> list[str]:
    return [f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]


@pytest.mark.slow
def test_ddp_cpu_two_processes(tmp_path):
    """`trainer=ddp_cpu`: two gloo processes train, validate and write one set of checkpoints."""
    run = tmp_path / "run"
    proc = run_train_script(["trainer=ddp_cpu", *DDP_TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                             "trainer.limit_val_batches=1", "data.num_train=32", "data.num_val=8",
                             "data.batch_size=4", "test=false", *_ddp_paths(tmp_path, run)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "train_ddp_process_1.log").is_file()  # the second process really ran
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert proc.stdout.count("run folder:") + proc.stderr.count("run folder:") == 1  # rank 0 only


def _last_logged(csv_path, keys: list[str]) -> dict[str, float]:
    """The last value of each key in a CSVLogger metrics.csv."""
    import csv

    values: dict[str, float] = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            values.update({k: float(row[k]) for k in keys if row.get(k) not in (None, "")})
    return values


@pytest.mark.slow
def test_ddp_validation_with_uneven_ranks_finishes_and_matches_one_process(make_cfg, tmp_path):
    """33 validation images, batch 16, 2 ranks: the unpadded EvalSampler gives rank 0 two batches and rank 1
    one. Evaluation must run no per-batch collective (the box-count all-reduce of the training loss would
    meet the other rank's end-of-epoch one and hang), and the mAP of both ranks' images together equals
    that of one process evaluating the same checkpoint."""
    import lightning as L
    from hydra.utils import instantiate

    from datamodules.sampling import EvalSampler
    from tasks.runtime import to_plain

    assert [len(EvalSampler(range(33), 2, r)) for r in (0, 1)] == [17, 16]  # -> 2 and 1 batches of 16
    data = ["data.num_train=32", "data.num_val=33", "data.batch_size=16", "model.num_queries=8"]
    run = tmp_path / "run"
    proc = run_train_script(["trainer=ddp_cpu", *DDP_TINY, *data, "trainer.max_epochs=1", "test=false",
                             *_ddp_paths(tmp_path, run)], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = ["val/mAP", "val/mAP_50", "val/mAP_75", "val/mAR_100"]
    ddp = _last_logged(run / "csv" / "version_0" / "metrics.csv", keys)
    assert set(ddp) == set(keys), ddp

    # one process, the same weights (last.ckpt is written after that validation), the same 33 images
    cfg = make_cfg(*DDP_TINY, *data, "trainer.precision=32-true", tiny=False)
    cfg.paths.cache_dir = str(tmp_path / "cache")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    task = instantiate(cfg.task, model=to_plain(cfg.model), data_info=datamodule.data_info)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    single = trainer.validate(task, datamodule=datamodule, ckpt_path=str(run / "checkpoints" / "last.ckpt"),
                              weights_only=True)[0]
    assert ddp["val/mAR_100"] > 0  # something to compare: a wrong image count would change it
    for k in keys:  # CSV holds 6+ significant digits; the same detections give the same COCO numbers
        assert ddp[k] == pytest.approx(single[k], abs=1e-6), (k, ddp, single)


# ---------------------------------------------------------------------------------------------
# reliability: exact resume, interruptions, divergence
# ---------------------------------------------------------------------------------------------

EXACT = ["data.num_train=8", "logger=none", "test=false", "trainer.limit_val_batches=1", "trainer.precision=32-true",
         "model.dropout=0.1", "callbacks.visualizer=null"]


def _weights(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel())


@pytest.mark.slow
def test_resume_at_epoch_end_is_exact(make_cfg, tmp_path):
    """2 epochs straight == 1 epoch + resume for 1 (data order, flips, dropout RNG, AdamW, LR schedule)."""
    out = tmp_path / "outputs" / "detection"
    train(make_cfg(*EXACT, "trainer.max_epochs=2", run="straight"))
    train(make_cfg(*EXACT, "trainer.max_epochs=1", run="half"))
    half = torch.load(out / "half/checkpoints/last.ckpt", weights_only=True)
    assert half["global_step"] == 2 and "rng" in half["callbacks"]["RunGuard"]
    train(make_cfg(*EXACT, "trainer.max_epochs=2", f"ckpt_path={out / 'half/checkpoints/last.ckpt'}", run="resumed"))
    straight, resumed = _weights(out / "straight/checkpoints/last.ckpt"), _weights(out / "resumed/checkpoints/last.ckpt")
    assert _max_diff(straight, resumed) <= 1e-6
    # and the check can fail: one epoch less is far away
    assert _max_diff(straight, _weights(out / "half/checkpoints/last.ckpt")) > 1e-3


@pytest.mark.slow
def test_sigterm_mid_run_saves_and_resume_is_exact(make_cfg, tmp_path, cache_dir):
    """SIGTERM to a real `python train.py`: it saves after the current step, exits 143 printing the resume
    command; resuming from that (mid-epoch) checkpoint ends with the same weights as an uninterrupted run."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import TINY_DATA, TINY_MODEL

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "outputs" / "detection"
    common = [*EXACT, "trainer.max_epochs=3"]  # 2 steps per epoch, 6 in all
    cmd = [sys.executable, "train.py", *TINY_MODEL, *TINY_DATA, *common, f"paths.log_dir={tmp_path / 'outputs'}",
           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={out / 'killed'}", "callbacks.progress_bar.refresh_rate=0"]
    env = {**os.environ, "WANDB_MODE": "offline"}  # same thread count as this process: same float sums
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = out / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:  # end of epoch 0 (step 2)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    ckpt = torch.load(last, weights_only=True)
    assert 2 < ckpt["global_step"] < 6, ckpt["global_step"]
    assert f"ckpt_path={last}" in output and "resume with: python train.py" in output
    assert not [p for p in last.parent.iterdir() if ".tmp-" in p.name]  # the atomic write left nothing behind

    train(make_cfg(*common, f"ckpt_path={last}", run="resumed"))
    train(make_cfg(*common, run="straight"))
    resumed = torch.load(out / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    assert _max_diff(_weights(out / "straight/checkpoints/last.ckpt"), resumed["state_dict"]) <= 1e-6


@pytest.mark.slow
def test_diverging_run_stops_without_overwriting_checkpoints(make_cfg, tmp_path):
    from train import TrainingDiverged

    folder = tmp_path / "outputs" / "detection" / "same" / "checkpoints"
    train(make_cfg(*EXACT, "trainer.max_epochs=1", run="same"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # a genuinely diverging run (lr 1e30) writing into the same folder
    with pytest.raises(TrainingDiverged, match=r"global step \d+.*Last good checkpoint: .*last\.ckpt") as err:
        train(make_cfg(*EXACT, "trainer.max_epochs=3", "task.lr=1e30", "task.lr_backbone=1e30",
                       "task.warmup_steps=0", run="same"))
    print(err.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_truncated_checkpoint_is_explained(make_cfg, tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "mtdetr": {"task": "detection"}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy interrupted half way
    with pytest.raises(ConfigError, match=r"cut\.ckpt.*is not a readable checkpoint.*truncated"):
        train(make_cfg(f"ckpt_path={path}", "logger=none"))


def test_only_rank_zero_keeps_hydra_files():
    from train import quiet_other_ranks

    argv = ["train.py", "task=detection"]
    assert quiet_other_ranks(argv, {}) == argv
    assert quiet_other_ranks(argv, {"RANK": "0"}) == argv
    for env in ({"RANK": "3"}, {"SLURM_PROCID": "1"}):
        assert quiet_other_ranks(argv, env)[-2:] == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    lightning_child = [*argv, "hydra.output_subdir=.pl_hydra_rank_1"]
    assert quiet_other_ranks(lightning_child, {"RANK": "1"}) == lightning_child


@pytest.mark.slow
def test_detr_original_recipes_verbatim_and_fair(make_cfg):
    """`experiment=detr_original_shapes` is DETR's recipe verbatim (frozen BN, stem and layer1 frozen, trunk
    LR 1e-5: settings for ImageNet weights); `detr_original_shapes_fair` differs from it only where a trunk
    trained from scratch needs it: BatchNorm trains, the whole trunk trains, at the LR of the rest."""
    from hydra.utils import instantiate
    from torch import nn

    from tasks.runtime import to_plain

    info = {"num_classes": 3, "class_names": ["circle", "square", "triangle"], "category_ids": [1, 2, 3]}
    tasks, cfgs = {}, {}
    for name in ("detr_original_shapes", "detr_original_shapes_fair"):
        cfgs[name] = make_cfg(f"experiment={name}", "logger=none")
        tasks[name] = instantiate(cfgs[name].task, model=to_plain(cfgs[name].model), data_info=info)
    verbatim, fair = tasks["detr_original_shapes"], tasks["detr_original_shapes_fair"]
    changed = {("model", "frozen_bn"), ("model", "trainable_layers"), ("task", "lr_backbone")}
    for group in ("model", "task", "data", "trainer"):
        a, b = to_plain(cfgs["detr_original_shapes"][group]), to_plain(cfgs["detr_original_shapes_fair"][group])
        assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {k for g, k in changed if g == group}

    def lrs(task):
        return {g["name"]: g["lr"] for g in task.param_groups()}

    trunk = dict(verbatim.model.adapter.body.named_parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in verbatim.model.adapter.body.modules())
    assert not any(p.requires_grad for n, p in trunk.items() if n.startswith(("0.", "4.")))  # conv1, layer1
    assert lrs(verbatim) == {"main": 1e-4, "backbone": 1e-5}
    body = fair.model.adapter.body
    assert all(p.requires_grad for p in body.parameters())
    assert sum(isinstance(m, nn.BatchNorm2d) and m.weight.requires_grad for m in body.modules()) == 20  # ResNet-18
    assert lrs(fair) == {"main": 1e-4, "backbone": 1e-4}


@pytest.mark.parametrize("data", ["shapes", "coco", "voc", "yolo", "coco128"])
def test_photos_get_the_photo_recipe(make_cfg, data):
    """task=detection with a photo data source composes configs/photo_recipe/<data>.yaml: from scratch a
    half-width trunk, one encoder and six decoder layers, five denoising groups and the fitted warm-up; the
    synthetic shapes keep the full trunk, three encoder and three decoder layers, no denoising and their
    warm-up."""
    photos = data != "shapes"
    cfg = make_cfg("task=detection", f"data={data}", *(["data.root=/photos"] if photos else []), tiny=False)
    assert cfg.model.trunk_width == (0.5 if photos else 1.0) and cfg.task.fit_warmup == photos
    assert cfg.model.num_encoder_layers == (1 if photos else 3) and cfg.model.num_decoder_layers == (6 if photos else 3)
    assert cfg.model.dn_groups == (5 if photos else 0)
    assert cfg.task.enc_matches == 1 and cfg.model.encoder_stride is None and cfg.data.get("mosaic", 0) == 0
    assert cfg.task.class_loss == "focal" and cfg.task.warmup_steps == 100  # the rest of the settings stay


@pytest.mark.parametrize("experiment", ["detr_r50_coco", "dino_r50_coco"])
def test_the_r50_experiments_restate_what_the_photo_recipe_changes(make_cfg, experiment):
    """The DETR-R50 / DINO-R50 experiments read photos, so the photo recipe composes under them: each
    restates the paper's trunk and layers, and only DINO's keeps denoising (the original DETR has none)."""
    cfg = make_cfg("task=detection", f"experiment={experiment}", "data.root=/coco",
                   "model.pretrained_backbone=IMAGENET1K_V1", tiny=False)
    assert cfg.model.trunk_width == 1.0
    assert (cfg.model.num_encoder_layers, cfg.model.num_decoder_layers) == (6, 6)
    assert cfg.model.dn_groups == (5 if experiment == "dino_r50_coco" else 0)


@pytest.mark.parametrize("weights", ["model.pretrained_backbone=IMAGENET1K_V1", "model.init_from=/w/detr.ckpt"])
def test_the_photo_recipe_leaves_the_trunk_width_to_pretrained_weights(make_cfg, weights):
    """With trunk or whole-model weights the recipe states no width (null): the weights' own (full) width
    is built, not a half-width trunk that the weights could not fill."""
    cfg = make_cfg("task=detection", "data=coco", "data.root=/photos", weights, tiny=False)
    assert cfg.model.trunk_width is None
    assert cfg.model.num_encoder_layers == (None if "init_from" in weights else 1)  # the source's own count
    assert cfg.model.num_decoder_layers == (None if "init_from" in weights else 6)
    assert cfg.model.dn_groups == (0 if "init_from" in weights else 5)  # no label embedding in DETR's weights
    explicit = make_cfg("task=detection", "data=coco", "data.root=/photos", weights, "model.trunk_width=1", tiny=False)
    assert explicit.model.trunk_width == 1
