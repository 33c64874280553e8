"""The synthetic shapes dataset: deterministic, valid COCO, atomic, and served in the detection contract."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datamodules.shapes as shapes
from datamodules.errors import DataError
from datamodules.shapes import COMPLETE_MARKER, ShapesDataModule, generate_shapes_dataset

SMALL = {"num_train": 12, "num_val": 4, "num_test": 5, "image_size": 64, "min_objects": 2, "max_objects": 4}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", seed=3, **SMALL)


def test_deterministic(small_dataset: Path, tmp_path: Path) -> None:
    again = generate_shapes_dataset(tmp_path / "again", seed=3, **SMALL)
    for name in ("train.json", "val.json", "test.json"):
        assert (again / name).read_bytes() == (small_dataset / name).read_bytes()
    for name in ("train_000005.png", "val_000003.png"):
        a = np.asarray(Image.open(small_dataset / "images" / name))
        b = np.asarray(Image.open(again / "images" / name))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    other = generate_shapes_dataset(tmp_path / "other", seed=4, **SMALL)
    assert (other / "train.json").read_bytes() != (small_dataset / "train.json").read_bytes()


def test_valid_coco_with_boxes_inside_and_counts_in_range(small_dataset: Path) -> None:
    train = json.loads((small_dataset / "train.json").read_text())
    val = json.loads((small_dataset / "val.json").read_text())
    test = json.loads((small_dataset / "test.json").read_text())
    assert [c["name"] for c in train["categories"]] == ["circle", "square", "triangle"]
    assert [c["id"] for c in train["categories"]] == [1, 2, 3] and val["categories"] == train["categories"]
    assert test["categories"] == train["categories"]
    assert len(train["images"]) == 12 and len(val["images"]) == 4 and len(test["images"]) == 5
    all_images = train["images"] + val["images"] + test["images"]
    all_anns = train["annotations"] + val["annotations"] + test["annotations"]
    assert len({i["id"] for i in all_images}) == 21 and len({a["id"] for a in all_anns}) == len(all_anns)
    per_image = {i["id"]: 0 for i in all_images}
    for a in all_anns:
        per_image[a["image_id"]] += 1
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= 64 and y + h <= 64
        assert a["area"] == w * h and a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3)
    assert all(2 <= n <= 4 for n in per_image.values())
    for img in all_images:
        assert (small_dataset / "images" / img["file_name"]).is_file()
        assert (img["width"], img["height"]) == (64, 64)


def test_test_split_is_held_out_and_leaves_val_unchanged(small_dataset: Path, tmp_path: Path) -> None:
    """test.json is drawn from its own random stream: adding it (or changing its size) leaves train.json and
    val.json byte for byte as they were, and no test image repeats a validation or training image."""
    without = generate_shapes_dataset(tmp_path / "without", seed=3, **{**SMALL, "num_test": 0})
    for name in ("train.json", "val.json"):
        assert (without / name).read_bytes() == (small_dataset / name).read_bytes()
    assert json.loads((without / "test.json").read_text())["images"] == []
    pixels = {}
    for split in ("train", "val", "test"):
        for img in json.loads((small_dataset / f"{split}.json").read_text())["images"]:
            pixels[img["file_name"]] = np.asarray(Image.open(small_dataset / "images" / img["file_name"])).tobytes()
    assert len(set(pixels.values())) == len(pixels) == 21

    dm = ShapesDataModule(cache_dir=str(tmp_path / "cache"), seed=3, batch_size=4, num_workers=0, **SMALL)
    dm.setup("test")
    assert dm.test_json.name == "test.json" and len(dm.test_dataset) == 5
    dm0 = ShapesDataModule(cache_dir=str(tmp_path / "cache"), seed=3, batch_size=4, num_workers=0, **{**SMALL, "num_test": 0})
    assert dm0.test_json == dm0.val_json  # num_test=0: no held-out split, said in the docstring


def test_boxes_are_tight_on_shape_pixels(tmp_path: Path) -> None:
    """Single-shape images: every box edge has a shape pixel right next to background outside it."""
    ds = generate_shapes_dataset(
        tmp_path / "one", num_train=10, num_val=0, num_test=0, image_size=64, min_objects=1, max_objects=1, seed=5
    )
    train = json.loads((ds / "train.json").read_text())
    boxes = {a["image_id"]: [int(v) for v in a["bbox"]] for a in train["annotations"]}
    checked = 0
    for img in train["images"]:
        px = np.asarray(Image.open(ds / "images" / img["file_name"])).astype(float)
        x, y, w, h = boxes[img["id"]]
        edges = [  # (pixels on the box edge, their neighbours just outside)
            (px[y, x : x + w], px[y - 1, x : x + w]) if y > 0 else None,
            (px[y + h - 1, x : x + w], px[y + h, x : x + w]) if y + h < 64 else None,
            (px[y : y + h, x], px[y : y + h, x - 1]) if x > 0 else None,
            (px[y : y + h, x + w - 1], px[y : y + h, x + w]) if x + w < 64 else None,
        ]
        for edge in filter(None, edges):
            inside, outside = edge
            assert np.linalg.norm(inside - outside, axis=-1).max() > 40
            checked += 1
    assert checked >= 20


def test_pycocotools_loads_and_gt_against_itself_is_ap_1(small_dataset: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(small_dataset / "train.json"))
        dets = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"]
        ]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_reuses_finished_dataset_and_leaves_nothing_when_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = generate_shapes_dataset(tmp_path / "done", num_train=2, num_val=1, num_test=1, image_size=32)
    assert (done / COMPLETE_MARKER).is_file()

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_write_split", boom)
    assert generate_shapes_dataset(done, num_train=2, num_val=1, num_test=1, image_size=32) == done  # no regeneration
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_dataset(tmp_path / "interrupted", num_train=2, num_val=1, num_test=1, image_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # no partial or temp folder


def test_foreign_folder_without_marker_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.json").write_text("{}")
    with pytest.raises(DataError, match="COMPLETE"):
        generate_shapes_dataset(tmp_path / "ds", num_train=1, num_val=1, num_test=1, image_size=32)


def test_datamodule_generates_once_and_yields_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dm = ShapesDataModule(cache_dir=str(tmp_path), num_train=6, num_val=3, num_test=2, image_size=64, batch_size=4, num_workers=0)
    assert dm.data_info == {
        "num_classes": 3,
        "class_names": ["circle", "square", "triangle"],
        "category_ids": [1, 2, 3],
        "max_boxes_per_image": 5,  # the drawing's bound, max_objects (sizes num_queries=auto)
    }
    assert not any(tmp_path.iterdir())  # data_info does not generate
    dm.setup("fit")  # without prepare_data
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(dm.root) in out
    assert dm.root.parent == tmp_path and dm.root.name.startswith("shapes-")
    dm2 = ShapesDataModule(cache_dir=str(tmp_path), num_train=6, num_val=3, num_test=2, image_size=64, num_workers=0)
    dm2.prepare_data()
    assert capsys.readouterr().out == "" and dm2.root == dm.root  # same params → cached folder
    assert ShapesDataModule(cache_dir=str(tmp_path), num_train=6, num_val=3, num_test=2, image_size=64, seed=1).root != dm.root

    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[:2] == (4, 3) and batch["images"].dtype == torch.float32
    assert batch["pixel_mask"].shape == (4, *batch["images"].shape[-2:])
    for i, t in enumerate(batch["targets"]):
        h, w = t["size"].tolist()
        assert h in (56, 64, 72) and h == w and not batch["pixel_mask"][i, :h, :w].any()
        assert batch["pixel_mask"][i].sum() == batch["pixel_mask"][i].numel() - h * w
        assert 1 <= len(t["labels"]) <= 5 and set(t["labels"].tolist()) <= {0, 1, 2}
        assert ((t["boxes"] > 0) & (t["boxes"] <= 1)).all()
    assert len(dm.val_dataloader().dataset) == 3 and dm.test_dataset is None
    dm.setup("test")  # the held-out split, not the one that chooses the checkpoint
    assert len(dm.test_dataset) == 2 and dm.test_dataset is not dm.val_dataset


def test_datamodule_rejects_unknown_argument(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        ShapesDataModule(cache_dir=str(tmp_path), num_trian=5)  # type: ignore[call-arg]
