"""Pascal VOC folders (``data=voc``) on tiny fixtures written to tmp_path."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from datamodules.coco import coco_from_dict
from datamodules.errors import DataError, MissingDataError
from datamodules.voc import VocDataModule
from tests.conftest import TINY_MODEL
from train import train

# image id -> (width, height, objects (name, difficult, xmin, ymin, xmax, ymax))
IMAGES = {
    "a": (64, 48, [("dog", 0, 4, 6, 30, 40), ("cat", 0, 32, 2, 60, 20)]),
    "b": (40, 56, [("cat", 0, 1, 1, 40, 56)]),
    "c": (48, 48, [("dog", 0, 10, 10, 20, 30), ("bird", 1, 30, 30, 44, 46)]),
    "d": (50, 40, []),
}


def xml_text(name: str, w: int, h: int, objects: list, filename: str | None = None) -> str:
    objs = "".join(
        f"""
  <object>
    <name>{n}</name>
    <difficult>{d}</difficult>
    <bndbox>
      <xmin>{x1}</xmin>
      <ymin>{y1}</ymin>
      <xmax>{x2}</xmax>
      <ymax>{y2}</ymax>
    </bndbox>
  </object>"""
        for n, d, x1, y1, x2, y2 in objects
    )
    return (f"<annotation>\n  <filename>{filename or name + '.jpg'}</filename>\n"
            f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}\n</annotation>\n")


def write_voc(root: Path, images: dict = IMAGES, lists: dict[str, list[str]] | None = None) -> Path:
    """A VOC folder: Annotations/, JPEGImages/ and (when ``lists``) ImageSets/Main/<split>.txt."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for i, (name, (w, h, objects)) in enumerate(images.items()):
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(root / "JPEGImages" / f"{name}.jpg")
        (root / "Annotations" / f"{name}.xml").write_text(xml_text(name, w, h, objects))
    if lists is not None:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for split, ids in lists.items():
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return root


def module(root: Path, **kwargs) -> VocDataModule:
    settings = {"train_scales": [48], "val_scale": 48, "max_size": 1000, "num_workers": 0, "batch_size": 2}
    return VocDataModule(root=str(root), **{**settings, **kwargs})


LISTS = {"train": ["a", "b"], "val": ["c", "d"]}


def test_boxes_classes_and_splits_from_lists(tmp_path):
    dm = module(write_voc(tmp_path / "voc", lists=LISTS))
    dm.setup("fit")
    # classes: every name in the XMLs, sorted; category id = label + 1
    assert dm.data_info["class_names"] == ["bird", "cat", "dog"]
    train = dm.splits()["train"][1]
    assert [(im["file_name"], im["width"], im["height"]) for im in train["images"]] == [
        ("a.jpg", 64, 48), ("b.jpg", 40, 56)]
    assert [(a["image_id"], a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in train["annotations"]] == [
        (1, 3, [4.0, 6.0, 26.0, 34.0], 26.0 * 34.0, 0),
        (1, 2, [32.0, 2.0, 28.0, 18.0], 28.0 * 18.0, 0),
        (2, 2, [1.0, 1.0, 39.0, 55.0], 39.0 * 55.0, 0),
    ]
    assert [a["id"] for a in train["annotations"]] == [1, 2, 3]
    assert dm.train_json == tmp_path / "voc/ImageSets/Main/train.txt"
    assert len(dm.val_dataset) == 2 and dm.test_json == dm.val_json  # no test.txt: test on val


def test_loaded_targets_equal_the_xml_boxes(tmp_path):
    dm = module(write_voc(tmp_path / "voc", lists=LISTS), val_scale=48)
    dm.setup("fit")
    _, target = dm.val_dataset[0]  # image c, 48x48: no resize at val_scale 48
    assert target["size"].tolist() == [48, 48]
    # the difficult bird is an ignore region: not a training target
    assert target["labels"].tolist() == [2]
    expected = torch.tensor([[15.0, 20.0, 10.0, 20.0]]) / 48  # dog (10, 10, 20, 30) as cxcywh / size
    torch.testing.assert_close(target["boxes"], expected, rtol=0, atol=1e-6)


def ap50(gt: dict, detections: list[dict]) -> float:
    coco = coco_from_dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


def test_difficult_boxes_are_coco_ignore_regions(tmp_path):
    images = {"a": (64, 48, [("dog", 0, 4, 6, 30, 40)]),
              "c": (48, 48, [("dog", 0, 10, 10, 20, 30), ("dog", 1, 30, 30, 44, 46)])}
    dm = module(write_voc(tmp_path / "voc", images=images, lists={"train": ["a"], "val": ["c"]}))
    dm.setup("fit")
    gt = dm.splits()["val"][1]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
    _, target = dm.val_dataset[0]
    assert target["boxes"].shape == (1, 4)  # not a training target
    found = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 20], "score": 0.9}
    on_difficult = {"image_id": 1, "category_id": 1, "bbox": [30, 30, 14, 16], "score": 0.95}
    # missing the difficult dog costs no recall, and a detection on it is no false positive
    assert ap50(gt, [found]) == pytest.approx(1.0, abs=1e-9)  # COCOeval sums 101 recall points
    assert ap50(gt, [found, on_difficult]) == pytest.approx(1.0, abs=1e-9)
    as_normal = {**gt, "annotations": [{**a, "iscrowd": 0} for a in gt["annotations"]]}
    assert ap50(as_normal, [found]) < 0.6  # the same boxes without the ignore flag: recall 1/2


