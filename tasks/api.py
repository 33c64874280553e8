"""Use a trained checkpoint from Python, without Hydra::

    from tasks.api import load
    detector = load("outputs/detection/<run>/checkpoints/last.ckpt")
    detector.predict(["a.jpg", "b.png"], threshold=0.5)
    # [{"file": "a.jpg", "width": 640, "height": 480, "boxes": [[x1, y1, x2, y2], ...],
    #   "labels": ["dog", ...], "scores": [0.91, ...]}, ...]
    load("translation.ckpt").translate(["Ein Hund läuft."], strategy="beam", beam_size=5)

``load`` rebuilds the task from the checkpoint alone: its settings, class names, tokenizer and the data
module's preprocessing are stored in it (``tasks.base.BaseTask.remember_data``), and the weights come
from its state dict -- weight sources used at training time (``pretrained_backbone``, ``init_from``)
are never read again. Results are plain Python (lists, dicts, str, float).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from datamodules.coco import collate_detection, load_rgb_image, make_detection_transforms, to_rgb
from datamodules.errors import DataError
from datamodules.multilabel import ImageOnly

from .base import CHECKPOINT_KEY, BaseTask
from .runtime import ConfigError

SUPPORTED_TASKS = ("detection", "multilabel", "translation", "multitask")
# Detection checkpoints written before ``position_offset`` was a setting were all trained with the
# cell-centre sine positions (0.5); the setting's default is now DETR's (0.0).
LEGACY_POSITION_OFFSET = 0.5
WEIGHT_SOURCES = ("pretrained_backbone", "init_from")  # weight files/names read when a model is first built
PRECISIONS = {"32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
              "16": torch.float16, "16-mixed": torch.float16}


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` of an mtdetr checkpoint; ``ConfigError`` naming the file otherwise."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"ckpt_path={path!r}: no such file. Give the path of a .ckpt file written by train.py.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or not a checkpoint at all
        raise ConfigError(f"ckpt_path={path!r} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})."
                          ) from e
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"ckpt_path={path!r} is not an mtdetr training checkpoint (no {CHECKPOINT_KEY!r} entry).")
    if meta.get("task") not in SUPPORTED_TASKS:
        raise ConfigError(f"ckpt_path={path!r} holds a {meta.get('task')!r} model, which eval.py / predict.py do "
                          f"not support (supported: {', '.join(SUPPORTED_TASKS)}).")
    return ckpt


def checkpoint_file(ref: str) -> str:
    """A checkpoint path (``~`` expanded), or a W&B model artifact ``wandb:entity/project/name:alias``
    downloaded (online only; offline it is a one-line error)."""
    from .loggers import resolve_wandb_checkpoint
    from .runtime import wandb_has_credentials

    if not ref.startswith("wandb:"):
        return str(Path(ref).expanduser())
    try:
        return resolve_wandb_checkpoint(ref, online=wandb_has_credentials())
    except ValueError as e:
        raise ConfigError(str(e)) from e


def without_weight_sources(settings: Any) -> Any:
    """``settings`` with every ``pretrained_backbone`` / ``init_from`` entry (at any depth) set to None:
    the checkpoint's state dict holds the trained weights."""
    if isinstance(settings, dict):
        return {k: None if k in WEIGHT_SOURCES else without_weight_sources(v) for k, v in settings.items()}
    return settings


def task_classes() -> dict[str, type[BaseTask]]:
    from .multitask import TASKS, MultiTask

    return {**TASKS, "multitask": MultiTask}


def upgrade_settings(task_name: str, model: dict, settings: dict) -> tuple[dict, dict]:
    """``(model, task settings)`` of an older checkpoint in today's layout: detection's
    ``position_offset``; ``model.mode`` / ``model.decoding`` / ``test_decoding`` became the task's
    ``mode`` and ``decoding`` (the test decoding, with ``validation`` holding what validation did)."""
    model, settings = dict(model), dict(settings)
    if task_name == "detection" and "position_offset" not in model:
        model["position_offset"] = LEGACY_POSITION_OFFSET
    if "mode" in model:
        settings["mode"] = model.pop("mode")
    if "decoding" in model:
        old, test = dict(model.pop("decoding") or {}), dict(settings.pop("test_decoding", None) or {})
        settings["decoding"] = {**old, **test, "validation": {k: old[k] for k in test if k in old}}
    return model, settings


