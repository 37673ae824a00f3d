"""Dataset names → datasets and loaders (arXiv 2602.06883, §3 and PROTOCOL.md §3).

Every name users type is parsed here once into a :class:`DatasetSpec`; :func:`build_dataset` then loads
the pool of images (see :mod:`vitef.data.datasets` for the on-disk layouts and the split table) and
:func:`build_loader` wraps it in a seeded, shardable loader.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitef.data.base import VitefDataset, check_split, three_way_split
from vitef.data.config import resolve_root
from vitef.data.loader import VitefLoader, make_loader
from vitef.data.transforms import ImageTransform, resolve_normalization
from vitef.errors import DataError

# The 19 corruptions of CIFAR-10-C / CIFAR-100-C / ImageNet-C (15 benchmark + 4 extra), as file/folder names.
OFFICIAL_CORRUPTIONS = (
    "brightness",
    "contrast",
    "defocus_blur",
    "elastic_transform",
    "fog",
    "frost",
    "gaussian_blur",
    "gaussian_noise",
    "glass_blur",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "saturate",
    "shot_noise",
    "snow",
    "spatter",
    "speckle_noise",
    "zoom_blur",
)
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
FIXED_CLASSES = {"cifar10": 10, "cifar100": 100, "flowers102": 102, "pet": 37, "imagenet": 1000, "domainnet": 345}

VALID_NAMES = (
    "digits",
    "digits_subset-<digits> (e.g. digits_subset-01234, digits_subset-56789)",
    "digits_c-corruption-<type>-severity-<1..5> (or digits_c-<type>-<s>)",
    "cifar10",
    "cifar100",
    "cifar10_c-corruption-<type>-severity-<1..5> (or cifar10_c-<type>-<s>)",
    "cifar100_c-corruption-<type>-severity-<1..5> (or cifar100_c-<type>-<s>)",
    f"domainnet-<{'|'.join(DOMAINNET_DOMAINS)}>",
    "flowers102",
    "pet",
    "imagenet",
    "imagenet_c-corruption-<type>-severity-<1..5> (or imagenet_c-<type>-<s>)",
    "imagefolder:<path>",
    "corrupt:<type>-<1..5>:<any name above>",
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset name.

    ``kind`` selects the loader; ``variant`` is its parameter (cifar10/cifar100, a DomainNet domain, a digit
    subset, a folder path); ``corruption``/``severity`` pick an official corrupted file (CIFAR-C,
    ImageNet-C); ``applied`` lists corruptions computed on the fly (``corrupt:``, ``digits_c``).
    """

    name: str
    kind: str
    variant: str | None = None
    corruption: str | None = None
    severity: int | None = None
    applied: tuple[tuple[str, int], ...] = ()


def valid_names_message() -> str:
    return "valid names: " + "; ".join(VALID_NAMES)


def _corruption_and_severity(name: str, rest: str, official: bool) -> tuple[str, int]:
    m = re.fullmatch(r"corruption-([a-z_]+)-severity-(\d+)", rest) or re.fullmatch(r"([a-z_]+)-(\d+)", rest)
    if m is None:
        raise DataError(f"dataset name {name!r}: expected <prefix>-corruption-<type>-severity-<1..5>")
    corruption, severity = m.group(1), int(m.group(2))
    if not 1 <= severity <= 5:
        raise DataError(f"dataset name {name!r}: severity {severity} is not in 1..5")
    if official:
        if corruption not in OFFICIAL_CORRUPTIONS:
            raise DataError(
                f"dataset name {name!r}: unknown corruption {corruption!r}; valid: {', '.join(OFFICIAL_CORRUPTIONS)}"
            )
    else:
        _check_applied(name, corruption)
    return corruption, severity


def _check_applied(name: str, corruption: str) -> None:
    from vitef.data.corruptions import CORRUPTIONS

    if corruption not in CORRUPTIONS:
        raise DataError(
            f"dataset name {name!r}: corruption {corruption!r} has no on-the-fly implementation; "
            f"implemented: {', '.join(sorted(CORRUPTIONS))}"
        )


