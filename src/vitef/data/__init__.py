"""Datasets, transforms, corruptions and loaders of the study (arXiv 2602.06883, §3).

Public API (the data contract in docs/ARCHITECTURE.md)::

    build_dataset(name, split, *, size, augment, mean, std, root, seed, download)  -> Dataset (.num_classes)
    build_loader(name, split, *, batch_size, size=224, ...)                          -> DataLoader (.num_classes)
    make_iterable(loader, seed)                                                      -> endless, resumable batches
    num_classes(name), resolve_normalization(normalize, model=None), DataConfig

See :mod:`vitef.data.datasets` for the names, on-disk layouts and the split table.
"""

from vitef.data.base import SPLITS, VitefDataset
from vitef.data.config import DataConfig, resolve_root
from vitef.data.corruptions import CORRUPTIONS, corrupt
from vitef.data.loader import EndlessIterator, EpochSampler, VitefLoader, make_iterable
from vitef.data.registry import (
    DOMAINNET_DOMAINS,
    OFFICIAL_CORRUPTIONS,
    VALID_NAMES,
    DatasetSpec,
    build_dataset,
    build_loader,
    num_classes,
    parse_name,
)
from vitef.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, resolve_normalization

__all__ = [
    "CORRUPTIONS",
    "DOMAINNET_DOMAINS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_CORRUPTIONS",
    "SPLITS",
    "VALID_NAMES",
    "DataConfig",
    "DatasetSpec",
    "EndlessIterator",
    "EpochSampler",
    "ImageTransform",
    "VitefDataset",
    "VitefLoader",
    "build_dataset",
    "build_loader",
    "corrupt",
    "make_iterable",
    "num_classes",
    "parse_name",
    "resolve_normalization",
    "resolve_root",
]
