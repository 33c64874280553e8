"""Official COCO AP (tasks/coco_eval.py, CocoDetectionMetric): equal to COCOeval run by hand on the
same ground-truth JSON, crowd regions ignored, sizes from the annotation area; DDP gathers like one process."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.detection import MeanAveragePrecision

from tasks.coco_eval import STAT_KEYS, evaluate_detections, ground_truth_coco, per_class_rows
from tasks.evaluation import ClassMismatch, _to, match_classes
from tasks.metrics import CocoDetectionMetric
from tasks.plots import confusion_matrix


def crowd_json() -> dict:
    """3 images, 2 classes; a crowd region on image 1 and mask-like areas (much smaller than w*h) that
    put the 40x40 boxes into 'small' (area < 32^2) while their boxes are 'medium'."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 150} for i in (1, 2, 3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 700.0, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [100, 20, 80, 100], "area": 6000.0, "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 9, "bbox": [30, 40, 60, 50], "area": 2500.0, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 5, "bbox": [120, 60, 40, 40], "area": 900.0, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 9, "bbox": [5, 5, 150, 120], "area": 15000.0, "iscrowd": 0},
    ]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}]}


def detections() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    truth = [(1, 5, [10, 10, 40, 40]), (2, 9, [30, 40, 60, 50]), (2, 5, [120, 60, 40, 40]), (3, 9, [5, 5, 150, 120])]
    dets = []
    for image_id, cat, (x, y, w, h) in truth:
        jitter = (torch.randn(4, generator=g) * 4).tolist()
        dets.append({"image_id": image_id, "category_id": cat, "bbox": [x + jitter[0], y + jitter[1], w + jitter[2],
                                                                          h + jitter[3]], "score": 0.9})
    # on the crowd region: ignored by COCO, a false positive if the crowd box were dropped
    dets += [{"image_id": 1, "category_id": 5, "bbox": [105, 25, 30, 40], "score": 0.95},
             {"image_id": 1, "category_id": 5, "bbox": [140, 70, 30, 40], "score": 0.93},
             {"image_id": 3, "category_id": 5, "bbox": [60, 60, 30, 30], "score": 0.5}]  # a real false positive
    return dets


def by_hand(gt_path, det_path) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(det_path)), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return dict(zip(STAT_KEYS, ev.stats.tolist()))