def parse_name(name: str) -> DatasetSpec:
    """Parse a dataset name (see ``VALID_NAMES``) or raise a :class:`DataError` listing the valid ones."""
    if not isinstance(name, str) or not name:
        raise DataError(f"dataset name {name!r} is empty; {valid_names_message()}")
    if name.startswith("corrupt:"):
        m = re.fullmatch(r"corrupt:([a-z_]+)-(\d+):(.+)", name)
        if m is None:
            raise DataError(f"dataset name {name!r}: write corrupt:<type>-<1..5>:<name>, e.g. corrupt:snow-5:cifar10")
        corruption, severity = _corruption_and_severity(name, f"{m.group(1)}-{m.group(2)}", official=False)
        inner = parse_name(m.group(3))
        return dataclasses.replace(inner, name=name, applied=inner.applied + ((corruption, severity),))
    if name.startswith("imagefolder:"):
        path = name[len("imagefolder:") :]
        if not path:
            raise DataError("dataset name 'imagefolder:' needs a path: imagefolder:/path/to/class_folders")
        return DatasetSpec(name, "imagefolder", variant=path)
    if name in ("cifar10", "cifar100"):
        return DatasetSpec(name, "cifar", variant=name)
    if name in ("flowers102", "pet", "imagenet", "digits"):
        return DatasetSpec(name, name)
    for prefix, kind in (("cifar10_c-", "cifar_c"), ("cifar100_c-", "cifar_c"), ("imagenet_c-", "imagenet_c")):
        if name.startswith(prefix):
            corruption, severity = _corruption_and_severity(name, name[len(prefix) :], official=True)
            variant = prefix[:-3] if kind == "cifar_c" else None
            return DatasetSpec(name, kind, variant=variant, corruption=corruption, severity=severity)
    if name.startswith("digits_c-"):
        corruption, severity = _corruption_and_severity(name, name[len("digits_c-") :], official=False)
        return DatasetSpec(name, "digits", applied=((corruption, severity),))
    if name.startswith("digits_subset-"):
        from vitef.data.digits import parse_digit_subset

        spec = name[len("digits_subset-") :]
        parse_digit_subset(spec)
        return DatasetSpec(name, "digits", variant=spec)
    if name.startswith("domainnet-"):
        domain = name[len("domainnet-") :]
        if domain not in DOMAINNET_DOMAINS:
            raise DataError(f"dataset name {name!r}: unknown DomainNet domain; valid: {', '.join(DOMAINNET_DOMAINS)}")
        return DatasetSpec(name, "domainnet", variant=domain)
    plain = ["digits", "cifar10", "cifar100", "flowers102", "pet", "imagenet", "domainnet-clipart"]
    guess = difflib.get_close_matches(name, plain, n=1)
    hint = f" Did you mean {guess[0]!r}?" if guess else ""
    raise DataError(f"unknown dataset {name!r}.{hint} {valid_names_message()}")


def num_classes(name: str, root: str | os.PathLike | None = None) -> int:
    """Number of classes of the task ``name`` (reads the folder only for ``imagefolder:``)."""
    spec = parse_name(name)
    if spec.kind == "digits":
        return len(spec.variant) if spec.variant else 10
    if spec.kind == "cifar" or spec.kind == "cifar_c":
        return FIXED_CLASSES[spec.variant]
    if spec.kind == "imagenet_c":
        return 1000
    if spec.kind == "imagefolder":
        from vitef.data.datasets import imagefolder_classes

        return len(imagefolder_classes(Path(spec.variant)))
    return FIXED_CLASSES[spec.kind]


def _load_pool(spec: DatasetSpec, split: str, *, root: Path, seed: int, download: bool, digits_size: int):
    """``(source, split indices, num_classes)`` for a parsed name."""
    if spec.kind == "digits":
        from vitef.data.digits import digits_source, parse_digit_subset

        classes = parse_digit_subset(spec.variant) if spec.variant else None
        source = digits_source(digits_size, classes)
        return source, three_way_split(len(source), split), len(classes) if classes else 10
    from vitef.data import datasets

    loader = {
        "cifar": datasets.load_cifar,
        "cifar_c": datasets.load_cifar_c,
        "domainnet": datasets.load_domainnet,
        "flowers102": datasets.load_flowers102,
        "pet": datasets.load_pet,
        "imagenet": datasets.load_imagenet,
        "imagenet_c": datasets.load_imagenet_c,
        "imagefolder": datasets.load_imagefolder,
    }[spec.kind]
    return loader(spec, split, root=root, seed=seed, download=download)


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
) -> VitefDataset:
    """One split of the dataset ``name``: items ``(image (3, size, size) float32, label)``, ``.num_classes``.

    Parameters
    ----------
    name
        A registered name (see ``VALID_NAMES``).
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
    """
    check_split(split)
    spec = parse_name(name)
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither (then `normalize` decides)")
    if mean is None:
        mean, std = resolve_normalization(normalize, model)
    source, indices, n_classes = _load_pool(
        spec, split, root=resolve_root(root), seed=seed, download=download, digits_size=digits_size
    )
    corruption = None
    if spec.applied:
        from vitef.data.corruptions import compose_corruptions

        corruption = compose_corruptions(spec.applied)
    augment = split == "train" if augment is None else augment
    return VitefDataset(
        source,
        np.asarray(indices),
        n_classes,
        ImageTransform(size, augment, mean, std, crop_scale=crop_scale, hflip=hflip),
        corruption=corruption,
        name=name,
        split=split,
    )


def build_loader(
    name: str,
    split: str,
    *,
    batch_size: int,
    size: int = 224,
    shuffle: bool | None = None,
    augment: bool | None = None,
    seed: int = 0,
    num_workers: int = 0,
    normalize: str = "imagenet",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    root: str | os.PathLike | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    download: bool = False,
    model: nn.Module | None = None,
    digits_size: int = 32,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
) -> VitefLoader:
    """A loader over :func:`build_dataset` ``(name, split)`` with ``.num_classes``.

    ``shuffle`` and ``augment`` default to true for the train split only. The order is seeded by ``seed``
    and sharded by ``rank``/``world_size``; pass the loader to :func:`make_iterable` for step-based loops.
    ``device`` (default: CUDA if available) decides pinned memory. Other arguments: see
    :func:`build_dataset`.
    """
    dataset = build_dataset(
        name,
        split,
        size=size,
        augment=augment,
        mean=mean,
        std=std,
        root=root,
        seed=seed,
        download=download,
        normalize=normalize,
        model=model,
        digits_size=digits_size,
        crop_scale=crop_scale,
        hflip=hflip,
    )
    shuffle = split == "train" if shuffle is None else shuffle
    return make_loader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        device=device,
    )
