"""Behaviour of the COCO detection data path on tiny datasets written to tmp_path."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from datamodules.coco import (
    CocoDataModule,
    CocoDetectionDataset,
    collate_detection,
    load_coco_json,
    load_rgb_image,
    make_detection_transforms,
    max_boxes_per_image,
    to_rgb,
)
from datamodules.errors import DataError, MissingDataError
from modules.backbone import IMAGENET_MEAN, IMAGENET_STD

CATEGORIES = [
    {"id": 9, "name": "dog", "supercategory": "animal"},
    {"id": 5, "name": "cat", "supercategory": "animal"},
]


def write_coco(
    root: Path,
    images: list[tuple[str, int, int]],
    anns: list[tuple[int, int, list[float]]],
    name: str = "train.json",
    categories: list[dict[str, Any]] | None = None,
    write_images: bool = True,
) -> Path:
    """images: (file_name, width, height), ids 1..; anns: (image_id, category_id, [x, y, w, h])."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    if write_images:
        for file_name, w, h in images:
            Image.new("RGB", (w, h), (200, 100, 50)).save(root / "images" / file_name)
    data = {
        "images": [
            {"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images)
        ],
        "annotations": [
            {"id": k + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (im, c, b) in enumerate(anns)
        ],
        "categories": CATEGORIES if categories is None else categories,
    }
    path = root / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """3 images of different sizes (one without boxes) in train and val."""
    images = [("a.png", 100, 80), ("b.png", 60, 90), ("empty.png", 50, 50)]
    anns = [(1, 9, [10.0, 20.0, 30.0, 40.0]), (1, 5, [0.0, 0.0, 100.0, 80.0]), (2, 5, [5.0, 5.0, 10.0, 20.0])]
    write_coco(tmp_path, images, anns, "train.json")
    write_coco(tmp_path, images, anns, "val.json", write_images=False)
    return tmp_path


def small_dm(root: Path, **kw: Any) -> CocoDataModule:
    args = {"batch_size": 3, "num_workers": 0, "train_scales": [64], "val_scale": 64, "max_size": 100}
    args.update(kw)
    return CocoDataModule(root=str(root), **args)


def unnormalize(img: torch.Tensor) -> torch.Tensor:
    return img * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


# ------------------------------------------------------------------------------------ contract


def test_batch_contract(tiny: Path) -> None:
    dm = small_dm(tiny)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    images, mask, targets = batch["images"], batch["pixel_mask"], batch["targets"]
    assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[:2] == (3, 3)
    assert mask.dtype == torch.bool and mask.shape == (3, *images.shape[-2:])
    assert images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
    for i, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert not mask[i, :h, :w].any()
        assert mask[i].sum() == mask.shape[1] * mask.shape[2] - h * w  # True exactly on the padding
        assert (images[i, :, h:, :] == 0).all() and (images[i, :, :, w:] == 0).all()
        assert t["labels"].dtype == torch.int64 and t["boxes"].dtype == torch.float32
        assert t["boxes"].shape == (len(t["labels"]), 4)
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert ((t["labels"] >= 0) & (t["labels"] < 2)).all()
        assert isinstance(t["image_id"], int) and t["orig_size"].dtype == torch.int64
    # image 1: 100x80 → shortest side 64 → 80x64; sizes follow (h, w)
    t0 = targets[0]
    assert t0["image_id"] == 1 and t0["orig_size"].tolist() == [80, 100] and t0["size"].tolist() == [64, 80]
    # category ids 5, 9 → labels 0, 1; box [10,20,30,40] in a 100x80 image → cxcywh normalised
    assert t0["labels"].tolist() == [1, 0]
    torch.testing.assert_close(t0["boxes"][0], torch.tensor([0.25, 0.5, 0.3, 0.5]), atol=2e-3, rtol=0)
    torch.testing.assert_close(t0["boxes"][1], torch.tensor([0.5, 0.5, 1.0, 1.0]), atol=1e-4, rtol=0)
    # image without annotations
    t2 = targets[2]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)


def test_train_loader_with_empty_image_and_worker(tiny: Path) -> None:
    dm = small_dm(tiny, num_workers=1, persistent_workers=False)
    dm.setup("fit")
    seen = 0
    for batch in dm.train_dataloader():
        for t in batch["targets"]:
            seen += 1
            if t["image_id"] == 3:
                assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert seen == 3


def test_horizontal_flip_moves_boxes_and_pixels(tmp_path: Path) -> None:
    write_coco(tmp_path, [("a.png", 100, 80)], [(1, 9, [10.0, 20.0, 30.0, 40.0])])
    left_red = np.zeros((80, 100, 3), dtype=np.uint8)
    left_red[:, :50] = (255, 0, 0)
    left_red[:, 50:] = (0, 0, 255)
    Image.fromarray(left_red).save(tmp_path / "images" / "a.png")
    transforms = make_detection_transforms(True, train_scales=[80], max_size=1000, hflip_prob=1.0)
    ds = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", transforms=transforms)
    image, target = ds[0]
    assert target["size"].tolist() == [80, 100]  # shortest side already 80: no resize
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.75, 0.5, 0.3, 0.5]), atol=1e-5, rtol=0)
    rgb = unnormalize(image)
    assert rgb[2, :, :50].mean() > 0.9 and rgb[0, :, 50:].mean() > 0.9  # blue now left, red right