def test_given_classes_fix_label_order_and_unknown_class_is_named(tmp_path):
    root = write_voc(tmp_path / "voc", lists=LISTS)
    dm = module(root, classes=["dog", "cat", "bird", "horse"])
    assert dm.data_info["class_names"] == ["dog", "cat", "bird", "horse"]
    assert [a["category_id"] for a in dm.splits()["train"][1]["annotations"]] == [1, 2, 2]
    with pytest.raises(DataError, match=r"a\.xml:4: object class 'dog' is not in data\.classes"):
        module(root, classes=["cat", "bird"]).setup("fit")


def test_random_split_without_lists(tmp_path):
    images = {f"im{i}": (32, 32, [("dog", 0, 2, 2, 20, 20)]) for i in range(10)}
    root = write_voc(tmp_path / "voc", images=images)
    names = {}
    for seed in (0, 0, 1):
        dm = module(root, val_fraction=0.3, split_seed=seed)
        dm.setup("fit")
        train = [im["file_name"] for im in dm.splits()["train"][1]["images"]]
        val = [im["file_name"] for im in dm.splits()["val"][1]["images"]]
        assert len(val) == 3 and len(train) == 7 and not set(train) & set(val)
        assert sorted(train + val) == sorted(f"im{i}.jpg" for i in range(10))
        names.setdefault(seed, []).append(val)
    assert names[0][0] == names[0][1]  # same seed, same split
    assert names[1][0] != names[0][0]  # another seed, another split
    with pytest.raises(ValueError, match="val_fraction"):
        module(root, val_fraction=1.0)


def test_test_list_is_its_own_split(tmp_path):
    root = write_voc(tmp_path / "voc", lists={"train": ["a", "b"], "val": ["c"], "test": ["d"]})
    dm = module(root)
    dm.setup("test")
    assert [im["file_name"] for im in dm.test_dataset.coco.dataset["images"]] == ["d.jpg"]


@pytest.mark.parametrize(
    ("break_it", "error", "message"),
    [
        (lambda r: (r / "Annotations/b.xml").write_text("<annotation>\n  <filename>b.jpg</filename>\n  <object>\n</annotation>\n"),
         DataError, r"b\.xml:4:3: malformed XML \(mismatched tag"),
        (lambda r: (r / "JPEGImages/b.jpg").unlink(),
         MissingDataError, r"b\.xml: image 'b\.jpg' \(its <filename>\) is missing from .*JPEGImages"),
        (lambda r: (r / "Annotations/b.xml").write_text(xml_text("b", 40, 56, [("cat", 0, 1, 1, 45, 56)])),
         DataError, r"b\.xml:4: box \(x1, y1, x2, y2\) = \(1, 1, 45, 56\) lies outside the 40x56 image"),
        (lambda r: (r / "Annotations/b.xml").write_text(
            xml_text("b", 40, 56, [("cat", 0, 1, 1, 40, 56)]).replace("<ymax>56", "<ymax>5x6")),
         DataError, r"b\.xml:11: <bndbox><ymax> must be a number, got '5x6'"),
        (lambda r: (r / "Annotations/b.xml").write_text(xml_text("b", 41, 56, [])),
         DataError, r"b\.xml: the annotation says the image is 41x56 \(w x h\) but .*b\.jpg is 40x56"),
        (lambda r: (r / "ImageSets/Main/train.txt").write_text("a\n\nzz\n"),
         MissingDataError, r"train\.txt:3: image id 'zz' has no annotation file"),
        (lambda r: (r / "ImageSets/Main/val.txt").write_text("c\nb\n"),
         DataError, r"1 image id\(s\) are in both .*train\.txt and val\.txt, e\.g\. \['b'\]"),
    ],
    ids=["malformed-xml", "missing-image", "box-outside", "bad-number", "size-mismatch", "list-id-without-xml",
         "train-val-overlap"],
)
def test_bad_input_is_named_with_file_and_line(tmp_path, break_it, error, message):
    root = write_voc(tmp_path / "voc", lists=LISTS)
    break_it(root)
    with pytest.raises(error, match=message):
        module(root).setup("fit")


