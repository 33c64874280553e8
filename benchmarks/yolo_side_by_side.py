"""Our detection recipe against Ultralytics YOLOv8n from its yaml, on real photos, side by side.

Both train from scratch (no weights: YOLOv8n is built from ``yolov8n.yaml``, our trunk from random
initialisation) on the raccoon photos (``../shared/data/raccoon``: 160 train / 40 val photos, one
class), with the same longest image side (``--imgsz``), batch, torch threads and wall-clock budget,
one after the other, each in its own process (peak memory is that process's and its children's):

* **ours**: ``benchmarks/real_photos.py``'s run (``data=coco``; our default recipe plus
  ``data.max_size=IMGSZ``, so the longest side is IMGSZ as YOLO's; extra Hydra overrides after ``--``):
  the whole val split is evaluated with COCOeval every ``--every`` minutes of training (the
  evaluation is not charged to the budget);
* **yolo**: ``ultralytics`` (``pip install -e '.[yolo]'``; never a main dependency) on a YOLO copy of
  the same boxes (``formats_agree.write_yolo_copy``), ``time=`` the budget (Ultralytics fits its
  schedule to it and stops there). After every epoch its EMA model (the weights it saves) is scored
  with the same COCOeval as ours (``tasks.coco_eval``; ``conf=0.001``, at most 100 detections per
  image), not charged to the budget; Ultralytics' own validator is off (``val=False``).

    PYTHONPATH=. .venv/bin/python benchmarks/yolo_side_by_side.py                 # 15 minutes each
    PYTHONPATH=. .venv/bin/python benchmarks/yolo_side_by_side.py --minutes 3 --which yolo
    PYTHONPATH=. .venv/bin/python benchmarks/yolo_side_by_side.py -- model.num_queries=50

Prints a table on stderr and one JSON document on stdout (and ``--out``). Wall-clock numbers depend on
what else runs on the machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")

from benchmarks.common import cpu_model, emit_json, max_rss_mib  # noqa: E402
from benchmarks.real_photos import DEFAULT_ROOT, child_env, run_in_subprocess  # noqa: E402


def ours_overrides(imgsz: int, batch: int, workers: int) -> list[str]:
    """Our recipe at YOLO's image size: the longest side capped at ``imgsz`` (training and val)."""
    return [f"data.max_size={imgsz}", f"data.batch_size={batch}", f"data.num_workers={workers}"]


