"""Kill a small training run at random moments, resume it each time, compare with an uninterrupted run.

    PYTHONPATH=. .venv/bin/python benchmarks/kill_resume.py --kills 3            # tiny DETR on shapes, CPU
    PYTHONPATH=. .venv/bin/python benchmarks/kill_resume.py --kills 5 --num-workers 2 --signals KILL

1. One uninterrupted ``python train.py`` run (its own log folder) gives the reference weights and the
   wall time T.
2. The same command is started in a second log folder and sent a signal (SIGKILL and SIGTERM alternate
   by default) after a random delay: ``--startup`` seconds plus a uniform fraction in [0.05, 0.45] of the
   time the remaining steps took in the reference run; it is then resumed with ``ckpt_path=last``
   (the newest ``last.ckpt`` there: the one a SIGTERM wrote after its current step, or the last
   end-of-epoch one after a SIGKILL). A run killed before it wrote any checkpoint starts over.
   This repeats until ``--kills`` signals have landed; the last resume runs to the end.
3. Prints each kill (signal, delay, the global step the next resume started from), K and the largest
   absolute difference between the two final ``state_dict``s (parameters and buffers). Exit status 1
   when it exceeds ``--tolerance`` (1e-6).

Not a test (it takes minutes); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "task=detection", "model.backbone=resnet18", "model.d_model=32", "model.nhead=4", "model.num_encoder_layers=1",
    "model.num_decoder_layers=2", "model.dim_feedforward=64", "model.num_queries=8", "model.dropout=0.1",
    "data.image_size=64", "data.batch_size=4", "data.num_val=8", "logger=none", "test=false",
    "trainer.limit_val_batches=1", "trainer.precision=32-true", "callbacks.visualizer=null",
    "callbacks.progress_bar.refresh_rate=0",
]


def command(args: argparse.Namespace, log_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", *TINY, f"data.num_train={args.num_train}", f"data.num_workers={args.num_workers}",
            f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", f"paths.log_dir={log_dir}",
            f"paths.cache_dir={args.workdir / 'cache'}", *extra]


def newest_last(log_dir: Path) -> str | None:
    found = sorted(glob.glob(str(log_dir / "detection" / "*" / "checkpoints" / "last.ckpt")), key=os.path.getmtime)
    return found[-1] if found else None


def run(cmd: list[str], env: dict, log: Path, kill_after: float | None = None, sig: int = signal.SIGKILL):
    """Run ``cmd``; with ``kill_after``, send ``sig`` then. Returns (return code, killed?, seconds)."""
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=kill_after)
            return proc.returncode, False, time.time() - start
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            proc.wait()
            return proc.returncode, True, time.time() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--signals", default="KILL,TERM", help="comma list cycled through: KILL, TERM, INT")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-train", type=int, default=32, help="training images (batch 4)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=42, help="training seed; the kill delays use --rng-seed")
    p.add_argument("--rng-seed", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=1e-6)
    p.add_argument("--startup", type=float, default=12.0, help="seconds before a run trains (imports, data)")
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "kill_resume")
    args = p.parse_args()
    args.workdir = args.workdir.resolve()
    rng = random.Random(args.rng_seed)
    signals = [getattr(signal, f"SIG{s.strip().upper()}") for s in args.signals.split(",")]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ref_dir, kill_dir = args.workdir / stamp / "reference", args.workdir / stamp / "interrupted"
    (args.workdir / stamp).mkdir(parents=True)

    rc, _, total = run(command(args, ref_dir, []), env, args.workdir / stamp / "reference.log")
    if rc != 0:
        print(f"reference run failed (exit {rc}); see {args.workdir / stamp / 'reference.log'}")
        return 2
    reference = newest_last(ref_dir)
    steps = int(torch.load(reference, weights_only=True)["global_step"])
    startup = min(args.startup, 0.5 * total)
    print(f"reference run: {total:.1f}s, {steps} steps -> {reference}")

    kills, attempt = [], 0
    while True:
        ckpt = newest_last(kill_dir)
        extra = [f"ckpt_path={ckpt}"] if ckpt else []
        start_step = torch.load(ckpt, weights_only=True)["global_step"] if ckpt else 0
        log = args.workdir / stamp / f"attempt{attempt}.log"
        if len(kills) < args.kills:
            sig = signals[len(kills) % len(signals)]
            # a random moment within the work still to do (the reference run's time per step, scaled)
            delay = startup + rng.uniform(0.05, 0.45) * (total - startup) * (steps - start_step) / steps
            rc, killed, secs = run(command(args, kill_dir, extra), env, log, delay, sig)
        else:
            sig, (rc, killed, secs) = None, run(command(args, kill_dir, extra), env, log)
        attempt += 1
        if killed:
            kills.append((signal.Signals(sig).name, round(secs, 1), start_step, rc))
            print(f"attempt {attempt}: started at step {start_step}, {signal.Signals(sig).name} after {secs:.1f}s "
                  f"(exit {rc})")
            continue
        if rc != 0:
            print(f"attempt {attempt} failed with exit {rc}; see {log}")
            return 2
        print(f"attempt {attempt}: started at step {start_step}, ran to the end in {secs:.1f}s")
        break

    final = newest_last(kill_dir)
    a = torch.load(reference, weights_only=True)
    b = torch.load(final, weights_only=True)
    diff = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item()
               for k in a["state_dict"] if a["state_dict"][k].numel())
    if len(kills) < args.kills:
        print(f"note: only {len(kills)} of {args.kills} signals landed before the run finished")
    print(f"K={len(kills)} kills {[k[0] for k in kills]}; final global_step {b['global_step']} "
          f"(reference {a['global_step']}); max |weight difference| = {diff:.3g}")
    return 0 if diff <= args.tolerance and a["global_step"] == b["global_step"] else 1


if __name__ == "__main__":
    sys.exit(main())
