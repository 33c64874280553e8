"""Multi-label targets for the COCO data module (``CocoDataModule(target="multilabel")``).

An image's label set comes from one of two sources:

- the split's COCO JSON: the categories of all its annotations (crowd regions included: a crowd of
  people still shows people); an image without annotations has the empty set;
- a mapping file ``{file_name: [class name, ...]}`` (``train_labels`` / ``val_labels`` /
  ``test_labels``, e.g. ``data/coco128/multilabel_*.json``): the split's images are the file's keys,
  names are matched against the train JSON's category names.

Classes are the train JSON's categories (label i = i-th category by id), as for detection. Images
go through the detection transforms (flip, resize, normalise), which leave the labels alone. A
sample is ``(image float [3, H, W], labels float [C] multi-hot)``; a batch is ``images``,
``pixel_mask`` (True = padding) and ``labels`` ``[B, C]``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .coco import check_images_exist, collate_detection, load_rgb_image, make_detection_transforms
from .errors import DataError, check_relative_file_name, read_json

Entry = tuple[str, tuple[int, int] | None, list[int]]  # file name, (width, height) from the JSON, labels


def coco_label_sets(data: dict[str, Any], category_ids: Sequence[int]) -> list[Entry]:
    """One entry per image of a (validated) COCO JSON, in image-id order: the labels of its annotations."""
    cat_to_label = {int(c): i for i, c in enumerate(category_ids)}
    labels: dict[int, set[int]] = {int(img["id"]): set() for img in data["images"]}
    for ann in data["annotations"]:
        labels[ann["image_id"]].add(cat_to_label[ann["category_id"]])
    return [
        (img["file_name"], (int(img["width"]), int(img["height"])), sorted(labels[int(img["id"])]))
        for img in sorted(data["images"], key=lambda im: im["id"])
    ]


def load_label_mapping(path: Path, class_names: Sequence[str]) -> list[Entry]:
    """Read and check a ``{file_name: [class names]}`` file; entries sorted by file name.

    Raises ``DataError`` naming the file (and line for malformed JSON, the image and the name
    otherwise) for anything but an object of relative file names mapping to lists of known class names.
    """
    missing = (
        f"multi-label mapping file not found: {path}. Check the data config's *_labels arguments "
        "(relative paths are resolved against root)."
    )
    mapping = read_json(path, missing)
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: must be a JSON object {{file_name: [class names]}}, got {type(mapping).__name__}.")
    index = {name: i for i, name in enumerate(class_names)}
    return [(file_name, None, _label_indices(mapping[file_name], index, path, file_name)) for file_name in sorted(mapping)]


def _label_indices(names: Any, index: dict[str, int], path: Path, file_name: str) -> list[int]:
    """The sorted labels of one image's class ``names``; ``DataError`` for an unsafe ``file_name``, a
    value that is not a list of strings, or an unknown name (with the closest known ones)."""
    check_relative_file_name(file_name, f"{path}: file name")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: {file_name!r} must map to a list of class names, got {names!r}.")
    for name in names:
        if name not in index:
            close = difflib.get_close_matches(name, list(index), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise DataError(
                f"{path}: image {file_name!r} names class {name!r}, which is not a category of the "
                f"training JSON ({len(index)} classes, e.g. {list(index)[:5]}).{hint} Fix the name or "
                "add the category to the JSON's 'categories'."
            )
    return sorted({index[name] for name in names})


class ImageOnly:
    """Runs a detection transform (which needs a boxes target) on an image alone."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: tv_tensors.Image) -> Tensor:
        empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=tuple(image.shape[-2:]))
        out, _ = self.transform(image, {"boxes": empty, "labels": torch.zeros(0, dtype=torch.int64)})
        return out


def collate_multilabel(batch: Sequence[tuple[Tensor, Tensor]], size_divisibility: int = 32) -> dict[str, Tensor]:
    """``images`` ``[B, 3, Hmax, Wmax]``, ``pixel_mask`` ``[B, Hmax, Wmax]``, ``labels`` ``[B, C]``."""
    out = collate_detection(batch, size_divisibility)
    out["labels"] = torch.stack(out.pop("targets"))
    return out


class MultiLabelDataset(Dataset):
    """Images from ``images_dir`` with multi-hot labels ``[num_classes]``."""

    collate_fn = staticmethod(collate_multilabel)

    def __init__(self, *, images_dir: Path, entries: list[Entry], num_classes: int,
                 transforms: Callable | None = None) -> None:
        self.images_dir, self.entries, self.num_classes = Path(images_dir), entries, num_classes
        self.transforms = transforms
        counts = torch.zeros(num_classes, dtype=torch.int64)
        for _, _, labels in entries:
            counts[labels] += 1
        self.label_counts: list[int] = counts.tolist()

    def __len__(self) -> int:
        return len(self.entries)

    def multi_hot(self, index: int) -> Tensor:
        target = torch.zeros(self.num_classes)
        target[self.entries[index][2]] = 1.0
        return target

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        file_name, size, _ = self.entries[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb_image(self.images_dir / file_name, size)))
        if self.transforms is not None:
            image = self.transforms(image)
        image = image.as_subclass(Tensor)
        if not image.is_floating_point():
            image = image.float().div_(255.0)
        return image, self.multi_hot(index)


def build_multilabel_dataset(dm: Any, split: str, json_path: Path, data: dict[str, Any],
                             categories: list[dict[str, Any]], train: bool) -> MultiLabelDataset:
    """The ``CocoDataModule`` hook for ``target="multilabel"``: the split's dataset from its mapping file
    if it has one, else from its (validated) COCO JSON; every listed image must exist."""
    mapping = dm.labels_file(split)
    if mapping is not None:
        entries = load_label_mapping(mapping, [str(c["name"]) for c in categories])
        check_images_exist(dm.images_dir, {"images": [{"file_name": f} for f, _, _ in entries]}, mapping)
    else:
        entries = coco_label_sets(data, [c["id"] for c in categories])
        check_images_exist(dm.images_dir, data, json_path)
    transforms = make_detection_transforms(
        train, train_scales=dm.train_scales, val_scale=dm.val_scale, max_size=dm.max_size
    )
    return MultiLabelDataset(
        images_dir=dm.images_dir, entries=entries, num_classes=len(categories), transforms=ImageOnly(transforms)
    )
