"""Run plumbing for ``train.py``: config schema, resolvers, checkpoint lookup, W&B offline, instantiation."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from modules import private_api

from .base import CHECKPOINT_KEY

ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A user mistake in the configuration or on the command line."""


def wandb_has_credentials() -> bool:
    """True when W&B could log online without asking for a key."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def fast_bf16_available(accelerator: str = "auto") -> bool:
    """Whether bf16 matmuls/convolutions run natively here (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if accelerator not in ("auto", "cpu"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_precision(accelerator: str = "auto") -> str:
    """``bf16-mixed`` where bf16 is native and fast, else ``32-true``."""
    return "bf16-mixed" if fast_bf16_available(accelerator) else "32-true"


def if_scratch(pretrained_backbone: str | None, init_from: str | None, value: object, otherwise: object = None) -> object:
    """``value`` for a model trained from scratch (no trunk weights, no whole-model weights), else
    ``otherwise``: None by default (a setting the weights decide, such as the trunk width)."""
    return value if not pretrained_backbone and not init_from else otherwise


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mtdetr.root"):
        OmegaConf.register_new_resolver("mtdetr.root", lambda: str(ROOT))
        OmegaConf.register_new_resolver("mtdetr.wandb_offline", lambda: not wandb_has_credentials())
        OmegaConf.register_new_resolver("mtdetr.auto_precision", auto_precision)
        OmegaConf.register_new_resolver("mtdetr.if_scratch", if_scratch)
        # looked up at each call, so that a test can force either answer
        OmegaConf.register_new_resolver("mtdetr.fast_bf16", lambda accelerator="auto": fast_bf16_available(accelerator))


@dataclass
class PathsSchema:
    root_dir: str = str(ROOT)
    data_dir: str = "${paths.root_dir}/data"
    log_dir: str = "${paths.root_dir}/outputs"
    output_dir: str | None = "${hydra:runtime.output_dir}"
    cache_dir: str = "${paths.root_dir}/.cache"


@dataclass
class TrainSchema:
    """Top-level keys of ``configs/train.yaml``: a misspelled one is an error, not a new key."""

    task_name: str = "???"
    seed: int | None = 42
    ckpt_path: str | None = None
    train: bool = True
    test: bool = True
    float32_matmul_precision: str | None = None
    paths: PathsSchema = field(default_factory=PathsSchema)
    task: Any = None
    data: Any = None
    model: Any = None
    decoding: Any = None
    task_settings: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None


@dataclass
class EvalSchema:
    """Top-level keys of ``configs/eval.yaml`` (``eval.py``)."""

    ckpt_path: str = "???"
    split: str = "val"
    task_name: str | None = None
    device: str = "auto"
    precision: str | None = "32"
    score_threshold: float = 0.5
    attention: bool = False
    attention_samples: int = 8
    decoding: Any = None
    logger: Any = None
    paths: PathsSchema = field(default_factory=PathsSchema)
    data: Any = None


@dataclass
class PredictSchema:
    """Top-level keys of ``configs/predict.yaml`` (``predict.py``)."""

    ckpt_path: str = "???"
    input: str = "???"
    output: str | None = None
    task_name: str | None = None
    device: str = "auto"
    precision: str | None = "32"
    threshold: float | None = None
    batch_size: int = 8
    save_images: bool = True
    attention: bool = False
    decoding: Any = None
    paths: PathsSchema = field(default_factory=PathsSchema)


@dataclass
class ExportSchema:
    """Top-level keys of ``configs/export.yaml`` (``export.py``)."""

    ckpt_path: str = "???"
    format: str = "onnx"
    task_name: str | None = None
    postprocess: bool = True
    top_k: int | None = None
    height: int | None = None
    width: int | None = None
    opset: int = 17
    output: str | None = None
    verify: bool = True
    paths: PathsSchema = field(default_factory=PathsSchema)


def register_schema() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
    store.store(name="eval_schema", node=EvalSchema)
    store.store(name="predict_schema", node=PredictSchema)
    store.store(name="export_schema", node=ExportSchema)


def open_overrides(argv: list[str], groups: tuple[str, ...] = ("data", "decoding")) -> list[str]:
    """``data.x=1`` -> ``++data.x=1`` (eval.py / predict.py): those dicts start from the checkpoint's
    settings, not from a config file, so their keys are added or replaced."""
    return [f"++{a}" if a.startswith(tuple(f"{g}." for g in groups)) else a for a in argv]


def find_last_checkpoint(log_dir: str, task_name: str) -> str:
    """Newest ``last.ckpt`` of a task under ``<log_dir>/<task_name>/*/checkpoints/``."""
    pattern = os.path.join(log_dir, task_name, "*", "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise ConfigError(
            f"ckpt_path=last: no checkpoint matches {pattern}. Train once first, or give the path of a "
            "checkpoint file: ckpt_path=outputs/<task>/<run>/checkpoints/last.ckpt"
        )
    return found[-1]


def read_checkpoint_meta(path: str, task_name: str) -> dict:
    """Check that ``path`` is a readable mtdetr checkpoint of ``task_name``; return its metadata."""
    if not os.path.isfile(path):
        raise ConfigError(f"ckpt_path={path!r}: no such file. Use ckpt_path=last for the newest run's last.ckpt.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or not a checkpoint at all
        raise ConfigError(
            f"ckpt_path={path!r} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            "It may be truncated (a run killed while writing) or not a PyTorch file; pick another one."
        ) from e
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        raise ConfigError(f"ckpt_path={path!r} is not an mtdetr training checkpoint (no {CHECKPOINT_KEY!r} entry).")
    if meta.get("task") != task_name:
        raise ConfigError(
            f"ckpt_path={path!r} was saved by task={meta.get('task')!r}, but this run is task={task_name!r}. "
            f"Run with task={meta.get('task')} or pick a checkpoint of this task."
        )
    return meta


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, str | None]:
    """``cfg.ckpt_path`` as a file path (``last`` -> newest run's last.ckpt) and its W&B run id."""
    path = cfg.ckpt_path
    if not path:
        return None, None
    if path == "last":
        path = find_last_checkpoint(cfg.paths.log_dir, cfg.task_name)
    path = os.path.abspath(os.path.expanduser(path))
    meta = read_checkpoint_meta(path, cfg.task_name)
    return path, meta.get("wandb_run_id")


def find_good_checkpoint(trainer, resumed_from: str | None = None) -> str | None:
    """The newest checkpoint this run can fall back to: its ``last.ckpt`` (this run's or one already in
    its checkpoint folder), else the checkpoint it resumed from."""
    cb = trainer.checkpoint_callback
    candidates = [getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")]
    folder = getattr(cb, "dirpath", None)
    if folder:
        candidates.append(os.path.join(folder, "last.ckpt"))
    candidates.append(resumed_from or "")
    return next((os.path.abspath(p) for p in candidates if p and os.path.isfile(p)), None)


def resume_command(cfg: DictConfig, checkpoint: str) -> str:
    """The command that continues this run: the same command-line overrides plus ``ckpt_path=<checkpoint>``."""
    import shlex

    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not under @hydra.main (tests, notebooks): name the task only
        overrides = [f"task={cfg.task_name}"]
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]
    return shlex.join(["python", "train.py", *overrides, f"ckpt_path={checkpoint}"])


def instantiate_dict(cfg: DictConfig | None, **extra: Any) -> list[Any]:
    """Instantiate each named entry of a config dict (callbacks, loggers); null entries are skipped."""
    if not cfg:
        return []
    objects = []
    for name, node in cfg.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"entry {name!r} has no _target_: every callback/logger needs one")
        kwargs = {k: v for k, v in extra.items() if k in _target_params(node._target_)}
        objects.append(instantiate(node, **kwargs))
    return objects


def callbacks_for(callbacks: list, loggers: list) -> list:
    """Drop callbacks that only feed a logger (LR monitor) when the run has no logger (``logger=none``)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    if loggers:
        return callbacks
    return [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]


def _target_params(target: str) -> set[str]:
    import importlib
    import inspect

    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    return set(inspect.signature(obj).parameters)


def wandb_summary(loggers: list) -> str | None:
    """Where an offline W&B run lies and how to upload it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run_dir = str(Path(run.dir).parent)
            if getattr(run.settings, "mode", "") in ("offline", "dryrun"):
                return f"W&B run {run.id} saved offline in {run_dir}\n  upload it with: wandb sync {run_dir}"
            return f"W&B run {run.id}: {run.url}"
    return None


def close_loggers(loggers: list, status: str = "success") -> None:
    """Finalize every logger; a W&B run is finished so the next run in this process starts fresh (only
    the run the logger started: asking ``WandbLogger.experiment`` would start one)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        logger.finalize(status)
        run = private_api.wandb_logger_run(logger) if isinstance(logger, WandbLogger) else None
        if run is not None:
            run.finish()


def mirror_lightning_logs() -> None:
    """Send Lightning's messages to the run's ``train.log`` too (Hydra's file handler on the root
    logger; Lightning's own logger does not propagate to it)."""
    import logging

    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in files:
            if handler not in logger.handlers:
                logger.addHandler(handler)


PREPROCESSING_KEYS = ("train_scales", "val_scale", "max_size", "size_divisibility", "target", "src_lang",
                      "tgt_lang", "max_len")


def data_settings(datamodule: Any) -> dict[str, Any]:
    """The data module's effective preprocessing (image scales, max size, padding multiple; languages and
    length cap for text; one entry per task for a multitask data module), as plain values for the
    checkpoint. The tokenizer is stored with the task's ``data_info``."""
    children = getattr(datamodule, "datamodules", None)
    if isinstance(children, dict):
        return {name: data_settings(dm) for name, dm in children.items()}
    settings = {}
    for key in PREPROCESSING_KEYS:
        value = getattr(datamodule, key, None)
        if isinstance(value, str | int | float | list | tuple):
            settings[key] = list(value) if isinstance(value, tuple | list) else value
    return settings


def to_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
