"""The default detection recipe on real photos: val mAP50 by minute, step time and peak memory.

Trains ``task=detection`` with the shipped defaults (model, optimiser, precision, and the data
config's CPU default sizes, batch and workers) on the raccoon photos (``../shared/data/raccoon``: 200
ordinary photos of 200-1,900 px, one class; see its README), read as ``data=coco`` (its COCO JSON)
and/or ``data=voc`` (its Pascal VOC XML; the same boxes, see ``benchmarks/formats_agree.py``).
Each format runs in its own process (so peak memory is that run's), for a budget of *training* time:
at every whole minute training pauses, the whole val split (40 photos) is evaluated with COCO mAP
(``benchmarks/convergence.py``'s evaluation, not charged to the budget), and training goes on. The
LR schedule is fitted to the budget (``tasks.callbacks.FitScheduleToTime``, as a ``train.py`` run's
is to ``trainer.max_time``).

    PYTHONPATH=. .venv/bin/python benchmarks/real_photos.py                      # coco, 15 minutes
    PYTHONPATH=. .venv/bin/python benchmarks/real_photos.py --formats coco voc --minutes 3
    PYTHONPATH=. .venv/bin/python benchmarks/real_photos.py --minutes 5 -- model.num_queries=50

Prints a per-minute table and a summary on stderr and one JSON document on stdout (and ``--out``).
Peak memory is ``ru_maxrss`` of the training process and, separately, of its largest finished
child (the data-loader workers). Wall-clock numbers depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")

from benchmarks.common import cpu_model, emit_json, max_rss_mib  # noqa: E402

DEFAULT_ROOT = ROOT.parent / "shared" / "data" / "raccoon"


def format_overrides(fmt: str, root: Path) -> list[str]:
    """The Hydra overrides that read the raccoon folder in format ``fmt``."""
    if fmt == "coco":
        return ["data=coco", f"data.root={root}"]
    if fmt == "voc":
        return ["data=voc", f"data.root={root / 'voc'}", "data.images_dir=../images"]
    raise ValueError(f"unknown format {fmt!r}; use coco or voc")


def run_one(fmt: str, root: Path, minutes: float, every: float, extra: list[str], ckpt: str | None = None) -> dict:
    """Train in this process; return the run's record (see ``convergence.run_recipe``) plus memory."""
    from benchmarks.convergence import run_recipe  # imported here: the parent process stays light

    marks = [60.0 * every * k for k in range(1, int(minutes / every + 1e-9) + 1)]
    if not marks or marks[-1] < 60.0 * minutes - 1e-6:
        marks.append(60.0 * minutes)
    overrides = format_overrides(fmt, root) + extra
    result = run_recipe(fmt, overrides, marks, [], save_checkpoint=ckpt, fit_schedule=True)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {**result, "peak_rss_mib": round(max_rss_mib(), 1), "peak_worker_rss_mib": round(children, 1)}


def child_env() -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH`` (what was there stays after it)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_in_subprocess(fmt: str, root: Path, minutes: float, every: float, extra: list[str],
                      ckpt_dir: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", fmt, "--root", str(root), "--minutes", str(minutes),
           "--every", str(every)]
    if ckpt_dir is not None:
        cmd += ["--save-checkpoints", str(ckpt_dir)]
    cmd += ["--", *extra]
    print(f"format {fmt}: {' '.join(format_overrides(fmt, root) + extra)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=child_env())
    if proc.returncode != 0:
        raise SystemExit(f"the {fmt} run failed (exit status {proc.returncode}); its log is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the child prints its JSON last


def step_seconds(records: list[dict], i: int) -> float | None:
    """Mean training seconds per step between mark i-1 (or the start) and mark i."""
    prev = records[i - 1] if i else {"step": 0, "train_seconds": 0.0}
    steps = records[i]["step"] - prev["step"]
    return (records[i]["train_seconds"] - prev["train_seconds"]) / steps if steps else None


def minute_table(results: list[dict]) -> str:
    """One row per mark: steps reached, seconds per step since the last mark, train loss, val mAP50 / mAP."""
    head = ["minute"] + [f"{r['recipe']}: step / s per step / loss / mAP50 / mAP" for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = max(len(r["records"]) for r in results)
    for i in range(rows):
        cells = [f"{results[0]['records'][i]['at']:g}" if i < len(results[0]["records"]) else "-"]
        for r in results:
            rec = r["records"][i] if i < len(r["records"]) else None
            sec = step_seconds(r["records"], i) if rec is not None else None
            cells.append("-" if rec is None else f"{rec['step']} / {'-' if sec is None else f'{sec:.1f}'} / "
                         f"{rec['train_loss']} / {rec['mAP_50']:.3f} / {rec['mAP']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steady_step_seconds(records: list[dict]) -> float | None:
    """Seconds per step from the first mark to the last (leaves out the first steps' warm-up)."""
    if len(records) < 2 or records[-1]["step"] == records[0]["step"]:
        return None
    return (records[-1]["train_seconds"] - records[0]["train_seconds"]) / (records[-1]["step"] - records[0]["step"])


def summary_table(results: list[dict]) -> str:
    head = ["format", "precision", "steps", "s per step (all / after the first mark)", "images/s",
            "peak RSS MiB (main / worker)", "final val mAP50", "best val mAP50"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        final = r["records"][-1]["mAP_50"] if r["records"] else float("nan")
        best = max((rec["mAP_50"] for rec in r["records"]), default=float("nan"))
        steady = steady_step_seconds(r["records"])
        lines.append(f"| {r['recipe']} | {r['precision']} | {r['steps']} | {r['step_ms'] / 1000:.1f} / "
                     f"{'-' if steady is None else f'{steady:.1f}'} | {r['images_per_s']} | "
                     f"{r['peak_rss_mib']:.0f} / {r['peak_worker_rss_mib']:.0f} | {final:.3f} | {best:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the raccoon folder (default: %(default)s)")
    parser.add_argument("--formats", nargs="+", default=["coco"], choices=["coco", "voc"])
    parser.add_argument("--minutes", type=float, default=15.0, help="training-time budget per format")
    parser.add_argument("--every", type=float, default=1.0, help="minutes of training between evaluations")
    parser.add_argument("--out", type=Path, help="also write the JSON document here")
    parser.add_argument("--save-checkpoints", type=Path,
                        help="write each format's final model to DIR/<format>.ckpt (for eval.py / predict.py)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args()
    root = args.root.resolve()
    if not (root / "train.json").is_file():
        parser.error(f"{root} is not the raccoon folder (no train.json); pass --root")
    if args.child:
        ckpt = None if args.save_checkpoints is None else str(args.save_checkpoints / f"{args.child}.ckpt")
        print(json.dumps(run_one(args.child, root, args.minutes, args.every, args.overrides, ckpt)))
        return
    start = time.perf_counter()
    results = []
    for fmt in args.formats:
        results.append(run_in_subprocess(fmt, root, args.minutes, args.every, args.overrides, args.save_checkpoints))
        print(minute_table(results[-1:]) + "\n", file=sys.stderr, flush=True)
    print(minute_table(results) + "\n\n" + summary_table(results), file=sys.stderr)
    emit_json({"benchmark": "real_photos", "machine": cpu_model(), "cores": os.cpu_count(),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "root": str(root),
               "minutes": args.minutes, "every": args.every, "wall_seconds": round(time.perf_counter() - start, 1),
               "results": results}, args.out)


if __name__ == "__main__":
    main()
