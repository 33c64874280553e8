"""Evaluation pictures: precision-recall curves (from COCOeval) and a detection confusion matrix.

matplotlib is an optional dependency (``pip install mtdetr[eval]``); without it the pictures are left
out with a warning and everything else is still written.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

log = logging.getLogger("mtdetr")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: pr_curve.png and confusion_matrix.png are not written "
                      "(pip install matplotlib)", stacklevel=3)
        return None
    return plt


def pr_curves(evaluation: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall points ``[R]``, precision ``[K, R]`` per class at IoU 0.5, all areas, 100 detections, NaN
    where a class has no ground truth; the mean over classes ``[R]``)."""
    ev = evaluation.evaluator
    precision = ev.eval["precision"][0, :, :, 0, -1].T.astype(float)  # [K, R]
    precision[precision < 0] = np.nan
    defined = ~np.isnan(precision).all(1)
    mean = np.nanmean(precision[defined], 0) if defined.any() else np.zeros(precision.shape[1])
    return np.asarray(ev.params.recThrs), precision, mean


def plot_pr_curve(evaluation: Any, class_names: dict[int, str], path: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    recall, precision, mean = pr_curves(evaluation)
    fig, ax = plt.subplots(figsize=(7, 6))
    for k, cat_id in enumerate(evaluation.evaluator.params.catIds):
        if not np.isnan(precision[k]).all():
            ax.plot(recall, precision[k], linewidth=1, alpha=0.6, label=class_names.get(cat_id, str(cat_id)))
    ax.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes (AP50 {np.mean(mean):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall at IoU 0.5")
    handles = ax.get_legend_handles_labels()[0]
    if len(handles) <= 21:
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(gt: Any, detections: Sequence[dict], image_ids: Sequence[int], cat_ids: Sequence[int],
                     score_threshold: float = 0.5, iou_threshold: float = 0.5) -> np.ndarray:
    """``[K+1, K+1]`` counts, rows = true class, columns = predicted class, index K = background: a
    detection (score >= ``score_threshold``) and a non-crowd ground-truth box are paired greedily by
    IoU >= ``iou_threshold`` regardless of class; an unpaired box counts as (class, background), an
    unpaired detection as (background, class)."""
    index = {c: i for i, c in enumerate(cat_ids)}
    k = len(cat_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        if d["score"] >= score_threshold:
            by_image.setdefault(int(d["image_id"]), []).append(d)
    for image_id in image_ids:
        truths = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        dets = by_image.get(int(image_id), [])
        t_boxes, d_boxes = _xyxy([a["bbox"] for a in truths]), _xyxy([d["bbox"] for d in dets])
        iou = box_iou(t_boxes, d_boxes) if len(truths) and len(dets) else torch.zeros(len(truths), len(dets))
        used_t, used_d = set(), set()
        for flat in torch.argsort(iou.flatten(), descending=True).tolist():
            i, j = divmod(flat, max(len(dets), 1))
            if iou[i, j] < iou_threshold:
                break
            if i not in used_t and j not in used_d:
                used_t.add(i), used_d.add(j)
                matrix[index[truths[i]["category_id"]], index[dets[j]["category_id"]]] += 1
        for i, a in enumerate(truths):
            if i not in used_t:
                matrix[index[a["category_id"]], k] += 1
        for j, d in enumerate(dets):
            if j not in used_d:
                matrix[k, index[d["category_id"]]] += 1
    return matrix


def _xyxy(boxes: list) -> torch.Tensor:
    b = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def plot_confusion_matrix(gt: Any, detections: Sequence[dict], image_ids: Sequence[int], class_names: dict[int, str],
                          score_threshold: float, path: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    cat_ids = sorted(class_names)
    matrix = confusion_matrix(gt, detections, image_ids, cat_ids, score_threshold)
    labels = [class_names[c] for c in cat_ids] + ["background"]
    size = max(5.0, 0.35 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix (IoU 0.5, score >= {score_threshold})")
    if len(labels) <= 15:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