def yolo_detections(model, data: dict, image_dir: Path, imgsz: int, names: list[str]) -> list[dict]:
    """The model's val detections as COCO results (the JSON's image and category ids)."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    if [c["name"] for c in cats] != names:
        raise ValueError(f"class order differs: {names} vs {[c['name'] for c in cats]}")
    detections = []
    for im in data["images"]:
        result = model.predict(str(image_dir / im["file_name"]), imgsz=imgsz, conf=0.001, max_det=100,
                               device="cpu", verbose=False)[0]
        for (x1, y1, x2, y2), score, cls in zip(result.boxes.xyxy.tolist(), result.boxes.conf.tolist(),
                                                 result.boxes.cls.tolist()):
            detections.append({"image_id": im["id"], "category_id": cats[int(cls)]["id"],
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return detections


def run_yolo(root: Path, minutes: float, imgsz: int, batch: int, workers: int, seed: int, threads: int) -> dict:
    """Train YOLOv8n from its yaml in this process for ``minutes``; its per-epoch record.

    Ultralytics' own per-epoch validation is off (``val=False``); instead, after every epoch, its EMA
    model (the weights it saves) is scored with the same COCOeval as ours, and as for ours the
    evaluation is not charged to the budget (its clock, ``train_time_start``, moves on by the time the
    evaluation took)."""
    import torch
    from ultralytics import YOLO

    from benchmarks.formats_agree import write_yolo_copy
    from tasks.coco_eval import evaluate_detections, ground_truth_coco

    val = json.loads((root / "val.json").read_text())
    gt = ground_truth_coco(val)
    records, clock = [], {"steps": 0, "paused": 0.0}

    def score(model) -> dict:
        names = [model.names[i] for i in sorted(model.names)]
        stats = evaluate_detections(gt, yolo_detections(model, val, root / "images", imgsz, names)).stats
        return {"mAP_50": round(float(stats["AP50"]), 4), "mAP": round(float(stats["AP"]), 4),
                "mAP_75": round(float(stats["AP75"]), 4)}

    def on_train_start(trainer) -> None:
        clock["t0"] = time.perf_counter()

    def on_train_batch_start(trainer) -> None:
        # Ultralytics' select_device (training start, and every predict) sets cores - 1 threads
        torch.set_num_threads(threads)

    def on_train_batch_end(trainer) -> None:
        clock["steps"] += 1

    def on_fit_epoch_end(trainer) -> None:
        if records and records[-1]["step"] == clock["steps"]:
            return  # an epoch that stopped on the budget before its first step
        start = time.perf_counter()
        seconds = start - clock["t0"] - clock["paused"]
        probe = YOLO("yolov8n.yaml", verbose=False)
        probe.model = copy.deepcopy(trainer.ema.ema).float().eval()
        probe.model.names = dict(enumerate(trainer.data["names"].values()))
        records.append({"epoch": trainer.epoch + 1, "step": clock["steps"], "train_seconds": round(seconds, 1),
                        "train_loss": round(float(sum(trainer.tloss.values())), 4) if trainer.tloss else None,
                        **score(probe)})
        took = time.perf_counter() - start
        clock["paused"] += took
        trainer.train_time_start += took  # not charged to Ultralytics' time budget either
        print(f"  yolo epoch {records[-1]['epoch']}: {records[-1]}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="yolo_raccoon_") as tmp:
        data_yaml = write_yolo_copy(root, Path(tmp) / "data") / "data.yaml"
        model = YOLO("yolov8n.yaml")
        for event, fn in (("on_train_start", on_train_start), ("on_train_batch_start", on_train_batch_start),
                          ("on_train_batch_end", on_train_batch_end), ("on_fit_epoch_end", on_fit_epoch_end)):
            model.add_callback(event, fn)
        start = time.perf_counter()
        model.train(data=str(data_yaml), imgsz=imgsz, batch=batch, workers=workers, device="cpu",
                    epochs=1000, time=minutes / 60, pretrained=False, amp=False, plots=False, val=False,
                    seed=seed, project=str(Path(tmp) / "runs"), name="yolov8n", exist_ok=True, verbose=False)
        train_wall = time.perf_counter() - start
        final = score(model)
    steps, seconds = clock["steps"], records[-1]["train_seconds"] if records else float("nan")
    return {"recipe": "yolov8n", "steps": steps, "epochs": len(records), "train_seconds": seconds,
            "train_wall_seconds": round(train_wall, 1), "step_ms": round(1000 * seconds / max(steps, 1), 1),
            "images_per_s": round(steps * batch / seconds, 2) if seconds == seconds else None,
            "records": records, "final": final}


def run_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_yolo(args.root, args.minutes, args.imgsz, args.batch, args.workers, args.seed, args.threads)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result.update(peak_rss_mib=round(max_rss_mib(), 1), peak_worker_rss_mib=round(children, 1), threads=args.threads)
    print(json.dumps(result))


def yolo_in_subprocess(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "yolo", "--root", str(args.root), "--minutes", str(args.minutes),
           "--imgsz", str(args.imgsz), "--batch", str(args.batch), "--threads", str(args.threads),
           "--workers", str(args.workers), "--seed", str(args.seed)]
    print(f"yolov8n: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=child_env())
    if proc.returncode != 0:
        raise SystemExit(f"the YOLOv8n run failed (exit status {proc.returncode}); its log is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(ours: dict | None, yolo: dict | None) -> str:
    lines = ["| run | steps | s per step | peak RSS MiB (main / workers) | val mAP50 by minute | final mAP50 / mAP |",
             "|---|---|---|---|---|---|"]
    if ours:
        by_minute = ", ".join(f"{r['at']:g}: {r['mAP_50']:.3f}" for r in ours["records"])
        last = ours["records"][-1] if ours["records"] else {"mAP_50": float("nan"), "mAP": float("nan")}
        lines.append(f"| ours | {ours['steps']} | {ours['step_ms'] / 1000:.2f} | {ours['peak_rss_mib']:.0f} / "
                     f"{ours['peak_worker_rss_mib']:.0f} | {by_minute} | {last['mAP_50']:.3f} / {last['mAP']:.3f} |")
    if yolo:
        by_epoch = ", ".join(f"{r['train_seconds'] / 60:.1f}: {r['mAP_50']:.3f}" for r in yolo["records"])
        lines.append(f"| YOLOv8n | {yolo['steps']} | {yolo['step_ms'] / 1000:.2f} | {yolo['peak_rss_mib']:.0f} / "
                     f"{yolo['peak_worker_rss_mib']:.0f} | {by_epoch} | {yolo['final']['mAP_50']:.3f} / "
                     f"{yolo['final']['mAP']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the raccoon folder (default: %(default)s)")
    parser.add_argument("--which", nargs="+", default=["ours", "yolo"], choices=["ours", "yolo"])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget of each run")
    parser.add_argument("--every", type=float, default=1.0, help="ours: minutes of training between evaluations")
    parser.add_argument("--imgsz", type=int, default=512, help="longest image side (both)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (Ultralytics uses 0 on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="YOLO's seed (ours: the config's seed)")
    parser.add_argument("--out", type=Path, help="also write the JSON document here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for ours (after --)")
    args = parser.parse_args()
    args.root = args.root.resolve()
    if not (args.root / "train.json").is_file():
        parser.error(f"{args.root} is not the raccoon folder (no train.json); pass --root")
    if args.child:
        run_child(args)
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # both children
    start = time.perf_counter()
    ours = yolo = None
    if "ours" in args.which:
        extra = ours_overrides(args.imgsz, args.batch, args.workers) + args.overrides
        ours = run_in_subprocess("coco", args.root, args.minutes, args.every, extra)
    if "yolo" in args.which:
        yolo = yolo_in_subprocess(args)
    print(table(ours, yolo), file=sys.stderr)
    emit_json({"benchmark": "yolo_side_by_side", "machine": cpu_model(), "cores": os.cpu_count(),
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "imgsz": args.imgsz,
               "batch": args.batch, "threads": args.threads, "minutes": args.minutes,
               "wall_seconds": round(time.perf_counter() - start, 1), "ours": ours, "yolo": yolo}, args.out)


if __name__ == "__main__":
    main()
