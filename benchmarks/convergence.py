"""Detection convergence: val mAP after fixed wall-clock and step budgets, per recipe.

Each recipe is a list of Hydra overrides on top of ``task=detection`` (the embedded synthetic-shapes
data unless a recipe says otherwise). A run trains with the recipe's own data, model, optimiser and
precision, and pauses at each mark (minutes of *training* time, and global steps) to evaluate the
whole validation split with COCO mAP; evaluation time is not charged to the budget. It stops at the
last mark.

    PYTHONPATH=. .venv/bin/python benchmarks/convergence.py --recipes original original_fair default --minutes 5 10 15
    PYTHONPATH=. .venv/bin/python benchmarks/convergence.py --ablation --steps 300 600 --minutes
    PYTHONPATH=. .venv/bin/python benchmarks/convergence.py --recipes default -- trainer.precision=32-true

Recipes (``--list`` prints their overrides): ``original`` (DETR's recipe at the issue's scale, verbatim:
frozen BatchNorm, stem and layer1, trunk LR 1e-5 -- settings for ImageNet weights, which our randomly
initialised trunk does not have), ``original_fair`` (the same recipe with BatchNorm and the whole trunk
trained at the LR of the rest: the fair from-scratch baseline that the README compares against),
``plain`` (our recipe choices without any of DETR's successors' techniques), ``full`` (all five
techniques), ``default`` (the shipped ``task=detection``), ``plain+<technique>`` (one technique
added) and ``full-<technique>`` (one removed). One JSON document goes to stdout (and ``--out``); a table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torchmetrics.detection import MeanAveragePrecision  # noqa: E402

from benchmarks.common import cpu_model, emit_json  # noqa: E402
from tasks.callbacks import FitScheduleToTime  # noqa: E402
from tasks.runtime import data_settings, register_resolvers, register_schema, to_plain  # noqa: E402

# Each technique as the overrides that switch it on (`dn` and `groups` at the sizes of the ablation's
# full recipe; the shipped default, configs/model/detr_small.yaml, keeps 2 groups and no denoising).
TECHNIQUES: dict[str, list[str]] = {
    "focal": ["task.class_loss=focal", "task.cost_class=2.0", "task.loss_ce=2.0"],
    "anchors": ["model.anchor_queries=true"],
    "refine": ["model.anchor_queries=true", "model.box_refine=true"],
    "dn": ["model.anchor_queries=true", "model.dn_groups=5"],
    "groups": ["model.num_groups=3"],
    "two_stage": ["model.two_stage=true"],
}
# ... and the overrides that switch each one off again
TECHNIQUES_OFF: dict[str, list[str]] = {
    "focal": ["task.class_loss=ce", "task.cost_class=1.0", "task.loss_ce=1.0"],
    "refine": ["model.box_refine=false"],
    "dn": ["model.dn_groups=0"],
    "groups": ["model.num_groups=1"],
    "two_stage": ["model.two_stage=false"],
}
PLAIN = [
    "task.class_loss=ce", "task.cost_class=1.0", "task.loss_ce=1.0", "model.anchor_queries=false",
    "model.box_refine=false", "model.dn_groups=0", "model.num_groups=1", "model.two_stage=false",
]


def merged(*override_lists: list[str]) -> list[str]:
    """Concatenate override lists, a later value of a key replacing an earlier one."""
    out: dict[str, str] = {}
    for overrides in override_lists:
        for o in overrides:
            out[o.split("=", 1)[0]] = o
    return list(out.values())


def recipes() -> dict[str, list[str]]:
    full = merged(PLAIN, *TECHNIQUES.values())
    out = {"original": ["experiment=detr_original_shapes"], "original_fair": ["experiment=detr_original_shapes_fair"],
           "plain": PLAIN, "default": [], "full": full}
    for name, on in TECHNIQUES.items():
        out[f"plain+{name}"] = merged(PLAIN, on)
    for name, off in TECHNIQUES_OFF.items():
        out[f"full-{name}"] = merged(full, off)
    return out


ABLATION = ["original", "original_fair", "plain", *(f"plain+{n}" for n in TECHNIQUES if n != "anchors"), "full",
            *(f"full-{n}" for n in TECHNIQUES_OFF), "default"]


class Probe(L.Callback):
    """Evaluates val mAP at training-time marks (seconds) and step marks, then stops the run."""

    def __init__(self, datamodule, seconds: list[float], steps: list[int]) -> None:
        self.datamodule, self.seconds, self.steps = datamodule, sorted(seconds), sorted(steps)
        self.records: list[dict] = []
        self.t0 = self.paused = 0.0
        self.last_report = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0, self.paused = time.perf_counter(), 0.0

    def train_seconds(self) -> float:
        return time.perf_counter() - self.t0 - self.paused

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, elapsed = trainer.global_step, self.train_seconds()
        if step % 50 == 0 and step != self.last_report:
            self.last_report = step
            print(f"  step {step}: {elapsed:.0f}s of training", file=sys.stderr, flush=True)
        due = []
        while self.seconds and self.seconds[0] <= elapsed:
            due.append(("minutes", self.seconds.pop(0) / 60))
        while self.steps and self.steps[0] <= step:
            due.append(("steps", self.steps.pop(0)))
        if due:
            self.record(trainer, pl_module, due, step, elapsed)
        if not self.seconds and not self.steps:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        """The run ended before its last mark (its plan was shorter): evaluate where it ended."""
        if self.seconds or self.steps:
            self.record(trainer, pl_module, [("end", trainer.global_step)], trainer.global_step, self.train_seconds())

    def record(self, trainer, pl_module, due: list[tuple[str, float]], step: int, elapsed: float) -> None:
        start = time.perf_counter()
        metrics = evaluate(trainer, pl_module, self.datamodule.val_dataloader())
        loss = trainer.callback_metrics.get("train/loss")
        for kind, mark in due:
            self.records.append({"mark": kind, "at": mark, "step": step, "train_seconds": round(elapsed, 1),
                                 "train_loss": None if loss is None else round(float(loss), 4), **metrics})
            print(f"  {kind}={mark:g}: step {step}, {elapsed:.0f}s, {metrics}", file=sys.stderr, flush=True)
        self.paused += time.perf_counter() - start


@torch.no_grad()
def evaluate(trainer, task, loader) -> dict[str, float]:
    """COCO mAP of the whole validation split, under the run's precision (as Lightning validates)."""
    was_training = task.training
    task.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    with trainer.precision_plugin.forward_context():
        for batch in loader:
            batch = trainer.strategy.batch_to_device(batch)
            task.update_map(metric, task(batch["images"], batch["pixel_mask"]), batch["targets"])
    result = metric.compute()
    task.train(was_training)
    return {name: round(max(float(result[key]), 0.0), 4) for key, name in
            (("map", "mAP"), ("map_50", "mAP_50"), ("map_75", "mAP_75"))}


