"""Recipe switches on real photos at equal step budgets, several seeds each, many runs at once.

A CPU budget gives each recipe a number of steps (15 CPU-minutes on raccoon: 136 at full trunk
width, 280 at half width; ``benchmarks/yolo_side_by_side.py`` measures them). One seed of a 15-minute
CPU run is noisy (val mAP50 moves by +-0.1 from one minute to the next), so this script decides
between switches by running each recipe for exactly its steps, with the LR schedule a
``trainer.max_time`` run would fit to them (the cosine over those steps; the warm-up's share of the
600-step plan, 100 x steps / 600, as ``task.fit_warmup`` keeps it), for several seeds, several runs
at a time (on one GPU, or on a CPU with cores to spare). The whole raccoon val split is scored with
COCO mAP at each step mark. Not a time benchmark: the step counts are the inputs.

    PYTHONPATH=. python benchmarks/photo_sweep.py --root ../shared/data/raccoon --device gpu --parallel 5
    PYTHONPATH=. python benchmarks/photo_sweep.py --recipes full_k4 half_k1 --seeds 0 --scale 0.1   # a quick try

Prints a table (mean and each seed's final val mAP50 / mAP) on stderr and one JSON document on stdout
(and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")

from benchmarks.common import cpu_model, emit_json  # noqa: E402
from benchmarks.real_photos import DEFAULT_ROOT, child_env, format_overrides  # noqa: E402

PLAN_STEPS, PLAN_WARMUP = 600, 100  # raccoon's plan: 30 epochs of 20 steps, 100 warm-up steps
FULL, THREE_Q, HALF = "model.trunk_width=1.0", "model.trunk_width=0.75", "model.trunk_width=0.5"
LR1E3 = ["task.lr=1e-3", "task.lr_backbone=1e-3"]


def matches(n: int) -> str:
    return f"task.enc_matches={n}"


# name: (steps in 15 CPU-minutes on EPYC-AVX2 at that trunk width, overrides over data=coco's recipe);
# each states its trunk width and proposal matching, so a change of the shipped recipe changes none
RECIPES: dict[str, tuple[int, list[str]]] = {
    "full_k4": (136, [FULL, matches(4)]),                 # the photo recipe of stop 23
    "full_k1": (136, [FULL, matches(1)]),
    "full_k8": (136, [FULL, matches(8)]),
    "full_k4_lr1e-3": (136, [FULL, matches(4), *LR1E3]),
    "three_quarter_k4": (195, [THREE_Q, matches(4)]),
    "half_k4": (280, [HALF, matches(4)]),
    "half_k1": (280, [HALF, matches(1)]),                 # the photo recipe now
    "half_k2": (280, [HALF, matches(2)]),
    "half_k8": (280, [HALF, matches(8)]),
    "half_k4_lr1e-3": (280, [HALF, matches(4), *LR1E3]),
}


def run_overrides(root: Path, steps: int, extra: list[str], seed: int, device: str, workers: int) -> list[str]:
    warmup = math.ceil(PLAN_WARMUP * steps / PLAN_STEPS)
    return [*format_overrides("coco", root), "data.max_size=512", "data.batch_size=8", f"data.num_workers={workers}",
            f"trainer.max_steps={steps}", f"task.warmup_steps={warmup}", f"seed={seed}",
            f"trainer.accelerator={device}", "trainer.precision=32-true", *extra]


def run_child(name: str, overrides: list[str], marks: list[int], threads: int) -> dict:
    import torch

    from benchmarks.convergence import run_recipe

    torch.set_num_threads(threads)
    return run_recipe(name, overrides, [], marks, plan=True)


def launch(name: str, seed: int, args: argparse.Namespace) -> dict:
    steps, extra = RECIPES[name]
    steps = max(2, round(steps * args.scale))
    overrides = run_overrides(args.root, steps, extra, seed, args.device, args.workers)
    marks = sorted({max(1, steps // 3), max(1, 2 * steps // 3), steps})
    cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads),
           "--marks", *map(str, marks), "--", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        print(f"FAIL {name} seed {seed}: {' | '.join(tail)}", file=sys.stderr, flush=True)
        return {"recipe": name, "seed": seed, "failed": tail}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    final = result["records"][-1]
    print(f"{name} seed {seed}: {steps} steps, val mAP50 {final['mAP_50']:.3f} mAP {final['mAP']:.3f} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return {**result, "seed": seed, "steps_asked": steps}


def summary(results: list[dict]) -> str:
    lines = ["| recipe | steps | val mAP50 mean (seeds) | val mAP mean (seeds) | mAP50 at 1/3, 2/3 of the steps |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["recipe"] for r in results):
        done = [r for r in results if r["recipe"] == name and "records" in r]
        if not done:
            lines.append(f"| {name} | - | failed | | |")
            continue
        m50 = [r["records"][-1]["mAP_50"] for r in done]
        m = [r["records"][-1]["mAP"] for r in done]
        early = [statistics.mean(r["records"][i]["mAP_50"] for r in done) for i in range(len(done[0]["records"]) - 1)]
        lines.append(f"| {name} | {done[0]['steps']} | {statistics.mean(m50):.3f} ({', '.join(f'{v:.3f}' for v in m50)}) "
                     f"| {statistics.mean(m):.3f} ({', '.join(f'{v:.3f}' for v in m)}) | "
                     f"{', '.join(f'{v:.3f}' for v in early)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the raccoon folder (default: %(default)s)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", nargs="+", metavar="RECIPE:SEED", help="these runs instead of recipes x seeds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers per run")
    parser.add_argument("--scale", type=float, default=1.0, help="x every recipe's steps (a quick try: 0.1)")
    parser.add_argument("--out", type=Path, help="also write the JSON document here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--marks", nargs="*", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.overrides, args.marks, args.threads)))
        return
    args.root = args.root.resolve()
    if not (args.root / "train.json").is_file():
        parser.error(f"{args.root} is not the raccoon folder (no train.json); pass --root")
    start = time.perf_counter()
    jobs = [(name, seed) for seed in args.seeds for name in args.recipes]  # seed-major: a cut run has every recipe
    if args.jobs:
        jobs = [(job.rsplit(":", 1)[0], int(job.rsplit(":", 1)[1])) for job in args.jobs]
        unknown = sorted({name for name, _ in jobs} - set(RECIPES))
        if unknown:
            parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
        args.recipes = list(dict.fromkeys(name for name, _ in jobs))
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results = list(pool.map(lambda job: launch(*job, args), jobs))
    results.sort(key=lambda r: (args.recipes.index(r["recipe"]), r["seed"]))
    print(summary(results), file=sys.stderr)
    emit_json({"benchmark": "photo_sweep", "machine": cpu_model(), "cores": os.cpu_count(), "device": args.device,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "root": str(args.root),
               "wall_seconds": round(time.perf_counter() - start, 1), "results": results}, args.out)


if __name__ == "__main__":
    main()
