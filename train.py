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

from datamodules.coco import DataError
from tasks.runtime import (
    ConfigError,
    callbacks_for,
    close_loggers,
    instantiate_dict,
    mirror_lightning_logs,
    register_resolvers,
    register_schema,
    resolve_checkpoint,
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
    task = instantiate(cfg.task, model=to_plain(cfg.model), data_info=datamodule.data_info)
    loggers = instantiate_dict(cfg.logger, id=wandb_id)
    callbacks = callbacks_for(instantiate_dict(cfg.callbacks), loggers)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(to_plain(cfg))

    if cfg.train:
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit after saving
            summary = wandb_summary(loggers)
            close_loggers(loggers, "interrupted")
            log.info(f"interrupted; resume with: python train.py task={cfg.task_name} ckpt_path=last")
            if summary:
                log.info(summary)
            raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if cfg.train else ckpt_path
        trainer.test(task, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if not trainer.is_global_zero:  # DDP: the other processes stay quiet
        close_loggers(loggers)
        return metrics
    log.info(f"run folder: {cfg.paths.output_dir}")
    if trainer.checkpoint_callback is not None and cfg.train:
        last = trainer.checkpoint_callback.last_model_path
        log.info(f"checkpoints: best={trainer.checkpoint_callback.best_model_path or '-'} last={last or '-'}")
        if last and os.path.isfile(last):
            log.info(f"resume with: python train.py task={cfg.task_name} ckpt_path={last}")
    summary = wandb_summary(loggers)
    if summary:
        log.info(summary)
    close_loggers(loggers)
    return metrics


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except MissingMandatoryValue as e:  # a ??? in the config that the command line did not fill
        sys.exit(f"error: missing mandatory value {e.full_key} — set it on the command line, e.g. {e.full_key}=...")
    except (ConfigError, InstantiationException, DataError) as e:  # user mistakes: no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
