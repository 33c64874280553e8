"""Metric sync across ranks with different sample counts (evaluation without DistributedSampler padding)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.detection import MeanAveragePrecision

from tasks.metrics import make_uneven_safe


def _images(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * 50
        boxes = torch.cat([xy, xy + 10 + torch.rand(3, 2, generator=g) * 20], 1)
        noisy = boxes + torch.randn(3, 4, generator=g) * 3
        preds.append({"boxes": noisy, "scores": torch.rand(3, generator=g), "labels": torch.tensor([1, 2, 1])})
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2, 2])})
    return preds, targets


def _rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    preds, targets = _images(5, 0)
    mine = slice(0, 3) if rank == 0 else slice(3, 5)  # 3 images on rank 0, 2 on rank 1
    metric = make_uneven_safe(MeanAveragePrecision(iou_type="bbox", backend="pycocotools"))
    metric.update(preds[mine], targets[mine])
    result = metric.compute()
    queue.put((rank, float(result["map"]), float(result["map_50"])))
    dist.destroy_process_group()


@pytest.mark.slow
def test_map_syncs_uneven_ranks_like_one_process():
    preds, targets = _images(5, 0)
    single = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    single.update(preds, targets)
    expected = single.compute()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for _, m, m50 in results:
        assert abs(m - float(expected["map"])) < 1e-6 and abs(m50 - float(expected["map_50"])) < 1e-6
