"""Attention pictures (``attention=true`` in predict.py): what the last decoder layer read.

Detection: each kept detection's query, its cross-attention over the image tokens (head-averaged),
upsampled over the image beside its box — DETR's figure. Translation: the source x target
cross-attention of each sentence, tokens on the axes. The weights are the model's own: a hook asks
the last decoder layer's cross-attention for them (``MultiheadAttention(need_weights=True)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn


@contextmanager
def last_cross_attention(transformer: nn.Module) -> Iterator[list[Tensor]]:
    """Within the block, each call of the last decoder layer's cross-attention appends its
    head-averaged weights ``[B, T, S]`` to the yielded list (the layer's output is unchanged)."""
    module = transformer.decoder_layers[-1].cross_attn
    captured: list[Tensor] = []

    def ask(_, args, kwargs):
        return args, {**kwargs, "need_weights": True}

    def keep(_, args, kwargs, output):
        out, weights = output
        captured.append(weights.detach().float())
        return out

    hooks = [module.register_forward_pre_hook(ask, with_kwargs=True),
             module.register_forward_hook(keep, with_kwargs=True)]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


def kept_queries(outputs: dict, model: nn.Module, threshold: float, top_k: int) -> list[list[tuple[int, int, float]]]:
    """Per image, ``(query, label, score)`` of the detections scoring >= ``threshold`` (best ``top_k``)."""
    probs = model.class_probs(outputs["pred_logits"])  # [B, Q, C]
    rows = []
    for p in probs:
        score, label = p.max(-1)
        order = [q for q in score.argsort(descending=True).tolist() if score[q] >= threshold][:top_k]
        rows.append([(q, int(label[q]), float(score[q])) for q in order])
    return rows


def token_maps(weights: Tensor, pixel_mask: Tensor, queries: list[int]) -> Tensor:
    """``weights`` ``[Q, S]`` of one image over its ``h x w`` tokens -> ``[len(queries), H, W]`` maps over
    its valid pixels (``pixel_mask`` ``[H_pad, W_pad]``, True = padding), each scaled to max 1."""
    h_pad, w_pad = pixel_mask.shape
    stride = round((h_pad * w_pad / weights.shape[-1]) ** 0.5)
    h, w = h_pad // stride, w_pad // stride
    maps = weights[queries].view(len(queries), 1, h, w)
    maps = F.interpolate(maps, size=(h_pad, w_pad), mode="bilinear", align_corners=False)[:, 0]
    valid_h, valid_w = int((~pixel_mask).any(1).sum()), int((~pixel_mask).any(0).sum())
    maps = maps[:, :valid_h, :valid_w]
    return maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def draw_detection_attention(image: Image.Image, maps: Tensor, boxes: list, names: list[str], path: Path) -> None:
    """One panel per detection: the image with its attention map (heat) and its box (``boxes`` pixel
    xyxy of ``image``); ``maps`` ``[K, h, w]`` in [0, 1] over the resized image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(len(boxes), 1)
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.2), squeeze=False)
    for ax, heat, box, name in zip(axes[0], maps, boxes, names):
        ax.imshow(image)
        ax.imshow(heat.numpy(), cmap="inferno", alpha=0.55, extent=(0, image.width, image.height, 0))
        x1, y1, x2, y2 = box
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="cyan", linewidth=1.5))
        ax.set_title(name, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_translation_attention(weights: Tensor, source: list[str], target: list[str], path: Path) -> None:
    """Heat map of ``weights`` ``[len(target), len(source)]``: rows the output tokens, columns the input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.35 * len(source), 1 + 0.3 * len(target)))
    ax.imshow(weights.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(source)), source, rotation=90, fontsize=7)
    ax.set_yticks(range(len(target)), target, fontsize=7)
    ax.set_xlabel("source")
    ax.set_ylabel("translation")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_image_attention(predictor, loaded: list, threshold: float | None, folder: Path) -> list[Path]:
    """``<folder>/<image name>.png`` per image of ``loaded`` (``load_images``): each kept detection's
    attention beside its box. Detection checkpoints only."""
    if predictor.task_name != "detection":
        raise ValueError(f"attention pictures are drawn for detection and translation, not {predictor.task_name}")
    paths = []
    for (_, pil), row in zip(loaded, predictor.attention(loaded, threshold)):
        names = [f"{label} {score:.2f}" for label, score in zip(row["labels"], row["scores"])]
        path = _free_name(folder, Path(row["file"]).stem)
        draw_detection_attention(pil, row["maps"], row["boxes"], names, path)
        paths.append(path)
    return paths


def draw_sentence_attention(predictor, lines: list[str], decoding: dict, folder: Path) -> list[Path]:
    """``<folder>/line<N>.png``: the source x translation cross-attention of each non-empty line N (from 1)."""
    paths = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            weights, source, target = predictor.attention(line, **decoding)
            paths.append(folder / f"line{number:05d}.png")
            draw_translation_attention(weights, source, target, paths[-1])
    return paths


def _free_name(folder: Path, stem: str) -> Path:
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        path, n = folder / f"{stem}_{n}.png", n + 1
    return path