def test_box_within_one_pixel_of_the_border_is_clamped(tmp_path):
    root = write_voc(tmp_path / "voc", lists=LISTS)
    (root / "Annotations/b.xml").write_text(xml_text("b", 40, 56, [("cat", 0, 0, 1, 41, 56)]))  # VOC 1-based xmax
    dm = module(root)
    assert dm.splits()["train"][1]["annotations"][-1]["bbox"] == [0.0, 1.0, 40.0, 55.0]


def test_size_absent_is_read_from_the_image(tmp_path):
    root = write_voc(tmp_path / "voc", lists=LISTS)
    text = xml_text("b", 40, 56, [("cat", 0, 1, 1, 40, 56)])
    (root / "Annotations/b.xml").write_text(text.replace("<size><width>40</width><height>56</height><depth>3</depth></size>", ""))
    images = module(root).splits()["train"][1]["images"]
    assert (images[1]["width"], images[1]["height"]) == (40, 56)


@pytest.mark.slow
def test_train_py_runs_on_a_voc_folder(make_cfg, tmp_path):
    root = write_voc(tmp_path / "voc", lists=LISTS)
    metrics = train(make_cfg(*TINY_MODEL, "data=voc", f"data.root={root}", "data.batch_size=2",
                             "data.num_workers=0", "data.train_scales=[48]", "data.val_scale=48",
                             "data.max_size=64", "trainer.fast_dev_run=true", "logger=csv", tiny=False))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/mAP" in metrics and "test/mAP" in metrics


def _rotated_jpeg(path: Path, stored: tuple[int, int]) -> None:
    """A JPEG whose stored pixels are ``stored`` (w, h) with EXIF orientation 6 (shown rotated 90°)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", stored, (90, 30, 200)).save(path, "JPEG", exif=exif)


@pytest.mark.parametrize("stated", [(20, 40), (40, 20), None], ids=["oriented", "stored", "absent"])
def test_exif_orientation_as_for_coco(tmp_path, stated):
    root = write_voc(tmp_path / "voc", lists=LISTS)
    _rotated_jpeg(root / "JPEGImages/b.jpg", (40, 20))
    text = xml_text("b", *(stated or (1, 1)), [("cat", 0, 2, 2, 18, 18)])
    if stated is None:
        text = text.replace("<size><width>1</width><height>1</height><depth>3</depth></size>", "")
    (root / "Annotations/b.xml").write_text(text)
    dm = module(root)
    dm.setup("fit")
    image = dm.splits()["train"][1]["images"][1]
    # the XML's size when it names the oriented or the stored pixels, else the oriented image's
    assert (image["width"], image["height"]) == (stated or (20, 40))
    with pytest.warns(UserWarning, match="EXIF orientation is ignored") if stated == (40, 20) else contextlib.nullcontext():
        _, target = dm.train_dataset[1]
    assert target["boxes"].shape == (1, 4)


def test_multilabel_target_from_voc(tmp_path):
    dm = module(write_voc(tmp_path / "voc", lists=LISTS), target="multilabel")
    dm.setup("fit")
    # labels: bird, cat, dog; image a has a dog and a cat, c a dog and a (difficult) bird
    labels = [dm.train_dataset[i][1].tolist() for i in range(2)] + [dm.val_dataset[i][1].tolist() for i in range(2)]
    assert labels == [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
