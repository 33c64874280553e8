"""Does sharing one Transformer between detection, multi-label and translation help or hurt?

Trains, through ``train.py``'s own ``train()`` and ``task=multitask``:

- three single-task runs: ``MultiTask`` with one task (the same code, the same shared-Transformer
  sizes and task embedding; only the other tasks are dropped), ``--steps`` training steps each;
- one multitask run: all three tasks round-robin on ONE Transformer, ``3 x --steps`` steps, i.e. the
  same ``--steps`` per task (each task's data, batch size and LR schedule length are the same as in
  its single run);

then reads each task's validation metrics after that same number of steps per task (validation runs
once, at the end): detection mAP / mAP_50, multi-label mAP / CF1, translation BLEU / perplexity, and
prints a markdown table with single, multitask and the difference.

Sizes are small CPU ones (below) so that the whole benchmark takes ~10-15 minutes on 2 CPU cores::

    OMP_NUM_THREADS=2 python -m benchmarks.multitask --steps 200 --json benchmark-multitask.json

Everything is seeded (``seed``); numbers move with the thread count and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")

TASKS = ("detection", "multilabel", "translation")
# small CPU sizes: d=64 shared Transformer (2+2 layers), 96 px shapes (6x6 image tokens), Multi30k
# with 1024-token batches and the first 200 validation sentences
SMALL = [
    "model.shared.d_model=64",
    "model.shared.nhead=4",
    "model.shared.num_encoder_layers=2",
    "model.shared.num_decoder_layers=2",
    "model.shared.dim_feedforward=256",
    "model.shared.dropout=0.1",
    "model.detection.num_queries=10",
    "data.detection.image_size=96",
    "data.detection.train_scales=[96]",
    "data.detection.val_scale=96",
    "data.detection.max_size=96",
    "data.detection.num_val=200",
    "data.multilabel.image_size=96",
    "data.multilabel.train_scales=[96]",
    "data.multilabel.val_scale=96",
    "data.multilabel.max_size=96",
    "data.multilabel.num_val=200",
    "data.translation.max_tokens=1024",
    "data.translation.max_eval_examples=200",
    "task.warmup_steps=50",
    "trainer.max_epochs=1",
    "trainer.max_time=null",
    "trainer.num_sanity_val_steps=0",
    "logger=none",
    "test=false",
    "callbacks.progress_bar.refresh_rate=0",
]
METRICS = {
    "detection": ("mAP", "mAP_50", "loss"),
    "multilabel": ("mAP", "CF1", "loss"),
    "translation": ("BLEU", "ppl", "loss"),
}
LOWER_IS_BETTER = {"loss", "ppl"}


def run(tasks: list[str], steps: int, out: Path, extra: list[str]) -> tuple[dict[str, float], float]:
    from hydra import compose, initialize_config_dir

    import train as train_module

    drop = [o for t in TASKS if t not in tasks for o in (f"data.{t}=null", f"task.tasks.{t}=null")]
    name = "+".join(tasks)
    overrides = [
        "task=multitask", *SMALL, *drop, f"data.steps_per_epoch={steps * len(tasks)}",
        f"paths.log_dir={out}", f"paths.output_dir={out / name}", *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    start = time.perf_counter()
    metrics = train_module.train(cfg)
    return metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per task")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    import torch

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mtdetr-bench-") as tmp:
        out = Path(tmp)
        for tasks in [[t] for t in TASKS] + [list(TASKS)]:
            key = "+".join(tasks)
            metrics, seconds = run(tasks, args.steps, out, args.overrides)
            results[key] = {"seconds": seconds, "metrics": {k: v for k, v in metrics.items() if "/val/" in k}}
            print(f"{key}: {seconds:.0f} s", flush=True)
    multi = results["+".join(TASKS)]
    rows = ["| task | metric | single-task | multitask | multitask - single |", "|---|---|---|---|---|"]
    for task in TASKS:
        single = results[task]
        for m in METRICS[task]:
            a, b = single["metrics"].get(f"{task}/val/{m}"), multi["metrics"].get(f"{task}/val/{m}")
            if a is None or b is None:
                continue
            better = (b < a) if m in LOWER_IS_BETTER else (b > a)
            rel = f" ({(b - a) / abs(a) * 100:+.0f}%)" if abs(a) > 1e-9 else ""
            rows.append(f"| {task} | {m} | {a:.4f} | {b:.4f} | {b - a:+.4f}{rel}{' better' if better else ''} |")
    total = sum(r["seconds"] for r in results.values())
    rows.append("")
    rows.append("training + validation wall time: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in results.items())
                + f"; total {total / 60:.1f} min")
    table = "\n".join(rows)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    print(f"\n{args.steps} steps per task; {machine}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"steps_per_task": args.steps, "machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
