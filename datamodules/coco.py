"""COCO-format detection data: a validated dataset, transforms v2, padding collate and a DataModule.

A sample is ``(image, target)``:
- ``image``: float32 ``[3, H, W]``, ImageNet-normalised, H/W after resize (not padded).
- ``target``: ``labels`` int64 ``[n]`` (contiguous 0..C-1, category ids sorted ascending),
  ``boxes`` float32 ``[n, 4]`` cxcywh normalised to the resized, un-padded image,
  ``image_id`` int (the JSON's image id), ``orig_size`` int64 ``[2]`` = (h, w) from the JSON,
  ``size`` int64 ``[2]`` = (h, w) after resize.

A batch (``collate_detection``) is ``dict(images [B,3,Hmax,Wmax], pixel_mask bool [B,Hmax,Wmax]
(True = padding), targets list[dict])``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset
from torchvision.ops import box_convert
from torchvision.transforms import v2

from modules.backbone import IMAGENET_MEAN, IMAGENET_STD
from modules.criterion import clamped_area

from .base import SplitDataModule
from .errors import DataError, MissingDataError, check_relative_file_name, read_json
from .sampling import EpochSampler, EvalSampler, ResumableDataLoader, SeededDataset

# DETR's multi-scale recipe (Carion et al. 2020): shortest side 480..800 step 32, longer side <= 1333.
DETR_TRAIN_SCALES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
DETR_VAL_SCALE = 800
DETR_MAX_SIZE = 1333

EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how to rotate/flip the stored pixels
# What PIL raises for a file that is not a (complete) image.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and validate a COCO detection JSON; return the parsed dict (``annotations`` defaults to []).

    Raises ``DataError`` naming the file (and line/column for malformed JSON, the offending entry
    otherwise) when the file cannot serve as detection ground truth.
    """
    path = Path(path)
    missing = (
        f"COCO annotation file not found: {path}. Check the data config's root and *_json arguments "
        "(relative paths are resolved against root)."
    )
    return check_coco_dict(read_json(path, missing), path)


