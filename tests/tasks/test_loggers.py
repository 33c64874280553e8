"""W&B model artifacts: an offline run ends with its checkpoints logged in the run's own files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2 as pb

from tasks.loggers import checkpoint_aliases, resolve_wandb_checkpoint
from train import train

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of [crc32, length, type] + data


def wandb_records(path: Path) -> list[pb.Record]:
    """Every record of an offline run's ``run-<id>.wandb`` file (its 7-byte ``:W&B`` header first)."""
    data, pos, parts, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the rest of a block too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


@pytest.mark.slow
def test_offline_run_logs_best_and_last_checkpoint_as_a_model_artifact(make_cfg, tmp_path):
    common = ["logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "test=false"]
    train(make_cfg(*common))
    wandb.teardown()  # what the end of the process does: the W&B service writes out the run's file
    run_dir = tmp_path / "outputs" / "detection" / "run1"
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    artifacts = [r.artifact for r in wandb_records(wandb_file) if r.WhichOneof("record_type") == "artifact"]
    run_id = wandb_file.stem.removeprefix("run-")
    kinds = [r.WhichOneof("record_type") for r in wandb_records(wandb_file)]
    assert artifacts, f"no artifact record in the offline run: {kinds[-12:]}"
    assert {a.name for a in artifacts} == {f"model-{run_id}"} and {a.type for a in artifacts} == {"model"}
    aliases = {alias for a in artifacts for alias in a.aliases}
    assert {"best", "latest"} <= aliases
    for artifact in artifacts:
        assert [entry.path for entry in artifact.manifest.contents] == ["model.ckpt"]

    train(make_cfg(*common, "logger.wandb.log_checkpoints=false", run="off"))
    wandb.teardown()
    (off_file,) = (tmp_path / "outputs" / "detection" / "off").glob("wandb/offline-run-*/run-*.wandb")
    assert not [r for r in wandb_records(off_file) if r.WhichOneof("record_type") == "artifact"]


def test_checkpoint_aliases_join_one_file_and_skip_missing_ones(tmp_path):
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    best.write_bytes(b"x")
    assert checkpoint_aliases(str(best), str(last)) == {str(best.resolve()): ["best"]}
    last.write_bytes(b"y")
    assert checkpoint_aliases(str(best), str(last)) == {str(best.resolve()): ["best"], str(last.resolve()): ["latest"]}
    assert checkpoint_aliases(str(best), str(best)) == {str(best.resolve()): ["best", "latest"]}
    assert checkpoint_aliases("", "") == {}


def test_a_wandb_reference_offline_is_a_one_line_error_and_a_path_passes_through(tmp_path):
    with pytest.raises(ValueError, match=r"wandb artifact get me/mtdetr/model-abc:best") as info:
        resolve_wandb_checkpoint("wandb:me/mtdetr/model-abc:best", online=False)
    assert "\n" not in str(info.value)
    assert resolve_wandb_checkpoint(str(tmp_path / "x.ckpt"), online=False) == str(tmp_path / "x.ckpt")


def test_eval_and_predict_name_a_wandb_reference_offline_in_one_line(monkeypatch):
    from tasks.api import load
    from tasks.runtime import ConfigError

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ConfigError, match="W&B is offline here") as info:
        load("wandb:me/mtdetr/model-abc:latest", device="cpu")
    assert "\n" not in str(info.value)
