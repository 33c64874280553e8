"""Pascal VOC folders (one XML per image) as COCO detection data: ``data=voc``.

Layout (each part overridable; relative paths resolve against ``root``)::

    root/Annotations/<id>.xml        <annotation>: <filename>, <size>, <object>s with <name>,
                                     <difficult>, <bndbox> xmin/ymin/xmax/ymax in pixels
    root/JPEGImages/<filename>       the images
    root/ImageSets/Main/{train,val,test}.txt   one image id per line (test.txt optional)

Without ``train.txt`` the XMLs are split at random (fixed ``split_seed``): ``val_fraction`` of them
validate, the rest train, and the test split is the val split.

Boxes: COCO ``bbox`` = [xmin, ymin, xmax - xmin, ymax - ymin], i.e. the XML's numbers are taken as
continuous pixel coordinates with the image's top-left corner at 0. VOC's own tools count pixels from
1 (the box covers pixels xmin..xmax inclusive); the 1-pixel shift of that reading is below annotation
noise, and this mapping is the one most converters use (raccoon's COCO JSON was made with it).
Boxes up to ``EDGE_TOLERANCE_PX`` outside the image are clamped; further out is an error.
``<difficult>1</difficult>`` objects become COCO ignore regions (``iscrowd=1``): not trained on, and
detections on them neither count as true nor as false positives.

Classes: ``classes`` (a list, label i = classes[i]) or, when null, every ``<name>`` found in the
split files' XMLs, sorted.
"""

from __future__ import annotations

import os
import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.parsers import expat

from lightning.pytorch.utilities import rank_zero_info

from .errors import DataError, MissingDataError, check_relative_file_name
from .formats import (
    IMAGE_SUFFIXES,
    ConvertedDataModule,
    ImageRecord,
    box_inside,
    coco_dict,
    finite_number,
    image_size,
)

# --------------------------------------------------------------------------------------------
# One XML file
# --------------------------------------------------------------------------------------------


def parse_xml(path: Path) -> tuple[ET.Element, dict[ET.Element, int]]:
    """Parse ``path``; return the root element and each element's line number (for messages)."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    lines: dict[ET.Element, int] = {}

    def start(tag: str, attrs: dict[str, str]) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.offset + 1}: malformed XML ({expat.ErrorString(e.code)}, line {e.lineno}, "
            f"column {e.offset + 1}). Fix the file there or re-export it."
        ) from e
    return builder.close(), lines


def _text(element: ET.Element | None) -> str | None:
    return element.text.strip() if element is not None and element.text is not None else None


def _stated_size(root: ET.Element, lines: dict[ET.Element, int], path: Path) -> tuple[int, int] | None:
    """The XML's <size> (width, height), or None when absent or 0 (tools write 0 when unknown)."""
    size = root.find("size")
    if size is None:
        return None
    values = []
    for key in ("width", "height"):
        element = size.find(key)
        value = finite_number(_text(element))
        if value is None or value < 0 or not value.is_integer():
            line = lines.get(element if element is not None else size)
            raise DataError(
                f"{path}:{line}: <size><{key}> must be a non-negative integer, got {_text(element)!r}. Fix "
                "the file or remove <size> (the image's own size is then used)."
            )
        values.append(int(value))
    return (values[0], values[1]) if all(values) else None


def _object(obj: ET.Element, lines: dict[ET.Element, int], path: Path) -> tuple[str, bool, list[float], int]:
    """(class name, difficult, [xmin, ymin, xmax, ymax], line of <object>) of one <object>."""
    line = lines[obj]
    name = _text(obj.find("name"))
    if not name:
        raise DataError(f"{path}:{line}: <object> has no <name>. Add the class name or remove the object.")
    difficult_text = _text(obj.find("difficult")) or "0"
    if difficult_text not in ("0", "1"):
        raise DataError(f"{path}:{lines[obj.find('difficult')]}: <difficult> must be 0 or 1, got {difficult_text!r}.")
    bndbox = obj.find("bndbox")
    if bndbox is None:
        raise DataError(f"{path}:{line}: <object> {name!r} has no <bndbox>. Add the box or remove the object.")
    coords = []
    for key in ("xmin", "ymin", "xmax", "ymax"):
        element = bndbox.find(key)
        value = finite_number(_text(element))
        if value is None:
            raise DataError(
                f"{path}:{lines.get(element, lines[bndbox])}: <bndbox><{key}> must be a number, got "
                f"{_text(element)!r}. Fix the box."
            )
        coords.append(value)
    return name, difficult_text == "1", coords, line


