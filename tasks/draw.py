"""Annotated copies of images for ``predict.py``: boxes with class name and score, or the label list."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990", "#9a6324", "#800000", "#808000", "#000075"]


def draw_predictions(image: Image.Image, prediction: dict) -> Image.Image:
    """A copy of ``image`` with ``prediction`` (a ``tasks.api`` result) drawn: each box in its class's
    colour with ``name score``; without boxes (multi-label) the labels as one caption box."""
    pixels = F.pil_to_tensor(image)
    if "boxes" in prediction:
        boxes = torch.tensor(prediction["boxes"], dtype=torch.float32).reshape(-1, 4)
        texts = [f"{n} {s:.2f}" for n, s in zip(prediction["labels"], prediction["scores"])]
        colors = [PALETTE[hash(n) % len(PALETTE)] for n in prediction["labels"]]
        width = max(1, round(max(image.size) / 300))
        if len(boxes):
            pixels = draw_bounding_boxes(pixels, boxes, labels=texts, colors=colors, width=width)
    else:
        caption = ", ".join(f"{n} {s:.2f}" for n, s in zip(prediction["labels"], prediction["scores"])) or "(none)"
        box = torch.tensor([[0.0, 0.0, float(image.width - 1), float(min(12, image.height - 1))]])
        pixels = draw_bounding_boxes(pixels, box, labels=[caption], colors="white", fill=False, width=1)
    return F.to_pil_image(pixels)