def run_recipe(name: str, overrides: list[str], seconds: list[float], steps: list[int],
               save_checkpoint: str | None = None, fit_schedule: bool = False, plan: bool = False) -> dict:
    """Train recipe ``name`` to the last mark, evaluating at each; ``save_checkpoint``: also write the
    final model there as a checkpoint that ``eval.py`` / ``predict.py`` read (data settings included).
    ``plan``: the trainer keeps the config's ``max_epochs`` / ``max_steps`` (the LR schedule's planned
    length, as in ``train.py``; without it the run has no planned end and the cosine stays at its peak
    after the warm-up); a plan that ends before the last mark ends the run, evaluated there (mark
    ``end``). ``fit_schedule`` (implies ``plan``): the LR schedule ends at the last minute mark
    (``FitScheduleToTime`` on the training clock), as a ``trainer.max_time`` run's does."""
    register_resolvers()
    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["task=detection", "logger=none", *overrides])
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    task = instantiate(cfg.task, model=to_plain(cfg.model), data_info=datamodule.data_info)
    task.remember_data(to_plain(cfg.data), data_settings(datamodule))
    probe = Probe(datamodule, seconds, steps)
    callbacks = [probe]
    if fit_schedule and seconds:
        callbacks.append(FitScheduleToTime(budget_seconds=max(seconds), clock=probe.train_seconds))
    # Probe stops the run at its last mark; a plan (see the docstring) can end it first
    planned = plan or fit_schedule
    length = {"max_epochs": cfg.trainer.max_epochs if planned else -1, "max_steps": cfg.trainer.max_steps if planned else -1}
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        **length, max_time=None, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(ROOT / "outputs" / "convergence"),
    )
    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    steps_done = trainer.global_step
    train_seconds = probe.train_seconds()
    if save_checkpoint:
        trainer.save_checkpoint(save_checkpoint)
    return {
        "recipe": name,
        "overrides": overrides,
        "precision": str(trainer.precision),
        "steps": steps_done,
        "train_seconds": round(train_seconds, 1),
        "step_ms": round(1000 * train_seconds / max(steps_done, 1), 1),
        "images_per_s": round(steps_done * cfg.data.batch_size / max(train_seconds, 1e-9), 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "records": probe.records,
    }


def table(results: list[dict]) -> str:
    marks = sorted({(r["mark"], r["at"]) for res in results for r in res["records"]})
    head = ["recipe", "step ms"] + [f"{'min' if k == 'minutes' else 'step'} {a:g}" for k, a in marks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        by_mark = {(r["mark"], r["at"]): r for r in res["records"]}
        cells = [res["recipe"], f"{res['step_ms']:.0f}"]
        for m in marks:
            r = by_mark.get(m)
            cells.append("-" if r is None else f"{r['mAP_50']:.3f} / {r['mAP']:.3f} / {r['mAP_75']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(cells: val mAP_50 / mAP / mAP_75)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["original", "original_fair", "default"],
                        help="recipe names (see --list)")
    parser.add_argument("--ablation", action="store_true", help=f"run the ablation recipes: {' '.join(ABLATION)}")
    parser.add_argument("--minutes", nargs="*", type=float, default=[5, 10, 15], help="training-time marks")
    parser.add_argument("--steps", nargs="*", type=int, default=[], help="global-step marks")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every recipe (after --)")
    args = parser.parse_args()
    catalogue = recipes()
    if args.list:
        for name, ov in catalogue.items():
            print(f"{name:22s} {' '.join(ov) or '(the shipped defaults)'}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ABLATION if args.ablation else args.recipes
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {sorted(catalogue)}")
    if not args.minutes and not args.steps:
        parser.error("give at least one --minutes or --steps mark")
    results = []
    for name in names:
        overrides = merged(catalogue[name], args.overrides)
        print(f"recipe {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
        results.append(run_recipe(name, overrides, [m * 60 for m in args.minutes], args.steps))
        print(table(results[-1:]), file=sys.stderr, flush=True)
        if args.out:  # after every recipe, so an interrupted sweep keeps what it measured
            Path(args.out).write_text(json.dumps(document(results), indent=2) + "\n")
    print(table(results), file=sys.stderr)
    emit_json(document(results), args.out)


def document(results: list[dict]) -> dict:
    return {"benchmark": "convergence", "machine": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "command": " ".join(sys.argv), "results": results}


if __name__ == "__main__":
    main()