def fill_metric(metric: CocoDetectionMetric, data: dict, dets: list[dict]) -> None:
    """Feed the metric as DetectionTask does: per image its size, detections (xyxy) and non-crowd boxes."""
    for img in data["images"]:
        mine = [d for d in dets if d["image_id"] == img["id"]]
        gts = [a for a in data["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
        metric.update(torch.tensor([[img["id"], img["height"], img["width"]]]),
                      [{"boxes": torch.tensor([xyxy(d["bbox"]) for d in mine]).reshape(-1, 4),
                        "scores": torch.tensor([d["score"] for d in mine]),
                        "labels": torch.tensor([d["category_id"] for d in mine])}],
                      [{"boxes": torch.tensor([xyxy(a["bbox"]) for a in gts]).reshape(-1, 4),
                        "labels": torch.tensor([a["category_id"] for a in gts])}])


def test_metric_equals_cocoeval_by_hand_with_crowd_and_areas(tmp_path):
    data = crowd_json()
    gt_path = tmp_path / "val.json"
    gt_path.write_text(json.dumps(data))
    metric = CocoDetectionMetric()
    fill_metric(metric, data, detections())
    metric.ground_truth = ground_truth_coco(data)
    ours = {k: float(v) for k, v in metric.compute().items()}
    det_path = tmp_path / "detections.json"
    det_path.write_text(json.dumps(metric.coco_detections()))  # what eval.py writes
    expected = by_hand(gt_path, det_path)
    for key in STAT_KEYS:
        assert abs(ours[key] - expected[key]) < 1e-4, (key, ours[key], expected[key])
    # the crowd region and the areas matter: without them (the old metric) the numbers differ
    plain = CocoDetectionMetric()
    fill_metric(plain, data, detections())
    without = {k: float(v) for k, v in plain.compute().items()}
    assert ours["AP"] > without["AP"] + 0.05  # the two detections on the crowd are no longer false positives
    assert ours["AP_small"] > -1 and without["AP_small"] == -1  # 40x40 boxes are small by their mask area


def test_fallback_ground_truth_equals_torchmetrics():
    """Without a ground-truth JSON the metric scores the batches' boxes like torchmetrics' pycocotools mAP."""
    data = crowd_json()
    data["annotations"] = [a for a in data["annotations"] if not a["iscrowd"]]
    for a in data["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    dets = detections()
    ours = CocoDetectionMetric()
    fill_metric(ours, data, dets)
    reference = MeanAveragePrecision(box_format="xywh", iou_type="bbox", backend="pycocotools")
    for img in data["images"]:
        mine = [d for d in dets if d["image_id"] == img["id"]]
        gts = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        reference.update([{"boxes": torch.tensor([d["bbox"] for d in mine]).reshape(-1, 4),
                           "scores": torch.tensor([d["score"] for d in mine]),
                           "labels": torch.tensor([d["category_id"] for d in mine])}],
                         [{"boxes": torch.tensor([a["bbox"] for a in gts], dtype=torch.float).reshape(-1, 4),
                           "labels": torch.tensor([a["category_id"] for a in gts])}])
    ref = reference.compute()
    got = ours.compute()
    assert abs(float(got["AP"]) - float(ref["map"])) < 1e-4
    assert abs(float(got["AP50"]) - float(ref["map_50"])) < 1e-4


def test_only_seen_images_are_evaluated_and_per_class_rows():
    data = crowd_json()
    result = evaluate_detections(ground_truth_coco(data), detections(), image_ids=[2])
    assert result.evaluator.params.imgIds == [2]
    rows = per_class_rows(result, {5: "cat", 9: "dog"})
    assert [(r["class"], r["images"], r["boxes"]) for r in rows] == [("cat", 1, 1), ("dog", 1, 1)]
    assert all(0 <= r["AP50"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections(ground_truth_coco(data), [], image_ids=[7])
    empty = evaluate_detections(ground_truth_coco(data), [])  # no detection at all: AP 0, not a crash
    assert empty.stats["AP"] == 0.0


def test_missing_area_iscrowd_and_ids_are_filled_without_touching_the_input():
    data = crowd_json()
    for a in data["annotations"]:
        del a["area"], a["iscrowd"]
        a["id"] = None
    coco = ground_truth_coco(data)
    anns = coco.dataset["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    assert anns[0]["area"] == 40 * 40 and anns[0]["iscrowd"] == 0
    assert "area" not in data["annotations"][0]


def test_confusion_matrix_pairs_by_iou_then_counts_background():
    gt = ground_truth_coco(crowd_json())
    dets = [{"image_id": 1, "category_id": 9, "bbox": [10, 10, 40, 40], "score": 0.9},   # cat seen as dog
            {"image_id": 2, "category_id": 9, "bbox": [30, 40, 60, 50], "score": 0.9},   # dog right
            {"image_id": 3, "category_id": 5, "bbox": [0, 0, 10, 10], "score": 0.9},     # nothing there
            {"image_id": 3, "category_id": 9, "bbox": [5, 5, 150, 120], "score": 0.2}]   # under the threshold
    m = confusion_matrix(gt, dets, [1, 2, 3], [5, 9], score_threshold=0.5)
    # rows true (cat, dog, background), columns predicted
    assert m.tolist() == [[0, 1, 1], [0, 1, 1], [1, 0, 0]]
    assert np.sum(m) == 5


def test_classes_match_by_name_and_a_mismatch_lists_both_sides():
    cats = [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]
    assert match_classes(["cat", "dog"], cats, "x.json") == [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    with pytest.raises(ClassMismatch) as e:
        match_classes(["cat", "dog", "bird"], [{"id": 1, "name": "cat"}, {"id": 2, "name": "cow"}], "other/val.json")
    message = str(e.value)
    assert "\n" not in message and "other/val.json" in message
    assert "missing ['dog', 'bird']" in message and "extra ['cow']" in message


def _rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    data = crowd_json()
    mine = {"images": data["images"][:2] if rank == 0 else data["images"][2:], "annotations": data["annotations"]}
    metric = CocoDetectionMetric()  # 2 images on rank 0, 1 on rank 1
    fill_metric(metric, mine, detections())
    metric.ground_truth = ground_truth_coco(data)
    queue.put((rank, {k: float(v) for k, v in metric.compute().items()}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_coco_metric_syncs_uneven_ranks_like_one_process():
    data = crowd_json()
    single = CocoDetectionMetric()
    fill_metric(single, data, detections())
    single.ground_truth = ground_truth_coco(data)
    expected = {k: float(v) for k, v in single.compute().items()}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29600 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]  # spawn + import on a busy machine
    for p in procs:
        p.join(timeout=60)
    for _, stats in results:
        assert stats == pytest.approx(expected, abs=1e-9)


def test_eval_batches_reach_the_device_with_their_nested_targets():
    """eval.py on a GPU moved only the batch's top-level tensors: the detection targets (a list of
    dicts) stayed on the CPU and the metric update failed on mixed devices. Every tensor moves."""
    batch = {"images": torch.ones(2, 3, 4, 4), "targets": [{"boxes": torch.ones(1, 4), "labels": torch.zeros(1)}],
             "names": ["a.jpg"]}
    moved = _to(batch, torch.device("meta"))
    assert moved["images"].device.type == "meta"
    assert {t.device.type for t in moved["targets"][0].values()} == {"meta"}
    assert moved["names"] == ["a.jpg"]
