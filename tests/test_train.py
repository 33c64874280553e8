"""End-to-end runs of train.py's ``train()`` on the composed Hydra config (tiny sizes, CPU)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException

from tasks.runtime import ConfigError
from train import train


def test_fast_dev_run_detection(make_cfg):
    metrics = train(make_cfg("trainer.fast_dev_run=true", "logger=csv"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"val/mAP", "val/mAP_50", "val/mAP_75", "test/mAP"} <= set(metrics)


def test_run_writes_checkpoints_that_load_weights_only(make_cfg, tmp_path):
    cfg = make_cfg("logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    train(cfg)
    ckpt_dir = tmp_path / "outputs" / "detection" / "run1" / "checkpoints"
    names = sorted(os.listdir(ckpt_dir))
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert ckpt["mtdetr"]["task"] == "detection"
    assert ckpt["hyper_parameters"]["data_info"]["class_names"] == ["circle", "square", "triangle"]
    assert (tmp_path / "outputs" / "detection" / "run1" / "predictions" / "epoch000.png").is_file()


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



def test_ddp_cpu_two_processes(tmp_path):
    """`trainer=ddp_cpu`: two gloo processes train, validate and write one set of checkpoints."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", "trainer=ddp_cpu", "logger=csv", "trainer.max_epochs=1",
           "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.num_train=32", "data.num_val=8",
           "data.image_size=64", "data.batch_size=4", "model.d_model=32", "model.nhead=4", "model.num_encoder_layers=1",
           "model.num_decoder_layers=1", "model.dim_feedforward=64", "test=false", f"paths.log_dir={tmp_path}",
           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", "callbacks.progress_bar.refresh_rate=0"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "train_ddp_process_1.log").is_file()  # the second process really ran
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert proc.stdout.count("run folder:") + proc.stderr.count("run folder:") == 1  # rank 0 only