def test_random_crop_cuts_pixels_and_boxes_together(tmp_path: Path) -> None:
    """data.crop: a cropped photo's boxes still frame the object's own pixels (a white rectangle on
    black), at least one box centre survives every crop, and the crop is a function of torch's seed."""
    write_coco(tmp_path, [("a.png", 200, 100)], [(1, 9, [20.0, 10.0, 40.0, 30.0]), (1, 5, [130.0, 50.0, 60.0, 40.0])])
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[10:40, 20:60] = 255
    pixels[50:90, 130:190] = 255
    Image.fromarray(pixels).save(tmp_path / "images" / "a.png")
    tf = make_detection_transforms(True, train_scales=[100], max_size=100000, hflip_prob=0.0, crop=1.0, crop_min=0.5)
    ds = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", transforms=tf)
    sizes = set()
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = ds[0]
        h, w = target["size"].tolist()
        sizes.add((h, w))
        white = unnormalize(image).mean(0) > 0.5  # resized (shortest side 100): edges blur by <= 2 px
        assert len(target["boxes"]) >= 1
        boxed = torch.zeros_like(white)
        for cx, cy, bw, bh in target["boxes"].tolist():
            x0, y0, x1, y1 = round((cx - bw / 2) * w), round((cy - bh / 2) * h), round((cx + bw / 2) * w), round((cy + bh / 2) * h)
            assert white[y0 + 3:y1 - 3, x0 + 3:x1 - 3].all()  # the box holds its object's pixels
            boxed[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = True  # edges blur by <= 2 px
        assert not (white & ~boxed)[3:-3, 3:-3].any()  # every white pixel is inside a kept box
        torch.manual_seed(seed)
        again = ds[0]
        assert torch.equal(again[0], image) and torch.equal(again[1]["boxes"], target["boxes"])
    assert len(sizes) > 20  # the crops differ (aspect ratios vary)
    uncropped = make_detection_transforms(True, train_scales=[100], max_size=1000, hflip_prob=0.0, crop=0.0)
    _, t = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", transforms=uncropped)[0]
    assert t["size"].tolist() == [100, 200]
    with pytest.raises(ValueError, match="crop"):
        CocoDataModule(root=str(tmp_path), crop=1.5)


def test_resize_keeps_normalised_boxes_and_caps_long_side(tmp_path: Path) -> None:
    write_coco(tmp_path, [("a.png", 300, 100)], [(1, 5, [30.0, 10.0, 60.0, 50.0])])
    eval_tf = make_detection_transforms(False, val_scale=50, max_size=120)
    image, target = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", transforms=eval_tf)[0]
    assert target["size"].tolist() == [40, 120] == list(image.shape[-2:])  # long side capped at 120
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.2, 0.35, 0.2, 0.5]), atol=5e-3, rtol=0)
    capped = make_detection_transforms(False, val_scale=120, max_size=120)  # cap always binds
    _, t = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", transforms=capped)[0]
    assert t["size"].tolist() == [40, 120]
    train_tf = make_detection_transforms(True, train_scales=[20, 30], max_size=1000, hflip_prob=0.0)
    ds = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", transforms=train_tf)
    sizes = {tuple(ds[0][1]["size"].tolist()) for _ in range(20)}
    assert sizes <= {(20, 60), (30, 90)} and len(sizes) == 2


