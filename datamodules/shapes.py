"""The embedded default detection data: coloured circles, squares and triangles written as real COCO.

``generate_shapes_dataset`` writes ``images/*.png``, ``train.json``, ``val.json`` and ``test.json`` (COCO
detection format, category ids 1=circle, 2=square, 3=triangle). The three splits are drawn from
different random streams: validation chooses the checkpoint, the held-out test split reports it. It is deterministic in its arguments and
written atomically, so ``ShapesDataModule`` can cache it under ``cache_dir/shapes-<hash>`` and then
read it exactly like any other COCO dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .coco import CocoDataModule
from .errors import DataError

# Bump when the generator's output changes, so old caches are not reused.
GENERATOR_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
SHAPES_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
SIZE_RANGE = (0.12, 0.48)  # shape extent as a fraction of the image side
MIN_VISIBLE = 0.5  # a shape keeps at least this fraction of its pixels visible under later shapes
SHADING_STD = 12.0  # mild smooth noise (bilinear-upsampled 4x4 Gaussian grid) over the whole image
_SHADING_GRID = 4
_MAX_PLACEMENT_TRIES = 60


def _colour_far_from(rng: np.random.Generator, others: list[np.ndarray], min_dist: list[float]) -> np.ndarray:
    """Random RGB colour at least ``min_dist[i]`` (Euclidean, 0..255 units) from ``others[i]``."""
    best, best_margin = None, -math.inf
    for _ in range(100):
        c = rng.integers(0, 256, size=3).astype(np.float32)
        margin = min((np.linalg.norm(c - o) - d for o, d in zip(others, min_dist)), default=0.0)
        if margin >= 0:
            return c
        if margin > best_margin:
            best, best_margin = c, margin
    return best  # practically unreachable; the closest try is still a distinct colour


@functools.lru_cache(maxsize=8)
def _bilinear_matrix(size: int, grid: int) -> np.ndarray:
    """[size, grid] weights that linearly interpolate ``grid`` control points over ``size`` pixels."""
    pos = (np.arange(size) + 0.5) * (grid - 1) / size
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = (pos - lo).astype(np.float32)
    m = np.zeros((size, grid), dtype=np.float32)
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    return m


def _shape_mask(kind: int, x0: float, y0: float, extent: float, angle: float, size: int) -> np.ndarray:
    """Bool mask [size, size] of one shape whose bounding square is (x0, y0, extent)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + extent, y0 + extent
    if kind == 1:
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif kind == 2:
        draw.rectangle([x0, y0, x1, y1], fill=1)
    else:  # equilateral triangle inscribed in the circle of the bounding square, random rotation
        cx, cy, r = x0 + extent / 2, y0 + extent / 2, extent / 2
        pts = [
            (cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def _render_image(
    rng: np.random.Generator, size: int, num_objects: int
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image: uint8 [size, size, 3] and [(category_id, [x, y, w, h])] tight on the visible pixels."""
    background = rng.integers(0, 256, size=3).astype(np.float32)
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = background
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the shape that owns each pixel
    kinds = _paint_shapes(rng, pixels, owner, background, num_objects)
    _add_shading(rng, pixels)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image, _visible_boxes(owner, kinds)


def _paint_shapes(
    rng: np.random.Generator, pixels: np.ndarray, owner: np.ndarray, background: np.ndarray, num_objects: int
) -> list[int]:
    """Paint up to ``num_objects`` shapes into ``pixels`` / ``owner`` (in place), each in a colour far
    from the background and the earlier shapes; return their category ids in painting order."""
    kinds: list[int] = []
    full_areas: list[int] = []
    colours: list[np.ndarray] = []
    for _ in range(num_objects):
        placed = _place_shape(rng, owner, full_areas)
        if placed is None:
            continue
        kind, mask = placed
        colour = _colour_far_from(rng, [background, *colours], [120.0] + [60.0] * len(colours))
        pixels[mask] = colour
        owner[mask] = len(kinds)
        kinds.append(kind)
        full_areas.append(int(mask.sum()))
        colours.append(colour)
    return kinds


def _place_shape(
    rng: np.random.Generator, owner: np.ndarray, full_areas: list[int]
) -> tuple[int, np.ndarray] | None:
    """(category id, mask) of a random shape that leaves every earlier shape (``full_areas`` pixels
    each) at least ``MIN_VISIBLE`` visible; None after ``_MAX_PLACEMENT_TRIES`` failed tries."""
    size = owner.shape[0]
    for attempt in range(_MAX_PLACEMENT_TRIES):
        shrink = 1.0 - 0.6 * attempt / _MAX_PLACEMENT_TRIES  # smaller shapes fit more easily
        extent = rng.uniform(*SIZE_RANGE) * size * shrink
        kind = int(rng.integers(1, 4))
        x0 = rng.uniform(0, size - extent)
        y0 = rng.uniform(0, size - extent)
        mask = _shape_mask(kind, x0, y0, extent, rng.uniform(0, 2 * math.pi), size)
        if not mask.any():
            continue
        if full_areas:
            still_visible = np.bincount(owner[~mask] + 1, minlength=len(full_areas) + 1)[1:]
            if np.any(still_visible < MIN_VISIBLE * np.asarray(full_areas)):
                continue
        return kind, mask
    return None


def _add_shading(rng: np.random.Generator, pixels: np.ndarray) -> None:
    """Add smooth noise to ``pixels`` [size, size, 3] in place (smooth rather than per-pixel: as much
    variation, and the PNGs stay small and quick to write)."""
    interp = _bilinear_matrix(pixels.shape[0], _SHADING_GRID)
    grid = rng.normal(0.0, SHADING_STD, size=(_SHADING_GRID, _SHADING_GRID, 3)).astype(np.float32)
    pixels += (interp @ grid.transpose(2, 0, 1) @ interp.T).transpose(1, 2, 0)


def _visible_boxes(owner: np.ndarray, kinds: list[int]) -> list[tuple[int, list[float]]]:
    """[(category_id, [x, y, w, h])] of each shape, tight on the pixels it still owns."""
    objects = []
    for i, kind in enumerate(kinds):
        ys, xs = np.nonzero(owner == i)
        x, y = int(xs.min()), int(ys.min())
        objects.append((kind, [float(x), float(y), float(xs.max() + 1 - x), float(ys.max() + 1 - y)]))
    return objects


def _write_split(
    out: Path,
    *,
    split: str,
    split_index: int,
    num_images: int,
    first_ids: tuple[int, int],
    image_size: int,
    min_objects: int,
    max_objects: int,
    seed: int,
) -> dict[str, Any]:
    """Write the split's PNGs to ``out/images``; return its COCO dict. ``first_ids`` = (first image id,
    first annotation id)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        # One independent stream per image: the output does not depend on generation order.
        rng = np.random.default_rng([seed, split_index, i])
        pixels, objects = _render_checked_image(rng, image_size, min_objects, max_objects)
        image_id = first_ids[0] + i
        file_name = f"{split}_{i:06d}.png"
        Image.fromarray(pixels, mode="RGB").save(out / "images" / file_name, compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        annotations += _annotations(objects, image_id, first_ann_id=first_ids[1] + len(annotations))
    return {
        "info": {
            "description": f"synthetic shapes ({split}), mtdetr generator v{GENERATOR_VERSION}",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": SHAPES_CATEGORIES,
    }


def _render_checked_image(
    rng: np.random.Generator, image_size: int, min_objects: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """``_render_image`` with a random number of shapes in [min_objects, max_objects]; ``ValueError``
    when fewer than ``min_objects`` fit."""
    wanted = int(rng.integers(min_objects, max_objects + 1))
    pixels, objects = _render_image(rng, image_size, wanted)
    if len(objects) < min_objects:
        raise ValueError(
            f"could only place {len(objects)} of {wanted} shapes in a {image_size}px image; "
            "lower max_objects/min_objects or raise image_size"
        )
    return pixels, objects


def _annotations(objects: list[tuple[int, list[float]]], image_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """COCO annotations of one image's objects, ids from ``first_ann_id``."""
    return [
        {
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": 0,
        }
        for k, (category_id, bbox) in enumerate(objects)
    ]


def shapes_params(
    num_train: int, num_val: int, image_size: int, min_objects: int, max_objects: int, seed: int,
    num_test: int = 200,
) -> dict[str, int]:
    """The generator parameters (plus generator version) that identify a cached dataset."""
    return {
        "version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "image_size": int(image_size),
        "min_objects": int(min_objects),
        "max_objects": int(max_objects),
        "seed": int(seed),
    }


def shapes_cache_name(params: dict[str, int]) -> str:
    """``shapes-<10 hex chars of sha1(params)>``."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"shapes-{digest}"


def generate_shapes_dataset(
    out_dir: str | Path,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 5,
    seed: int = 0,
    num_test: int = 200,
) -> Path:
    """Write the synthetic COCO dataset to ``out_dir`` (``images/``, ``train.json``, ``val.json``,
    ``test.json``). ``val.json`` does not depend on ``num_test`` (nor ``train.json``): each split has
    its own random stream, and the test images follow the validation ones in image and annotation ids.

    Deterministic in its arguments. Written into a temporary sibling folder and renamed into place,
    so an interrupted run leaves no partial dataset; an existing ``out_dir`` with the completion
    marker is reused as is. Returns ``out_dir`` as a Path.
    """
    if num_train < 0 or num_val < 0 or num_test < 0:
        raise ValueError("num_train, num_val and num_test must be >= 0")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    out = Path(out_dir)
    if (out / COMPLETE_MARKER).is_file():
        return out
    if out.exists() and any(out.iterdir()):
        raise DataError(
            f"{out} exists but lacks the '{COMPLETE_MARKER}' marker of a finished shapes dataset; "
            "delete that folder (or choose another cache_dir) and run again."
        )
    params = shapes_params(num_train, num_val, image_size, min_objects, max_objects, seed, num_test)
    _write_atomically(out, lambda folder: _write_dataset(folder, params))
    return out


def _write_dataset(folder: Path, params: dict[str, int]) -> None:
    """The images, one JSON per split (image and annotation ids continue across splits) and, last,
    the completion marker holding ``params``."""
    (folder / "images").mkdir()
    drawing = {key: params[key] for key in ("image_size", "min_objects", "max_objects", "seed")}
    first_ids = (1, 1)
    for split_index, split in enumerate(("train", "val", "test")):
        data = _write_split(folder, split=split, split_index=split_index, num_images=params[f"num_{split}"],
                            first_ids=first_ids, **drawing)
        (folder / f"{split}.json").write_text(json.dumps(data) + "\n", encoding="utf-8")
        first_ids = (first_ids[0] + len(data["images"]), first_ids[1] + len(data["annotations"]))
    (folder / COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n", encoding="utf-8")


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temporary sibling folder, then rename it to ``out`` (a concurrent writer that
    finished first wins; its dataset is the same)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / COMPLETE_MARKER).is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_scales(image_size: int) -> list[int]:
    return [max(8, int(round(image_size * f / 8)) * 8) for f in (0.875, 1.0, 1.125)]


class ShapesDataModule(CocoDataModule):
    """``CocoDataModule`` on the generated shapes dataset cached at ``cache_dir/shapes-<hash>``
    (``target="multilabel"``: which of circle / square / triangle each image shows).

    Checkpoints are chosen on ``val.json`` (``num_val`` images); ``trainer.test`` reports the held-out
    ``test.json`` (``num_test`` images, another random stream). ``num_test=0`` writes no test images and
    tests on the validation split (then the test numbers are not held out).

    Scale defaults follow ``image_size``: train shortest side in {0.875, 1, 1.125} × image_size
    (rounded to multiples of 8), val at image_size, longer side capped at 1.25 × image_size.
    """

    def __init__(
        self,
        *,
        cache_dir: str,
        num_train: int = 1000,
        num_val: int = 200,
        image_size: int = 128,
        min_objects: int = 1,
        max_objects: int = 5,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 2,
        train_scales: Sequence[int] | None = None,
        val_scale: int | None = None,
        max_size: int | None = None,
        size_divisibility: int = 32,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        target: str = "detection",
        num_test: int = 200,
    ) -> None:
        self.generator_params = shapes_params(num_train, num_val, image_size, min_objects, max_objects, seed,
                                              num_test)
        root = Path(cache_dir) / shapes_cache_name(self.generator_params)
        super().__init__(
            root=str(root),
            test_json="test.json" if num_test > 0 else None,
            batch_size=batch_size,
            num_workers=num_workers,
            train_scales=_default_scales(image_size) if train_scales is None else train_scales,
            val_scale=image_size if val_scale is None else val_scale,
            max_size=math.ceil(image_size * 1.25) if max_size is None else max_size,
            size_divisibility=size_divisibility,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            target=target,
        )

    def _generate(self) -> None:
        if (self.root / COMPLETE_MARKER).is_file():
            return
        start = time.perf_counter()
        p = {k: v for k, v in self.generator_params.items() if k != "version"}
        generate_shapes_dataset(self.root, **p)
        print(
            f"shapes dataset: wrote {p['num_train']}+{p['num_val']}+{p['num_test']} (train+val+test) images to "
            f"{self.root} "
            f"in {time.perf_counter() - start:.1f}s"
        )

    def prepare_data(self) -> None:
        """Generate the dataset once (Lightning calls this on one process per node)."""
        self._generate()

    def setup(self, stage: str | None = None) -> None:
        self._generate()  # no-op when prepare_data already ran or the cache exists
        super().setup(stage)

    def _reference_categories(self, train_data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        # Known without touching disk, so data_info works before the data is generated.
        self._max_boxes = self.generator_params["max_objects"]
        return sorted(SHAPES_CATEGORIES, key=lambda c: c["id"])
