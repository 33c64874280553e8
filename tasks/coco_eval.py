"""Official COCO box AP: pycocotools ``COCOeval`` against the ground-truth COCO dict itself.

Crowd annotations (``iscrowd=1``) are ignore regions and small/medium/large use the annotation's
``area``, exactly as the COCO server does. Used by training's ``val/mAP`` / ``test/mAP``
(``tasks.metrics.CocoDetectionMetric``) and by ``eval.py``, so both give the same numbers as running
``COCOeval`` by hand on the written ``detections.json``.

A detection is a COCO result dict ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in
original-image pixels and the file's own ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from datamodules.coco import coco_from_dict

# COCOeval.stats order
STAT_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
             "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def ground_truth_coco(data: dict[str, Any] | COCO) -> COCO:
    """A pycocotools index over a COCO detection dict (or an existing index), with the fields COCOeval
    needs filled in where the file leaves them out: ``area`` = box w*h, ``iscrowd`` = 0, ``id`` = a
    fresh unique number. The caller's dict is not modified."""
    dataset = data.dataset if isinstance(data, COCO) else data
    anns = dataset.get("annotations", [])
    complete = all("area" in a and "iscrowd" in a and a.get("id") is not None for a in anns)
    if isinstance(data, COCO) and complete:
        return data
    fixed = dict(dataset)
    used = {a["id"] for a in anns if a.get("id") is not None}
    next_id = max((i for i in used if isinstance(i, int)), default=0) + 1
    fixed["annotations"] = []
    for a in anns:
        a = dict(a)
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
        a.setdefault("iscrowd", 0)
        if a.get("id") is None:
            a["id"], next_id = next_id, next_id + 1
        fixed["annotations"].append(a)
    return coco_from_dict(fixed)


def results_coco(gt: COCO, detections: Sequence[dict[str, Any]]) -> COCO:
    """``COCO.loadRes`` for boxes, without its prints and also for an empty result list."""
    anns = []
    for i, d in enumerate(detections, start=1):
        x, y, w, h = (float(v) for v in d["bbox"])
        anns.append({"id": i, "image_id": d["image_id"], "category_id": d["category_id"], "bbox": [x, y, w, h],
                     "score": float(d["score"]), "area": w * h, "iscrowd": 0})
    return coco_from_dict({"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                   "annotations": anns})


@dataclass
class CocoEvaluation:
    """The 12 COCOeval stats (``STAT_KEYS``, fractions; -1 = undefined) and the evaluator itself
    (``evaluator.eval["precision"]`` ``[T=10 IoUs, R=101 recalls, K classes, A=4 areas, M=3 max dets]``)."""

    stats: dict[str, float]
    evaluator: COCOeval


def evaluate_detections(gt: COCO, detections: Sequence[dict[str, Any]],
                        image_ids: Sequence[int] | None = None) -> CocoEvaluation:
    """COCOeval (bbox) of ``detections`` on the images ``image_ids`` (default: every image of ``gt``)."""
    known = set(gt.getImgIds())
    ids = sorted(known if image_ids is None else {int(i) for i in image_ids})
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in the ground truth")
    evaluator = COCOeval(gt, results_coco(gt, detections), iouType="bbox")
    evaluator.params.imgIds = ids
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return CocoEvaluation(dict(zip(STAT_KEYS, (float(s) for s in evaluator.stats))), evaluator)


def _mean_defined(values: np.ndarray) -> float:
    values = values[values > -1]
    return float(values.mean()) if values.size else -1.0


def per_class_rows(evaluation: CocoEvaluation, class_names: dict[int, str]) -> list[dict[str, Any]]:
    """One row per category: ``class, images, boxes`` (non-crowd ground truth on the evaluated images),
    ``AP, AP50, AP75, AR100`` (all areas; -1 where the class has no ground truth there)."""
    ev = evaluation.evaluator
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    img_ids = set(ev.params.imgIds)
    rows = []
    for k, cat_id in enumerate(ev.params.catIds):
        anns = [a for a in ev.cocoGt.loadAnns(ev.cocoGt.getAnnIds(catIds=[cat_id]))
                if a["image_id"] in img_ids and not a.get("iscrowd", 0)]
        p = precision[:, :, k, 0, -1]
        rows.append({
            "class": class_names.get(cat_id, str(cat_id)),
            "images": len({a["image_id"] for a in anns}),
            "boxes": len(anns),
            "AP": _mean_defined(p),
            "AP50": _mean_defined(p[0]),
            "AP75": _mean_defined(p[5]),
            "AR100": _mean_defined(recall[:, k, 0, -1]),
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-class rows as an aligned text table (AP numbers in %, '-' where undefined)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v < 0 else f"{100 * v:.1f}"
        return str(v)

    header = list(rows[0]) if rows else ["class", "images", "boxes", "AP", "AP50", "AP75", "AR100"]
    cells = [header] + [[fmt(r[h]) for h in header] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c)))
             for c in cells]
    return "\n".join(lines)
