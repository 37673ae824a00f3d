"""Image sources, split helpers and the dataset that applies transforms (arXiv 2602.06883, §3).

A *source* is a whole dataset pool: ``len``, ``targets`` and ``image(i)`` → uint8 ``(3, H, W)``. A split is
an index array into its source. :class:`VitefDataset` combines them with an optional corruption (applied
to the source image, seeded by the image's source index so it is fixed like a CIFAR-10-C file) and the
train/eval :class:`~vitef.data.transforms.ImageTransform`.

Indexing with an ``int`` uses the global torch RNG for augmentation (torchvision behaviour). The loaders'
sampler instead passes ``(index, aug_seed)`` pairs, so each sample's augmentation depends only on
(seed, epoch, index): identical for any number of workers and after a resume.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from vitef.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_SEED = 42  # PROTOCOL.md §3: the fixed permutation of CIFAR-C and DomainNet
MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-mixed non-negative 63-bit seed from integers (splitmix64 steps)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & MASK64)) & MASK64
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
        h = h ^ (h >> 31)
    return h >> 1


def split_80_20(indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``indices`` with ``seed`` and cut them into the first 80% (floor) and the remaining 20%."""
    perm = np.random.default_rng(seed).permutation(len(indices))
    cut = int(len(indices) * 0.8)
    return np.sort(indices[perm[:cut]]), np.sort(indices[perm[cut:]])


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def three_way_split(n: int, split: str, trainval_seed: int = SPLIT_SEED) -> np.ndarray:
    """The protocol's split of a single pool of ``n`` images (CIFAR-C, DomainNet, digits, imagefolder).

    All ``n`` are permuted with the fixed seed 42 and cut 80/20 into train+val / test; train+val is then cut
    80/20 into train / val with ``trainval_seed`` (42 unless stated otherwise).
    """
    check_split(split)
    trainval, test = split_80_20(np.arange(n), SPLIT_SEED)
    if split == "test":
        return test
    train, val = split_80_20(trainval, trainval_seed)
    return train if split == "train" else val


class ImageSource:
    """A pool of labelled images. Subclasses set ``targets`` and implement ``image``."""

    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, index: int) -> torch.Tensor:
        """The image ``index`` as a uint8 ``(3, H, W)`` tensor."""
        raise NotImplementedError


class ArraySource(ImageSource):
    """Images held in (or memory-mapped from) a uint8 array of shape ``(N, H, W, 3)`` or ``(N, 3, H, W)``."""

    def __init__(self, images: np.ndarray | torch.Tensor, targets: Sequence[int], channels_last: bool = True):
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.channels_last = channels_last
        if len(self.images) != len(self.targets):
            raise DataError(f"{len(self.images)} images but {len(self.targets)} labels")

    def image(self, index: int) -> torch.Tensor:
        img = self.images[index]
        t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img))
        return t.permute(2, 0, 1).contiguous() if self.channels_last else t


# Largest in-memory pool whose corrupted images are kept (CIFAR-size arrays fit; ImageNet-size ones do not).
CORRUPTION_CACHE_BYTES = 512 * 2**20


def _nbytes(images: np.ndarray | torch.Tensor) -> int:
    return int(images.nbytes) if isinstance(images, np.ndarray) else images.numel() * images.element_size()


class VitefDataset(Dataset):
    """One split of a named dataset: ``(image (3, size, size) float32, label int)`` with ``.num_classes``.

    Parameters
    ----------
    source
        The image pool.
    indices
        The split: indices into ``source``.
    num_classes
        Number of classes of the task.
    transform
        ``(uint8 image, random.Random or None)`` → float tensor (``ImageTransform``).
    corruption
        Optional ``(image uint8 (3, H, W), seed) → image uint8``; seeded by ``corruption_seed`` and the
        source index so every image is corrupted the same way in every epoch, split and process.
    name, split
        For messages and ``repr``.
    """

    def __init__(
        self,
        source: ImageSource,
        indices: np.ndarray,
        num_classes: int,
        transform: Callable[[torch.Tensor, random.Random | None], torch.Tensor],
        *,
        corruption: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        corruption_seed: int = 0,
        name: str = "",
        split: str = "",
    ):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.num_classes = int(num_classes)
        self.transform = transform
        self.corruption = corruption
        self.corruption_seed = corruption_seed
        self.name = name
        self.split = split
        self.targets = self.source.targets[self.indices]
        # Corruptions are deterministic per image, so an in-memory pool (ArraySource: the bundled digits, small
        # arrays) keeps each corrupted image after its first use: the offline study draws every training image
        # about six times per run, and corrupting it is most of the cost of a step (e.g. impulse noise).
        small = isinstance(source, ArraySource) and _nbytes(source.images) <= CORRUPTION_CACHE_BYTES
        self._corrupted: dict[int, torch.Tensor] | None = {} if small else None

    def __len__(self) -> int:
        return len(self.indices)

    def raw_image(self, i: int) -> torch.Tensor:
        """The (possibly corrupted) uint8 source image of item ``i``, before transforms."""
        src = int(self.indices[i])
        if self.corruption is None:
            return self.source.image(src)
        if self._corrupted is not None and src in self._corrupted:
            return self._corrupted[src]
        img = self.corruption(self.source.image(src), mix_seed(self.corruption_seed, src))
        if self._corrupted is not None:
            self._corrupted[src] = img
        return img

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            i, aug_seed = key
        else:
            i, aug_seed = key, None
        rng = None if aug_seed is None else random.Random(aug_seed)
        label = int(self.targets[int(i)])
        threads = torch.get_num_threads()
        if threads == 1 or get_worker_info() is not None:
            return self.transform(self.raw_image(int(i)), rng), label
        # Loading in the main process (num_workers=0): one image's ops are too small for intra-op threads,
        # whose hand-offs cost more than they save (3x slower on 2 busy cores, benchmarks/data.py).
        torch.set_num_threads(1)
        try:
            return self.transform(self.raw_image(int(i)), rng), label
        finally:
            torch.set_num_threads(threads)

    def __repr__(self) -> str:
        return f"VitefDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"