def build_task(ckpt: dict) -> BaseTask:
    """The checkpoint's task with its trained weights, in eval mode, on the CPU."""
    meta = ckpt[CHECKPOINT_KEY]
    hparams = dict(ckpt["hyper_parameters"])
    hparams["model"] = without_weight_sources(hparams["model"])
    if meta["task"] == "multitask":
        models, tasks = dict(hparams["model"]), dict(hparams["tasks"])
        for name in [n for n in tasks if tasks[n] is not None and n in models]:
            models[name], tasks[name] = upgrade_settings(name, models[name], tasks[name])
        hparams["model"], hparams["tasks"] = models, tasks
    else:
        model, hparams = upgrade_settings(meta["task"], hparams["model"], hparams)
        hparams["model"] = model
    task = task_classes()[meta["task"]](**hparams)
    task.load_state_dict(ckpt["state_dict"], strict=True)
    task.remember_data(meta.get("data"), meta.get("preprocessing"))
    return task.eval()


def pick_task(task: BaseTask, task_name: str | None, path: str = "") -> tuple[BaseTask, str]:
    """The task to use: the task itself, or a multitask checkpoint's child named by ``task_name``."""
    names = getattr(task, "task_names", None)
    if names is None:
        if task_name not in (None, task.task_name):
            raise ConfigError(f"task_name={task_name}: {path or 'the checkpoint'} is a {task.task_name} "
                              "checkpoint; task_name= is only for multitask checkpoints (leave it out).")
        return task, task.task_name
    if task_name not in names:
        raise ConfigError(f"{path or 'the checkpoint'} is a multitask checkpoint of {', '.join(names)}: "
                          f"pick one with task_name=<{'|'.join(names)}>" + (f" (got {task_name!r})" if task_name else ""))
    return task.task(task_name), task_name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: no CUDA GPU is available here; use device=cpu or device=auto.")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a device: use cpu, cuda, cuda:N or auto.") from e


def autocast(device: torch.device, precision: str | int | None):
    """The autocast context of ``precision`` (32 | bf16 | 16, Lightning's spellings too) on ``device``."""
    key = str(precision if precision is not None else "32")
    if key not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[key]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Predictor:
    """A checkpoint's task ready to run: ``task`` (the ``BaseTask``, eval mode), ``meta`` (the checkpoint's
    mtdetr entry: task, data config, preprocessing, metrics at save time), ``device``, ``precision``."""

    def __init__(self, task: BaseTask, task_name: str, meta: dict, device: torch.device,
                 precision: str | None, path: str = "") -> None:
        self.task, self.task_name, self.meta, self.path = task.to(device), task_name, meta, path
        self.device, self.precision = device, precision
        multitask = meta.get("task") == "multitask"
        data = meta.get("data") or {}
        prep = meta.get("preprocessing") or {}
        self.data_config = data.get(task_name) if multitask else data
        self.preprocessing = (prep.get(task_name) if multitask else prep) or {}

    def autocast(self):
        return autocast(self.device, self.precision)


