"""Loaders with seeded, shardable, resumable order (arXiv 2602.06883, §3–4: step-based finetuning).

:class:`EpochSampler` decides the order: epoch ``e`` is a permutation drawn from ``(seed, e)`` (or the
natural order for evaluation), padded like ``DistributedSampler`` so every rank gets the same number of
samples, and sharded ``rank::world_size``. It yields ``(index, aug_seed)`` pairs with ``aug_seed`` derived
from (seed, epoch, index), so augmentation is reproducible whatever the number of workers.

:func:`make_iterable` turns a loader into an endless stream of batches whose ``state_dict()`` is
``{"epoch", "batch"}``: a run killed at step k and resumed from that state sees exactly the batches an
uninterrupted run sees (the sampler skips the consumed part of the epoch without loading it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from vitef.data.base import mix_seed
from vitef.errors import DataError

logger = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """Seeded per-epoch order, sharded by rank, with a start offset for exact resumption.

    Parameters
    ----------
    n
        Dataset length.
    shuffle
        Permute each epoch (train) or keep the natural order (evaluation).
    seed
        Base seed of the permutations and of the per-sample augmentation seeds.
    rank, world_size
        This process's shard. With ``shuffle`` the epoch is padded (repeating its first indices) to a
        multiple of ``world_size`` so all ranks see equally many samples; without it the shards are just
        ``rank::world_size`` (no duplicates, which evaluation needs).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank} world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        self.n = n
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this shard on the next iteration only."""
        self.start = int(start)

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g).tolist()
            total = -(-self.n // self.world_size) * self.world_size
            order += order[: total - self.n]
        else:
            order = list(range(self.n))
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        if self.shuffle:
            return -(-self.n // self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        epoch = self.epoch
        for i in self.epoch_indices(epoch)[start:]:
            yield i, mix_seed(self.seed, epoch, i)


class VitefLoader(DataLoader):
    """A ``DataLoader`` over a :class:`~vitef.data.base.VitefDataset` with ``.num_classes``."""

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes


def make_loader(
    dataset: Any,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> VitefLoader:
    """A :class:`VitefLoader` with an :class:`EpochSampler`; pinned memory when the target is CUDA."""
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    if num_workers < 0:
        raise DataError(f"num_workers={num_workers} must be >= 0")
    if len(dataset) == 0:
        raise DataError(f"dataset {getattr(dataset, 'name', '')!r} split {getattr(dataset, 'split', '')!r} is empty")
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    if device is None:
        pin = torch.cuda.is_available()
    else:
        pin = torch.device(device).type == "cuda"
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        # Persistent workers keep the decoded-dataset state (e.g. memory maps) across epochs; a few batches
        # in flight per worker hide the per-batch jitter.
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return VitefLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=drop_last,
        **kwargs,
    )


class EndlessIterator:
    """Endless batches from a :class:`VitefLoader`, resumable via ``state_dict`` / ``load_state_dict``.

    ``state_dict()`` = ``{"epoch": e, "batch": b, "seed": s}``: ``b`` batches of epoch ``e`` have been
    returned. Loading it makes the next batch the ``b``-th of epoch ``e`` (0-based).
    """

    def __init__(self, loader: DataLoader, seed: int | None = None):
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, EpochSampler):
            raise TypeError("make_iterable needs a loader from vitef.data.build_loader (with an EpochSampler)")
        self.loader = loader
        self.sampler = sampler
        if seed is not None:
            sampler.seed = int(seed)
        self.epoch = 0
        self.batch = 0
        self._it: Iterator | None = None

    @property
    def num_classes(self) -> int:
        return self.loader.dataset.num_classes

    def __iter__(self) -> EndlessIterator:
        return self

    def __next__(self) -> Any:
        empty_epochs = 0
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.batch * self.loader.batch_size)
                self._it = iter(self.loader)
            try:
                out = next(self._it)
            except StopIteration:
                self._it = None
                if self.batch == 0:
                    empty_epochs += 1
                    if empty_epochs > 1:
                        raise DataError(
                            f"the loader yields no batch ({len(self.sampler)} samples per rank, batch_size="
                            f"{self.loader.batch_size}, drop_last={self.loader.drop_last}): lower batch_size"
                        ) from None
                self.epoch += 1
                self.batch = 0
                continue
            self.batch += 1
            return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        if "seed" in state:
            self.sampler.seed = int(state["seed"])
        self._it = None  # the next batch restarts the epoch at the saved position


def make_iterable(loader: DataLoader, seed: int | None = None) -> EndlessIterator:
    """An endless, resumable iterator over ``loader``'s batches (``seed`` overrides the loader's seed)."""
    return EndlessIterator(loader, seed)
