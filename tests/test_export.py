"""export.py: the ONNX file runs in onnxruntime and gives PyTorch's float32 results on real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tasks.api import load
from tasks.detection import DetectionTask
from tasks.multilabel import MultiLabelTask
from tasks.runtime import ConfigError

onnx = pytest.importorskip("onnx", reason="the export extra: pip install -e '.[export]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "data" / "coco128" / "images").glob("*.jpg"))[:3]  # real photos of different sizes
CPU_DEFAULT = dict(backbone="resnet18", frozen_bn=False, trainable_layers=5, stride=16, d_model=32, nhead=4,
                   num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0, num_queries=8,
                   anchor_queries=True, box_refine=True, num_groups=2, two_stage=True)
INFO = {"num_classes": 3, "class_names": ["cat", "dog", "bird"], "category_ids": [3, 8, 9]}
PREP = {"val_scale": 96, "max_size": 128, "size_divisibility": 32}


def save(task, path: Path, name: str) -> Path:
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "mtdetr": {"task": name, "data": None, "metrics": {}, "preprocessing": PREP}}, path)
    return path


def export(tmp_path: Path, *overrides: str) -> Path:
    import export as script

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("export", overrides=[f"paths.output_dir={tmp_path / 'run'}", *overrides])
    return script.export(cfg)


def real_batch(predictor) -> dict:
    loaded, problems = predictor.load_images(IMAGES)
    assert not problems and len({pil.size for _, pil in loaded}) > 1
    return predictor._batch([pil for _, pil in loaded], predictor.transform())


@pytest.mark.parametrize("class_loss,model", [
    ("focal", CPU_DEFAULT), ("focal", {**CPU_DEFAULT, "trunk_width": 0.5, "encoder_stride": 32}),
    ("ce", {**CPU_DEFAULT, "anchor_queries": False, "box_refine": False, "num_groups": 1, "two_stage": False}),
], ids=["cpu-default", "photo-recipe", "original"])
@pytest.mark.slow
def test_detection_onnx_equals_pytorch_on_real_images(tmp_path, class_loss, model):
    torch.manual_seed(0)
    ckpt = save(DetectionTask(model=model, data_info=INFO, class_loss=class_loss, top_k=20), tmp_path / "d.ckpt",
                "detection")
    path = export(tmp_path, f"ckpt_path={ckpt}")
    assert path == tmp_path / "run" / "model.onnx"
    predictor = load(ckpt, device="cpu")
    batch = real_batch(predictor)  # a different size than the trace, images padded to the largest
    assert batch["pixel_mask"].any()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"images": batch["images"].numpy(),
                                               "pixel_mask": batch["pixel_mask"].numpy()})
    with torch.no_grad():
        out = predictor.task.model(batch["images"], batch["pixel_mask"])
    from modules.detr import postprocess

    for i, ref in enumerate(postprocess(out, batch["sizes"], top_k=20, class_loss=class_loss)):
        h, w = batch["sizes"][i].tolist()
        order = ref["scores"].argsort(descending=True)  # the graph gives the best first; postprocess may not
        ref = {k: v[order] for k, v in ref.items()}
        pixels = torch.from_numpy(boxes[i]) * torch.tensor([w, h, w, h])
        assert torch.equal(torch.from_numpy(labels[i]), ref["labels"])
        assert (torch.from_numpy(scores[i]) - ref["scores"]).abs().max() <= 1e-4
        assert (pixels / max(h, w) - ref["boxes"].clamp(min=0).minimum(torch.tensor([w, h, w, h])) / max(h, w)
                ).abs().max() <= 1e-4  # normalised-box error at most 1e-4 of the image
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["class_names"]) == ["cat", "dog", "bird"]
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and json.loads(meta["std"]) == [0.229, 0.224, 0.225]


@pytest.mark.slow
def test_raw_heads_and_fixed_size(tmp_path):
    torch.manual_seed(0)
    ckpt = save(DetectionTask(model=CPU_DEFAULT, data_info=INFO, class_loss="focal"), tmp_path / "d.ckpt", "detection")
    path = export(tmp_path, f"ckpt_path={ckpt}", "postprocess=false", "height=128", "width=96")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [tuple(i.shape) for i in session.get_inputs()] == [("batch", 3, 128, 96), ("batch", 128, 96)]
    assert session.get_inputs()[1].type == "tensor(bool)"
    images, mask = torch.randn(3, 3, 128, 96), torch.zeros(3, 128, 96, dtype=torch.bool)
    mask[2, :, 64:] = True
    logits, boxes = session.run(None, {"images": images.numpy(), "pixel_mask": mask.numpy()})
    with torch.no_grad():
        out = load(ckpt, device="cpu").task.model(images, mask)
    assert (torch.from_numpy(logits) - out["pred_logits"]).abs().max() <= 1e-4
    assert (torch.from_numpy(boxes) - out["pred_boxes"]).abs().max() <= 1e-4


@pytest.mark.slow
def test_multilabel_onnx_scores_equal_pytorch(tmp_path):
    torch.manual_seed(0)
    model = {k: v for k, v in CPU_DEFAULT.items() if k not in ("anchor_queries", "box_refine", "num_groups",
                                                              "two_stage", "num_queries")}
    task = MultiLabelTask(model=model, data_info=INFO)
    ckpt = save(task, tmp_path / "m.ckpt", "multilabel")
    path = export(tmp_path, f"ckpt_path={ckpt}")
    predictor = load(ckpt, device="cpu")
    batch = real_batch(predictor)
    (scores,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": batch["images"].numpy(), "pixel_mask": batch["pixel_mask"].numpy()})
    with torch.no_grad():
        ref, _ = predictor.task.predict(batch["images"], batch["pixel_mask"])
    assert scores.shape == (3, 3) and (torch.from_numpy(scores) - ref).abs().max() <= 1e-4


def test_unexportable_checkpoints_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    ckpt = save(DetectionTask(model=CPU_DEFAULT, data_info=INFO), tmp_path / "d.ckpt", "detection")
    for overrides, message in (([f"ckpt_path={ckpt}", "format=tflite"], "only export format is onnx"),
                               ([f"ckpt_path={ckpt}", "height=128"], "both height and width")):
        with pytest.raises(ConfigError, match=message) as info:
            export(tmp_path, *overrides)
        assert "\n" not in str(info.value)