class ImagePredictor(Predictor):
    """Detection and multi-label models: images in, plain results out (see ``predict``)."""

    batch_size = 8

    @property
    def class_names(self) -> list[str]:
        info = self.task.data_info
        return list(info.get("class_names") or [str(i) for i in range(int(info["num_classes"]))])

    def transform(self) -> ImageOnly:
        """The validation preprocessing of the training run (shortest side, max size, normalisation)."""
        prep = self.preprocessing
        if "val_scale" not in prep or "max_size" not in prep:
            raise ConfigError(f"{self.path or 'the checkpoint'} does not store its preprocessing (written before "
                              "it was kept in checkpoints); evaluate it with eval.py and data.* settings instead.")
        return ImageOnly(make_detection_transforms(False, val_scale=prep["val_scale"], max_size=prep["max_size"]))

    def load_images(self, images: Iterable[str | os.PathLike | Image.Image]) -> tuple[list, list[str]]:
        """(``[(name, PIL RGB image)]``, problems): files that are not readable images are reported, not raised."""
        loaded, problems = [], []
        for i, item in enumerate(images):
            if isinstance(item, Image.Image):
                loaded.append((f"<image {i}>", to_rgb(item)))
                continue
            try:
                loaded.append((str(item), load_rgb_image(item)))
            except DataError as e:
                problems.append(f"{item}: {str(e).split(': ', 1)[-1].split('; ')[0]}")
        return loaded, problems

    def _batch(self, pils: Sequence[Image.Image], transform) -> dict:
        samples = []
        for pil in pils:
            image = transform(tv_tensors.Image(v2.functional.pil_to_tensor(pil))).as_subclass(torch.Tensor)
            samples.append((image, {"orig_size": torch.tensor([pil.height, pil.width])}))
        size_div = int(self.preprocessing.get("size_divisibility", 32))
        batch = collate_detection(samples, size_div)
        return {"images": batch["images"].to(self.device), "pixel_mask": batch["pixel_mask"].to(self.device),
                "sizes": torch.stack([t["orig_size"] for t in batch["targets"]]).to(self.device)}

    def predict(self, images: Iterable[str | os.PathLike | Image.Image], threshold: float | None = None,
                batch_size: int | None = None, progress: Any = None) -> list[dict]:
        """One dict per readable image, in input order: ``file, width, height`` and ``boxes`` (pixel
        xyxy, detection), ``labels`` (class names), ``scores``. Unreadable files are left out (see
        ``load_images`` to name them). ``threshold``: lowest score kept (default: 0.5 for detection,
        the task's own for multi-label). ``progress``: called with the number of images done per batch."""
        loaded, _ = self.load_images(images)
        return self.predict_loaded(loaded, threshold, batch_size, progress)

    def predict_loaded(self, loaded: list, threshold: float | None = None, batch_size: int | None = None,
                       progress: Any = None) -> list[dict]:
        transform, size = self.transform(), int(batch_size or self.batch_size)
        results = []
        for start in range(0, len(loaded), size):
            chunk = loaded[start:start + size]
            batch = self._batch([pil for _, pil in chunk], transform)
            with torch.inference_mode(), self.autocast():
                rows = self._run(batch, threshold)
            for (name, pil), row in zip(chunk, rows):
                results.append({"file": name, "width": pil.width, "height": pil.height, **row})
            if progress is not None:
                progress(len(chunk))
        return results


class Detector(ImagePredictor):
    def _run(self, batch: dict, threshold: float | None) -> list[dict]:
        from modules.detr import postprocess

        task, names = self.task, self.class_names
        outputs = task(batch["images"], batch["pixel_mask"])
        preds = postprocess(outputs, batch["sizes"], top_k=task.top_k, class_loss=task.model.class_loss)
        thr = 0.5 if threshold is None else float(threshold)
        rows = []
        for p, (h, w) in zip(preds, batch["sizes"].tolist()):
            keep = p["scores"].float() >= thr
            boxes = p["boxes"][keep].float()
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                 boxes[:, 3].clamp(0, h)], 1)  # inside the image
            rows.append({"boxes": [[round(float(v), 2) for v in b] for b in boxes.tolist()],
                         "labels": [names[i] for i in p["labels"][keep].tolist()],
                         "scores": [round(float(s), 4) for s in p["scores"][keep].float().tolist()]})
        return rows


    def attention(self, loaded: list, threshold: float | None = None) -> list[dict]:
        """Per image of ``loaded`` (``load_images``): its kept detections' last-decoder-layer
        cross-attention, ``maps`` ``[K, h, w]`` in [0, 1] over the resized image, with their ``boxes``
        (pixel xyxy of the original image), ``labels`` and ``scores``."""
        from .attention import kept_queries, last_cross_attention, token_maps

        task, names, thr = self.task, self.class_names, 0.5 if threshold is None else float(threshold)
        result = []
        for start in range(0, len(loaded), self.batch_size):
            chunk = loaded[start:start + self.batch_size]
            batch = self._batch([pil for _, pil in chunk], self.transform())
            with torch.inference_mode(), self.autocast(), last_cross_attention(task.model.transformer) as seen:
                outputs = task(batch["images"], batch["pixel_mask"])
            kept = kept_queries(outputs, task.model, thr, task.top_k)
            for i, ((name, pil), rows) in enumerate(zip(chunk, kept)):
                queries = [q for q, _, _ in rows]
                cxcywh = outputs["pred_boxes"][i, queries].float().cpu()
                scale = torch.tensor([pil.width, pil.height, pil.width, pil.height], dtype=torch.float32)
                boxes = (torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1) * scale)
                result.append({"file": name, "maps": token_maps(seen[-1][i].cpu(), batch["pixel_mask"][i].cpu(), queries),
                               "boxes": boxes.tolist(), "labels": [names[c] for _, c, _ in rows],
                               "scores": [s for _, _, s in rows]})
        return result


