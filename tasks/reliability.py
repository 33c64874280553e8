"""Run safety that every task gets from ``train.py``: exact resume, clean interruption, no poisoned checkpoints.

``RunGuard`` (a Lightning callback, always added by ``train.py``):

- **RNG states**: the torch (CPU and CUDA), numpy and Python global RNG states go into every checkpoint
  (``callbacks.RunGuard``, plain tensors/lists: ``weights_only=True`` still loads) and are put back
  when training restarts, so dropout and any other draw continue exactly where the saved run was.
  Data order and augmentations do not use the global RNG at all (``datamodules/sampling.py``).
- **Interruptions**: the first Ctrl-C (SIGINT) or SIGTERM only sets a flag; at the end of the current
  training step the run writes ``checkpoints/last.ckpt`` (atomically), then stops with
  ``TrainingInterrupted``. ``train.py`` finishes the loggers and prints the resume command. A second
  Ctrl-C aborts at once (the previous checkpoint stays intact). Under DDP the flag is OR-reduced over
  ranks each step, so all ranks stop at the same step.
- **NaN/Inf weights**: after every optimizer step the parameters are checked; non-finite values stop the
  run with ``FloatingPointError`` *before* any checkpoint callback (they run after this one) can save
  them. Lightning itself saves nothing on an exception (``ModelCheckpoint(save_on_exception=False)``)
  and skips ``on_train_end``, so nothing already on disk is overwritten by a poisoned state.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch

from .metrics import make_module_metrics_uneven_safe

log = logging.getLogger("mtdetr")


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGINT/SIGTERM after saving ``checkpoint``; exit status 128 + signal number."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(128 + signum)
        self.signum, self.checkpoint = signum, checkpoint


def rng_state() -> dict[str, Any]:
    """Global RNG states as plain values (tensors, lists, tuples of ints)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameters_finite(module: torch.nn.Module) -> bool:
    params = [p.detach() for p in module.parameters()]
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


class RunGuard(L.Callback):
    """See the module docstring. ``checkpoint_name``: file written on interruption, in the
    ``ModelCheckpoint`` folder (``<run>/checkpoints`` without one)."""

    def __init__(self, checkpoint_name: str = "last.ckpt") -> None:
        self.checkpoint_name = checkpoint_name
        self.stop_signal: int | None = None
        self.saved_path: str | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._previous_handlers: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # evaluation ranks hold different sample counts (no padding)
            make_module_metrics_uneven_safe(pl_module)

    # RNG state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in load_state_dict: nothing between this and the first step draws from the RNG
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._install_handlers()

    # signals --------------------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            log.warning("second Ctrl-C: stopping now without saving (the previous checkpoint is intact)")
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning(f"received {signal.Signals(signum).name}: saving a checkpoint after this training step, "
                    "then stopping (Ctrl-C again to abort at once)")

    def checkpoint_path(self, trainer: L.Trainer) -> str:
        cb = trainer.checkpoint_callback
        folder = getattr(cb, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        last = getattr(cb, "last_model_path", "")
        if last and os.path.dirname(os.path.abspath(last)) == os.path.abspath(folder):
            return last  # ModelCheckpoint's own last file (last-v1.ckpt if a stale last.ckpt was there)
        return os.path.join(folder, self.checkpoint_name)

    # per step ------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not parameters_finite(pl_module):
            raise FloatingPointError(
                f"weights became NaN/Inf at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
                "not saving them. Lower the learning rate or check the data."
            )
        stop = self.stop_signal is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            path = self.checkpoint_path(trainer)
            trainer.save_checkpoint(path, weights_only=False)
            self.saved_path = path
            raise TrainingInterrupted(self.stop_signal or signal.SIGTERM, path)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