def test_degenerate_boxes_dropped_and_outside_boxes_clamped(tmp_path: Path) -> None:
    anns = [
        (1, 5, [10.0, 10.0, 0.0, 5.0]),
        (1, 9, [80.0, 60.0, 50.0, 50.0]),
        (1, 5, [-10.0, 0.0, 20.0, 10.0]),
    ]
    write_coco(tmp_path, [("a.png", 100, 80)], anns)
    for train in (True, False):
        tf = make_detection_transforms(train, train_scales=[80], val_scale=80, max_size=1000, hflip_prob=0.0)
        _, t = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", transforms=tf)[0]
        assert t["labels"].tolist() == [1, 0]
        torch.testing.assert_close(t["boxes"][0], torch.tensor([0.9, 0.875, 0.2, 0.25]))
        torch.testing.assert_close(t["boxes"][1], torch.tensor([0.05, 0.0625, 0.1, 0.125]))


def test_dropped_boxes_are_named_once_at_setup(tmp_path: Path) -> None:
    """Boxes the transforms drop (zero/negative size, no area inside the image) are kept out of the
    targets and named at setup: count, first annotation ids and file, one warning per kind."""
    anns = [(1, 5, [10.0, 10.0, 0.0, 5.0]), (1, 9, [10.0, 10.0, 20.0, 20.0]), (1, 5, [5.0, 5.0, 4.0, -1.0]),
            (2, 9, [70.0, 10.0, 10.0, 10.0]), (2, 9, [-30.0, 0.0, 20.0, 10.0])]
    images = [("a.png", 100, 80), ("b.png", 60, 50)]
    write_coco(tmp_path, images, anns)
    write_coco(tmp_path, images, anns[1:2], "val.json", write_images=False)
    dm = small_dm(tmp_path)
    with pytest.warns(UserWarning) as caught:
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "dropping" in str(w.message)]
    train_json = tmp_path / "train.json"
    assert messages == [
        f"{train_json}: dropping 2 box(es) with zero or negative width/height (annotation ids [1, 3]); they are "
        "not targets. Fix or remove them in the JSON.",
        f"{train_json}: dropping 2 box(es) with no area inside their image (annotation ids [4, 5]); they are "
        "not targets. Fix or remove them in the JSON.",
    ]  # nothing about val.json: its one box is fine
    targets = [dm.train_dataset[i][1]["labels"].tolist() for i in range(2)]
    assert targets == [[1], []]  # only the good box (category 9: label 1 of the sorted ids [5, 9])


def test_crowd_annotations_left_out(tmp_path: Path) -> None:
    path = write_coco(
        tmp_path, [("a.png", 40, 40)], [(1, 5, [1.0, 1.0, 5.0, 5.0]), (1, 9, [2.0, 2.0, 9.0, 9.0])]
    )
    data = json.loads(path.read_text())
    data["annotations"][1]["iscrowd"] = 1
    path.write_text(json.dumps(data))
    _, t = CocoDetectionDataset(root=tmp_path / "images", ann_file=path)[0]
    assert t["labels"].tolist() == [0]


