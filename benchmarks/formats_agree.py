"""Check that ``data=voc`` and ``data=coco`` load the same boxes from the raccoon dataset.

The raccoon folder (``../shared/data/raccoon``, see its README) holds the same boxes twice: COCO JSON
(``train.json`` / ``val.json``) and the original Pascal VOC XML (``voc/Annotations``, split lists in
``voc/ImageSets/Main``). This script loads both through their data modules and compares, per split:

1. the COCO views (what evaluation uses): the same image files, widths and heights, and per image
   the same boxes (matched after sorting) with the same class names, ``iscrowd`` and ``area``;
2. the samples the model sees (validation transforms at the given scale): the same image tensors
   and the same normalised target boxes and labels.

    PYTHONPATH=. .venv/bin/python benchmarks/formats_agree.py [--root ../shared/data/raccoon] [--scale 512]

Prints a JSON summary (images and boxes compared, largest coordinate difference) and exits 1 on a
disagreement. VOC coordinates map as ``x = xmin, w = xmax - xmin`` (see ``datamodules/voc.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import emit_json  # noqa: E402
from datamodules.coco import CocoDataModule  # noqa: E402
from datamodules.voc import VocDataModule  # noqa: E402

TOLERANCE_PX = 1e-6  # box coordinates (pixels) must agree to this; areas to this relative amount


def boxes_by_file(data: dict) -> dict[str, tuple[tuple[int, int], list[tuple]]]:
    """file_name -> ((width, height), sorted [(class name, x, y, w, h, area, iscrowd)])."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    out = {im["file_name"]: ((im["width"], im["height"]), []) for im in data["images"]}
    for a in data["annotations"]:
        out[files[a["image_id"]]][1].append((names[a["category_id"]], *map(float, a["bbox"]), float(a["area"]),
                                             int(a.get("iscrowd", 0))))
    return {f: (size, sorted(boxes)) for f, (size, boxes) in out.items()}


def compare_views(coco: dict, voc: dict) -> tuple[list[str], int, int, float]:
    """(problems, images, boxes, largest |difference| of a box coordinate in pixels)."""
    a, b = boxes_by_file(coco), boxes_by_file(voc)
    problems = [] if a.keys() == b.keys() else [f"image sets differ: {sorted(a.keys() ^ b.keys())[:5]}"]
    n_boxes, max_diff = 0, 0.0
    for f in sorted(a.keys() & b.keys()):
        (size_a, boxes_a), (size_b, boxes_b) = a[f], b[f]
        if size_a != size_b:
            problems.append(f"{f}: size {size_a} vs {size_b}")
        if len(boxes_a) != len(boxes_b) or [x[0] for x in boxes_a] != [x[0] for x in boxes_b] \
                or [x[6] for x in boxes_a] != [x[6] for x in boxes_b]:
            problems.append(f"{f}: boxes {boxes_a} vs {boxes_b}")
            continue
        for ba, bb in zip(boxes_a, boxes_b, strict=True):
            diff = max(abs(p - q) for p, q in zip(ba[1:5], bb[1:5], strict=True))
            if diff > TOLERANCE_PX or abs(ba[5] - bb[5]) > TOLERANCE_PX * max(ba[5], 1.0):
                problems.append(f"{f}: box {ba} vs {bb}")
            max_diff = max(max_diff, diff)
        n_boxes += len(boxes_a)
    return problems, len(a.keys() & b.keys()), n_boxes, max_diff


def compare_samples(coco_ds, voc_ds) -> tuple[list[str], int, float]:
    """(problems, samples, largest |difference| of a normalised target box coordinate)."""
    index = {coco_ds.coco.imgs[i]["file_name"]: k for k, i in enumerate(coco_ds.ids)}
    problems, max_diff = [], 0.0
    for k, image_id in enumerate(voc_ds.ids):
        name = voc_ds.coco.imgs[image_id]["file_name"]
        img_a, t_a = coco_ds[index[name]]
        img_b, t_b = voc_ds[k]
        if not torch.equal(img_a, img_b):
            problems.append(f"{name}: image tensors differ")
        order_a, order_b = t_a["boxes"][:, 0].argsort(), t_b["boxes"][:, 0].argsort()
        if t_a["boxes"].shape != t_b["boxes"].shape or not torch.equal(t_a["labels"][order_a], t_b["labels"][order_b]):
            problems.append(f"{name}: targets differ")
            continue
        if len(order_a):
            diff = float((t_a["boxes"][order_a] - t_b["boxes"][order_b]).abs().max())
            if diff > 1e-6:  # float32 targets in [0, 1]
                problems.append(f"{name}: target boxes differ by {diff}")
            max_diff = max(max_diff, diff)
    return problems, len(voc_ds), max_diff


def eval_dataset(dm: CocoDataModule, split: str):
    """The split's dataset with the deterministic validation transforms (no random flip or scale)."""
    data = getattr(dm, f"{split}_dataset").coco.dataset
    return dm._build(getattr(dm, f"{split}_json"), train=False, train_data=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "raccoon")
    parser.add_argument("--scale", type=int, default=512, help="validation shortest side for the sample check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = {"train_scales": [args.scale], "val_scale": args.scale, "max_size": 2 * args.scale, "num_workers": 0}
    coco = CocoDataModule(str(args.root), **sizes)
    voc = VocDataModule(str(args.root / "voc"), images_dir="../images", **sizes)
    coco.setup("fit")
    voc.setup("fit")
    doc: dict = {"root": str(args.root), "scale": args.scale, "class_names": voc.data_info["class_names"]}
    problems: list[str] = []
    for split in ("train", "val"):
        coco_data = getattr(coco, f"{split}_dataset").coco.dataset
        voc_data = getattr(voc, f"{split}_dataset").coco.dataset
        p1, n_images, n_boxes, view_diff = compare_views(coco_data, voc_data)
        p2, n_samples, sample_diff = compare_samples(eval_dataset(coco, split), eval_dataset(voc, split))
        problems += p1 + p2
        doc[split] = {"images": n_images, "boxes": n_boxes, "max_box_diff_px": view_diff,
                      "samples": n_samples, "max_target_diff_normalised": sample_diff}
    doc["agree"] = not problems
    doc["problems"] = problems[:20]
    emit_json(doc, args.out)
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