class Tagger(ImagePredictor):
    def _run(self, batch: dict, threshold: float | None) -> list[dict]:
        scores, predicted = self.task.predict(batch["images"], batch["pixel_mask"])
        if threshold is not None and not self.task.is_sequence:
            predicted = scores >= float(threshold)
        names = self.class_names
        rows = []
        for s, p in zip(scores.float(), predicted):
            idx = sorted(p.nonzero().flatten().tolist(), key=lambda c: -float(s[c]))
            rows.append({"labels": [names[c] for c in idx], "scores": [round(float(s[c]), 4) for c in idx]})
        return rows


class Translator(Predictor):
    batch_size = 32

    def translate(self, sentences: Sequence[str], batch_size: int | None = None, **decoding) -> list[str]:
        """One translation per sentence (an empty or blank sentence gives ""). ``decoding``: settings of
        ``modules.decoding.generate`` laid over the model's (strategy, beam_size, max_len, ...)."""
        from modules.decoding import check_settings

        try:
            check_settings({**self.task.decoding, **decoding}, "decoding")
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e
        out = ["" for _ in sentences]
        todo = [i for i, s in enumerate(sentences) if s.strip()]
        size = int(batch_size or self.batch_size)
        for start in range(0, len(todo), size):
            idx = todo[start:start + size]
            with torch.inference_mode(), self.autocast():
                for i, text in zip(idx, self.task.translate([sentences[i] for i in idx], **decoding)):
                    out[i] = text
        return out


    def attention(self, sentence: str, **decoding) -> tuple[Tensor, list[str], list[str]]:
        """The translation of ``sentence`` and its last-decoder-layer cross-attention (head-averaged):
        (``[T, S]`` weights, source tokens, output tokens), EOS included on both sides."""
        task = self.task
        src_ids = task.source_ids(sentence) + [task.eos_id]
        src = torch.tensor([src_ids], device=self.device)
        with torch.inference_mode(), self.autocast():
            hyp = task.translate_ids(src, src == task.pad_id, **decoding)[0]
            tgt_in = torch.tensor([[task.bos_id, *hyp]], device=self.device)
            out = task.model(src, src == task.pad_id, tgt_in, need_attn=True)
        return out["cross_attn"][0].float().cpu(), self.pieces(src_ids), self.pieces([*hyp, task.eos_id])

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.task.tokenizer.id_to_token(i) or str(i) for i in ids]


PREDICTORS = {"detection": Detector, "multilabel": Tagger, "translation": Translator}


def load(path: str | os.PathLike, *, task_name: str | None = None, device: str = "auto",
         precision: str | None = "32") -> Detector | Tagger | Translator:
    """Load a checkpoint written by ``train.py`` into a ready model object (see the module docstring).
    ``task_name`` picks the task of a multitask checkpoint; ``device``: auto | cpu | cuda[:N];
    ``precision``: 32 | bf16 | 16 (autocast)."""
    path = checkpoint_file(str(path))
    ckpt = read_checkpoint(path)
    task, name = pick_task(build_task(ckpt), task_name, path)
    device_ = resolve_device(device)
    autocast(device_, precision)  # an unknown precision fails here, not at the first batch
    return PREDICTORS[name](task, name, ckpt[CHECKPOINT_KEY], device_, precision, path)
