"""Detection folders in other formats (Pascal VOC, YOLO) served as COCO.

Each split of such a folder is converted into a COCO detection dict in memory (``images`` with
width/height, ``annotations`` with id, image_id, category_id, ``bbox`` [x, y, w, h] in pixels,
``area``, ``iscrowd``; ``categories`` with ids 1..C in class order). The dict is validated by
``check_coco_dict`` and served by ``CocoDataModule``'s dataset, transforms and collate, so every format
gets the same checks, batches and COCO evaluation (``dataset.coco`` is the ground truth).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .coco import EXIF_ORIENTATION, IMAGE_DECODE_ERRORS, CocoDataModule, check_coco_dict
from .errors import DataError, MissingDataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# A box may overshoot the image border by this much (annotation tools' rounding, VOC's 1-based
# pixels); it is clamped to the border. Any further out is an error.
EDGE_TOLERANCE_PX = 1.0


@dataclass
class ImageRecord:
    """One image of a split: ``file_name`` relative to the images folder, size (w, h) in pixels and
    its boxes as ``(x1, y1, x2, y2, class_index, iscrowd)`` in pixels."""

    file_name: str
    width: int
    height: int
    boxes: list[tuple[float, float, float, float, int, int]] = field(default_factory=list)


def image_size(path: Path, stated: tuple[int, int] | None, where: str) -> tuple[int, int]:
    """(width, height) of ``path`` as the loader will see it: EXIF orientation applied.

    ``stated`` is the annotation's own (w, h), or None. It must equal the oriented size, or the stored
    pixels' size (then the loader ignores EXIF orientation, as for a COCO JSON); otherwise ``DataError``
    naming ``where`` (the annotation file). Reads the image header only.
    """
    try:
        with Image.open(path) as im:
            stored = im.size
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except IMAGE_DECODE_ERRORS as e:
        raise DataError(
            f"{where}: image {path} cannot be read ({type(e).__name__}: {e}); it is corrupt or truncated. "
            "Replace it or remove it from the dataset."
        ) from e
    oriented = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
    if stated is None or tuple(stated) in (oriented, stored):
        return tuple(stated) if stated is not None else oriented
    raise DataError(
        f"{where}: the annotation says the image is {stated[0]}x{stated[1]} (w x h) but {path} is "
        f"{oriented[0]}x{oriented[1]}; the boxes would be misplaced. Fix the size in the annotation or use "
        "the original image file."
    )


def box_inside(
    box: Sequence[float], width: int, height: int, where: str
) -> tuple[float, float, float, float]:
    """``box`` (x1, y1, x2, y2) in pixels clamped to the image; ``DataError`` naming ``where`` if it lies
    more than ``EDGE_TOLERANCE_PX`` outside the image or is inverted (x2 < x1 or y2 < y1)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise DataError(
            f"{where}: box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is inverted (x2 < x1 or "
            "y2 < y1). Fix the box's corners."
        )
    t = EDGE_TOLERANCE_PX
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise DataError(
            f"{where}: box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
            f"{width}x{height} image. Fix the box (or the image size it was annotated on)."
        )
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def coco_dict(records: Sequence[ImageRecord], class_names: Sequence[str]) -> dict[str, Any]:
    """A COCO detection dict: image ids 1..N in ``records`` order, annotation ids 1..M, category id =
    class index + 1. ``bbox`` = [x1, y1, x2 - x1, y2 - y1] and ``area`` = w * h."""
    images, annotations = [], []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": rec.file_name, "width": rec.width, "height": rec.height})
        for x1, y1, x2, y2, cls, crowd in rec.boxes:
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(crowd),
            })
    categories = [{"id": i + 1, "name": str(n), "supercategory": ""} for i, n in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def finite_number(text: str | None) -> float | None:
    """``text`` as a finite float, or None if it is missing or not a finite number."""
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class ConvertedDataModule(CocoDataModule):
    """A ``CocoDataModule`` whose splits are COCO dicts built in memory from another format.

    Subclasses implement ``convert() -> {split: (source, coco dict)}`` (``train`` and ``val`` required,
    ``test`` optional; ``source`` is the list file or folder a split came from and names it in
    messages). Keys of the COCO config that a format does not use (``train_json``...) must stay null.
    """

    format_name = "?"
    root_help = ""

    def __init__(self, *, root: str, unused: dict[str, Any] | None = None, **kwargs: Any) -> None:
        for key, value in (unused or {}).items():
            if value is not None:
                raise ValueError(f"data.{key}={value!r} is not used by data={self.format_name}; leave it null.")
        super().__init__(root=root, **kwargs)
        self._converted: dict[str, tuple[Path, dict[str, Any]]] | None = None

    def convert(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        raise NotImplementedError

    def splits(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        """split -> (source, validated COCO dict); converted once, on first use."""
        if self._converted is None:
            self._check_root()
            converted = {s: (src, check_coco_dict(d, src)) for s, (src, d) in self.convert().items()}
            self._test_json_arg = "test" if "test" in converted else None
            self._converted = converted
        return self._converted

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise MissingDataError(f"dataset root not found: {self.root}. Set data.root to {self.root_help}.")

    @property
    def train_json(self) -> Path:
        return self.splits()["train"][0]

    @property
    def val_json(self) -> Path:
        return self.splits()["val"][0]

    @property
    def test_json(self) -> Path:
        splits = self.splits()
        return splits.get("test", splits["val"])[0]

    def _load_split_json(self, path: Path) -> dict[str, Any]:
        for source, data in self.splits().values():
            if source == path:
                return data
        raise KeyError(f"no split of {self.root} comes from {path}")
