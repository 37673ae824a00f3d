"""The bundled offline datasets: scikit-learn's handwritten digits rendered as RGB images.

``sklearn.datasets.load_digits`` ships 1,797 real 8×8 grey images (values 0..16, 10 classes) inside the
scikit-learn package, so these datasets need no network and no files. Each image is scaled to [0, 1],
upsampled bilinearly to ``digits_size`` pixels (default 32, CIFAR-like), replicated to 3 channels and
stored as uint8; the usual train/eval transforms then bring it to the model's input size.

Splits (fixed, independent of the run seed): the pool is permuted with seed 42 and cut 80/20 into
train+val / test, then train+val 80/20 into train / val. ``digits``: 1,149 / 288 / 360.
``digits_subset-<digits>`` keeps only the listed classes (labels remapped to 0..k-1 in sorted digit
order) and splits that pool the same way, so e.g. ``digits_subset-01234`` (pretraining) and
``digits_subset-56789`` (transfer to new classes) are disjoint tasks.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from vitef.data.base import ArraySource
from vitef.errors import DataError

NUM_DIGITS = 10


@functools.lru_cache(maxsize=4)
def _rendered(size: int) -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous(), np.asarray(digits.target, dtype=np.int64)  # (N, 3, S, S)


def parse_digit_subset(spec: str) -> list[int]:
    """``"56789"`` → ``[5, 6, 7, 8, 9]`` (sorted, unique), or a :class:`DataError`."""
    if not spec or not spec.isdigit() or len(set(spec)) != len(spec):
        raise DataError(
            f"digits_subset-{spec}: after 'digits_subset-' write distinct digits 0-9, e.g. digits_subset-01234"
        )
    if len(spec) < 2:
        raise DataError(f"digits_subset-{spec}: a classification task needs at least 2 digits")
    return sorted(int(c) for c in spec)


def digits_source(size: int = 32, classes: list[int] | None = None) -> ArraySource:
    """The digits (optionally only ``classes``, relabelled 0..k-1) rendered at ``size`` pixels."""
    if size < 8:
        raise DataError(f"digits_size={size} must be >= 8 (the digits are 8x8 originals)")
    images, targets = _rendered(size)
    if classes is not None:
        keep = np.flatnonzero(np.isin(targets, classes))
        remap = np.full(NUM_DIGITS, -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        source = ArraySource(images[torch.from_numpy(keep)], remap[targets[keep]], channels_last=False)
        source.origin = keep  # position of each kept image in load_digits()
        return source
    source = ArraySource(images, targets, channels_last=False)
    source.origin = np.arange(len(targets))
    return source
