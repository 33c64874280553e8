"""Loggers: Lightning's W&B logger, plus checkpoints kept as W&B model Artifacts, online or offline.

Lightning's own ``log_model`` refuses an offline ``WandbLogger``, and a run without credentials is
offline here, so the checkpoints are logged by :class:`WandbLogger` itself when training ends: the
artifact lands in the run's folder and ``wandb sync <run dir>`` uploads it with the rest of the run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

log = logging.getLogger("mtdetr")


class WandbLogger(LightningWandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` that, with ``log_checkpoints`` (the default), logs the
    best and the last checkpoint of a finished fit as versions of the model Artifact
    ``model-<run id>`` with the aliases ``best`` and ``latest`` (one version with both aliases when
    they are the same file). ``log_checkpoints=false`` turns it off."""

    def __init__(self, *, id: str | None = None, log_checkpoints: bool = True, **kwargs: Any) -> None:
        # ``id`` named here: the run plumbing passes a resumed run's id only to loggers that declare it
        super().__init__(id=id, **kwargs)
        self.log_checkpoints = log_checkpoints
        self._fit_checkpoints: Any = None  # the ModelCheckpoint that saved last (not Lightning's attribute)
        self._logged: set[tuple[str, float]] = set()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        self._fit_checkpoints = checkpoint_callback

    def finalize(self, status: str) -> None:
        if status == "success" and self.log_checkpoints and self._fit_checkpoints is not None:
            self.log_checkpoint_artifacts(self._fit_checkpoints)
        super().finalize(status)

    def log_checkpoint_artifacts(self, checkpoint_callback: Any) -> list[str]:
        """Log the best and last checkpoint files (once each per file version); returns their aliases."""
        import wandb

        files = checkpoint_aliases(getattr(checkpoint_callback, "best_model_path", ""),
                                   getattr(checkpoint_callback, "last_model_path", ""))
        logged = []
        for path, aliases in files.items():
            key = (path, os.path.getmtime(path))
            if key in self._logged:
                continue
            artifact = wandb.Artifact(f"model-{self.experiment.id}", type="model", metadata={
                "file": os.path.basename(path),
                "score": _score(checkpoint_callback, path),
                "monitor": getattr(checkpoint_callback, "monitor", None),
            })
            artifact.add_file(path, name="model.ckpt")
            self.experiment.log_artifact(artifact, aliases=aliases)
            self._logged.add(key)
            logged.extend(aliases)
            log.info(f"W&B model artifact model-{self.experiment.id} ({', '.join(aliases)}): {path}")
        return logged


def checkpoint_aliases(best: str, last: str) -> dict[str, list[str]]:
    """``{file: aliases}`` for the files that exist: the best gets ``best``, the last ``latest``."""
    files: dict[str, list[str]] = {}
    for path, alias in ((best, "best"), (last, "latest")):
        if path and os.path.isfile(path):
            files.setdefault(os.path.realpath(path), []).append(alias)
    return files


def _score(checkpoint_callback: Any, path: str) -> float | None:
    best = getattr(checkpoint_callback, "best_model_path", "")
    score = getattr(checkpoint_callback, "best_model_score", None)
    if best and os.path.realpath(best) == path and score is not None:
        return float(score)
    return None


WANDB_PREFIX = "wandb:"


def resolve_wandb_checkpoint(ref: str, online: bool) -> str:
    """``wandb:entity/project/model-<id>:alias`` -> the downloaded ``model.ckpt`` (online only); any
    other string is returned as it is. Offline, a one-line ``ValueError`` says what to do instead."""
    if not ref.startswith(WANDB_PREFIX):
        return ref
    name = ref[len(WANDB_PREFIX):]
    if not online:
        raise ValueError(
            f"ckpt_path={ref} is a W&B artifact, but W&B is offline here (no credentials or WANDB_MODE=offline): "
            f"on a machine with access run `wandb artifact get {name}` and pass the model.ckpt it downloads")
    import wandb

    artifact = wandb.Api().artifact(name, type="model")
    return os.path.join(artifact.download(), "model.ckpt")
