"""Detection speed: our DETR (``modules/``) against a re-implementation of the original DETR, side by side.

For each setting and implementation, in its own subprocess (so peak memory is that run's alone):
training images/s (forward, matching + loss with auxiliary layers, backward, gradient clipping,
AdamW step), evaluation images/s (forward + post-processing), the matcher alone, peak memory, and
the FLOPs of one training step as achieved GFLOP/s and as a fraction of this machine's matmul peak.

    PYTHONPATH=. .venv/bin/python benchmarks/detection_speed.py --settings detr-r18-small --steps 10
    PYTHONPATH=. .venv/bin/python benchmarks/detection_speed.py --quick      # smoke test

One JSON document goes to stdout (and ``--out``), a short table to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `make bench` runs this file without PYTHONPATH
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.utils.flop_counter as flop_counter  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.common import cpu_model, emit_json, max_rss_mib  # noqa: E402
from benchmarks.reference_detr import (  # noqa: E402
    ReferenceCriterion,
    build_reference_detr,
    reference_loss_weights,
    reference_matcher,
    reference_param_groups,
    reference_postprocess,
    reference_total_loss,
)
from modules import private_api  # noqa: E402
from modules.criterion import SetCriterion, weighted_loss  # noqa: E402
from modules.detr import build_detr, postprocess  # noqa: E402
from modules.matcher import HungarianMatcher  # noqa: E402

IMPLS = ("ours", "reference")
LOSS_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
MATCH_COSTS = {"cost_class": 1.0, "cost_bbox": 5.0, "cost_giou": 2.0}
LR, LR_BACKBONE, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 1e-5, 1e-4, 0.1
QUICK_IMAGE_SIZE = 128
NUM_BATCHES = 4  # distinct synthetic batches, cycled


@dataclass(frozen=True)
class Setting:
    backbone: str
    image_size: int
    batch_size: int
    d_model: int
    num_encoder_layers: int
    num_decoder_layers: int
    nhead: int
    dim_feedforward: int
    num_queries: int
    num_classes: int
    image_width: int | None = None  # None: square images of image_size
    stride: int = 32
    dropout: float = 0.1


SETTINGS = {
    "detr-r50": Setting("resnet50", 512, 2, 256, 6, 6, 8, 2048, 100, 91),
    "detr-r18-small": Setting("resnet18", 256, 8, 128, 3, 3, 8, 512, 20, 4),
    # real sizes (docs/real-sizes.md): DETR-R50 at a COCO-sized image, and the shipped stride-16
    # configs/model/detr_small.yaml architecture (dropout 0) at DETR's 800 px scale of a 4:3 photo
    "detr-r50-800x1200": Setting("resnet50", 800, 2, 256, 6, 6, 8, 2048, 100, 91, image_width=1200),
    "detr-small-800x1067": Setting("resnet18", 800, 8, 128, 3, 3, 8, 512, 20, 91, image_width=1067,
                                   stride=16, dropout=0.0),
}


# ------------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    import torchvision

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], reps: int) -> dict:
    """Best achieved GFLOP/s of square ``torch.matmul`` over ``sizes`` (best of ``reps`` each)."""
    best, best_n = 0.0, None
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up (allocator, kernel selection)
        sync(device)
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
            gflops = 2 * n**3 / (time.perf_counter() - t0) / 1e9
            if gflops > best:
                best, best_n = gflops, n
        del a, b
    return {"gflop_per_s": round(best, 2), "size": best_n, "dtype": str(dtype).replace("torch.", "")}


def _sdpa_cpu_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_mapping() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention kernels: count them like SDPA."""
    formulas = {"forward": _sdpa_cpu_forward_flops, "backward": _sdpa_cpu_backward_flops}
    return {op: formulas[kind] for kind, op in private_api.cpu_flash_attention_ops().items()}