def test_max_boxes_per_image_counts_targets_not_crowds(tmp_path: Path) -> None:
    anns = [(1, 5, [1.0, 1.0, 5.0, 5.0]), (2, 9, [2.0, 2.0, 9.0, 9.0]), (2, 5, [1.0, 1.0, 3.0, 3.0]),
            (2, 5, [4.0, 4.0, 3.0, 3.0])]
    path = write_coco(tmp_path, [("a.png", 40, 40), ("b.png", 40, 40)], anns)
    data = json.loads(path.read_text())
    assert max_boxes_per_image(data) == 3
    data["annotations"][3]["iscrowd"] = 1  # an ignore region, not a target
    path.write_text(json.dumps(data))
    assert max_boxes_per_image(data) == 2 and small_dm(tmp_path).data_info["max_boxes_per_image"] == 2
    assert max_boxes_per_image({"annotations": []}) == 0


def test_collate_pads_bottom_right() -> None:
    a = (torch.ones(3, 10, 20), {"x": 1})
    b = (torch.full((3, 33, 5), 2.0), {"x": 2})
    out = collate_detection([a, b], size_divisibility=32)
    assert out["images"].shape == (2, 3, 64, 32) and out["pixel_mask"].shape == (2, 64, 32)
    assert out["images"][0, :, :10, :20].eq(1).all() and out["images"][0].sum() == 3 * 10 * 20
    assert out["pixel_mask"][0].sum() == 64 * 32 - 200 and not out["pixel_mask"][1, :33, :5].any()
    assert collate_detection([a, b], size_divisibility=1)["images"].shape == (2, 3, 33, 20)
    assert [t["x"] for t in out["targets"]] == [1, 2]


def test_data_info_plain_types_and_category_mapping(tiny: Path, tmp_path: Path) -> None:
    dm = small_dm(tiny)
    info = dm.data_info  # available before setup
    assert info == {"num_classes": 2, "class_names": ["cat", "dog"], "category_ids": [5, 9], "max_boxes_per_image": 2}
    json.dumps(info)
    torch.save({"data_info": info}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True)["data_info"] == info


def test_paths_relative_absolute_and_test_defaults_to_val(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    val = elsewhere / "my_val.json"
    val.write_text((tiny / "val.json").read_text())
    dm = small_dm(tiny, val_json=str(val))
    dm.setup("test")
    assert dm.val_json == val and dm.test_json == val and len(dm.test_dataset) == 3
    assert len(list(dm.test_dataloader())) == 1


def test_unknown_argument_is_type_error(tiny: Path) -> None:
    with pytest.raises(TypeError):
        CocoDataModule(root=str(tiny), batchsize=4)  # type: ignore[call-arg]


# ------------------------------------------------------------------------------------ bad data


def test_missing_root_and_json(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="nope") as err:
        small_dm(tmp_path / "nope").setup("fit")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="train.json"):
        small_dm(tmp_path).setup("fit")


def test_malformed_json_names_file_line_column(tiny: Path) -> None:
    (tiny / "val.json").write_text('{\n  "images": [],\n  "categories": [,]\n}\n')
    with pytest.raises(DataError, match=r"val\.json:3:18") as err:
        small_dm(tiny).setup("fit")
    assert "line 3, column 18" in str(err.value)


def test_missing_image_file_named_with_count(tiny: Path) -> None:
    (tiny / "images" / "b.png").unlink()
    (tiny / "images" / "empty.png").unlink()
    with pytest.raises(MissingDataError, match=r"2 image file\(s\) listed in .*train\.json") as err:
        small_dm(tiny).setup("fit")
    assert "b.png" in str(err.value) and "empty.png" in str(err.value)


@pytest.mark.parametrize("bad_name", ["../secret.png", "/etc/passwd", "sub/../../x.png", "C:\\x.png"])
def test_file_name_escaping_images_folder_refused(tmp_path: Path, bad_name: str) -> None:
    write_coco(tmp_path, [("a.png", 10, 10)], [])
    write_coco(tmp_path, [(bad_name, 10, 10)], [], name="val.json", write_images=False)
    with pytest.raises(DataError, match=r"val\.json.*escapes the images folder"):
        small_dm(tmp_path).setup("fit")


