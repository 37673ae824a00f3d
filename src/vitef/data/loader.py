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
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from vitef.data.base import mix_seed
from vitef.errors import DataError
from vitef.monitor.stop import ignore_stop_signals

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
        yield from self.items(self.epoch, start)

    def items(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """``(index, aug_seed)`` of this rank's samples of ``epoch``, from position ``start`` on."""
        for i in self.epoch_indices(epoch)[start:]:
            yield i, mix_seed(self.seed, epoch, i)


class EpochBatches(Sampler):
    """The batches of an :class:`EpochSampler`, epoch after epoch without end, from batch ``batch`` of ``epoch``.

    The batches are those a ``DataLoader`` over the sampler makes in each epoch (``drop_last`` included). One
    ``DataLoader`` iteration over them keeps the workers busy across epoch boundaries: a new iteration per epoch
    drains the prefetch queue at the end of each epoch, and the first step of the next one waits for a worker to
    produce a whole batch (on a GPU, a step several times slower than the others, every epoch).
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool, epoch: int = 0, batch: int = 0):
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = epoch
        self.batch = batch

    def per_epoch(self) -> int:
        """Batches in one epoch."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.batch * self.batch_size
        while True:
            chunk: list[tuple[int, int]] = []
            for item in self.sampler.items(epoch, start):
                chunk.append(item)
                if len(chunk) == self.batch_size:
                    yield chunk
                    chunk = []
            if chunk and not self.drop_last:
                yield chunk
            epoch, start = epoch + 1, 0


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
        # Persistent workers keep the decoded-dataset state (e.g. memory maps) across epochs. Two batches in
        # flight per worker (torch's default) hide the per-batch jitter; each one is a shared-memory block and,
        # on CUDA, a pinned copy (154 MB for 256 float images at 224 px): 4 per worker would hold 9 GB of each
        # with 14 workers, for no gain once the workers outpace the device.
        kwargs.update(persistent_workers=True, prefetch_factor=2)
        # A scheduler signals every process of the job: the training loop stops on it after a checkpoint, which
        # needs the workers alive until then (they end with their process).
        kwargs["worker_init_fn"] = ignore_stop_signals
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

    The batches come from one ``DataLoader`` pass over :class:`EpochBatches` that never ends, so the workers
    prefetch across epoch boundaries; the stream restarts only when a state is loaded.
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
        loader = self.loader
        per_epoch = EpochBatches(self.sampler, loader.batch_size, loader.drop_last).per_epoch()
        if per_epoch == 0:
            raise DataError(
                f"the loader yields no batch ({len(self.sampler)} samples per rank, batch_size="
                f"{loader.batch_size}, drop_last={loader.drop_last}): lower batch_size"
            )
        if self.batch >= per_epoch:  # the previous batch closed its epoch
            self.epoch += 1
            self.batch = 0
            self.sampler.set_epoch(self.epoch)
        if self._it is None:
            self.sampler.set_epoch(self.epoch)
            self._it = iter(self._stream())
        out = next(self._it)
        self.batch += 1
        return out

    def _stream(self) -> DataLoader:
        """One endless ``DataLoader`` pass from the current position (:class:`EpochBatches`), with the loader's
        dataset, workers, pinning and prefetching."""
        loader = self.loader
        options: dict[str, Any] = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "generator": loader.generator,
        }
        if loader.num_workers > 0:
            options["prefetch_factor"] = loader.prefetch_factor
        if getattr(loader, "pin_memory_device", ""):
            options["pin_memory_device"] = loader.pin_memory_device
        batches = EpochBatches(self.sampler, loader.batch_size, loader.drop_last, self.epoch, self.batch)
        return DataLoader(loader.dataset, batch_sampler=batches, **options)

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


class DevicePrefetcher:
    """The batches of an :class:`EndlessIterator`, already on ``device``, one batch ahead (issue 13).

    ``next()`` hands out the batch fetched ahead; :meth:`prefetch` fetches the following one from the loader and,
    on CUDA, starts its host-to-device copy on a side stream. The training step calls :meth:`prefetch` once its own
    forward and backward are queued, so the loader's host work (taking the batch from the worker queue, pinning)
    and the copy overlap the device computing that step. Fetched when the step asks for its batch instead, the host
    time of every fetch (and its jitter) was spent with the device idle: the GPU had finished the previous step and
    the next step's kernels were not queued yet. Without a :meth:`prefetch` call, ``next()`` fetches on demand.

    On the compute stream, the copy of a ViT-B batch of 256 float images (154 MB) would wait for the previous
    step's kernels and the next step would wait for it (about 6 ms per step at ~25 GB/s, an estimate). Each batch
    is recorded on the compute stream before it is handed out (``record_stream``), so its memory is not reused
    while the step still reads it.

    ``normalize`` (a :class:`~vitef.data.transforms.Normalizer`) turns the batches of a loader built with
    ``output="uint8"`` into normalised floats after the copy, on the device: a quarter of the bytes cross to the
    GPU. Off CUDA the batches stay where the loader made them (normalised in this process when ``normalize`` is
    given); fetching ahead works the same way. ``state_dict`` is the position of the next batch handed out (the one
    fetched ahead counts as not consumed), so a run resumed from it sees the same batches.
    """

    def __init__(self, batches: EndlessIterator, device: torch.device | str, normalize: Callable | None = None):
        self.batches = batches
        self.normalize = normalize
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pending: tuple[Any, dict[str, int]] | None = None

    @property
    def num_classes(self) -> int:
        return self.batches.num_classes

    def __iter__(self) -> DevicePrefetcher:
        return self

    def prefetch(self) -> None:
        """Fetch the next batch from the loader (and start its copy to the device), unless one is already waiting."""
        if self._pending is not None:
            return
        state = self.batches.state_dict()
        images, labels = next(self.batches)
        if self.stream is None:
            batch = (images if self.normalize is None else self.normalize(images), labels)
        else:
            with torch.cuda.stream(self.stream):
                images = images.to(self.device, non_blocking=True)
                if self.normalize is not None:
                    images = self.normalize(images)  # (B, 3, H, W) float32, made on the side stream
                batch = (images, labels.to(self.device, non_blocking=True))
        self._pending = (batch, state)

    def __next__(self) -> Any:
        self.prefetch()  # nothing waiting: the first batch, or the caller did not fetch ahead
        assert self._pending is not None
        (images, labels), _ = self._pending
        self._pending = None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)  # the copy is done before the step reads the batch
            images.record_stream(current)
            labels.record_stream(current)
        return images, labels

    def state_dict(self) -> dict[str, int]:
        return dict(self._pending[1]) if self._pending is not None else self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._pending = None
        self.batches.load_state_dict(state)
