"""Check that ``data=voc`` (and ``data=yolo``) load the same boxes as ``data=coco`` from the raccoon dataset.

The raccoon folder (``../shared/data/raccoon``, see its README) holds the same boxes twice: COCO JSON
(``train.json`` / ``val.json``) and the original Pascal VOC XML (``voc/Annotations``, split lists in
``voc/ImageSets/Main``). This script loads both through their data modules and compares, per split:

1. the COCO views (what evaluation uses): the same image files, widths and heights, and per image
   the same boxes (matched after sorting) with the same class names, ``iscrowd`` and ``area``;
2. the samples the model sees (validation transforms at the given scale): the same image tensors
   and the same normalised target boxes and labels.

raccoon has no YOLO labels, so the script also writes a YOLO copy of the COCO JSON into a temporary
folder (labels ``class cx cy w h`` with 6 decimals, as Ultralytics writes them; images linked) and
compares ``data=yolo`` on it the same way, with a tolerance for that rounding.

    PYTHONPATH=. .venv/bin/python benchmarks/formats_agree.py [--root ../shared/data/raccoon] [--scale 512]

Prints a JSON summary (images and boxes compared, largest coordinate difference) and exits 1 on a
disagreement. VOC coordinates map as ``x = xmin, w = xmax - xmin`` (see ``datamodules/voc.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import emit_json  # noqa: E402
from datamodules.coco import CocoDataModule  # noqa: E402
from datamodules.voc import VocDataModule  # noqa: E402
from datamodules.yolo import YoloDataModule  # noqa: E402

TOLERANCE_PX = 1e-6  # VOC vs COCO: box coordinates (pixels) must agree to this
YOLO_TOLERANCE_PX = 0.01  # YOLO copy: 6-decimal fractions of images up to ~2,000 px are within 0.002 px


def boxes_by_file(data: dict) -> dict[str, tuple[tuple[int, int], list[tuple]]]:
    """file_name -> ((width, height), sorted [(class name, x, y, w, h, area, iscrowd)])."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    files = {i: Path(f).name for i, f in files.items()}  # YOLO's file names include the split folder
    out = {f: ((im["width"], im["height"]), []) for im in data["images"] for f in [files[im["id"]]]}
    for a in data["annotations"]:
        out[files[a["image_id"]]][1].append((names[a["category_id"]], *map(float, a["bbox"]), float(a["area"]),
                                             int(a.get("iscrowd", 0))))
    return {f: (size, sorted(boxes)) for f, (size, boxes) in out.items()}


def compare_views(coco: dict, other: dict, tolerance: float) -> tuple[list[str], int, int, float]:
    """(problems, images, boxes, largest |difference| of a box coordinate in pixels)."""
    a, b = boxes_by_file(coco), boxes_by_file(other)
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
            if diff > tolerance or abs(ba[5] - bb[5]) > tolerance * (ba[3] + ba[4] + tolerance):
                problems.append(f"{f}: box {ba} vs {bb}")
            max_diff = max(max_diff, diff)
        n_boxes += len(boxes_a)
    return problems, len(a.keys() & b.keys()), n_boxes, max_diff


def compare_samples(coco_ds, other_ds, tolerance: float) -> tuple[list[str], int, float]:
    """(problems, samples, largest |difference| of a normalised target box coordinate)."""
    index = {coco_ds.coco.imgs[i]["file_name"]: k for k, i in enumerate(coco_ds.ids)}
    problems, max_diff = [], 0.0
    for k, image_id in enumerate(other_ds.ids):
        name = Path(other_ds.coco.imgs[image_id]["file_name"]).name
        img_a, t_a = coco_ds[index[name]]
        img_b, t_b = other_ds[k]
        if not torch.equal(img_a, img_b):
            problems.append(f"{name}: image tensors differ")
        order_a, order_b = t_a["boxes"][:, 0].argsort(), t_b["boxes"][:, 0].argsort()
        if t_a["boxes"].shape != t_b["boxes"].shape or not torch.equal(t_a["labels"][order_a], t_b["labels"][order_b]):
            problems.append(f"{name}: targets differ")
            continue
        if len(order_a):
            diff = float((t_a["boxes"][order_a] - t_b["boxes"][order_b]).abs().max())
            if diff > tolerance:
                problems.append(f"{name}: target boxes differ by {diff}")
            max_diff = max(max_diff, diff)
    return problems, len(other_ds), max_diff


