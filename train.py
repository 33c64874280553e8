"""Train and test any task: ``python train.py task=detection [hydra overrides]``.

Compose the config (``configs/``), instantiate data, task, callbacks, loggers and trainer, fit, test
on the best checkpoint, and say where everything went. Resume with ``ckpt_path=<file>`` or
``ckpt_path=last``. ``python train.py --help`` lists the config groups.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from datamodules.errors import DataError
from modules.private_api import PrivateAPIError
from tasks.reliability import RunGuard, TrainingInterrupted
from tasks.runtime import (
    ConfigError,
    callbacks_for,
    close_loggers,
    data_settings,
    find_good_checkpoint,
    instantiate_dict,
    mirror_lightning_logs,
    register_resolvers,
    register_schema,
    resolve_checkpoint,
    resume_command,
    to_plain,
    wandb_summary,
)

register_resolvers()
register_schema()
log = logging.getLogger("mtdetr")


def train(cfg: DictConfig) -> dict[str, float]:
    mirror_lightning_logs()
    if cfg.float32_matmul_precision:
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path, wandb_id = resolve_checkpoint(cfg)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = weights_from_checkpoint(to_plain(cfg.model), ckpt_path, cfg.task_name)
    task = instantiate(cfg.task, model=model, data_info=datamodule.data_info)
    task.remember_data(to_plain(cfg.data), data_settings(datamodule))  # the checkpoint alone evaluates / predicts
    loggers = instantiate_dict(cfg.logger, id=wandb_id)
    guard = RunGuard()  # RNG state in checkpoints, SIGINT/SIGTERM -> checkpoint + stop, NaN weights never saved
    callbacks = callbacks_for(instantiate_dict(cfg.callbacks), loggers) + [guard]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(to_plain(cfg))

    if cfg.train:
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except FloatingPointError as e:  # NaN/Inf loss or weights: nothing poisoned was saved
            close_loggers(loggers, "failed")
            good = find_good_checkpoint(trainer, ckpt_path)
            raise TrainingDiverged(
                f"{e} -- training stopped at global step {trainer.global_step}; nothing was saved after it. "
                + (f"Last good checkpoint: {good} (resume: {resume_command(cfg, good)})" if good
                   else "No checkpoint was saved before it.")
            ) from e
        except (KeyboardInterrupt, SystemExit) as e:  # RunGuard saved after the step; a 2nd Ctrl-C did not
            _report_interruption(cfg, trainer, loggers, getattr(e, "checkpoint", None) or guard.saved_path, ckpt_path)
            raise
        if guard.stop_signal is not None:  # signal during the last validation: the run ended, skip the test
            _report_interruption(cfg, trainer, loggers, trainer.checkpoint_callback and
                                 trainer.checkpoint_callback.last_model_path, ckpt_path)
            raise TrainingInterrupted(guard.stop_signal, None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # read before testing: trainer.test(ckpt_path=best) restores the callback's state saved in the best
    # checkpoint, written before last.ckpt (last_model_path "" if the best is from the first epoch)
    cb = trainer.checkpoint_callback
    best_ckpt, last_ckpt = (cb.best_model_path, cb.last_model_path) if cb is not None and cfg.train else ("", "")
    if cfg.test:
        best = best_ckpt if cfg.train else ckpt_path
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if not trainer.is_global_zero:  # DDP: the other processes stay quiet
        close_loggers(loggers)
        return metrics
    log.info(f"run folder: {cfg.paths.output_dir}")
    if cb is not None and cfg.train:
        log.info(f"checkpoints: best={best_ckpt or '-'} last={last_ckpt or '-'}")
        if last_ckpt and os.path.isfile(last_ckpt):
            log.info(f"resume with: python train.py task={cfg.task_name} ckpt_path={last_ckpt}")
    summary = wandb_summary(loggers)
    if summary:
        log.info(summary)
    close_loggers(loggers)
    return metrics


class TrainingDiverged(ConfigError):
    """The loss or the weights became NaN/Inf; the message names the step and the last good checkpoint."""


def weights_from_checkpoint(model: dict, ckpt_path: str | None, task_name: str) -> dict:
    """Resuming: the weights come from the checkpoint, so the training-start sources are not read again
    (a checkpoint never needs them): ``pretrained_backbone`` is dropped, and a detection run's
    ``init_from`` becomes the checkpoint itself, which states the architecture its run built."""
    if not ckpt_path or not isinstance(model, dict):
        return model
    model = dict(model)
    if model.get("pretrained_backbone"):
        model["pretrained_backbone"] = None
    if model.get("init_from") and task_name == "detection":
        model["init_from"] = ckpt_path
    return model


def _report_interruption(cfg: DictConfig, trainer, loggers: list, saved: str | None, ckpt_path: str | None) -> None:
    summary = wandb_summary(loggers) if trainer.is_global_zero else None
    close_loggers(loggers, "interrupted")
    if not trainer.is_global_zero:
        return
    good = saved if saved and os.path.isfile(saved) else find_good_checkpoint(trainer, ckpt_path)
    if good:
        log.info(f"interrupted at global step {trainer.global_step}; checkpoint: {good}")
        log.info(f"resume with: {resume_command(cfg, good)}")
    else:
        log.info("interrupted before any checkpoint was saved; start again with the same command")
    if summary:
        log.info(summary)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except MissingMandatoryValue as e:  # a ??? in the config that the command line did not fill
        sys.exit(f"error: missing mandatory value {e.full_key} — set it on the command line, e.g. {e.full_key}=...")
    except (ConfigError, InstantiationException, DataError, PrivateAPIError) as e:  # user mistakes: no traceback
        sys.exit(f"error: {e}")


def quiet_other_ranks(argv: list[str], env: dict[str, str]) -> list[str]:
    """Under torchrun / SLURM every process runs this script: only global rank 0 keeps Hydra's
    ``.hydra/`` folder and ``train.log``; the others log to stdout only (Lightning's own DDP launcher
    already gives its children a separate ``hydra.output_subdir``)."""
    rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
    if rank in ("", "0") or any(a.startswith(("hydra.output_subdir", "hydra/job_logging")) for a in argv):
        return argv
    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    sys.argv = quiet_other_ranks(sys.argv, dict(os.environ))
    main()