def read_annotation(path: Path) -> dict[str, Any]:
    """One VOC XML as ``{filename, size, objects: [(name, difficult, [x1, y1, x2, y2], line)]}``."""
    root, lines = parse_xml(path)
    if root.tag != "annotation":
        raise DataError(f"{path}:{lines[root]}: root element is <{root.tag}>, expected <annotation> (Pascal VOC).")
    return {
        "filename": _text(root.find("filename")),
        "size": _stated_size(root, lines, path),
        "objects": [_object(obj, lines, path) for obj in root.findall("object")],
    }


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def read_id_list(path: Path, annotations: Path) -> list[str]:
    """Image ids of a split list (one per line, blank lines allowed); each needs ``<id>.xml``."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        image_id = raw.strip()
        if not image_id:
            continue
        if len(image_id.split()) != 1:
            raise DataError(f"{path}:{lineno}: expected one image id per line, got {raw!r}.")
        if image_id in seen:
            raise DataError(f"{path}:{lineno}: image id {image_id!r} is listed twice (first on line {seen[image_id]}).")
        if not (annotations / f"{image_id}.xml").is_file():
            raise MissingDataError(
                f"{path}:{lineno}: image id {image_id!r} has no annotation file {annotations / (image_id + '.xml')}. "
                "Restore it or remove the line."
            )
        seen[image_id] = lineno
        ids.append(image_id)
    return ids


def random_split(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, val ids): ``round(val_fraction * n)`` ids (at least 1) drawn with ``seed``; each sorted."""
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    n_val = min(max(1, round(val_fraction * len(shuffled))), len(shuffled) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class VocDataModule(ConvertedDataModule):
    """Detection DataModule over a Pascal VOC folder (see the module docstring).

    Args (besides ``CocoDataModule``'s batch/size/target settings):
        annotations_dir: folder of the XML files.
        splits_dir: folder of ``train.txt`` / ``val.txt`` (/ ``test.txt``); null or no ``train.txt``
            there: split by ``val_fraction``.
        val_fraction: share of the images that validate when there are no lists, in (0, 1).
        split_seed: seed of that split.
        classes: class names (label order); null: the names found in the XMLs, sorted.
    """

    format_name = "voc"
    root_help = "the VOC folder (holding Annotations/, JPEGImages/, ImageSets/Main/)"

    def __init__(
        self,
        *,
        root: str,
        images_dir: str = "JPEGImages",
        annotations_dir: str = "Annotations",
        splits_dir: str | None = "ImageSets/Main",
        val_fraction: float = 0.2,
        split_seed: int = 0,
        classes: Sequence[str] | None = None,
        train_json: str | None = None,
        val_json: str | None = None,
        test_json: str | None = None,
        **kwargs: Any,
    ) -> None:
        unused = {"train_json": train_json, "val_json": val_json, "test_json": test_json}
        super().__init__(root=root, unused=unused, images_dir=images_dir, **kwargs)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.annotations_dir = annotations_dir
        self.splits_dir = splits_dir
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.classes = [str(c) for c in classes] if classes is not None else None
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes lists a name twice: {self.classes}")

    def _split_ids(self, annotations: Path) -> dict[str, tuple[Path, list[str]]]:
        """split -> (source, image ids): the ImageSets lists when ``train.txt`` exists, else a random split."""
        lists = self._resolve(self.splits_dir) if self.splits_dir else None
        if lists is not None and (lists / "train.txt").is_file():
            if not (lists / "val.txt").is_file():
                raise MissingDataError(
                    f"{lists} has train.txt but no val.txt. Add val.txt (one image id per line) or set "
                    "data.splits_dir=null to split by data.val_fraction."
                )
            out = {s: (lists / f"{s}.txt", read_id_list(lists / f"{s}.txt", annotations))
                   for s in ("train", "val", "test") if (lists / f"{s}.txt").is_file()}
            both = sorted(set(out["train"][1]) & set(out["val"][1]))
            if both:
                raise DataError(f"{len(both)} image id(s) are in both {lists / 'train.txt'} and val.txt, e.g. "
                                f"{both[:5]}; validation must be held out. Remove them from one list.")
            return out
        ids = sorted(p.stem for p in annotations.iterdir() if p.suffix == ".xml")
        if len(ids) < 2:
            raise MissingDataError(f"{annotations}: found {len(ids)} .xml file(s); a train/val split needs at least 2.")
        train, val = random_split(ids, self.val_fraction, self.split_seed)
        rank_zero_info(f"{lists / 'train.txt' if lists else 'no splits_dir'}: no split lists; "
                       f"{len(val)} of {len(ids)} images validate (val_fraction={self.val_fraction}, "
                       f"split_seed={self.split_seed})")
        tag = f"val_fraction={self.val_fraction},split_seed={self.split_seed}"
        return {"train": (annotations / f"[train:{tag}]", train), "val": (annotations / f"[val:{tag}]", val)}

    def _image_file(self, xml: Path, image_id: str, filename: str | None, present: set[str]) -> str:
        """The image's name relative to the images folder: the XML's <filename>, else <id>.<ext>."""
        if filename is not None:
            check_relative_file_name(filename, f"{xml}: <filename>")
            if filename in present or (self.images_dir / filename).is_file():
                return filename
            raise MissingDataError(f"{xml}: image {filename!r} (its <filename>) is missing from {self.images_dir}. "
                                   "Restore the file or fix <filename>.")
        for suffix in IMAGE_SUFFIXES:
            if image_id + suffix in present:
                return image_id + suffix
        raise MissingDataError(f"{xml}: no <filename> and no {image_id}.jpg/.png/... in {self.images_dir}. "
                               "Add <filename> or restore the image.")

    def _record(self, xml: Path, image_id: str, ann: dict[str, Any], labels: dict[str, int],
                present: set[str]) -> ImageRecord:
        file_name = self._image_file(xml, image_id, ann["filename"], present)
        width, height = image_size(self.images_dir / file_name, ann["size"], str(xml))
        record = ImageRecord(file_name, width, height)
        for name, difficult, coords, line in ann["objects"]:
            if name not in labels:
                raise DataError(f"{xml}:{line}: object class {name!r} is not in data.classes {list(labels)}. "
                                "Add it to data.classes or fix the name.")
            x1, y1, x2, y2 = box_inside(coords, width, height, f"{xml}:{line}")
            record.boxes.append((x1, y1, x2, y2, labels[name], int(difficult)))
        return record

    def convert(self) -> dict[str, tuple[Path, dict[str, Any]]]:
        annotations = self._resolve(self.annotations_dir)
        if not annotations.is_dir():
            raise MissingDataError(f"annotations folder not found: {annotations}. Set data.annotations_dir.")
        if not self.images_dir.is_dir():
            raise MissingDataError(f"images folder not found: {self.images_dir}. Set data.images_dir.")
        split_ids = self._split_ids(annotations)
        parsed = {i: read_annotation(annotations / f"{i}.xml") for _, ids in split_ids.values() for i in ids}
        names = self.classes or sorted({obj[0] for ann in parsed.values() for obj in ann["objects"]})
        if not names:
            raise DataError(f"{annotations}: no <object> in any XML of the splits, so there are no classes. "
                            "Annotate some objects or set data.classes.")
        labels = {n: i for i, n in enumerate(names)}
        present = set(os.listdir(self.images_dir))
        return {
            split: (source, coco_dict([self._record(annotations / f"{i}.xml", i, parsed[i], labels, present)
                                       for i in ids], names))
            for split, (source, ids) in split_ids.items()
        }
