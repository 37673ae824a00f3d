"""make_iterable reads epoch after epoch in one DataLoader pass, so workers prefetch across epoch boundaries
(a new pass per epoch made the first step of every epoch wait for a whole batch: issue 13's stalls)."""

from __future__ import annotations

import pytest
import torch

from vitef.data import build_loader, make_iterable
from vitef.data.loader import EpochBatches


def _per_epoch_batches(loader, epochs):
    """The batches of a fresh DataLoader pass per epoch: what the stream must reproduce."""
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += list(loader)
    return out


@pytest.mark.parametrize("drop_last", [True, False])
def test_one_pass_spans_epochs_with_the_batches_of_each_epoch(drop_last):
    kw = dict(batch_size=20, size=8, seed=3, drop_last=drop_last, num_workers=2)
    per_epoch = 11 if drop_last else 12  # 225 train images of digits_subset-01
    it = make_iterable(build_loader("digits_subset-01", "train", **kw), seed=3)
    first = next(it)
    stream = it._it  # the one DataLoader iterator of the stream
    got = [first] + [next(it) for _ in range(2 * per_epoch - 1)]
    assert it._it is stream  # not restarted at the epoch boundaries
    assert it.state_dict() == {"epoch": 1, "batch": per_epoch, "seed": 3}
    expected = _per_epoch_batches(build_loader("digits_subset-01", "train", **{**kw, "num_workers": 0}), 3)
    for (x, y), (a, b) in zip(got, expected[: len(got)], strict=True):
        assert torch.equal(x, a) and torch.equal(y, b)
    # The state at an epoch's end resumes at the next epoch's first batch.
    resumed = make_iterable(build_loader("digits_subset-01", "train", **kw), seed=3)
    resumed.load_state_dict({"epoch": 0, "batch": per_epoch, "seed": 3})
    x, y = next(resumed)
    assert torch.equal(y, expected[per_epoch][1]) and resumed.state_dict() == {"epoch": 1, "batch": 1, "seed": 3}


def test_epoch_batches_counts_like_a_dataloader():
    sampler = build_loader("digits_subset-01", "train", batch_size=1, size=8).sampler
    assert EpochBatches(sampler, 20, drop_last=True).per_epoch() == len(sampler) // 20
    assert EpochBatches(sampler, 20, drop_last=False).per_epoch() == -(-len(sampler) // 20)
    assert EpochBatches(sampler, 10_000, drop_last=True).per_epoch() == 0