# ---------------------------------------------------------------------------------------- synthetic data
def random_targets(batch_size: int, num_classes: int, g: torch.Generator) -> list[dict[str, Tensor]]:
    """1-10 valid boxes per image, normalised cxcywh inside the image."""
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(1, 11, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * 0.45 + 0.05  # [0.05, 0.5)
        cxcy = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)  # box stays inside [0, 1]
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([cxcy, wh], 1)})
    return targets


def make_batches(setting: Setting, image_hw: tuple[int, int], seed: int, device: torch.device) -> list[dict]:
    """``NUM_BATCHES`` fixed batches: normalised random ``[B, 3, H, W]`` images, no padding, random targets."""
    g = torch.Generator().manual_seed(seed)
    batches, (h, w) = [], image_hw
    for _ in range(NUM_BATCHES):
        images = torch.randn(setting.batch_size, 3, h, w, generator=g)
        targets = random_targets(setting.batch_size, setting.num_classes, g)
        batches.append({
            "images": images.to(device),
            "pixel_mask": torch.zeros(setting.batch_size, h, w, dtype=torch.bool, device=device),
            "targets": [{k: v.to(device) for k, v in t.items()} for t in targets],
            "sizes": torch.tensor([[h, w]] * setting.batch_size, device=device),
        })
    return batches


# ---------------------------------------------------------------------------------------- implementations
@dataclass
class Impl:
    model: torch.nn.Module
    loss_fn: object  # (outputs, targets) -> (total loss, dict of terms)
    matcher: torch.nn.Module
    postprocess_fn: object  # (outputs, sizes) -> detections
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None


def build_impl(name: str, s: Setting, args: argparse.Namespace, device: torch.device) -> Impl:
    if name == "ours":
        model = build_detr(
            num_classes=s.num_classes, backbone=s.backbone, d_model=s.d_model, nhead=s.nhead,
            num_encoder_layers=s.num_encoder_layers, num_decoder_layers=s.num_decoder_layers,
            dim_feedforward=s.dim_feedforward, num_queries=s.num_queries, dropout=s.dropout,
            fuse_frozen_bn=args.fuse_bn, channels_last=args.channels_last, stride=s.stride,
        ).to(device)
        matcher = HungarianMatcher(**MATCH_COSTS)
        criterion = SetCriterion(num_classes=s.num_classes, matcher=matcher, eos_coef=0.1).to(device)
        # parameter groups as tasks/base.py: the CNN trunk at lr_backbone, the rest at lr
        trunk = {id(p) for p in model.adapter.body.parameters() if p.requires_grad}
        groups = [
            {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in trunk], "lr": LR},
            {"params": [p for p in model.parameters() if id(p) in trunk], "lr": LR_BACKBONE},
        ]

        def loss_fn(outputs, targets):
            losses = criterion(outputs, targets)
            return weighted_loss(losses, LOSS_WEIGHTS), losses

        post = postprocess
        dtype = torch.bfloat16 if args.precision == "bf16" else None
    elif name == "reference":
        model = build_reference_detr(
            s.num_classes, s.backbone, s.d_model, s.nhead, s.num_encoder_layers, s.num_decoder_layers,
            s.dim_feedforward, s.num_queries, dropout=s.dropout, stride=s.stride,
        ).to(device)
        matcher = reference_matcher(*MATCH_COSTS.values())
        criterion = ReferenceCriterion(s.num_classes, matcher, eos_coef=0.1).to(device)
        weights = reference_loss_weights(s.num_decoder_layers, **LOSS_WEIGHTS)
        groups = reference_param_groups(model, LR, LR_BACKBONE)

        def loss_fn(outputs, targets):
            losses = criterion(outputs, targets)
            return reference_total_loss(losses, weights), losses

        post = reference_postprocess
        dtype = None  # the original trains in fp32
    else:
        raise ValueError(f"unknown implementation {name!r}; choose among {IMPLS}")
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)
    return Impl(model, loss_fn, matcher, post, optimizer, dtype)


