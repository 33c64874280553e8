"""Ultralytics/YOLO folders (``data=yolo``) on tiny fixtures written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.errors import DataError, MissingDataError
from datamodules.yolo import YoloDataModule, label_path
from tests.conftest import TINY_MODEL
from train import train

NAMES = ["cat", "dog"]
# split -> image name -> (width, height, label lines or None for no label file)
SPLITS = {
    "train": {"t1": (64, 48, ["1 0.5 0.5 0.5 0.25", "0 0.25 0.75 0.25 0.5"]), "t2": (40, 40, ["0 0.5 0.5 1 1"])},
    "val": {"v1": (80, 40, ["1 0.125 0.25 0.25 0.5"]), "v2": (32, 32, None)},
}


def write_yolo(root: Path, splits: dict = SPLITS, yaml_text: str | None = None) -> Path:
    """``root/data.yaml`` + ``images/<split>/*.png`` + ``labels/<split>/*.txt``."""
    for split, images in splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name, (w, h, lines) in images.items():
            Image.new("RGB", (w, h), (10, 120, 200)).save(root / "images" / split / f"{name}.png")
            if lines is not None:
                (root / "labels" / split / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    text = yaml_text or "train: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n"
    (root / "data.yaml").write_text(text)
    return root


def module(root: Path, **kwargs) -> YoloDataModule:
    settings = {"train_scales": [40], "val_scale": 40, "max_size": 1000, "num_workers": 0, "batch_size": 2}
    return YoloDataModule(root=str(root), **{**settings, **kwargs})


def test_boxes_and_classes_from_data_yaml(tmp_path):
    dm = module(write_yolo(tmp_path / "ds"))
    dm.setup("fit")
    assert dm.data_info["class_names"] == NAMES
    assert dm.images_dir == tmp_path / "ds" / "images"
    train = dm.splits()["train"][1]
    assert [(i["file_name"], i["width"], i["height"]) for i in train["images"]] == [
        ("train/t1.png", 64, 48), ("train/t2.png", 40, 40)]
    got = [(a["image_id"], a["category_id"], a["iscrowd"]) for a in train["annotations"]]
    assert got == [(1, 2, 0), (1, 1, 0), (2, 1, 0)]
    # cx cy w h normalised -> x y w h in pixels (exact in binary for these values)
    assert [a["bbox"] for a in train["annotations"]] == [[16.0, 18.0, 32.0, 12.0], [8.0, 24.0, 16.0, 24.0],
                                                         [0.0, 0.0, 40.0, 40.0]]
    val = dm.splits()["val"][1]
    assert [a["bbox"] for a in val["annotations"]] == [[0.0, 0.0, 20.0, 20.0]]
    assert len(val["images"]) == 2  # v2 has no label file: an image without objects


def test_loaded_targets_equal_the_label_boxes(tmp_path):
    dm = module(write_yolo(tmp_path / "ds"))
    dm.setup("fit")
    _, target = dm.val_dataset[0]  # v1, 80x40: val_scale 40 leaves it as is
    assert target["size"].tolist() == [40, 80] and target["labels"].tolist() == [1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.125, 0.25, 0.25, 0.5]]), rtol=0, atol=1e-6)
    _, empty = dm.val_dataset[1]
    assert empty["boxes"].shape == (0, 4)


def test_list_files_names_as_list_and_test_split(tmp_path):
    root = write_yolo(tmp_path / "ds", splits={**SPLITS, "test": {"s1": (20, 20, ["0 0.5 0.5 0.5 0.5"])}})
    (root / "train.txt").write_text("./images/train/t2.png\n\n" + str(root / "images/train/t1.png") + "\n")
    (root / "data.yaml").write_text("path: .\ntrain: train.txt\nval: [images/val]\ntest: images/test\n"
                                    "nc: 2\nnames: [cat, dog]\n")
    dm = module(root)
    dm.setup(None)
    assert [i["file_name"] for i in dm.splits()["train"][1]["images"]] == ["train/t2.png", "train/t1.png"]
    assert dm.test_json == root / "images/test"
    assert [i["file_name"] for i in dm.test_dataset.coco.dataset["images"]] == ["test/s1.png"]


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/x/images/train/a.b.jpg")) == Path("/d/images/x/labels/train/a.b.txt")
    assert label_path(Path("/d/train/a.jpg")) == Path("/d/train/a.txt")


@pytest.mark.parametrize(
    ("break_it", "error", "message"),
    [
        (lambda r: (r / "labels/train/t2.txt").write_text("0 0.5 0.5 1 1\n0 0.5 0.5 1\n"),
         DataError, r"t2\.txt:2: expected 'class cx cy w h' \(5 numbers\), got '0 0\.5 0\.5 1'"),
        (lambda r: (r / "labels/train/t2.txt").write_text("0 0.1 0.1 0.1 0.1 0.2 0.2 0.3\n"),
         DataError, r"t2\.txt:1: .*polygon/segment labels are not supported"),
        (lambda r: (r / "labels/train/t2.txt").write_text("\n2 0.5 0.5 0.5 0.5\n"),
         DataError, r"t2\.txt:2: class 2 is not one of data\.yaml's names \(0\.\.1\)"),
        (lambda r: (r / "labels/train/t2.txt").write_text("0 20 20 10 10\n"),  # pixels instead of fractions
         DataError, r"t2\.txt:1: box \(x1, y1, x2, y2\) = \(600, 600, 1000, 1000\) lies outside the 40x40 image"),
        (lambda r: (r / "data.yaml").write_text("train: images/train\nval: [images/val\nnames: [cat, dog]\n"),
         DataError, r"data\.yaml:3:\d+: malformed YAML"),
        (lambda r: (r / "data.yaml").write_text("train: images/train\nval: images/val\nnc: 3\nnames: [cat, dog]\n"),
         DataError, r"nc=3 but 'names' has 2 entries"),
        (lambda r: (r / "data.yaml").write_text("train: images/train\nval: images/nope\nnames: [cat, dog]\n"),
         MissingDataError, r"data\.yaml: val: .*images/nope does not exist"),
        (lambda r: ((r / "train.txt").write_text("images/train/t1.png\nimages/train/gone.png\n"),
                    (r / "data.yaml").write_text("train: train.txt\nval: images/val\nnames: [cat, dog]\n")),
         MissingDataError, r"train\.txt:2: image 'images/train/gone\.png' not found"),
        (lambda r: [p.unlink() for p in (r / "labels/train").iterdir()],
         MissingDataError, r"images/train: none of its 2 images has a label file"),
    ],
    ids=["short-line", "segments", "unknown-class", "box-outside", "malformed-yaml", "nc-mismatch",
         "missing-folder", "missing-listed-image", "no-labels"],
)
def test_bad_input_is_named_with_file_and_line(tmp_path, break_it, error, message):
    root = write_yolo(tmp_path / "ds")
    break_it(root)
    with pytest.raises(error, match=message):
        module(root).setup("fit")


def test_roboflow_style_parent_paths_and_overshoot_clamped(tmp_path):
    root = write_yolo(tmp_path / "ds")
    (root / "data.yaml").write_text("train: ../images/train\nval: ../images/val\nnames: [cat, dog]\n")
    (root / "labels/train/t2.txt").write_text("0 0.5 0.5 1.02 1\n")  # 0.4 px past each side of 40 px
    dm = module(root)
    assert dm.splits()["train"][1]["annotations"][-1]["bbox"] == [0.0, 0.0, 40.0, 40.0]


def test_coco_only_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="data.train_json='x.json' is not used by data=yolo"):
        module(tmp_path, train_json="x.json")


@pytest.mark.slow
def test_train_py_runs_on_a_yolo_folder(make_cfg, tmp_path):
    root = write_yolo(tmp_path / "ds")
    metrics = train(make_cfg(*TINY_MODEL, "data=yolo", f"data.root={root}", "data.batch_size=2",
                             "data.num_workers=0", "data.train_scales=[40]", "data.val_scale=40",
                             "data.max_size=64", "trainer.fast_dev_run=true", "logger=csv", tiny=False))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/mAP" in metrics and "test/mAP" in metrics
