"""Checkpoint safety: atomic writes, and a ``last.ckpt`` that really is the last epoch."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from modules import private_api


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then renames it into place.

    A run killed while writing leaves the previous ``last.ckpt`` intact (plus, at worst, a stray
    ``*.tmp-<pid>`` file), never a truncated checkpoint. Remote paths (``s3://`` ...) fall back to the
    default writer.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``save_last`` meaning *every* epoch.

    Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint was written at the same step, so an
    epoch whose monitored metric did not improve leaves ``last.ckpt`` one or more epochs behind (and
    ``ckpt_path=last`` would silently repeat them). Here ``last.ckpt`` is refreshed at the end of every
    epoch (validation end, or training-epoch end when that is where checkpoints are saved).

    The refresh calls Lightning's private last-checkpoint writer (``modules.private_api``): where this
    Lightning lacks it, ``setup`` (before the first step) stops with a one-line ``PrivateAPIError``.
    """

    def __init__(self, **kwargs: Any) -> None:  # keyword arguments only, as every class a config builds
        super().__init__(**kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.save_last:
            private_api.check_last_checkpoint_writer(self)

    def _refresh_last(self, trainer, train_epoch_end: bool) -> None:
        """Write ``last.ckpt`` at the hook where this callback saves (training-epoch or validation end)."""
        if self.save_last and private_api.saves_on_train_epoch_end(self, trainer) == train_epoch_end:
            private_api.save_last_checkpoint(self, trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer, train_epoch_end=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._refresh_last(trainer, train_epoch_end=False)