def check_coco_dict(data: Any, path: Path) -> dict[str, Any]:
    """Validate a parsed COCO detection dict (from a file, or built in memory from another format);
    ``path`` names its source in the messages. Returns it with ``annotations`` defaulting to []."""
    _check_sections(data, path)
    category_ids = _check_categories(data["categories"], path)
    image_ids = _check_images(data["images"], path)
    _check_annotations(data["annotations"], path, image_ids, category_ids)
    return data


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_sections(data: Any, path: Path) -> None:
    """A JSON object with lists ``images`` and ``categories``; ``annotations`` (a list) defaults to []."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a JSON object with 'images' and 'categories'.")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list '{key}'; a COCO detection file needs it.")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise DataError(f"{path}: 'annotations' must be a list.")


def _check_categories(categories: list[Any], path: Path) -> set[int]:
    """Every category has an integer ``id`` (unique) and a string ``name``; at least one. Returns the ids."""
    category_ids: set[int] = set()
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise DataError(
                f"{path}: categories[{i}] needs an integer 'id' and a string 'name', got {cat!r}."
            )
        if cat["id"] in category_ids:
            raise DataError(f"{path}: category id {cat['id']} appears twice in 'categories'.")
        category_ids.add(cat["id"])
    if not category_ids:
        raise DataError(f"{path}: 'categories' is empty; list the classes (id, name).")
    return category_ids


def _check_images(images: list[Any], path: Path) -> set[int]:
    """Every image entry passes ``_check_image`` and has a unique id. Returns the ids."""
    image_ids: set[int] = set()
    for i, img in enumerate(images):
        _check_image(img, f"{path}: images[{i}]")
        if img["id"] in image_ids:
            raise DataError(f"{path}: image id {img['id']} appears twice in 'images'.")
        image_ids.add(img["id"])
    return image_ids


def _check_image(img: Any, where: str) -> None:
    """An integer ``id``, positive integer ``width`` / ``height`` and a relative string ``file_name``."""
    if not isinstance(img, dict):
        raise DataError(f"{where} must be an object, got {img!r}.")
    if not _is_int(img.get("id")):
        raise DataError(f"{where} needs an integer 'id', got {img.get('id')!r}.")
    where = f"{where} (id {img['id']})"
    for key in ("width", "height"):
        v = img.get(key)
        if not (_is_number(v) and v > 0 and float(v).is_integer()):
            raise DataError(f"{where} needs a positive integer '{key}', got {v!r}.")
    file_name = img.get("file_name")
    if not isinstance(file_name, str):
        raise DataError(f"{where} needs a string 'file_name'.")
    check_relative_file_name(file_name, f"{where} file_name")


def _check_annotations(
    annotations: list[Any], path: Path, image_ids: set[int], category_ids: set[int]
) -> None:
    """Every annotation is an object with a unique id (when it has one) and passes ``_check_annotation``."""
    annotation_ids: set[Any] = set()
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise DataError(f"{path}: annotations[{i}] must be an object, got {ann!r}.")
        where = f"{path}: annotations[{i}] (id {ann.get('id')!r})"
        if ann.get("id") is not None:
            if ann["id"] in annotation_ids:
                raise DataError(f"{where}: annotation id {ann['id']!r} appears twice in 'annotations'.")
            annotation_ids.add(ann["id"])
        _check_annotation(ann, where, image_ids, category_ids)


def _check_annotation(ann: dict[str, Any], where: str, image_ids: set[int], category_ids: set[int]) -> None:
    """Known ``image_id`` and ``category_id``; ``bbox`` = [x, y, w, h] of 4 finite numbers."""
    if ann.get("image_id") not in image_ids:
        raise DataError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'.")
    if ann.get("category_id") not in category_ids:
        raise DataError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories'.")
    bbox = ann.get("bbox")
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(_is_number(v) for v in bbox)
        or not all(math.isfinite(v) for v in bbox)
    ):
        raise DataError(f"{where} needs 'bbox' = [x, y, w, h] of 4 finite numbers, got {bbox!r}.")


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """Build a pycocotools ``COCO`` index from an already parsed dict (no second file read, no prints)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def sorted_categories(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON's categories sorted by id: position i is contiguous label i."""
    return sorted(data["categories"], key=lambda c: c["id"])


def check_same_categories(
    reference: list[dict[str, Any]], reference_path: Path, other: list[dict[str, Any]], other_path: Path
) -> None:
    """Raise ``DataError`` naming both files unless both define the same (id, name) pairs."""
    ref = {c["id"]: c["name"] for c in reference}
    oth = {c["id"]: c["name"] for c in other}
    if ref == oth:
        return
    only_ref = sorted(set(ref.items()) - set(oth.items()))
    only_oth = sorted(set(oth.items()) - set(ref.items()))
    raise DataError(
        f"categories differ between {reference_path} and {other_path}: "
        f"only in {reference_path.name}: {only_ref[:10]}{' ...' if len(only_ref) > 10 else ''}; "
        f"only in {other_path.name}: {only_oth[:10]}{' ...' if len(only_oth) > 10 else ''}. "
        "Both splits must use the same category list so labels mean the same thing."
    )


def check_images_exist(images_dir: Path, data: dict[str, Any], json_path: Path) -> None:
    """Raise ``MissingDataError`` listing the first few image files the JSON names but the disk lacks."""
    if not images_dir.is_dir():
        raise MissingDataError(
            f"images folder not found: {images_dir} (needed by {json_path}). Check the images_dir argument."
        )
    flat = set(os.listdir(images_dir))
    missing = []
    for img in data["images"]:
        name = img["file_name"]
        present = name in flat if ("/" not in name and "\\" not in name) else (images_dir / name).is_file()
        if not present:
            missing.append(name)
    if missing:
        raise MissingDataError(
            f"{len(missing)} image file(s) listed in {json_path} are missing from {images_dir}, "
            f"e.g. {missing[:5]}. Restore the files or remove their entries from the JSON."
        )
    unreadable = []
    for img in data["images"]:
        problem = image_header_problem(images_dir / img["file_name"])
        if problem:
            unreadable.append(f"{img['file_name']} ({problem})")
    if unreadable:
        raise DataError(
            f"{len(unreadable)} image file(s) listed in {json_path} cannot be read as images, e.g. "
            f"{unreadable[:5]}; they are corrupt or truncated. Replace them or remove their entries from the JSON."
        )


def max_boxes_per_image(data: dict[str, Any]) -> int:
    """The most non-crowd boxes that one image of a COCO dict has (0 without annotations)."""
    counts: dict[Any, int] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    return max(counts.values(), default=0)


def warn_dropped_boxes(data: dict[str, Any], json_path: Path) -> None:
    """Name, once at setup, the boxes the transforms will drop from the targets: zero or negative
    width/height, or no area inside their image (clamping leaves nothing). Crowd boxes are ignore
    regions, not targets, and are not counted."""
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    empty, outside = [], []
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        if w <= 0 or h <= 0:
            empty.append(ann.get("id"))
        elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
            outside.append(ann.get("id"))
    for ids, what in ((empty, "zero or negative width/height"), (outside, "no area inside their image")):
        if ids:
            rank_zero_warn(
                f"{json_path}: dropping {len(ids)} box(es) with {what} (annotation ids {ids[:5]}"
                f"{' ...' if len(ids) > 5 else ''}); they are not targets. Fix or remove them in the JSON."
            )


def image_header_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image, from a cheap check at setup (None if it looks fine): the
    header must parse, and PNG files must pass their chunk CRC check to the end (which catches
    truncation). Other formats (JPEG) are fully checked only when first decoded."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
    except IMAGE_DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    - 16-bit grayscale (``I;16*``, and ``I`` holding values in 0..65535) is scaled by 255/65535, not
      clipped (PIL's own ``convert`` would turn most of it white); other ``I``/``F`` data is
      min-max scaled (``F`` in [0, 1] is scaled by 255).
    - Images with transparency (RGBA, LA, P with a transparent colour, ...) are composited over white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
            a = a / 257.0
        elif mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0
        else:
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        gray = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Open ``path`` as 8-bit RGB, applying EXIF orientation.

    ``expected_size`` is the JSON's (width, height). If the oriented image does not match it but the
    stored pixels do, the annotations were made on the un-rotated pixels, so orientation is not
    applied (with a warning); if neither matches, ``DataError``.
    """
    with _decode_image(path) as raw:
        oriented = raw
        if raw.getexif().get(EXIF_ORIENTATION, 1) != 1:
            oriented = ImageOps.exif_transpose(raw)
        if expected_size is not None and oriented.size != tuple(expected_size):
            oriented = _pixels_matching_json(raw, oriented, tuple(expected_size), path)
        rgb = to_rgb(oriented)
        return rgb.copy() if rgb is raw else rgb  # detach from the closed file object


def _decode_image(path: str | Path) -> Image.Image:
    """The fully decoded image file; ``DataError`` for a corrupt or truncated one."""
    raw = None
    try:
        raw = Image.open(path)
        raw.load()
    except IMAGE_DECODE_ERRORS as e:
        if raw is not None:
            raw.close()
        raise DataError(
            f"{path}: cannot decode the image ({type(e).__name__}: {e}); the file is corrupt or truncated. "
            "Replace it or remove its entry from the JSON."
        ) from e
    return raw


def _pixels_matching_json(
    raw: Image.Image, oriented: Image.Image, expected_size: tuple[int, int], path: str | Path
) -> Image.Image:
    """The stored pixels when they (not the EXIF-oriented image) have the JSON's size, with a warning;
    ``DataError`` when neither does (the boxes would be misplaced)."""
    if raw.size != expected_size:
        raise DataError(
            f"{path}: image is {oriented.size[0]}x{oriented.size[1]} (w x h) but its JSON entry "
            f"says {expected_size[0]}x{expected_size[1]}; the boxes would be misplaced. Fix the "
            "JSON's width/height or use the original image file."
        )
    warnings.warn(
        f"{path}: the JSON's width/height match the stored pixels, not the EXIF-oriented "
        "image; EXIF orientation is ignored so the boxes stay aligned.",
        stacklevel=3,
    )
    return raw


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


class RandomSizeCrop(v2.Transform):
    """DETR's random crop, box-aware: with probability ``p``, cut the photo to a random rectangle whose
    height and width are each a uniform fraction in ``[min_fraction, 1]`` of the photo's, placed
    uniformly; boxes are cut with it (a later ``ClampBoundingBoxes`` / ``SanitizeBoundingBoxes``
    drops what falls outside). A photo with boxes keeps at least one: a rectangle containing no box
    centre is drawn again, up to ``tries`` times, and after that the photo stays whole. Random numbers
    come from torch's generator, so a seeded sample (``SeededDataset``) crops the same way again."""

    def __init__(self, p: float = 0.5, min_fraction: float = 0.5, tries: int = 10) -> None:
        super().__init__()
        if not 0 <= p <= 1 or not 0 < min_fraction <= 1:
            raise ValueError(f"crop probability must be in [0, 1] and its min_fraction in (0, 1], got {p}, {min_fraction}")
        self.p, self.min_fraction, self.tries = float(p), float(min_fraction), int(tries)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if self.p == 0 or float(torch.rand(())) >= self.p:
            return {"crop": None}
        height, width = v2.query_size(flat_inputs)
        boxes = next((x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)), None)
        centres = None
        if boxes is not None and len(boxes):
            xyxy = v2.functional.convert_bounding_box_format(boxes.as_subclass(Tensor), old_format=boxes.format,
                                                             new_format=tv_tensors.BoundingBoxFormat.XYXY)
            centres = (xyxy[:, :2] + xyxy[:, 2:]) / 2
        for _ in range(self.tries):
            fh, fw = (self.min_fraction + (1 - self.min_fraction) * torch.rand(2)).tolist()
            h, w = max(1, round(height * fh)), max(1, round(width * fw))
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            if centres is None or bool(((centres[:, 0] >= left) & (centres[:, 0] < left + w)
                                        & (centres[:, 1] >= top) & (centres[:, 1] < top + h)).any()):
                return {"crop": {"top": top, "left": left, "height": h, "width": w}}
        return {"crop": None}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["crop"] is None:
            return inpt
        return self._call_kernel(v2.functional.crop, inpt, **params["crop"])


def make_detection_transforms(
    train: bool,
    train_scales: Sequence[int] = tuple(DETR_TRAIN_SCALES),
    val_scale: int = DETR_VAL_SCALE,
    max_size: int = DETR_MAX_SIZE,
    hflip_prob: float = 0.5,
    crop: float = 0.0,
    crop_min: float = 0.5,
) -> v2.Transform:
    """Transforms v2 pipeline on ``(tv_tensors.Image uint8, target with BoundingBoxes)``.

    train: horizontal flip, with probability ``crop`` a random crop (``RandomSizeCrop``: sides
    ``crop_min``..1 of the photo's), random shortest side from ``train_scales`` (longer side <=
    ``max_size``). eval: shortest side ``val_scale`` (longer side <= ``max_size``). Both then clamp
    boxes to the image, drop degenerate boxes (< 1 px), convert to float in [0, 1] and normalise with
    ImageNet mean/std.
    """
    if train:
        geometric: list[v2.Transform] = [
            v2.RandomHorizontalFlip(hflip_prob),
            *([RandomSizeCrop(crop, crop_min)] if crop > 0 else []),
            v2.RandomShortestSize(min_size=[int(s) for s in train_scales], max_size=int(max_size)),
        ]
    elif int(max_size) > int(val_scale):
        geometric = [v2.Resize(int(val_scale), max_size=int(max_size))]
    else:  # the cap always binds: the longer side becomes max_size (Resize wants max_size > size)
        geometric = [v2.Resize(None, max_size=int(max_size))]
    return v2.Compose(
        [
            *geometric,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class CocoDetectionDataset(CocoDetection):
    """COCO detection JSON + image folder → ``(image [3,H,W] float, target dict)`` (see module doc).

    Args:
        root: the images folder; ``file_name`` entries are relative to it.
        ann_file: the COCO JSON (validated with ``load_coco_json`` unless ``coco_json`` is given).
        transforms: a v2 transform on ``(tv_tensors.Image, target)``; target carries ``boxes`` as
            ``tv_tensors.BoundingBoxes`` (XYXY, absolute), ``labels`` and ``image_id``. None: no change.
        coco_json: the already parsed and validated JSON (avoids reading big files twice).
        category_ids: label i ↔ category_ids[i]; default: the JSON's category ids sorted.
        mosaic: the probability that a training sample is a mosaic (:meth:`mosaic_sample`), when its
            key allows it (``dataset[(index, True)]``; ``dataset[index]`` never is one).
        mosaic_size: the side of a mosaic's square canvas in pixels.

    Crowd annotations (``iscrowd=1``) are left out of the targets (COCO evaluation treats them as
    ignore regions through the ground-truth JSON).
    """

    def __init__(
        self,
        *,
        root: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        coco_json: dict[str, Any] | None = None,
        category_ids: Sequence[int] | None = None,
        mosaic: float = 0.0,
        mosaic_size: int = 512,
    ) -> None:
        # CocoDetection.__init__ would parse the JSON again through pycocotools; build the index here.
        VisionDataset.__init__(self, root, transforms=transforms)
        self.ann_file = Path(ann_file)
        data = coco_json if coco_json is not None else load_coco_json(self.ann_file)
        self.coco = coco_from_dict(data)
        self.ids = sorted(self.coco.imgs.keys())
        if category_ids is None:
            category_ids = [c["id"] for c in sorted_categories(data)]
        self.category_ids = [int(c) for c in category_ids]
        self.cat_id_to_label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.mosaic, self.mosaic_size = float(mosaic), int(mosaic_size)

    def _load_image(self, id: int) -> Image.Image:
        info = self.coco.imgs[id]
        return load_rgb_image(Path(self.root) / info["file_name"], (info["width"], info["height"]))

    def _load_target(self, id: int) -> list[dict[str, Any]]:
        return [a for a in self.coco.imgToAnns.get(id, []) if not a.get("iscrowd", 0)]

    def __getitem__(self, index: int | tuple[int, bool]) -> tuple[Tensor, dict[str, Any]]:
        index, mosaic_allowed = index if isinstance(index, tuple) else (index, False)
        image_id = self.ids[index]
        if mosaic_allowed and self.mosaic > 0 and float(torch.rand(())) < self.mosaic:
            image, target = self.mosaic_sample(index)
        else:
            image = tv_tensors.Image(v2.functional.pil_to_tensor(self._load_image(image_id)))
            target = self._transformable_target(image_id, canvas=(image.shape[-2], image.shape[-1]))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = image.as_subclass(Tensor)
        if not image.is_floating_point():
            image = image.float().div_(255.0)
        return image, self._contract_target(target, image_id, size=image.shape[-2:])

    def mosaic_sample(self, index: int, min_visible: float = 0.25) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Four photos on one square canvas of ``mosaic_size`` px (YOLO's mosaic; DEIM's "dense
        one-to-one": ~4x the boxes per image for the one-to-one matching): ``index`` and three drawn at
        random fill the four rectangles that a centre, drawn in the middle half of the canvas, cuts it
        into; each photo is scaled to cover its rectangle, its corner at the centre, and cut by the
        rectangle. A box keeps ``min_visible`` of its area or is left out. The target is the first
        photo's ``image_id``."""
        size = self.mosaic_size
        centre = (torch.rand(2) * 0.5 + 0.25) * size  # (x, y)
        picks = [index, *torch.randint(len(self.ids), (3,)).tolist()]
        canvas = Image.new("RGB", (size, size))
        cx, cy = round(float(centre[0])), round(float(centre[1]))
        boxes, labels = [], []
        for corner, pick in enumerate(picks):  # 0: top-left of the centre, 1: top-right, 2: bottom-left, 3: bottom-right
            left, top = (0 if corner in (0, 2) else cx), (0 if corner in (0, 1) else cy)
            right, bottom = (cx if corner in (0, 2) else size), (cy if corner in (0, 1) else size)
            image_id = self.ids[pick]
            photo = self._load_image(image_id)
            scale = max((right - left) / photo.width, (bottom - top) / photo.height)
            w, h = max(1, math.ceil(photo.width * scale)), max(1, math.ceil(photo.height * scale))
            x0 = cx - w if corner in (0, 2) else cx  # the photo's corner at the centre
            y0 = cy - h if corner in (0, 1) else cy
            cut = photo.resize((w, h), Image.BILINEAR).crop((left - x0, top - y0, right - x0, bottom - y0))
            canvas.paste(cut, (left, top))
            anns = self._load_target(image_id)
            xyxy = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
                               "xywh", "xyxy") * scale + torch.tensor([x0, y0, x0, y0])
            lo, hi = torch.tensor([left, top, left, top]), torch.tensor([right, bottom, right, bottom])
            seen = xyxy.clamp(lo, hi)
            keep = clamped_area(seen) >= min_visible * clamped_area(xyxy).clamp(min=1e-6)
            boxes.append(seen[keep])
            labels += [self.cat_id_to_label[a["category_id"]] for a, k in zip(anns, keep.tolist()) if k]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(canvas))
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format=tv_tensors.BoundingBoxFormat.XYXY,
                                              canvas_size=(size, size)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(self.ids[index]),
        }
        return image, target

    def _transformable_target(self, image_id: int, canvas: tuple[int, int]) -> dict[str, Any]:
        """The image's non-crowd boxes as ``BoundingBoxes`` (XYXY, absolute) that transforms v2 move."""
        anns = self._load_target(image_id)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                box_convert(xywh, "xywh", "xyxy"),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=canvas,
            ),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": int(image_id),
        }

    def _contract_target(self, target: dict[str, Any], image_id: int, size: torch.Size) -> dict[str, Any]:
        """The transformed target in the batch contract: boxes cxcywh normalised to ``size`` = (h, w)."""
        info = self.coco.imgs[image_id]
        h, w = size
        boxes = box_convert(target["boxes"].as_subclass(Tensor).float(), "xyxy", "cxcywh")
        boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        return {
            "labels": target["labels"].to(torch.int64),
            "boxes": boxes.reshape(-1, 4),
            "image_id": int(image_id),
            "orig_size": torch.tensor([info["height"], info["width"]], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }


def collate_detection(
    batch: Sequence[tuple[Tensor, dict[str, Any]]], size_divisibility: int = 32
) -> dict[str, Any]:
    """Pad images bottom/right to a common size.

    Returns ``images`` float ``[B, 3, Hmax, Wmax]`` (zeros in the padding), ``pixel_mask`` bool
    ``[B, Hmax, Wmax]`` (True = padding) and ``targets`` (list of B dicts). Hmax/Wmax are rounded up
    to a multiple of ``size_divisibility`` (1 or 0: no rounding).
    """
    images = [img for img, _ in batch]
    h_max = max(img.shape[-2] for img in images)
    w_max = max(img.shape[-1] for img in images)
    if size_divisibility > 1:
        h_max = math.ceil(h_max / size_divisibility) * size_divisibility
        w_max = math.ceil(w_max / size_divisibility) * size_divisibility
    out = images[0].new_zeros((len(images), images[0].shape[0], h_max, w_max))
    mask = torch.ones((len(images), h_max, w_max), dtype=torch.bool)
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        out[i, :, :h, :w] = img
        mask[i, :h, :w] = False
    return {"images": out, "pixel_mask": mask, "targets": [t for _, t in batch]}


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class CocoDataModule(SplitDataModule):
    """Detection DataModule over a COCO JSON + image folder per split.

    Relative ``images_dir`` / ``*_json`` paths resolve against ``root``; absolute ones are used as is.
    ``test_json=None`` tests on the validation split. Labels are contiguous 0..C-1 in the train JSON's
    category-id order (``data_info``); val/test JSONs must define the same categories.

    ``target="multilabel"`` yields multi-label batches instead (``images``, ``pixel_mask``, ``labels``
    multi-hot ``[B, C]``): each image's set of categories from the split's JSON, or, where
    ``train_labels`` / ``val_labels`` / ``test_labels`` name a ``{file_name: [class names]}`` file,
    from that file (see ``datamodules/multilabel.py``). Those three are ignored for detection.
    """

    def __init__(
        self,
        *,
        root: str,
        images_dir: str = "images",
        train_json: str = "train.json",
        val_json: str = "val.json",
        test_json: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        train_scales: Sequence[int] = tuple(DETR_TRAIN_SCALES),
        val_scale: int = DETR_VAL_SCALE,
        max_size: int = DETR_MAX_SIZE,
        size_divisibility: int = 32,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        target: str = "detection",
        train_labels: str | None = None,
        val_labels: str | None = None,
        test_labels: str | None = None,
        mosaic: float = 0.0,
        close_mosaic: float = 0.33,
        crop: float = 0.0,
        crop_min: float = 0.5,
    ) -> None:
        super().__init__()
        RandomSizeCrop(crop, crop_min)  # the one check of both values, before any data is read
        self.crop, self.crop_min = float(crop), float(crop_min)
        if not 0 <= mosaic <= 1 or not 0 <= close_mosaic <= 1:
            raise ValueError(f"data.mosaic and data.close_mosaic are fractions in [0, 1], got {mosaic}, {close_mosaic}")
        self.mosaic, self.close_mosaic = float(mosaic), float(close_mosaic)
        if target not in ("detection", "multilabel"):
            raise ValueError(f"target must be 'detection' or 'multilabel', got {target!r}")
        self.target = target
        self._labels_args = {"train": train_labels, "val": val_labels, "test": test_labels}
        self.root = Path(root)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_scales = [int(s) for s in train_scales]
        if not self.train_scales:
            raise ValueError("train_scales must list at least one shortest-side size")
        self.val_scale = int(val_scale)
        self.max_size = int(max_size)
        self.size_divisibility = int(size_divisibility)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self._images_dir_arg = images_dir
        self._train_json_arg = train_json
        self._val_json_arg = val_json
        self._test_json_arg = test_json
        self.train_dataset: CocoDetectionDataset | None = None
        self.val_dataset: CocoDetectionDataset | None = None
        self.test_dataset: CocoDetectionDataset | None = None
        self._categories: list[dict[str, Any]] | None = None
        self._max_boxes: int | None = None  # the most boxes in one training image (read with the categories)

    # paths -----------------------------------------------------------------------------------
    def _resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.root / path

    @property
    def images_dir(self) -> Path:
        return self._resolve(self._images_dir_arg)

    @property
    def train_json(self) -> Path:
        return self._resolve(self._train_json_arg)

    @property
    def val_json(self) -> Path:
        return self._resolve(self._val_json_arg)

    @property
    def test_json(self) -> Path:
        return self._resolve(self._test_json_arg) if self._test_json_arg is not None else self.val_json

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise MissingDataError(
                f"dataset root not found: {self.root}. Set the data config's root to the folder holding "
                f"'{self._images_dir_arg}' and the JSON files."
            )

    def _load_split_json(self, path: Path) -> dict[str, Any]:
        """The validated COCO dict of a split (formats other than COCO JSON build it in memory)."""
        return load_coco_json(path)

    # categories --------------------------------------------------------------------------------
    def _reference_categories(self, train_data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if self._categories is None:
            self._check_root()
            data = train_data if train_data is not None else self._load_split_json(self.train_json)
            self._categories = sorted_categories(data)
            self._max_boxes = max_boxes_per_image(data)
        return self._categories

    def use_categories(self, categories: list[dict[str, Any]]) -> None:
        """Fix the label order to ``categories`` (label i = ``categories[i]``, ``{"id", "name"}``) instead of
        reading it from the train JSON: a trained model's classes, to evaluate without the training split."""
        self._categories = [dict(c) for c in categories]

    @property
    def data_info(self) -> dict[str, Any]:
        """``{"num_classes": C, "class_names": [...], "category_ids": [...]}``; label i ↔ category_ids[i];
        ``max_boxes_per_image``: the most (non-crowd) boxes in one training image (x 4 with mosaics, which
        hold four photos), when the training split was read (it sizes ``model.num_queries=auto``).

        Plain Python types only (safe for ``torch.load(weights_only=True)``). Reads the train JSON
        (not the images) if ``setup`` has not run.
        """
        cats = self._reference_categories()
        info = {
            "num_classes": len(cats),
            "class_names": [str(c["name"]) for c in cats],
            "category_ids": [int(c["id"]) for c in cats],
        }
        if self._max_boxes is not None and self.target == "detection":
            info["max_boxes_per_image"] = self._max_boxes * (4 if self.mosaic > 0 else 1)
        if self.target == "multilabel":  # training-set frequency of each class (label order of sequences)
            if self.train_dataset is None:
                self.setup("fit")
            info["label_counts"] = list(self.train_dataset.label_counts)
        return info

    # setup -------------------------------------------------------------------------------------
    def labels_file(self, split: str) -> Path | None:
        """The ``{file_name: [class names]}`` file of a split (multilabel target), or None."""
        arg = self._labels_args[split]
        return self._resolve(arg) if arg is not None else None

    def _build(
        self, json_path: Path, train: bool, train_data: dict[str, Any] | None = None, split: str = "train"
    ) -> CocoDetectionDataset:
        data = train_data if train_data is not None else self._load_split_json(json_path)
        reference = self._reference_categories(train_data)
        if json_path != self.train_json:
            check_same_categories(reference, self.train_json, sorted_categories(data), json_path)
        if self.target == "multilabel":
            from .multilabel import build_multilabel_dataset  # imported here: it builds on this module

            return build_multilabel_dataset(self, split, json_path, data, reference, train)
        check_images_exist(self.images_dir, data, json_path)
        warn_dropped_boxes(data, json_path)
        transforms = make_detection_transforms(
            train, train_scales=self.train_scales, val_scale=self.val_scale, max_size=self.max_size,
            crop=self.crop, crop_min=self.crop_min,
        )
        return CocoDetectionDataset(
            root=self.images_dir,
            ann_file=json_path,
            transforms=transforms,
            coco_json=data,
            category_ids=[c["id"] for c in reference],
            mosaic=self.mosaic if train else 0.0,
            mosaic_size=self.max_size,
        )

    def setup(self, stage: str | None = None) -> None:
        """Validate and build the datasets ``stage`` needs (fit: train+val, validate: val, test/predict: test)."""
        self._check_root()
        if stage in (None, "fit") and self.train_dataset is None:
            train_data = self._load_split_json(self.train_json)
            self.train_dataset = self._build(self.train_json, train=True, train_data=train_data)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build(self.val_json, train=False, split="val")
        if stage in (None, "test", "predict") and self.test_dataset is None:
            if self._test_json_arg is None and self.val_dataset is not None:
                self.test_dataset = self.val_dataset
            else:
                split = "test" if self._test_json_arg is not None else "val"
                self.test_dataset = self._build(self.test_json, train=False, split=split)

    def _mosaic_allowed(self) -> tuple[bool]:
        """Asked at each training epoch's start (main process): mosaics stay on until the last
        ``close_mosaic`` share of the run's training steps (its plan, or the length a time budget fitted),
        so that the run ends on whole photos, as YOLO's ``close_mosaic`` does."""
        trainer = self.trainer
        task = trainer.lightning_module if trainer is not None else None
        total = task.training_steps() if hasattr(task, "training_steps") else math.inf
        return (not math.isfinite(total) or trainer.global_step < (1 - self.close_mosaic) * total,)

    # loaders -----------------------------------------------------------------------------------
    def _loader(self, dataset: CocoDetectionDataset | None, shuffle: bool, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{name} dataset not built: call setup() with the matching stage first")
        # Order and augmentations are functions of (seed, epoch, index); see datamodules/sampling.py.
        generator = torch.Generator()
        if shuffle:
            options = self._mosaic_allowed if getattr(dataset, "mosaic", 0) else None
            sampler = EpochSampler(dataset, shuffle=True, generator=generator, options=options)
            if self.trainer is not None:
                sampler.set_epoch(self.trainer.current_epoch)
            dataset = SeededDataset(dataset=dataset)
        else:
            sampler = EvalSampler(dataset)
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=partial(getattr(dataset, "collate_fn", collate_detection),  # multilabel: its own
                               size_divisibility=self.size_divisibility),
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=generator,
            progress=self.train_progress if shuffle else None,
        )
