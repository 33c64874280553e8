"""ONNX export of a trained image model (``export.py``).

The checkpoint's model is wrapped with its post-processing (``modules.export``) and traced in float32
and eval mode; the class names and the preprocessing (mean/std, scales) go into the file's metadata;
onnxruntime then runs the file on the trace's inputs and the largest difference from PyTorch is
reported. Translation is not exported: its decoder runs step by step in Python (see docs/use.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from modules.backbone import IMAGENET_MEAN, IMAGENET_STD
from modules.export import DetectorForExport, TaggerForExport

from .runtime import ConfigError

log = logging.getLogger("mtdetr")


def exportable(predictor, *, postprocess: bool = True, top_k: int | None = None) -> nn.Module:
    """The graph to export for a loaded checkpoint (``tasks.api.load``), in eval mode."""
    task, name = predictor.task, predictor.task_name
    if name == "detection":
        return DetectorForExport(detr=task.model, top_k=top_k or task.top_k, postprocess=postprocess).eval()
    if name == "multilabel" and not task.is_sequence:
        return TaggerForExport(model=task.model, postprocess=postprocess).eval()
    if name == "multilabel":
        raise ConfigError(f"{predictor.path}: a multi-label model with the sequence decoder decodes label by "
                          "label in Python; only the parallel decoder exports (use predict.py for this one).")
    raise ConfigError(f"{predictor.path} is a {name} checkpoint: export.py exports detection and multi-label "
                      "models; translate with predict.py or tasks.api.load(...).translate (see docs/use.md).")


def example_inputs(height: int | None, width: int | None, batch: int = 2) -> tuple[Tensor, Tensor]:
    """Trace inputs: ``batch`` images with the later ones partly padded. The padding matters: an
    encoder given a mask with no padding skips it, and a trace without padding would keep no mask."""
    h, w = height or 160, width or 192
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=generator)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    for i in range(1, batch):
        mask[i, :, w - w // 4:] = True
        mask[i, h - h // 4:, :] = True
    images[mask[:, None].expand_as(images)] = 0.0
    return images, mask


def onnx_metadata(predictor, module: nn.Module) -> dict[str, str]:
    prep = predictor.preprocessing
    meta = {
        "mtdetr_task": predictor.task_name,
        "class_names": json.dumps(predictor.class_names),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "inputs": "images float32 [B,3,H,W] normalised ((pixels/255 - mean) / std); "
                  "pixel_mask bool [B,H,W], True = padding",
        "outputs": ", ".join(module.output_names()),
        "preprocessing": json.dumps({k: prep[k] for k in ("val_scale", "max_size", "size_divisibility") if k in prep}),
        "source_checkpoint": str(predictor.path),
    }
    if isinstance(module, DetectorForExport) and module.postprocess:
        meta["boxes"] = "xyxy normalised to [0, 1] of each image's unpadded region; labels index class_names"
    return meta


def export_onnx(module: nn.Module, path: Path, inputs: tuple[Tensor, Tensor], *, dynamic_size: bool,
                opset: int, metadata: dict[str, str]) -> None:
    """Trace ``module`` on ``inputs`` into ``path`` (dynamic batch; dynamic H/W with ``dynamic_size``)."""
    try:
        import onnx
    except ImportError as e:
        raise ConfigError("ONNX export needs the export extra: pip install -e '.[export]'") from e
    size = {2: "height", 3: "width"} if dynamic_size else {}
    mask_size = {1: "height", 2: "width"} if dynamic_size else {}
    names = module.output_names()
    axes = {"images": {0: "batch", **size}, "pixel_mask": {0: "batch", **mask_size},
            **{n: {0: "batch"} for n in names}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module, inputs, str(path), input_names=["images", "pixel_mask"], output_names=names,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def run_onnx(path: Path, images: Tensor, pixel_mask: Tensor) -> list:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy(), "pixel_mask": pixel_mask.numpy()})


def max_difference(module: nn.Module, path: Path, images: Tensor, pixel_mask: Tensor) -> float:
    """Largest absolute difference between onnxruntime and PyTorch (float32, eval) over every output."""
    with torch.no_grad():
        ours = module(images, pixel_mask)
    ours = ours if isinstance(ours, tuple) else (ours,)
    theirs = run_onnx(path, images, pixel_mask)
    return max(float((torch.from_numpy(t).double() - o.double()).abs().max()) for o, t in zip(ours, theirs))
