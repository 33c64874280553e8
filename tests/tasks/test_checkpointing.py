"""Checkpoint safety: atomic writes."""

from __future__ import annotations

import lightning.fabric.plugins.io.torch_io as torch_io
import pytest
import torch

from tasks.checkpointing import AtomicCheckpointIO


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}

    def dies_mid_write(obj, p):  # a kill while the bytes go to disk: half a file, then gone
        with open(p, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_io, "_atomic_save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
