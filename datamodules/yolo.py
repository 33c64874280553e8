"""Ultralytics/YOLO detection folders as COCO detection data: ``data=yolo``.

``root/data.yaml`` (the file name is ``data_yaml``) as Ultralytics writes it::

    path: .                 # optional dataset folder; relative: to data.yaml's folder (default: that folder)
    train: images/train     # a folder of images, a .txt list of image paths, or a list of those
    val: images/val
    test: images/test       # optional; without it the test split is the val split
    names: [cat, dog]       # or {0: cat, 1: dog}; label i = names[i]; `nc`, if given, must match

Split entries resolve against ``path``; an entry ``../x`` that does not exist there is tried as
``x`` (how Ultralytics reads Roboflow exports). Lines of a list file resolve against the list's
folder. Folders are searched recursively for image files (``IMAGE_SUFFIXES``).

Each image's labels are in the file at its path with the last ``images`` folder replaced by
``labels`` and the suffix by ``.txt``; one box per line, ``class cx cy w h``, normalised to the image
(EXIF orientation applied) in [0, 1]. An image without a label file has no objects (as in Ultralytics);
a split in which no image has one is an error (wrong layout). COCO ``bbox`` = the box in pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .errors import DataError, MissingDataError
from .formats import (
    IMAGE_SUFFIXES,
    ConvertedDataModule,
    ImageRecord,
    box_inside,
    coco_dict,
    finite_number,
    image_size,
)

SPLIT_KEYS = ("train", "val", "test")


def read_data_yaml(path: Path) -> dict[str, Any]:
    """Parse and check ``data.yaml``: a mapping with ``train``, ``val`` and ``names``."""
    if not path.is_file():
        raise MissingDataError(f"YOLO dataset file not found: {path}. Set data.root to the folder holding "
                               "data.yaml (or data.data_yaml to its name).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise DataError(f"{where}: malformed YAML ({e.problem}). Fix the file there.") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable YAML file ({e}).") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: must be a mapping with train, val and names keys.")
    for key in ("train", "val", "names"):
        if not data.get(key):
            raise DataError(f"{path}: missing '{key}'. A YOLO data.yaml needs train, val and names.")
    return data


def class_names(data: dict[str, Any], path: Path) -> list[str]:
    """``names`` as a list (a dict must have the keys 0..n-1); checks ``nc`` when given."""
    names = data["names"]
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: 'names' keys must be the class indices 0..{len(names) - 1}, got {sorted(names)}.")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not all(isinstance(n, str | int | float) for n in names):
        raise DataError(f"{path}: 'names' must be a list of class names or a {{index: name}} mapping.")
    if len({str(n) for n in names}) != len(names):
        raise DataError(f"{path}: 'names' lists a class name twice: {names}.")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{path}: nc={data['nc']} but 'names' has {len(names)} entries; make them agree.")
    return [str(n) for n in names]


def label_path(image: Path) -> Path:
    """Where YOLO keeps ``image``'s labels: last ``images`` folder -> ``labels``, suffix -> ``.txt``."""
    parts = list(image.parts)
    folders = [i for i, p in enumerate(parts[:-1]) if p == "images"]
    if folders:
        parts[folders[-1]] = "labels"
    return Path(*parts).with_suffix(".txt")