def test_category_mismatch_names_both_files(tiny: Path) -> None:
    data = json.loads((tiny / "val.json").read_text())
    data["categories"][0]["name"] = "wolf"
    (tiny / "val.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"categories differ between .*train\.json and .*val\.json") as err:
        small_dm(tiny).setup("validate")
    assert "wolf" in str(err.value)


def test_annotation_with_unknown_category_or_image(tmp_path: Path) -> None:
    write_coco(tmp_path, [("a.png", 10, 10)], [(1, 77, [0.0, 0.0, 1.0, 1.0])])
    with pytest.raises(DataError, match=r"train\.json.*category_id 77"):
        CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json")
    write_coco(tmp_path, [("a.png", 10, 10)], [(2, 5, [0.0, 0.0, 1.0, 1.0])])
    with pytest.raises(DataError, match=r"train\.json.*image_id 2"):
        CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json")


def test_image_size_disagreeing_with_json(tmp_path: Path) -> None:
    write_coco(tmp_path, [("a.png", 30, 20)], [])
    Image.new("RGB", (31, 20)).save(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match=r"a\.png.*31x20.*30x20"):
        CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json")[0]


# ------------------------------------------------------------------------------------ image modes


def test_grayscale_palette_rgba_and_16bit_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (7, 5), 77).save(tmp_path / "l.png")
    Image.new("RGB", (7, 5), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "p.png"
    )
    rgba = Image.new("RGBA", (7, 5), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray(np.full((5, 7), 32768, dtype=np.uint16)).save(tmp_path / "i16.png")
    for name in ("l", "p", "rgba", "i16"):
        im = load_rgb_image(tmp_path / f"{name}.png", (7, 5))
        assert im.mode == "RGB" and im.size == (7, 5), name
    assert load_rgb_image(tmp_path / "l.png").getpixel((3, 3)) == (77, 77, 77)
    assert load_rgb_image(tmp_path / "p.png").getpixel((3, 3)) == (10, 200, 30)
    rgb = load_rgb_image(tmp_path / "rgba.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (255, 0, 0)
    assert load_rgb_image(tmp_path / "i16.png").getpixel((3, 3)) == (128, 128, 128)  # scaled, not clipped
    assert to_rgb(Image.new("I", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)


def _exif_jpeg(path: Path, size: tuple[int, int], orientation: int) -> None:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = 255  # left half white in stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif, quality=95)
    path.write_bytes(buf.getvalue())


def test_exif_rotation_applied_and_boxes_follow(tmp_path: Path) -> None:
    # stored 40x20 (w x h), orientation 6 = rotate 90° clockwise for display → 20x40
    write_coco(tmp_path, [("r.jpg", 20, 40)], [(1, 5, [0.0, 0.0, 20.0, 20.0])], write_images=False)
    _exif_jpeg(tmp_path / "images" / "r.jpg", (40, 20), 6)
    im = load_rgb_image(tmp_path / "images" / "r.jpg", (20, 40))
    assert im.size == (20, 40) and im.mode == "RGB"
    assert np.asarray(im)[:18].mean() > 200 and np.asarray(im)[22:].mean() < 50  # white half on top
    image, t = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json")[0]
    assert (
        image.shape == (3, 40, 20) and t["size"].tolist() == [40, 20] and t["orig_size"].tolist() == [40, 20]
    )
    torch.testing.assert_close(t["boxes"][0], torch.tensor([0.5, 0.25, 1.0, 0.5]))


def test_exif_ignored_when_json_describes_stored_pixels(tmp_path: Path) -> None:
    _exif_jpeg(tmp_path / "r.jpg", (40, 20), 6)
    with pytest.warns(UserWarning, match="EXIF orientation is ignored"):
        im = load_rgb_image(tmp_path / "r.jpg", (40, 20))
    assert im.size == (40, 20)


# ---------------------------------------------------------------------------------------------
# bad input: every case of docs/bad-inputs.md that is not tested above
# ---------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_images_named(tmp_path: Path) -> None:
    write_coco(tmp_path, [("a.png", 64, 48), ("b.png", 64, 48)], [])
    (tmp_path / "images" / "a.png").write_bytes(b"this is not a png")
    ds = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json")
    with pytest.raises(DataError, match=r"a\.png: cannot decode the image .*corrupt or truncated"):
        ds[0]
    Image.effect_noise((64, 48), 60).convert("RGB").save(tmp_path / "images" / "b.png")  # incompressible
    full = (tmp_path / "images" / "b.png").read_bytes()
    (tmp_path / "images" / "b.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"b\.png: cannot decode the image .*corrupt or truncated"):
        ds[1]


@pytest.mark.parametrize("what", ["images", "categories", "annotations"])
def test_duplicate_ids_refused(tmp_path: Path, what: str) -> None:
    path = write_coco(tmp_path, [("a.png", 10, 10), ("b.png", 10, 10)],
                      [(1, 5, [0.0, 0.0, 5.0, 5.0]), (2, 5, [0.0, 0.0, 5.0, 5.0])])
    data = json.loads(path.read_text())
    data[what][1]["id"] = data[what][0]["id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"train\.json.*appears twice"):
        CocoDetectionDataset(root=tmp_path / "images", ann_file=path)


def test_corrupt_and_truncated_images_stop_the_run_at_setup(tmp_path: Path) -> None:
    """Not mid-epoch: setup names every unreadable image (a non-image file, a truncated PNG)."""
    write_coco(tmp_path, [("a.png", 64, 48), ("b.png", 64, 48), ("c.png", 64, 48)], [], "train.json")
    write_coco(tmp_path, [("c.png", 64, 48)], [], "val.json", write_images=False)
    (tmp_path / "images" / "a.png").write_bytes(b"this is not a png")
    Image.effect_noise((64, 48), 60).convert("RGB").save(tmp_path / "images" / "b.png")
    full = (tmp_path / "images" / "b.png").read_bytes()
    (tmp_path / "images" / "b.png").write_bytes(full[: len(full) // 2])
    dm = CocoDataModule(root=str(tmp_path), batch_size=2, num_workers=0)
    with pytest.raises(DataError, match=r"2 image file\(s\) listed in .*train\.json cannot be read.*a\.png.*b\.png"):
        dm.setup("fit")


def test_coco128_splits_are_disjoint_and_follow_the_readme_rule():
    """data/coco128: sorted by file name, index i % 5 == 4 -> val, i % 5 == 2 -> test (held out), the rest
    train (its README); the shipped config tests on test.json, not on the split that picks the checkpoint."""
    root = Path(__file__).resolve().parents[2] / "data" / "coco128"
    splits = {s: load_coco_json(root / f"{s}.json") for s in ("train", "val", "test")}
    names = {s: {img["file_name"] for img in d["images"]} for s, d in splits.items()}
    ordered = sorted(set().union(*names.values()))
    assert len(ordered) == sum(len(n) for n in names.values()) == 128  # disjoint, all 128 images
    for i, name in enumerate(ordered):
        assert name in names["val" if i % 5 == 4 else "test" if i % 5 == 2 else "train"], (i, name)
    assert [len(names[s]) for s in ("train", "val", "test")] == [77, 25, 26]
    for split in ("train", "val", "test"):
        mapping = json.loads((root / f"multilabel_{split}.json").read_text())
        assert set(mapping) == names[split]
    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "data" / "coco128.yaml")
    assert (cfg.test_json, cfg.test_labels) == ("test.json", "multilabel_test.json")


# ------------------------------------------------------------------------------------ mosaic
COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0)]


def coloured_boxes(root: Path) -> None:
    """4 photos of different shapes, grey, each with one box filled with its own colour; photos 1 and 3
    are class 9 (label 1), 2 and 4 class 5 (label 0)."""
    sizes = [(120, 80), (60, 100), (90, 90), (150, 60)]
    boxes = [[20.0, 10.0, 70.0, 50.0], [10.0, 30.0, 40.0, 50.0], [30.0, 30.0, 40.0, 40.0], [50.0, 5.0, 60.0, 45.0]]
    write_coco(root, [(f"{i}.png", w, h) for i, (w, h) in enumerate(sizes)],
               [(i + 1, 9 if i % 2 == 0 else 5, b) for i, b in enumerate(boxes)])
    for i, ((w, h), (x, y, bw, bh)) in enumerate(zip(sizes, boxes)):
        pixels = np.full((h, w, 3), 128, dtype=np.uint8)
        pixels[int(y):int(y + bh), int(x):int(x + bw)] = COLOURS[i]
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")


def test_a_mosaic_puts_every_box_on_its_own_pixels(tmp_path: Path) -> None:
    """Four photos on one canvas: each kept box covers pixels of its photo's box colour (and its label),
    boxes stay on the canvas, and over a few draws every photo shows up."""
    coloured_boxes(tmp_path)
    ds = CocoDetectionDataset(root=tmp_path / "images", ann_file=tmp_path / "train.json", mosaic=1.0, mosaic_size=128)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = ds.mosaic_sample(seed % 4)
        assert image.shape == (3, 128, 128) and target["image_id"] == ds.ids[seed % 4]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert ((boxes >= 0) & (boxes <= 128)).all() and len(boxes) == len(target["labels"])
        for (x1, y1, x2, y2), label in zip(boxes.round().int().tolist(), target["labels"].tolist()):
            inside = image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].flatten(1).T.float()
            if len(inside) == 0:
                continue
            colour = torch.tensor([COLOURS[i] for i in range(4)], dtype=torch.float32)
            which = (inside[:, None] - colour[None]).abs().sum(-1).argmin(-1).mode().values.item()
            assert (inside - colour[which]).abs().sum(-1).lt(60).float().mean() > 0.9  # the box's own pixels
            assert label == (1 if which % 2 == 0 else 0)
            seen.add(which)
    assert seen == {0, 1, 2, 3}


def test_mosaics_come_with_the_key_and_stop_for_the_last_share(tmp_path: Path) -> None:
    """The train loader asks, at each epoch's start, whether mosaics are allowed: on until the last
    ``close_mosaic`` share of the training steps, then whole photos; the same key gives the same mosaic."""
    from types import SimpleNamespace

    coloured_boxes(tmp_path)
    write_coco(tmp_path, [("0.png", 120, 80)], [], "val.json", write_images=False)
    dm = small_dm(tmp_path, batch_size=4, mosaic=1.0, close_mosaic=0.5, train_scales=[48], max_size=64)
    dm.setup("fit")
    assert dm.data_info["max_boxes_per_image"] == 4  # one box per photo, four photos per mosaic
    task = SimpleNamespace(training_steps=lambda: 100.0)
    dm.trainer = SimpleNamespace(lightning_module=task, global_step=49, current_epoch=0)
    loader = dm.train_dataloader()
    assert [t["size"].tolist() for t in next(iter(loader))["targets"]] == [[48, 48]] * 4  # square mosaics
    dm.trainer.global_step = 50
    batch = next(iter(loader))  # the next epoch's start
    assert sum(h != w for h, w in (t["size"].tolist() for t in batch["targets"])) == 3  # whole photos (one square)
    seeded = loader.dataset
    first, again = seeded[(1, 7, True)], seeded[(1, 7, True)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    assert not torch.equal(first[0], seeded[(1, 8, True)][0])
    with pytest.raises(ValueError, match="data.mosaic and data.close_mosaic"):
        small_dm(tmp_path, mosaic=1.5)
