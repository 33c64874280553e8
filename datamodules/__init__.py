"""Data sources: files and formats in, batches in the contracts of DESIGN.md out."""

from datamodules.coco import (
    CocoDataModule,
    CocoDetectionDataset,
    collate_detection,
    make_detection_transforms,
)
from datamodules.errors import DataError, MissingDataError
from datamodules.shapes import ShapesDataModule, generate_shapes_dataset

__all__ = [
    "CocoDataModule",
    "CocoDetectionDataset",
    "DataError",
    "MissingDataError",
    "ShapesDataModule",
    "collate_detection",
    "generate_shapes_dataset",
    "make_detection_transforms",
]
