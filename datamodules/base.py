"""What every DataModule shares: the split -> DataLoader methods built on one ``_loader``."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from .sampling import ResumableDataLoader


def fit_progress(trainer: L.Trainer | None) -> tuple[int, int]:
    """(batches of the current epoch already trained, batches per epoch; 0 when unknown) of ``trainer``."""
    if trainer is None:
        return 0, 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    total = trainer.num_training_batches
    return int(done), int(total) if total != float("inf") else 0


def position_state(trainer: L.Trainer | None) -> dict[str, int]:
    """The training position a data module saves in a checkpoint: ``{epoch, batches_done,
    epoch_batches}`` ({} without a trainer); ``sampling.restore_position`` applies it."""
    if trainer is None:
        return {}
    done, total = fit_progress(trainer)
    return {"epoch": int(trainer.current_epoch), "batches_done": done, "epoch_batches": total}


class SplitDataModule(L.LightningDataModule):
    """Subclasses set ``train_dataset`` / ``val_dataset`` / ``test_dataset`` in ``setup`` and define
    ``_loader(dataset, shuffle, name)``; prediction runs on the test split."""

    def _loader(self, dataset, shuffle: bool, name: str) -> DataLoader:
        raise NotImplementedError

    def train_progress(self) -> tuple[int, int]:
        """(batches of the current epoch already trained, batches per epoch) from the attached trainer;
        ``datamodules.sampling.ResumableDataLoader`` stores it in checkpoints to resume mid-epoch."""
        return fit_progress(self.trainer)

    # resume position ---------------------------------------------------------------------------
    # Saved in every checkpoint (under the data module's class name) and restored by Lightning *before*
    # configure_optimizers, which may already build and iterate the train loader (cosine schedules ask
    # for ``estimated_stepping_batches``) -- too early for the loader's own state, restored later.
    def state_dict(self) -> dict:
        return position_state(self.trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_resume = dict(state_dict) if state_dict else None

    def _apply_resume(self, loader: ResumableDataLoader) -> ResumableDataLoader:
        """Put a freshly built train loader at the saved position (once per restore)."""
        state = getattr(self, "_pending_resume", None)
        if state:
            loader.load_state_dict(state)
            self._pending_resume = None
        return loader

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_dataset, shuffle=True, name="train")
        return self._apply_resume(loader) if isinstance(loader, ResumableDataLoader) else loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False, name="val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False, name="test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False, name="test")
