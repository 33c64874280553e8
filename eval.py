"""Evaluate a trained checkpoint: ``python eval.py ckpt_path=<file.ckpt> [split=test] [data.*=...]``.

The checkpoint is enough: task, model, class names and the training run's data settings come from it
(the training split is never read). ``data=<group> data.root=...`` evaluates on other data with the
same class names (matched by name). Detection reports official COCO AP (pycocotools COCOeval on the
ground-truth annotations); multi-label per-class AP, mAP, CP/CR/CF1, OP/OR/OF1; translation sacreBLEU
BLEU and chrF. Files go to the run folder (``hydra.run.dir``); see docs/use.md.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from datamodules.errors import DataError
from modules.private_api import PrivateAPIError
from tasks.runtime import ConfigError, open_overrides, register_resolvers, register_schema, to_plain

register_resolvers()
register_schema()
log = logging.getLogger("mtdetr")


def eval_data_config(stored: dict | None, given: dict | None, explicit: set[str], preprocessing: dict) -> dict:
    """The data module config to evaluate on: the checkpoint's (``stored``) with the command line's
    ``data.*`` laid over it; or, when ``data=<group>`` chose other data (``given`` has a ``_target_``), that
    config with the training run's preprocessing for every key not given explicitly."""
    from tasks.runtime import _target_params

    given = dict(given or {})
    if "_target_" in given:
        accepted = _target_params(given["_target_"])
        keep = {k: v for k, v in preprocessing.items() if k in accepted and k not in explicit}
        return {**given, **keep}
    if not stored:
        raise ConfigError("the checkpoint does not store its data settings (written before they were kept): "
                          "choose the data, e.g. data=coco data.root=/path/to/folder")
    return {**stored, **given}


def explicit_keys(overrides: list[str]) -> set[str]:
    """The ``data.<key>`` names given on the command line."""
    keys = set()
    for o in overrides:
        name = o.lstrip("+~").split("=", 1)[0]
        if name.startswith("data."):
            keys.add(name.split(".")[1])
    return keys


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the checkpoint over ``cfg.split`` and write the task's files and ``metrics.json`` to
    ``cfg.paths.output_dir``; returns ``{"metrics", "per_class", "table", "plots"}``."""
    from tasks.api import load
    from tasks.evaluation import evaluate_detection, evaluate_multilabel, evaluate_translation

    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split={cfg.split}: use split=val or split=test")
    predictor = load(cfg.ckpt_path, task_name=cfg.task_name, device=cfg.device, precision=cfg.precision)
    data_cfg = eval_data_config(predictor.data_config, to_plain(cfg.data), explicit_keys(overrides or []),
                                predictor.preprocessing)
    datamodule = instantiate(data_cfg, _convert_="all")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info(f"evaluating {predictor.path} ({predictor.task_name}) on the {cfg.split} split of "
             f"{data_cfg['_target_']} on {predictor.device}")
    with _progress() as progress:
        if predictor.task_name == "detection":
            result = evaluate_detection(predictor, datamodule, cfg.split, out_dir, cfg.score_threshold, progress)
        elif predictor.task_name == "multilabel":
            result = evaluate_multilabel(predictor, datamodule, cfg.split, out_dir, progress)
        else:
            result = evaluate_translation(predictor, datamodule, cfg.split, out_dir, to_plain(cfg.decoding), progress)
    if cfg.attention:
        result["plots"] += attention_pictures(predictor, datamodule, cfg, out_dir / "attention")
    trained = predictor.meta.get("metrics") or {}
    prefix = f"{cfg.task_name}/" if predictor.meta.get("task") == "multitask" else ""
    summary = {"checkpoint": predictor.path, "task": predictor.task_name, "split": cfg.split, **result["metrics"],
               "at_save_time": {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix + "val/")}}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    log.info(f"{cfg.split} split, {predictor.task_name}:\n{result['table']}")
    log.info("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float)))
    log.info(f"files: {out_dir}")
    if cfg.logger and cfg.logger.get("wandb"):
        _log_wandb(cfg, predictor, summary, result, out_dir)
    return result


def attention_pictures(predictor, datamodule, cfg: DictConfig, folder: Path) -> list[Path]:
    """Attention pictures of the split's first ``cfg.attention_samples`` images or sentences."""
    from tasks.attention import draw_image_attention, draw_sentence_attention
    from tasks.evaluation import split_dataset

    dataset, _ = split_dataset(datamodule, cfg.split)
    count = min(cfg.attention_samples, len(dataset))
    if predictor.task_name == "translation":
        lines = [dataset[i]["src_text"] for i in range(count)]
        return draw_sentence_attention(predictor, lines, to_plain(cfg.decoding) or {}, folder)
    if predictor.task_name != "detection":
        raise ConfigError(f"attention=true draws detection and translation attention, not {predictor.task_name}")
    files = [Path(dataset.root) / dataset.coco.imgs[i]["file_name"] for i in dataset.ids[:count]]
    loaded, _ = predictor.load_images(files)
    return draw_image_attention(predictor, loaded, cfg.score_threshold, folder)


class _progress:
    """A tqdm bar on standard error counting evaluated samples."""

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(unit="sample", desc="evaluating", file=sys.stderr, leave=False)
        return self.bar.update

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _log_wandb(cfg: DictConfig, predictor, summary: dict, result: dict, out_dir: Path) -> None:
    """A W&B run of job type ``eval`` naming the checkpoint: metrics, per-class table, pictures."""
    import wandb

    from tasks.runtime import wandb_has_credentials

    run = wandb.init(project=cfg.logger.wandb.get("project", "mtdetr"), job_type="eval", group=predictor.task_name, dir=str(out_dir),
                     name=f"eval-{Path(predictor.path).parent.parent.name}-{Path(predictor.path).stem}",
                     mode="offline" if cfg.logger.wandb.get("offline") or not wandb_has_credentials() else "online",
                     config={"ckpt_path": predictor.path, "split": cfg.split, "task": predictor.task_name,
                             "trained_wandb_run": predictor.meta.get("wandb_run_id")})
    try:
        run.log({f"{cfg.split}/{k}": v for k, v in result["metrics"].items() if isinstance(v, int | float)})
        rows = result["per_class"]
        if rows:
            run.log({f"{cfg.split}/per_class": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        for path in result["plots"]:
            run.log({f"{cfg.split}/{Path(path).stem}": wandb.Image(str(path))})
        run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
        log.info(f"W&B eval run {run.id}: {run.dir}")
    finally:
        run.finish()


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        evaluate(cfg, list(HydraConfig.get().overrides.task))
    except MissingMandatoryValue as e:
        sys.exit(f"error: missing mandatory value {e.full_key} — set it on the command line, e.g. {e.full_key}=...")
    except (ConfigError, InstantiationException, DataError, PrivateAPIError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    sys.argv = open_overrides(sys.argv)
    main()
