"""Checkpoint safety: atomic writes."""

from __future__ import annotations

import os

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


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
