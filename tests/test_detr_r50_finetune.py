"""experiment=detr_r50_finetune: composes, reads a COCO-DETR-style source (a random, tiny Hugging Face
DETR written here: no network) and trains one fast_dev_run on the embedded shapes data; the
checkpointed settings rebuild the model without the source."""

from __future__ import annotations

import pytest
import torch

from tasks.detection import DetectionTask
from tests.conftest import TINY_DATA
from train import train

pytest.importorskip("transformers", reason="the hub extra: pip install -e '.[hub]'")
pytest.importorskip("timm", reason="the hub extra: pip install -e '.[hub]'")

TINY_HF = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=8, num_labels=91)


@pytest.mark.slow  # a training run (~35 s on 2 CPU cores)
def test_recipe_composes_with_detr_settings(make_cfg, tmp_path):
    from tests.modules.test_weights_hf import hf_detr

    hf_detr(tmp_path / "coco-detr", **TINY_HF)
    cfg = make_cfg("experiment=detr_r50_finetune", "trainer=cpu", f"model.init_from={tmp_path / 'coco-detr'}",
                   "trainer.fast_dev_run=true", "logger=csv", *TINY_DATA, tiny=False)
    assert cfg.model.init_from.endswith("coco-detr") and cfg.model.d_model is None and cfg.model.frozen_bn
    assert (cfg.task.lr, cfg.task.lr_backbone, cfg.task.class_loss, cfg.task.scheduler) == (1e-4, 1e-5, "ce", "step")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


@pytest.mark.slow
def test_checkpointed_settings_rebuild_without_the_source(tmp_path):
    from tests.modules.test_weights_hf import hf_detr

    hf_detr(tmp_path / "coco-detr", **TINY_HF)
    data_info = {"num_classes": 3, "class_names": ["a", "b", "c"], "category_ids": [1, 2, 3]}
    model = {"init_from": str(tmp_path / "coco-detr"), "d_model": None, "num_queries": None, "frozen_bn": True}
    task = DetectionTask(model=model, data_info=data_info).eval()
    saved = dict(task.hparams["model"])
    assert saved["d_model"] == 32 and saved["num_queries"] == 8 and saved["backbone"] == "resnet18"
    assert saved["init_from"] is None  # a checkpoint never reads the source again
    (tmp_path / "coco-detr" / "model.safetensors").unlink()  # the source is gone
    rebuilt = DetectionTask(model={**saved, "init_from": None}, data_info=data_info).eval()
    rebuilt.load_state_dict(task.state_dict())
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images, mask)["pred_boxes"], task(images, mask)["pred_boxes"])


@pytest.mark.slow  # two short training runs (~40 s on 2 CPU cores)
def test_resume_does_not_read_the_source_again(make_cfg, tmp_path):
    """A run started from init_from resumes from its checkpoint after the source is gone; the
    architecture taken from the source (settings left null) comes back from the checkpoint."""
    import shutil

    from tests.modules.test_weights_hf import hf_detr

    hf_detr(tmp_path / "coco-detr", **TINY_HF)
    common = ["model=detr_r50", f"model.init_from={tmp_path / 'coco-detr'}", "model.d_model=null", "model.nhead=null",
              "model.num_queries=null", "model.position_offset=null", "task.class_loss=ce", "logger=csv",
              "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false"]
    train(make_cfg(*common, "trainer.max_epochs=1", run="first"))
    shutil.rmtree(tmp_path / "coco-detr")
    last = tmp_path / "outputs/detection/first/checkpoints/last.ckpt"
    train(make_cfg(*common, "trainer.max_epochs=2", f"ckpt_path={last}", run="second"))
    second = torch.load(tmp_path / "outputs/detection/second/checkpoints/last.ckpt", weights_only=True)
    assert second["epoch"] == 1 and second["hyper_parameters"]["model"]["d_model"] == 32
