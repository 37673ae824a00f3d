"""Datasets, transforms, corruptions and loaders of the study (arXiv 2602.06883, §3).

Public API (the data contract in docs/ARCHITECTURE.md)::

    build_dataset(name, split, *, size, augment, mean, std, root, seed, download)  -> Dataset (.num_classes)
    build_loader(name, split, *, batch_size, size=224, ...)                          -> DataLoader (.num_classes)
    make_iterable(loader, seed)                                                      -> endless, resumable batches
    num_classes(name), canonical_name(name), resolve_normalization(normalize, model=None), DataConfig
    register_dataset(DatasetEntry(...)), dataset_entries(), valid_names()       -> the dataset table

See :mod:`vitef.data.table` for the dataset table and :mod:`vitef.data.datasets` for the built-in entries,
their on-disk layouts and splits.
"""

from typing import Any

from vitef.data.base import SPLITS, VitefDataset
from vitef.data.config import DataConfig, resolve_root
from vitef.data.corruptions import CORRUPTIONS, corrupt
from vitef.data.loader import DevicePrefetcher, EndlessIterator, EpochSampler, VitefLoader, make_iterable
from vitef.data.registry import (
    DOMAINNET_DOMAINS,
    OFFICIAL_CORRUPTIONS,
    DatasetSpec,
    build_dataset,
    build_loader,
    canonical_name,
    num_classes,
    parse_name,
)
from vitef.data.table import (
    DatasetEntry,
    dataset_entries,
    dataset_entry,
    register_dataset,
    unregister_dataset,
    valid_names,
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
    "DatasetEntry",
    "DatasetSpec",
    "EndlessIterator",
    "EpochSampler",
    "ImageTransform",
    "VitefDataset",
    "VitefLoader",
    "build_dataset",
    "build_loader",
    "canonical_name",
    "corrupt",
    "dataset_entries",
    "dataset_entry",
    "make_iterable",
    "DevicePrefetcher",
    "num_classes",
    "parse_name",
    "register_dataset",
    "resolve_normalization",
    "resolve_root",
    "unregister_dataset",
    "valid_names",
]


def __getattr__(name: str) -> Any:
    # VALID_NAMES was a constant; the table can grow at run time, so it is computed when asked for.
    if name == "VALID_NAMES":
        return valid_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
