"""Exact evaluation of a classifier over a whole split (arXiv 2602.06883, §4: model selection on
validation accuracy, test accuracy of the selected checkpoint).

Accuracy and loss are sample-weighted over the split: sums of per-sample losses and of correct
predictions divided by the number of samples, never a mean of batch means (the last batch is
usually smaller). Under ``torchrun`` each process evaluates a disjoint strided shard of the dataset
(no padding, no duplicates) and the sums are all-reduced, so the result equals one process's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from vitef import distributed
from vitef.errors import DataError
from vitef.utils import autocast_context, precision_scope


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Sample-weighted metrics over a split. ``acc`` is a fraction in [0, 1]."""

    loss: float
    acc: float
    n: int
    correct: int

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}loss": self.loss, f"{prefix}acc": self.acc, f"{prefix}n": self.n}


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """A loader over samples ``rank, rank + world_size, ...`` of ``loader``'s dataset, in order.

    Unlike ``DistributedSampler`` it never pads, so the shards partition the dataset exactly.
    """
    if world_size == 1:
        return loader
    dataset = loader.dataset
    indices = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    shard = DataLoader(
        Subset(dataset, indices),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
    )
    if hasattr(loader, "num_classes"):
        shard.num_classes = loader.num_classes  # type: ignore[attr-defined]
    return shard


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    precision: str = "fp32",
    distributed_shard: bool = True,
) -> EvalResult:
    """Cross-entropy and accuracy of ``model`` over every sample of ``loader``.

    Parameters
    ----------
    model
        Returns ``(B, num_classes)`` logits.
    loader
        Yields ``(images, labels)`` over the full split (not shuffled, no dropped batch). Under
        torchrun a ``DataLoader`` over the full split is re-sharded across processes when
        ``distributed_shard``; one whose sampler is already sharded (``sampler.world_size``) is kept.
    precision
        A name of :data:`vitef.utils.PRECISIONS`: autocast for the forward pass and the float32 matmul flags
        (:func:`vitef.utils.precision_scope`, restored on return); losses are accumulated in float64.
    """
    world = distributed.world_size()
    # A loader already sharded over the processes (e.g. vitef.data.build_loader(rank=, world_size=)) is kept.
    already_sharded = getattr(getattr(loader, "sampler", None), "world_size", 1) == world
    if distributed_shard and world > 1 and isinstance(loader, DataLoader) and not already_sharded:
        loader = shard_loader(loader, distributed.rank(), world)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with precision_scope(precision):
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast_context(device, precision):
                    logits = model(images)  # (B, num_classes)
                logits = logits.float()
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
                correct += (logits.argmax(dim=1) == labels).sum()
                count += labels.numel()
    finally:
        model.train(was_training)
    totals = torch.stack([loss_sum, correct.double(), count.double()])
    distributed.all_reduce_sum(totals)
    n = int(totals[2].item())
    if n == 0:
        raise DataError("evaluation got an empty split: check the dataset name and split")
    return EvalResult(loss=float(totals[0].item() / n), acc=float(totals[1].item() / n), n=n, correct=int(totals[1]))
