"""What ``eval.py`` runs: a loaded checkpoint (``tasks.api``) over one split of a data module, writing
its numbers and files into a folder. One function per task; plots in ``tasks/plots.py``.

- detection: official COCO AP (``tasks.coco_eval``) -> ``detections.json``, ``metrics.json``,
  ``per_class.csv``, ``pr_curve.png``, ``confusion_matrix.png``;
- multi-label: per-class AP, mAP, CP/CR/CF1, OP/OR/OF1 -> ``metrics.json``, ``per_class.csv``,
  ``predictions.csv``;
- translation: sacreBLEU BLEU and chrF with signatures -> ``metrics.json``, ``hypotheses.txt``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from datamodules.coco import load_coco_json
from datamodules.errors import DataError

from .api import Predictor
from .coco_eval import format_table, per_class_rows
from .metrics import CocoDetectionMetric

log = logging.getLogger("mtdetr")


class ClassMismatch(DataError):
    """The evaluation data's classes are not the model's (matched by name)."""


def match_classes(model_names: Sequence[str], categories: Sequence[dict[str, Any]], where: str) -> list[dict]:
    """The data's categories in the model's label order, matched by name; ``ClassMismatch`` listing the
    missing and extra names when the two sets differ."""
    by_name = {str(c["name"]): c for c in categories}
    missing = [n for n in model_names if n not in by_name]
    extra = sorted(set(by_name) - set(model_names))
    if missing or extra or len(by_name) != len(categories):
        raise ClassMismatch(
            f"{where}: its classes do not match the model's (matched by name): missing {missing or 'none'}, "
            f"extra {extra or 'none'}. Evaluate on data with exactly the model's {len(model_names)} class names.")
    return [{"id": int(by_name[n]["id"]), "name": n} for n in model_names]


def fix_label_order(predictor: Predictor, datamodule: Any, split: str) -> None:
    """Give an image data module the model's classes (by name) so it never reads the train JSON."""
    json_path = getattr(datamodule, f"{split}_json", None)
    if json_path is None or not hasattr(datamodule, "use_categories"):
        return
    names = predictor.task.data_info["class_names"]
    read = getattr(datamodule, "_load_split_json", load_coco_json)  # VOC / YOLO: their in-memory COCO dict
    datamodule.use_categories(match_classes(names, read(json_path)["categories"], str(json_path)))


def split_dataset(datamodule: Any, split: str):
    datamodule.setup("validate" if split == "val" else "test")
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is None:
        raise DataError(f"the data module has no {split} split; use split=val or split=test.")
    return dataset, (datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader())