def images_in(entry: Path, where: str) -> list[Path]:
    """The image files of one split entry: a folder (recursive) or a list file (one path per line)."""
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if entry.is_file():
        images = []
        for lineno, raw in enumerate(entry.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line:
                continue
            image = Path(os.path.normpath(entry.parent / line))  # an absolute line stays as it is
            if not image.is_file():
                raise MissingDataError(f"{entry}:{lineno}: image {line!r} not found ({image}). Restore it or "
                                       "remove the line.")
            images.append(image)
        return images
    raise MissingDataError(f"{where}: {entry} does not exist. Fix the entry (a folder of images or a .txt list).")


def read_labels(path: Path, num_classes: int, width: int, height: int) -> list[tuple]:
    """Boxes of one label file as ``(x1, y1, x2, y2, class, 0)`` in pixels; errors name file and line."""
    boxes = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        tokens = raw.split()
        if not tokens:
            continue
        values = [finite_number(t) for t in tokens]
        if len(tokens) != 5 or any(v is None for v in values):
            hint = " (polygon/segment labels are not supported: convert them to boxes)" if len(tokens) > 5 else ""
            raise DataError(f"{path}:{lineno}: expected 'class cx cy w h' (5 numbers), got {raw.strip()!r}{hint}.")
        cls, cx, cy, w, h = values
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise DataError(f"{path}:{lineno}: class {tokens[0]} is not one of data.yaml's names "
                            f"(0..{num_classes - 1}). Fix the class index or add the class to names.")
        if w < 0 or h < 0:
            raise DataError(f"{path}:{lineno}: negative box width or height in {raw.strip()!r}.")
        corners = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        boxes.append((*box_inside(corners, width, height, f"{path}:{lineno}"), int(cls), 0))
    return boxes


class YoloDataModule(ConvertedDataModule):
    """Detection DataModule over an Ultralytics/YOLO folder (see the module docstring).

    Args (besides ``CocoDataModule``'s batch/size/target settings):
        data_yaml: the dataset file, relative to ``root``.
    ``images_dir`` is not a setting: images live where data.yaml's entries say (the COCO view's
    ``file_name`` is relative to the folder that holds them all).
    """

    format_name = "yolo"
    root_help = "the folder holding the YOLO data.yaml"

    def __init__(self, *, root: str, data_yaml: str = "data.yaml", images_dir: str | None = None,
                 train_json: str | None = None, val_json: str | None = None, test_json: str | None = None,
                 **kwargs: Any) -> None:
        unused = {"images_dir": images_dir, "train_json": train_json, "val_json": val_json, "test_json": test_json}
        super().__init__(root=root, unused=unused, images_dir=".", **kwargs)
        self.data_yaml = data_yaml
        self._images_root: Path | None = None

    @property
    def images_dir(self) -> Path:
        """The deepest folder holding every image of every split (``file_name``s are relative to it)."""
        self.splits()
        return self._images_root

    def _entries(self, data: dict[str, Any], yaml_path: Path, split: str) -> list[Path]:
        base = yaml_path.parent / str(data.get("path") or ".")  # an absolute path stays as it is
        raw = data[split] if isinstance(data[split], list) else [data[split]]
        entries = []
        for item in raw:
            entry = Path(os.path.normpath(base / str(item)))
            if not entry.exists() and str(item).startswith("../") and (base / str(item)[3:]).exists():
                entry = Path(os.path.normpath(base / str(item)[3:]))
            entries.append(entry)
        return entries

    def _split_records(self, images: list[Path], names: list[str], source: Path) -> list[tuple[Path, ImageRecord]]:
        records, unlabelled = [], 0
        for image in images:
            width, height = image_size(image, None, str(source))
            labels = label_path(image)
            boxes = read_labels(labels, len(names), width, height) if labels.is_file() else []
            unlabelled += not labels.is_file()
            records.append((image, ImageRecord(str(image), width, height, boxes)))
        if images and unlabelled == len(images):
            raise MissingDataError(f"{source}: none of its {len(images)} images has a label file (e.g. "
                                   f"{label_path(images[0])}); YOLO labels live in a labels/ folder beside images/.")
        if unlabelled:
            rank_zero_info(f"{source}: {unlabelled} of {len(images)} images have no label file: no objects")
        return records

    def convert(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        yaml_path = self._resolve(self.data_yaml).absolute()
        data = read_data_yaml(yaml_path)
        names = class_names(data, yaml_path)
        split_records: dict[str, tuple[Path, list]] = {}
        for split in SPLIT_KEYS:
            if not data.get(split):
                continue
            entries = self._entries(data, yaml_path, split)
            images = [img for e in entries for img in images_in(e, f"{yaml_path}: {split}")]
            if not images:
                raise MissingDataError(f"{yaml_path}: {split} ({', '.join(map(str, entries))}) holds no images "
                                       f"({', '.join(IMAGE_SUFFIXES)}).")
            source = entries[0] if len(entries) == 1 else yaml_path.parent / f"[{split}]"
            split_records[split] = (source, self._split_records(images, names, source))
        self._warn_shared(split_records)
        all_images = [img for _, recs in split_records.values() for img, _ in recs]
        self._images_root = Path(os.path.commonpath([str(p.parent) for p in all_images]))
        out = {}
        for split, (source, recs) in split_records.items():
            for image, rec in recs:
                rec.file_name = image.relative_to(self._images_root).as_posix()
            out[split] = (source, coco_dict([rec for _, rec in recs], names))
        return out

    @staticmethod
    def _warn_shared(split_records: dict[str, tuple[Path, list]]) -> None:
        train = {img.resolve() for img, _ in split_records["train"][1]}
        shared = [img for img, _ in split_records["val"][1] if img.resolve() in train]
        if shared:
            rank_zero_warn(f"{len(shared)} of {len(split_records['val'][1])} val images are also train images "
                           f"(e.g. {shared[0]}): validation is not held out.")