def eval_dataset(dm: CocoDataModule, split: str):
    """The split's dataset with the deterministic validation transforms (no random flip or scale)."""
    data = getattr(dm, f"{split}_dataset").coco.dataset
    return dm._build(getattr(dm, f"{split}_json"), train=False, train_data=data)


def write_yolo_copy(root: Path, out: Path) -> Path:
    """A YOLO folder with raccoon's COCO boxes: ``data.yaml``, ``images/<split>/`` (links), ``labels/<split>/``."""
    names = None
    for split in ("train", "val"):
        data = json.loads((root / f"{split}.json").read_text())
        cats = sorted(data["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        label = {c["id"]: i for i, c in enumerate(cats)}
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        lines: dict[int, list[str]] = {im["id"]: [] for im in data["images"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        for a in data["annotations"]:
            (x, y, w, h), (iw, ih) = a["bbox"], sizes[a["image_id"]]
            lines[a["image_id"]].append(f"{label[a['category_id']]} {(x + w / 2) / iw:.6f} {(y + h / 2) / ih:.6f} "
                                        f"{w / iw:.6f} {h / ih:.6f}")
        for im in data["images"]:
            (out / "images" / split / im["file_name"]).symlink_to(root / "images" / im["file_name"])
            stem = Path(im["file_name"]).stem
            (out / "labels" / split / f"{stem}.txt").write_text("".join(line + "\n" for line in lines[im["id"]]))
    (out / "data.yaml").write_text(f"train: images/train\nval: images/val\nnames: {json.dumps(names)}\n")
    return out


def compare(coco: CocoDataModule, other: CocoDataModule, tolerance_px: float, tolerance_target: float,
            doc: dict, name: str) -> list[str]:
    """Compare both splits of ``other`` with ``coco``; add the counts to ``doc[split][name]``."""
    problems = []
    for split in ("train", "val"):
        coco_data = getattr(coco, f"{split}_dataset").coco.dataset
        other_data = getattr(other, f"{split}_dataset").coco.dataset
        p1, n_images, n_boxes, view_diff = compare_views(coco_data, other_data, tolerance_px)
        p2, n_samples, sample_diff = compare_samples(eval_dataset(coco, split), eval_dataset(other, split),
                                                     tolerance_target)
        problems += [f"{name}: {p}" for p in p1 + p2]
        doc.setdefault(split, {})[name] = {"images": n_images, "boxes": n_boxes, "max_box_diff_px": view_diff,
                                           "samples": n_samples, "max_target_diff_normalised": sample_diff}
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT.parent / "shared" / "data" / "raccoon")
    parser.add_argument("--scale", type=int, default=512, help="validation shortest side for the sample check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = {"train_scales": [args.scale], "val_scale": args.scale, "max_size": 2 * args.scale, "num_workers": 0}
    coco = CocoDataModule(root=str(args.root), **sizes)
    voc = VocDataModule(root=str(args.root / "voc"), images_dir="../images", **sizes)
    doc: dict = {"root": str(args.root), "scale": args.scale}
    with tempfile.TemporaryDirectory() as tmp:
        yolo = YoloDataModule(root=str(write_yolo_copy(args.root.resolve(), Path(tmp))), **sizes)
        for dm in (coco, voc, yolo):
            dm.setup("fit")
        doc["class_names"] = {"coco": coco.data_info["class_names"], "voc": voc.data_info["class_names"],
                              "yolo": yolo.data_info["class_names"]}
        problems = compare(coco, voc, TOLERANCE_PX, 1e-6, doc, "voc")  # float32 targets in [0, 1]
        problems += compare(coco, yolo, YOLO_TOLERANCE_PX, 1e-5, doc, "yolo")
    if not doc["class_names"]["coco"] == doc["class_names"]["voc"] == doc["class_names"]["yolo"]:
        problems.append(f"class names differ: {doc['class_names']}")
    doc["agree"] = not problems
    doc["problems"] = problems[:20]
    emit_json(doc, args.out)
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
