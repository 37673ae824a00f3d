"""Corrupted images of in-memory pools are computed once per dataset and are the same as recomputed ones."""

from __future__ import annotations

import numpy as np
import torch

from vitef.data.base import ArraySource, VitefDataset
from vitef.data.corruptions import Corruption


class Counting(Corruption):
    def __init__(self):
        super().__init__([("impulse_noise", 5)])
        self.calls = 0

    def __call__(self, image, seed):
        self.calls += 1
        return super().__call__(image, seed)


def test_each_image_is_corrupted_once_and_identically():
    rng = np.random.default_rng(0)
    source = ArraySource(rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), list(range(6)))
    corruption = Counting()
    ds = VitefDataset(source, np.arange(6), 6, lambda img, rng: img.float(), corruption=corruption, corruption_seed=3)
    first = [ds.raw_image(i).clone() for i in range(6)]
    again = [ds[i][0] for i in range(6)] + [ds[(i, 7)][0] for i in range(6)]
    assert corruption.calls == 6
    plain = Corruption([("impulse_noise", 5)])
    fresh = VitefDataset(source, np.arange(6), 6, lambda img, rng: img.float(), corruption=plain, corruption_seed=3)
    for i in range(6):
        assert torch.equal(first[i], fresh.raw_image(i))
        assert torch.equal(again[i], first[i].float()) and torch.equal(again[6 + i], first[i].float())
    assert not torch.equal(first[0], source.image(0))  # it was corrupted
