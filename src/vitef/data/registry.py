"""Dataset names → datasets and loaders (arXiv 2602.06883, §3 and PROTOCOL.md §3).

Every name users type is parsed once into a :class:`DatasetSpec` through the dataset table
(:mod:`vitef.data.table`; the built-in entries, their on-disk layouts and splits are in
:mod:`vitef.data.datasets`); :func:`build_dataset` then loads the pool of images with the entry's loader and
:func:`build_loader` wraps it in a seeded, shardable loader.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from vitef.data.base import VitefDataset, check_split
from vitef.data.config import resolve_root
from vitef.data.datasets import DOMAINNET_DOMAINS, OFFICIAL_CORRUPTIONS
from vitef.data.loader import VitefLoader, make_loader
from vitef.data.table import (
    DatasetSpec,
    canonical_name,
    dataset_entry,
    num_classes,
    parse_name,
    valid_names,
    valid_names_message,
)
from vitef.data.transforms import ImageTransform, resolve_normalization
from vitef.errors import DataError

__all__ = [
    "DOMAINNET_DOMAINS",
    "OFFICIAL_CORRUPTIONS",
    "DatasetSpec",
    "build_dataset",
    "build_loader",
    "canonical_name",
    "num_classes",
    "parse_name",
    "valid_names",
    "valid_names_message",
]


def build_dataset(
    name: str,
    split: str,
    *,
    size: int = 224,
    augment: bool | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    download: bool = False,
    normalize: str = "imagenet",
    model: nn.Module | None = None,
    digits_size: int = 32,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    cache: str | os.PathLike | None = None,
    output: str = "float",
) -> VitefDataset:
    """One split of the dataset ``name``: items ``(image (3, size, size) float32, label)``, ``.num_classes``.

    Parameters
    ----------
    name
        A registered name (see :func:`~vitef.data.table.valid_names`).
    split
        ``train``, ``val`` or ``test`` (see the split table in :mod:`vitef.data.datasets`).
    size
        Output side in pixels (the model's input size).
    augment
        Train transform (RandomResizedCrop + flip) or eval transform (Resize + CenterCrop); default: train
        transform for the train split only.
    mean, std
        Normalisation; default from ``normalize`` (``imagenet``/``model``/``none``, ``model`` needs ``model``).
    root
        Dataset root (default ``$VITEF_DATA`` or ``./datasets``).
    seed
        Run seed: the random train/val split of CIFAR and Pet depends on it.
    download
        Let torchvision download CIFAR / Flowers102 / Pet into ``root`` when missing.
    digits_size
        Side at which the bundled digits are rendered before transforms.
    crop_scale, hflip
        Area range of the train RandomResizedCrop and whether it flips horizontally (the paper's
        (0.08, 1) with flips; digits need milder crops and no flips).
    cache
        Folder of the decoded-image cache (:mod:`vitef.data.cache`): a file-backed pool (DomainNet, Flowers102,
        Pet, ImageNet, ``imagefolder``) is decoded once, stored with its shorter side at most
        ``max(256, ceil(size * 8/7))`` px, and read from there; ``None``: decode each image on every access.
    output
        ``"float"``: items are normalised float32 images. ``"uint8"``: items are the uint8 images before
        normalisation, and ``dataset.transform.normalizer`` normalises a batch of them (on its device) to the
        same floats; the training loop's :class:`~vitef.data.loader.DevicePrefetcher` does so on the GPU.
    """
    check_split(split)
    spec = parse_name(name)
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither (then `normalize` decides)")
    if mean is None:
        mean, std = resolve_normalization(normalize, model)
    entry = dataset_entry(spec.kind)
    options = {k: v for k, v in {"digits_size": digits_size}.items() if k in entry.load_options}
    root = resolve_root(root)
    source, indices, n_classes = entry.load(spec, split, root=root, seed=seed, download=download, **options)
    if cache is not None and str(cache) != "":
        from vitef.data.cache import cache_source

        # A derived task (fewshot-<k>:<dataset>) indexes its dataset's whole pool: cache that pool once, by its name.
        pool = entry.wraps(spec.variant)[1] if entry.wraps is not None else spec.canonical
        source = cache_source(source, cache, dataset=pool, size=size)
    corruption = None
    if spec.applied:
        from vitef.data.corruptions import compose_corruptions

        corruption = compose_corruptions(spec.applied)
    augment = split == "train" if augment is None else augment
    return VitefDataset(
        source,
        np.asarray(indices),
        n_classes,
        ImageTransform(size, augment, mean, std, crop_scale=crop_scale, hflip=hflip, output=output),
        corruption=corruption,
        name=name,
        split=split,
    )


# build_loader's keywords that go to make_loader (batch_size, shuffle, seed, num_workers, drop_last, rank,
# world_size, device); every other keyword goes to build_dataset (``seed`` goes to both).
_LOADER_ARGS = tuple(p for p in inspect.signature(make_loader).parameters if p != "dataset")


def _dataset_args() -> tuple[str, ...]:
    params = inspect.signature(build_dataset).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "seed")


def build_loader(
    name: str, split: str, *, batch_size: int, shuffle: bool | None = None, seed: int = 0, **options: Any
) -> VitefLoader:
    """A loader over :func:`build_dataset` ``(name, split, seed=seed, **dataset options)`` with ``.num_classes``.

    ``shuffle`` defaults to true for the train split only (as ``augment`` does in :func:`build_dataset`).
    The order is seeded by ``seed`` (which also seeds the dataset's split). The other options of
    :func:`make_loader` go to it with its defaults: ``num_workers``, ``drop_last``, ``rank``/``world_size``
    (sharding) and ``device`` (default: CUDA if available; decides pinned memory). Pass the loader to
    :func:`make_iterable` for step-based loops. Any other keyword (``size``, ``augment``, ``root``,
    ``normalize``, ...) is an argument of :func:`build_dataset`; an unknown one is a ``TypeError``.
    """
    dataset_args = _dataset_args()
    for key in options:
        if key not in dataset_args and key not in _LOADER_ARGS:
            guess = difflib.get_close_matches(key, dataset_args + _LOADER_ARGS, n=1)
            hint = f" Did you mean {guess[0]!r}?" if guess else ""
            raise TypeError(
                f"build_loader() got an unknown keyword argument {key!r}.{hint} It takes {', '.join(_LOADER_ARGS)} "
                f"and build_dataset's {', '.join(dataset_args)}"
            )
    loader_options = {k: v for k, v in options.items() if k in _LOADER_ARGS}
    dataset = build_dataset(name, split, seed=seed, **{k: v for k, v in options.items() if k not in _LOADER_ARGS})
    shuffle = split == "train" if shuffle is None else shuffle
    return make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, **loader_options)