def _to(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``, nested tensors too (the detection targets are a list of dicts)."""
    from lightning.fabric.utilities import move_data_to_device

    return move_data_to_device(batch, device)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["class"])
        writer.writeheader()
        writer.writerows(rows)


# detection --------------------------------------------------------------------------------------------
def evaluate_detection(predictor: Predictor, datamodule: Any, split: str, out_dir: Path,
                       score_threshold: float = 0.5, progress: Any = None) -> dict[str, Any]:
    """COCOeval of the checkpoint on ``split``; writes the detection files; returns metrics and the
    per-class rows (``{"metrics": ..., "per_class": ..., "plots": [...]}``)."""
    from .coco_eval import ground_truth_coco
    from .plots import plot_confusion_matrix, plot_pr_curve

    fix_label_order(predictor, datamodule, split)
    dataset, loader = split_dataset(datamodule, split)
    names = predictor.task.data_info["class_names"]
    data_names = [dataset.coco.cats[c]["name"] for c in dataset.category_ids]
    if list(data_names) != list(names):
        match_classes(names, [dataset.coco.cats[c] for c in dataset.category_ids], f"the {split} split")
    task, metric = predictor.task, CocoDetectionMetric()
    category_ids = torch.as_tensor(dataset.category_ids, dtype=torch.int64)  # label -> this file's id
    for batch in loader:
        batch = _to(batch, predictor.device)
        with torch.inference_mode(), predictor.autocast():
            outputs = task(batch["images"], batch["pixel_mask"])
        task.update_coco(metric, outputs, batch["targets"], category_ids)
        if progress is not None:
            progress(len(batch["targets"]))
    metric.ground_truth = ground_truth_coco(dataset.coco)
    evaluation = metric.evaluation()
    detections = metric.coco_detections()
    (out_dir / "detections.json").write_text(json.dumps(detections))
    class_names = {int(c["id"]): str(c["name"]) for c in metric.ground_truth.dataset["categories"]}
    rows = per_class_rows(evaluation, class_names)
    write_csv(out_dir / "per_class.csv", rows)
    plots = [plot_pr_curve(evaluation, class_names, out_dir / "pr_curve.png"),
             plot_confusion_matrix(metric.ground_truth, detections, evaluation.evaluator.params.imgIds,
                                   class_names, score_threshold, out_dir / "confusion_matrix.png")]
    metrics = {**evaluation.stats, "images": len(evaluation.evaluator.params.imgIds), "detections": len(detections)}
    return {"metrics": metrics, "per_class": rows, "table": format_table(rows), "plots": [p for p in plots if p]}


# multi-label ------------------------------------------------------------------------------------------
def evaluate_multilabel(predictor: Predictor, datamodule: Any, split: str, out_dir: Path,
                        progress: Any = None) -> dict[str, Any]:
    """Per-class AP, mAP, CP/CR/CF1, OP/OR/OF1 at the task's threshold; ``predictions.csv``."""
    from torchmetrics.classification import MultilabelAveragePrecision

    from .multilabel import MultilabelScores

    fix_label_order(predictor, datamodule, split)
    dataset, loader = split_dataset(datamodule, split)
    task, names = predictor.task, predictor.task.data_info["class_names"]
    scores_metric = MultilabelScores(len(names))
    all_scores, all_pred, all_true = [], [], []
    for batch in loader:
        batch = _to(batch, predictor.device)
        with torch.inference_mode(), predictor.autocast():
            scores, predicted = task.predict(batch["images"], batch["pixel_mask"])
        scores, predicted, labels = scores.float().cpu(), predicted.cpu(), batch["labels"].cpu()
        scores_metric.update(scores, predicted, labels)
        all_scores.append(scores), all_pred.append(predicted), all_true.append(labels > 0.5)
        if progress is not None:
            progress(len(labels))
    scores, predicted, truth = torch.cat(all_scores), torch.cat(all_pred), torch.cat(all_true)
    ap = MultilabelAveragePrecision(num_labels=len(names), average="none")(scores, truth.long())
    summary = {k: float(v) for k, v in scores_metric.compute().items()}
    rows = [{"class": n, "images": int(truth[:, c].sum()), "AP": float(ap[c]) if truth[:, c].any() else -1.0}
            for c, n in enumerate(names)]
    write_csv(out_dir / "per_class.csv", rows)
    files = [str(e[0]) for e in getattr(dataset, "entries", [])] or [str(i) for i in range(len(truth))]
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "labels", "predicted", *[f"score_{n}" for n in names]])
        for i in range(len(truth)):
            writer.writerow([files[i], ";".join(n for c, n in enumerate(names) if truth[i, c]),
                             ";".join(n for c, n in enumerate(names) if predicted[i, c]),
                             *[f"{float(s):.4f}" for s in scores[i]]])
    return {"metrics": {**summary, "images": len(truth)}, "per_class": rows, "table": format_table(rows), "plots": []}


# translation ------------------------------------------------------------------------------------------
def evaluate_translation(predictor: Predictor, datamodule: Any, split: str, out_dir: Path,
                         decoding: dict | None = None, progress: Any = None) -> dict[str, Any]:
    """sacreBLEU BLEU and chrF (with signatures) of the decoded split; ``hypotheses.txt`` in file order."""
    from sacrebleu.metrics import BLEU, CHRF

    from modules.decoding import check_settings

    task = predictor.task
    settings = task.split_decoding(split, decoding)
    check_settings({**task.decoding, **settings}, "decoding")
    if hasattr(datamodule, "use_tokenizer"):
        datamodule.use_tokenizer(task.tokenizer)  # the checkpoint's: the train split is not read
    dataset, loader = split_dataset(datamodule, split)
    hyps: list[str | None] = [None] * len(dataset)
    for batch in loader:
        batch = _to(batch, predictor.device)
        with torch.inference_mode(), predictor.autocast():
            ids = task.translate_ids(batch["src"], batch["src_padding_mask"], **settings)
        for i, row in zip(batch["index"].tolist(), ids):
            hyps[i] = task.tokenizer.decode(row)
        if progress is not None:
            progress(len(ids))
    refs = list(dataset.tgt_text)
    (out_dir / "hypotheses.txt").write_text("".join(f"{h}\n" for h in hyps), encoding="utf-8")
    bleu, chrf = BLEU(), CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    metrics = {"BLEU": bleu_score.score, "chrF": chrf_score.score, "BLEU_signature": str(bleu.get_signature()),
               "chrF_signature": str(chrf.get_signature()), "sentences": len(hyps),
               "decoding": {**task.decoding, **settings}}
    return {"metrics": metrics, "per_class": [], "table": f"{bleu_score}\n{chrf_score}", "plots": []}
