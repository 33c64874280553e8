"""Shared fixtures: compose the real Hydra config with tiny sizes so runs take seconds on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TINY_MODEL = [
    "model.backbone=resnet18",
    "model.d_model=32",
    "model.nhead=4",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=2",
    "model.dim_feedforward=64",
    "model.num_queries=8",
]
TINY_DATA = [
    "data.num_train=16",
    "data.num_val=8",
    "data.num_test=8",
    "data.image_size=64",
    "data.batch_size=4",
    "data.num_workers=0",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One synthetic-shapes cache for the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """``make_cfg(*overrides, run="run1")`` -> composed train config writing under tmp_path."""
    import train  # noqa: F401  (registers resolvers and the config schema)

    def _make(*overrides: str, run: str = "run1", tiny: bool = True) -> DictConfig:
        base = [
            f"paths.log_dir={tmp_path / 'outputs'}",
            f"paths.output_dir={tmp_path / 'outputs' / 'detection' / run}",
            f"paths.cache_dir={cache_dir}",
            "callbacks.progress_bar.refresh_rate=0",
        ]
        if tiny:
            base += TINY_MODEL + TINY_DATA
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            return compose("train", overrides=base + list(overrides))

    return _make


def run_train_script(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python train.py *args`` in the repository root, in its own process group. A run still going after
    ``timeout`` seconds (a DDP hang, say) is killed with all its processes -- Lightning's DDP launcher
    starts the other ranks as children -- and the calling test FAILS instead of blocking."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"train.py {' '.join(args[:3])} ... did not finish within {timeout:.0f} s (a hang?); "
                    f"stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