def _autocast(impl: Impl, device: torch.device):
    return torch.autocast(device.type, dtype=impl.autocast_dtype, enabled=impl.autocast_dtype is not None)


def train_step(impl: Impl, batch: dict, device: torch.device) -> float:
    with _autocast(impl, device):
        outputs = impl.model(batch["images"], batch["pixel_mask"])
        loss, _ = impl.loss_fn(outputs, batch["targets"])
    loss_value = loss.item()  # both training loops read the loss every step (finite check / logging)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(impl.model.parameters(), GRAD_CLIP)
    impl.optimizer.step()
    impl.optimizer.zero_grad()
    return loss_value


@torch.inference_mode()
def eval_step(impl: Impl, batch: dict, device: torch.device) -> list:
    with _autocast(impl, device):
        outputs = impl.model(batch["images"], batch["pixel_mask"])
    return impl.postprocess_fn(outputs, batch["sizes"])


def time_calls(fn, n: int, device: torch.device) -> list[float]:
    times = []
    for i in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_one(setting_name: str, impl_name: str, args: argparse.Namespace) -> dict:
    """Every measurement of one (setting, implementation); meant to run in a fresh process."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_start = max_rss_mib()
    s = SETTINGS[setting_name]
    image_hw = (QUICK_IMAGE_SIZE,) * 2 if args.quick else (s.image_size, s.image_width or s.image_size)
    torch.manual_seed(args.seed)
    impl = build_impl(impl_name, s, args, device)
    batches = make_batches(s, image_hw, args.seed, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # training
    impl.model.train()
    losses = [train_step(impl, batches[i % NUM_BATCHES], device) for i in range(args.warmup)]
    step_losses: list[float] = []
    train_times = time_calls(
        lambda i: step_losses.append(train_step(impl, batches[i % NUM_BATCHES], device)), args.steps, device
    )
    losses += step_losses
    train_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    # FLOPs of one more training step (counted, not timed)
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        train_step(impl, batches[0], device)
    step_flops = counter.get_total_flops()

    # evaluation
    impl.model.eval()
    for i in range(args.warmup):
        eval_step(impl, batches[i % NUM_BATCHES], device)
    eval_times = time_calls(lambda i: eval_step(impl, batches[i % NUM_BATCHES], device), args.steps, device)

    # the matcher alone, on this setting's output shapes
    g = torch.Generator().manual_seed(args.seed + 1)
    fake = {
        "pred_logits": torch.randn(s.batch_size, s.num_queries, s.num_classes + 1, generator=g).to(device),
        "pred_boxes": torch.randn(s.batch_size, s.num_queries, 4, generator=g).sigmoid().to(device),
    }
    targets = batches[0]["targets"]
    match_reps = 3 if args.quick else 50
    for _ in range(2):
        impl.matcher(fake, targets)
    match_times = time_calls(lambda i: impl.matcher(fake, targets), match_reps, device)

    step_s = statistics.fmean(train_times)
    return {
        "setting": setting_name,
        "impl": impl_name,
        "device": str(device),
        "precision": "bf16" if impl.autocast_dtype is torch.bfloat16 else "fp32",
        "channels_last": args.channels_last if impl_name == "ours" else False,
        "fuse_bn": args.fuse_bn if impl_name == "ours" else False,
        "image_size": list(image_hw),
        "batch_size": s.batch_size,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "steps": args.steps,
        "params_m": round(sum(p.numel() for p in impl.model.parameters()) / 1e6, 3),
        "trainable_params_m": round(sum(p.numel() for p in impl.model.parameters() if p.requires_grad) / 1e6, 3),
        "train_step_ms": round(step_s * 1e3, 2),
        "train_step_ms_median": round(statistics.median(train_times) * 1e3, 2),
        "train_images_per_s": round(s.batch_size / step_s, 3),
        "eval_batch_ms": round(statistics.fmean(eval_times) * 1e3, 2),
        "eval_images_per_s": round(s.batch_size / statistics.fmean(eval_times), 3),
        "matcher_ms_per_batch": round(statistics.median(match_times) * 1e3, 3),
        "peak_mem_mib": round(train_peak if train_peak is not None else max_rss_mib(), 1),
        "peak_mem_kind": "cuda_max_memory_allocated(train)" if train_peak is not None else "process_max_rss",
        "rss_at_start_mib": round(rss_start, 1),  # after imports: subtract it to compare CPU runs
        "peak_mem_above_start_mib": round(max_rss_mib() - rss_start, 1) if train_peak is None else None,
        "train_gflop_per_step": round(step_flops / 1e9, 3),
        "achieved_gflop_per_s": round(step_flops / step_s / 1e9, 2),
        "first_loss": round(losses[0], 5) if losses else None,
        "last_loss": round(losses[-1], 5) if losses else None,
        "losses_finite": all(math.isfinite(v) for v in losses),
    }


# ---------------------------------------------------------------------------------------- orchestration
def loss_semantics_check(setting_name: str, seed: int) -> dict:
    """Both criteria on the same predictions must give the same weighted terms."""
    s = SETTINGS[setting_name]
    g = torch.Generator().manual_seed(seed + 2)
    layers = s.num_decoder_layers

    def head():
        return {
            "pred_logits": torch.randn(s.batch_size, s.num_queries, s.num_classes + 1, generator=g),
            "pred_boxes": torch.randn(s.batch_size, s.num_queries, 4, generator=g).sigmoid(),
        }

    outputs = {**head(), "aux_outputs": [head() for _ in range(layers - 1)]}
    targets = random_targets(s.batch_size, s.num_classes, g)
    ours = SetCriterion(num_classes=s.num_classes, matcher=HungarianMatcher(**MATCH_COSTS), eos_coef=0.1)(outputs, targets)
    ref = ReferenceCriterion(s.num_classes, reference_matcher(*MATCH_COSTS.values()), 0.1)(outputs, targets)
    ours_total = weighted_loss(ours, LOSS_WEIGHTS).item()
    ref_total = reference_total_loss(ref, reference_loss_weights(layers, **LOSS_WEIGHTS)).item()
    diff = max(abs(ours[k].item() - ref[k].item()) for k in ours)
    return {
        "setting": setting_name,
        "terms": len(ours),
        "ours_total": round(ours_total, 6),
        "reference_total": round(ref_total, 6),
        "max_abs_term_diff": diff,
        "ok": diff < 1e-4 and set(ours) <= set(ref),
    }


def worker_argv(args: argparse.Namespace, setting: str, impl: str) -> list[str]:
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--worker", f"{setting}:{impl}",
        "--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--seed", str(args.seed),
        "--channels-last" if args.channels_last else "--no-channels-last",
        "--fuse-bn" if args.fuse_bn else "--no-fuse-bn",
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    return argv


def spawn(args: argparse.Namespace, setting: str, impl: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(worker_argv(args, setting, impl), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"setting": setting, "impl": impl, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], speedups: dict) -> None:
    cols = [
        ("setting", "setting", 15), ("impl", "impl", 10), ("train img/s", "train_images_per_s", 12),
        ("step ms", "train_step_ms", 10), ("eval img/s", "eval_images_per_s", 11),
        ("match ms", "matcher_ms_per_batch", 9), ("peak MiB", "peak_mem_mib", 9),
        ("GFLOP/step", "train_gflop_per_step", 11), ("GFLOP/s", "achieved_gflop_per_s", 9),
        ("%fp32 pk", "frac_of_fp32_matmul_peak", 9),
    ]
    err = sys.stderr
    print(" ".join(f"{h:>{w}}" for h, _, w in cols), file=err)
    for r in results:
        if "error" in r:
            print(f"{r['setting']:>15} {r['impl']:>10}  FAILED: {r['error'].splitlines()[-1]}", file=err)
            continue
        cells = []
        for _, key, w in cols:
            v = r.get(key)
            if key == "frac_of_fp32_matmul_peak" and v is not None:
                v = f"{100 * v:.1f}%"
            cells.append(f"{v!s:>{w}}")
        print(" ".join(cells), file=err)
    for name, sp in speedups.items():
        print(f"{name}: reference step / ours step = {sp:.3f}x (ours/reference = {1 / sp:.3f})", file=err)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of ours, reference")
    p.add_argument("--steps", type=int, default=20, help="timed training (and evaluation) steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="ours only: bf16 autocast around forward + loss (the reference is always fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="ours: channels-last trunk (default: as the configs, where bf16 is native on --device)")
    p.add_argument("--fuse-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="ours: fold frozen BatchNorm into the convolutions")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: 1 warm-up, 2 steps, {QUICK_IMAGE_SIZE}x{QUICK_IMAGE_SIZE} images")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: SETTING:IMPL
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.channels_last is None:
        from tasks.runtime import fast_bf16_available

        args.channels_last = fast_bf16_available("gpu" if args.device == "cuda" else "cpu")
    args.settings = [x for x in args.settings.split(",") if x]
    args.impls = [x for x in args.impls.split(",") if x]
    for name in args.settings:
        if name not in SETTINGS:
            p.error(f"unknown setting {name!r}; choose among {', '.join(SETTINGS)}")
    for name in args.impls:
        if name not in IMPLS:
            p.error(f"unknown implementation {name!r}; choose among {', '.join(IMPLS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        setting, impl = args.worker.split(":")
        print(json.dumps(run_one(setting, impl, args)))
        return 0

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (1024,) if args.quick else ((2048,) if device.type == "cpu" else (2048, 4096))
    reps = 2 if args.quick else 5
    peaks = {
        "fp32": matmul_peak_gflops(device, torch.float32, sizes, reps),
        "bf16": matmul_peak_gflops(device, torch.bfloat16, sizes, reps),
    }
    results = []
    for setting in args.settings:
        for impl in args.impls:
            print(f"[bench] {setting} / {impl} ...", file=sys.stderr, flush=True)
            r = spawn(args, setting, impl)
            if "error" not in r:
                for key in ("fp32", "bf16"):
                    r[f"frac_of_{key}_matmul_peak"] = round(r["achieved_gflop_per_s"] / peaks[key]["gflop_per_s"], 4)
            results.append(r)

    ok = {(r["setting"], r["impl"]): r for r in results if "error" not in r}
    speedups, detail = {}, {}
    for setting in args.settings:
        ours, ref = ok.get((setting, "ours")), ok.get((setting, "reference"))
        if ours and ref:
            speedups[setting] = round(ref["train_step_ms"] / ours["train_step_ms"], 3)
            detail[setting] = {
                "train_step_ratio_ours_over_reference": round(ours["train_step_ms"] / ref["train_step_ms"], 3),
                "meets_0.75": ours["train_step_ms"] <= 0.75 * ref["train_step_ms"],
                "eval_speedup": round(ours["eval_images_per_s"] / ref["eval_images_per_s"], 3),
                "matcher_speedup": round(ref["matcher_ms_per_batch"] / ours["matcher_ms_per_batch"], 3),
                "peak_mem_ratio_ours_over_reference": round(ours["peak_mem_mib"] / ref["peak_mem_mib"], 3),
            }
    doc = {
        "benchmark": "detection_speed",
        "machine": machine_info(device),
        "matmul_peak": peaks,
        "config": {
            "settings": {name: asdict(SETTINGS[name]) for name in args.settings},
            "impls": args.impls, "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
            "precision_ours": args.precision, "channels_last_ours": args.channels_last,
            "fuse_bn_ours": args.fuse_bn, "seed": args.seed,
        },
        "loss_semantics_check": [loss_semantics_check(name, args.seed) for name in args.settings],
        "results": results,
        "speedup": speedups,
        "speedup_detail": detail,
    }
    emit_json(doc, args.out)
    print_table(results, speedups)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
