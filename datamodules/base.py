"""What every DataModule shares: the split -> DataLoader methods built on one ``_loader``."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader


class SplitDataModule(L.LightningDataModule):
    """Subclasses set ``train_dataset`` / ``val_dataset`` / ``test_dataset`` in ``setup`` and define
    ``_loader(dataset, shuffle, name)``; prediction runs on the test split."""

    def _loader(self, dataset, shuffle: bool, name: str) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True, name="train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False, name="val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False, name="test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False, name="test")
