"""Samplers and a DataLoader that make data order and augmentation a pure function of (seed, epoch).

- ``EpochSampler`` (training): a ``DistributedSampler`` (so Lightning leaves it in place under DDP) whose
  order is drawn from ``seed + epoch`` and which yields ``(index, sample_seed)``; ``SeededDataset`` runs
  the wrapped dataset's ``__getitem__`` under ``torch.manual_seed(sample_seed)`` in a forked RNG, so the
  random augmentations of a sample depend on (seed, epoch, index) only -- not on the number of worker
  processes, on prefetching, or on what the model drew from the global RNG.
- ``EvalSampler`` (validation/test): each rank takes every ``world``-th sample, **without** the padding
  of ``DistributedSampler`` (which repeats samples so ranks get equal counts, and so would count some
  images twice in mAP). Evaluation needs no equal counts: nothing is all-reduced per batch.
- ``ResumableDataLoader``: Lightning saves its ``state_dict`` in every checkpoint (``loops.fit_loop.
  state_dict.combined_loader``) and hands it back on resume *before* the iterator is created, so a run
  restarted mid-epoch skips the batches it already trained on (Lightning alone would replay the epoch's
  first batches and never see its last ones) and one restarted at an epoch end starts the next epoch's
  order, even with worker processes that prefetch at creation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def default_seed() -> int:
    """The run's seed (``seed_everything`` exports ``PL_GLOBAL_SEED``, also to DDP children), else 0."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", 0))
    except ValueError:
        return 0


def world(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(num_replicas, rank): the given ones, else those of the initialised process group, (1, 0) without one."""
    w, r = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        w, r = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return (w if num_replicas is None else num_replicas), (r if rank is None else rank)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (fixed, cheap mixing; no Python ``hash`` randomisation)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    return x >> 1


class SeededDataset(Dataset):
    """Wraps a map-style dataset: ``ds[(i, s)]`` is ``dataset[i]`` computed under ``torch.manual_seed(s)``
    (the global torch RNG is restored afterwards), ``ds[(i, s, *options)]`` is ``dataset[(i, *options)]``
    likewise; ``ds[i]`` is plain ``dataset[i]``."""

    def __init__(self, *, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            index, seed, *options = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[(index, *options) if options else index]
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:  # dataset attributes (coco, ids, ...) stay reachable
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochPosition:
    """Where an epoch-wise order stands: ``set_epoch(e)`` selects epoch e; ``resume(k)`` skips the first
    k items (samples or batches) of the current epoch on the next iteration only (a mid-epoch restart),
    and selecting another epoch forgets it. ``restore_position`` drives both from a checkpoint."""

    epoch: int = 0
    skip: int = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.skip = 0
        self.epoch = int(epoch)

    def resume(self, skip: int) -> None:
        self.skip = max(0, int(skip))

    def take_skip(self) -> int:
        """The pending ``resume`` skip, handed out once: the iteration that takes it starts there."""
        skip, self.skip = self.skip, 0
        return skip


class EpochSampler(EpochPosition, DistributedSampler):
    """Training order: a permutation drawn from ``seed + epoch`` (with ``shuffle``), split over ranks as
    ``DistributedSampler`` does (padded to equal counts: DDP needs the same number of steps per rank).

    Yields ``(index, sample_seed(seed, epoch, index))`` for ``SeededDataset`` (``seeded=False``: plain
    indices); ``options``, if given, is called once per epoch when its iteration starts (in the main
    process: data-loader workers may persist) and its tuple is appended to every key of that epoch. ``resume(skip)`` drops the first ``skip`` samples of the current epoch's order once (a
    mid-epoch restart); ``set_epoch`` to another epoch forgets it. ``generator``, if given, is reseeded
    from (seed, epoch) at each ``set_epoch``: give the same one to the DataLoader, which draws its worker
    base seed from it instead of the global RNG.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seeded: bool = True,
        generator: torch.Generator | None = None,
        options: Callable[[], tuple] | None = None,
    ) -> None:
        num_replicas, rank = world(num_replicas, rank)
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=default_seed() if seed is None else int(seed),
            drop_last=False,
        )
        self.seeded = seeded
        self.generator = generator
        self.options = options
        self.skip = 0
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(sample_seed(self.seed, self.epoch, -1))

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.total_size > n and order:
            order += (order * math.ceil(self.total_size / n))[: self.total_size - n]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[Any]:
        extra = self.options() if self.options is not None and self.seeded else ()
        for i in self.indices()[self.take_skip():]:
            yield (i, sample_seed(self.seed, self.epoch, i), *extra) if self.seeded else i


class EvalSampler(DistributedSampler):
    """Evaluation order: ``rank, rank + world, ...`` -- every sample exactly once over all ranks, no padding."""

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        num_replicas, rank = world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position survives a checkpoint (Lightning's ``_Stateful`` protocol).

    ``progress()`` returns (batches of the current epoch already trained, batches per epoch); the data
    module supplies it from the trainer's loop counters. The resumable object is the batch sampler if it
    has ``resume`` (token buckets), else the sampler (``EpochSampler``).
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def _resumable(self) -> Any:
        for obj in (self.batch_sampler, self.sampler):
            if hasattr(obj, "resume") and hasattr(obj, "set_epoch"):
                return obj
        return None

    def state_dict(self) -> dict[str, int]:
        target = self._resumable()
        done, total = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": int(getattr(target, "epoch", 0)), "batches_done": int(done), "epoch_batches": int(total)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        target = self._resumable()
        if target is None or not state:
            return
        restore_position(target, state, items_per_batch=1 if target is self.batch_sampler else self.batch_size or 1)


def restore_position(target: Any, state: Mapping[str, int], items_per_batch: int = 1) -> None:
    """Put ``target`` (an object with ``set_epoch`` and ``resume``) at a saved ``{epoch, batches_done,
    epoch_batches}``: mid-epoch, it skips the batches already trained (``items_per_batch`` items each
    for a sampler of single items); saved at an epoch's end, the next epoch starts afresh."""
    epoch, done, total = int(state["epoch"]), int(state["batches_done"]), int(state["epoch_batches"])
    if total and done >= total:
        target.set_epoch(epoch + 1)
        return
    target.set_epoch(epoch)
    target.resume(done * items_per_batch)
