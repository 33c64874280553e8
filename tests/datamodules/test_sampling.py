"""Data order as a function of (seed, epoch): samplers, seeded augmentation, mid-epoch resume, no eval padding."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import write_png

from datamodules.coco import CocoDataModule
from datamodules.sampling import EpochSampler, EvalSampler, ResumableDataLoader, SeededDataset
from datamodules.text import TokenBucketBatchSampler
from tests.datamodules.test_coco import write_coco


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_resumes():
    data = list(range(10))
    a, b = EpochSampler(data, seed=3), EpochSampler(data, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(b) and sorted(i for i, _ in first) == data
    b.set_epoch(3)
    assert list(b) != first
    b.set_epoch(2)
    b.resume(4)
    assert list(b) == first[4:]
    assert list(b) == first  # the skip applies once
    b.resume(4)
    b.set_epoch(5)  # another epoch forgets it
    assert len(list(b)) == 10


def test_eval_sampler_covers_each_sample_once_over_ranks():
    data = list(range(7))
    parts = [list(EvalSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == data  # DistributedSampler would pad to 9
    assert [len(EvalSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [len(p) for p in parts]


def test_token_buckets_do_not_pad_evaluation_and_resume():
    lengths = torch.randint(1, 40, (101,), generator=torch.Generator().manual_seed(0))
    ranks = [TokenBucketBatchSampler(lengths, 128, shuffle=False, num_replicas=2, rank=r) for r in range(2)]
    seen = [i for s in ranks for b in s for i in b]
    assert sorted(seen) == list(range(101))
    assert sum(len(s) for s in ranks) == len(TokenBucketBatchSampler(lengths, 128, shuffle=False))
    train = TokenBucketBatchSampler(lengths, 128, shuffle=True, seed=1)
    train.set_epoch(4)
    full = list(train)
    train.resume(3)
    assert list(train) == full[3:]


def test_seeded_augmentation_ignores_global_rng_and_worker_count(tmp_path: Path):
    write_coco(tmp_path, [(f"{i}.png", 40 + i, 30) for i in range(6)], [(1, 5, [1.0, 2.0, 10.0, 8.0])])
    write_coco(tmp_path, [("0.png", 40, 30)], [], name="val.json", write_images=False)
    for i in range(6):  # asymmetric pixels, so a flip shows
        img = torch.zeros(3, 30, 40 + i, dtype=torch.uint8)
        img[:, :, :5] = 255
        write_png(img, str(tmp_path / "images" / f"{i}.png"))

    def batches(workers: int) -> list:
        dm = CocoDataModule(root=str(tmp_path), batch_size=2, num_workers=workers, train_scales=[32], max_size=64,
                            persistent_workers=False)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableDataLoader) and isinstance(loader.dataset, SeededDataset)
        torch.manual_seed(workers)  # a different global RNG state each time
        return [(b["images"], [t["boxes"] for t in b["targets"]]) for b in loader]

    plain, workers = batches(0), batches(2)
    assert len(plain) == 3
    for (img_a, box_a), (img_b, box_b) in zip(plain, workers):
        assert torch.equal(img_a, img_b) and all(torch.equal(x, y) for x, y in zip(box_a, box_b))
