"""Multi-label targets of the COCO data module: from COCO JSON, from mapping files, shapes, coco128."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.coco import CocoDataModule
from datamodules.errors import DataError, MissingDataError
from datamodules.shapes import ShapesDataModule
from tests.datamodules.test_coco import write_coco

ROOT = Path(__file__).resolve().parents[2]
CATS = [{"id": 90, "name": "zebra", "supercategory": "x"}, {"id": 7, "name": "cat", "supercategory": "x"},
        {"id": 12, "name": "dog", "supercategory": "x"}]  # labels: 0 = cat (7), 1 = dog (12), 2 = zebra (90)


def small_coco(root: Path) -> None:
    images = [("a.png", 40, 30), ("b.png", 30, 40), ("c.png", 20, 20)]
    anns = [(1, 90, [1.0, 1.0, 5.0, 5.0]), (1, 7, [2.0, 2.0, 5.0, 5.0]), (1, 7, [0.0, 0.0, 3.0, 3.0]),
            (2, 12, [1.0, 1.0, 0.5, 0.5])]  # a sub-pixel box: dropped for detection, still a label
    write_coco(root, images, anns, "train.json", categories=CATS)
    write_coco(root, images, anns, "val.json", categories=CATS, write_images=False)


def module(root: Path, **kwargs) -> CocoDataModule:
    return CocoDataModule(root=str(root), batch_size=3, num_workers=0, train_scales=[32], val_scale=32, max_size=48,
                          target="multilabel", **kwargs)


def test_labels_from_coco_json(tmp_path):
    small_coco(tmp_path)
    dm = module(tmp_path)
    dm.setup("fit")
    info = dm.data_info
    assert info["class_names"] == ["cat", "dog", "zebra"] and info["label_counts"] == [1, 1, 1]
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"images", "pixel_mask", "labels"}
    assert batch["labels"].tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]  # image c has no annotation: empty set
    assert batch["images"].shape[:2] == (3, 3) and batch["pixel_mask"].shape == (3, *batch["images"].shape[2:])
    assert batch["pixel_mask"].any()  # different aspect ratios are padded


def test_labels_from_a_mapping_file(tmp_path):
    small_coco(tmp_path)
    (tmp_path / "ml_train.json").write_text(json.dumps({"b.png": ["zebra", "cat"], "a.png": []}))
    dm = module(tmp_path, train_labels="ml_train.json")
    dm.setup("fit")
    assert dm.data_info["label_counts"] == [1, 0, 1]
    train = dm.train_dataset
    assert [e[0] for e in train.entries] == ["a.png", "b.png"]
    assert train.multi_hot(1).tolist() == [1.0, 0.0, 1.0] and train.multi_hot(0).tolist() == [0.0, 0.0, 0.0]
    assert len(dm.val_dataset) == 3  # val has no mapping: from val.json


def test_mapping_with_an_unknown_class_is_explained(tmp_path):
    small_coco(tmp_path)
    (tmp_path / "ml.json").write_text(json.dumps({"a.png": ["cat"], "b.png": ["zebras"]}))
    with pytest.raises(DataError, match=r"ml\.json: image 'b\.png' names class 'zebras'.*Did you mean \['zebra'\]"):
        module(tmp_path, train_labels="ml.json").setup("fit")


def test_mapping_with_a_missing_image_is_explained(tmp_path):
    small_coco(tmp_path)
    (tmp_path / "ml.json").write_text(json.dumps({"a.png": ["cat"], "gone.png": ["dog"]}))
    with pytest.raises(MissingDataError, match=r"1 image file\(s\) listed in .*ml\.json are missing.*gone\.png"):
        module(tmp_path, val_labels="ml.json").setup("fit")
    (tmp_path / "bad.json").write_text(json.dumps({"../a.png": ["cat"]}))
    with pytest.raises(DataError, match="escapes the images folder"):
        module(tmp_path, val_labels="bad.json").setup("fit")
    with pytest.raises(MissingDataError, match="mapping file not found"):
        module(tmp_path, val_labels="nope.json").setup("fit")


def test_coco128_mapping_files_agree_with_its_boxes():
    """The shipped multilabel_*.json give the same label sets as the COCO JSON's annotations."""
    root = ROOT / "data" / "coco128"
    from_json = module(root, test_json="test.json")
    from_map = module(root, test_json="test.json", train_labels="multilabel_train.json",
                      val_labels="multilabel_val.json", test_labels="multilabel_test.json")
    for dm in (from_json, from_map):
        dm.setup(None)
    assert from_map.data_info["num_classes"] == 80 and sum(c > 0 for c in from_map.data_info["label_counts"]) == 66
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        a, b = getattr(from_json, split), getattr(from_map, split)
        assert sorted((f, labels) for f, _, labels in a.entries) == [(f, labels) for f, _, labels in b.entries]
    assert from_json.data_info["label_counts"] == from_map.data_info["label_counts"]
    assert [e[2] for e in from_map.test_dataset.entries if e[0] == "000000000250.jpg"] == [[]]


def test_shapes_multilabel(tmp_path):
    dm = ShapesDataModule(cache_dir=str(tmp_path), num_train=6, num_val=4, num_test=2, image_size=32, batch_size=4, num_workers=0,
                          target="multilabel")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].shape == (4, 3) and batch["images"].shape == (4, 3, 32, 32)
    data = json.loads((dm.root / "val.json").read_text())
    for row, img in zip(batch["labels"], sorted(data["images"], key=lambda i: i["id"])):
        cats = {a["category_id"] - 1 for a in data["annotations"] if a["image_id"] == img["id"]}
        assert set(row.nonzero().flatten().tolist()) == cats
    assert torch.equal(batch["labels"].sum(1) > 0, torch.ones(4, dtype=torch.bool))  # 1..5 shapes per image
    with pytest.raises(ValueError, match="target"):
        CocoDataModule(root=str(tmp_path), target="segmentation")
