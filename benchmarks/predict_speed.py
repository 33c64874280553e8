"""Prediction speed on CPU: images/s of eager float32, eager bf16 autocast and onnxruntime, side by side.

Random weights (speed does not depend on them) at the shipped model settings (``detr_small``: the
ResNet-18 stride-16 CPU default; ``detr_r50``: the paper's DETR-R50), real photos from
``data/coco128/images`` resized as the checkpoint's preprocessing says (``--scale``/``--max-size``),
batch ``--batch``. Each engine runs the same batches; the median of ``--repeat`` timed passes counts.

    PYTHONPATH=. .venv/bin/python benchmarks/predict_speed.py --models detr_small detr_r50 --scale 512 --max-size 853
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_model, emit_json  # noqa: E402
from tasks.api import Detector  # noqa: E402
from tasks.detection import DetectionTask  # noqa: E402
from tasks.export import export_onnx, exportable, onnx_metadata  # noqa: E402

INFO = {"num_classes": 80, "class_names": [f"c{i}" for i in range(80)], "category_ids": list(range(1, 81))}


def detector(model: str, scale: int, max_size: int) -> Detector:
    settings = yaml.safe_load((ROOT / "configs" / "model" / f"{model}.yaml").read_text())
    torch.manual_seed(0)
    class_loss = "focal" if settings.get("two_stage") or settings.get("anchor_queries") else "ce"
    task = DetectionTask(model=settings, data_info=INFO, class_loss=class_loss).eval()
    meta = {"task": "detection", "preprocessing": {"val_scale": scale, "max_size": max_size, "size_divisibility": 32}}
    return Detector(task, "detection", meta, torch.device("cpu"), "32", path=f"<random {model}>")


def batches(predictor: Detector, count: int, size: int) -> list[dict]:
    files = sorted((ROOT / "data" / "coco128" / "images").glob("*.jpg"))[: count * size]
    loaded, _ = predictor.load_images(files)
    pils = [pil for _, pil in loaded]
    return [predictor._batch(pils[i:i + size], predictor.transform()) for i in range(0, len(pils), size)]


def timed(run, data: list[dict], repeat: int) -> float:
    """Median images/s over ``repeat`` passes (after one warm-up pass)."""
    run(data[0])
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        for batch in data:
            run(batch)
        rates.append(sum(len(b["images"]) for b in data) / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(model: str, args) -> dict:
    predictor = detector(model, args.scale, args.max_size)
    data = batches(predictor, args.batches, args.batch)
    module = exportable(predictor)

    def eager(precision: torch.dtype | None):
        def run(batch):
            with torch.inference_mode(), torch.autocast("cpu", dtype=precision or torch.bfloat16,
                                                        enabled=precision is not None):
                module(batch["images"], batch["pixel_mask"])
        return run

    result = {"model": model, "fp32": timed(eager(None), data, args.repeat),
              "bf16": timed(eager(torch.bfloat16), data, args.repeat)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        example = (data[0]["images"], data[0]["pixel_mask"])
        export_onnx(module, path, example, dynamic_size=True, opset=17, metadata=onnx_metadata(predictor, module))
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        result["onnxruntime"] = timed(lambda b: session.run(None, {"images": b["images"].numpy(),
                                                                   "pixel_mask": b["pixel_mask"].numpy()}),
                                      data, args.repeat)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["detr_small", "detr_r50"])
    parser.add_argument("--scale", type=int, default=512)
    parser.add_argument("--max-size", type=int, default=853)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [measure(m, args) for m in args.models]
    emit_json({"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "settings": vars(args) | {"out": str(args.out) if args.out else None}, "images_per_s": rows}, args.out)


if __name__ == "__main__":
    main()
