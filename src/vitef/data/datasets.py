"""The datasets of the study, their on-disk layouts and their splits (arXiv 2602.06883, §3; PROTOCOL.md §3).

Paths are relative to the dataset root (``data.root``, else ``$VITEF_DATA``, else ``./datasets``).

Each dataset family is one :class:`~vitef.data.table.DatasetEntry` of the table ``DATASETS`` at the end of
this module (name syntax, classes, loader, splits, layout, source, label and order in results tables); the
list below is generated from it. Splits follow PROTOCOL.md §3 ("80/20" cuts a permutation at floor(0.8 n)).

{split_table}

``corrupt:<type>-<s>:<name>`` is ``<name>`` with a corruption of :mod:`vitef.data.corruptions` applied to each
source image (same splits). Nothing falls back to other data: a missing or corrupt file is a
:class:`~vitef.errors.DataError` naming the dataset, the path, the expected layout and the official source.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitef.data.base import ArraySource, ImageSource, check_split, split_80_20, three_way_split
from vitef.data.table import (
    DatasetEntry,
    DatasetSpec,
    check_applied,
    dataset_entry,
    parse_name,
    register_dataset,
    split_table,
)
from vitef.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

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


def source_of(key: str) -> str:
    """Where to get dataset ``key`` (its table entry's ``source``)."""
    return dataset_entry(key).source


def missing(dataset: str, path: Path, layout: str, source: str, extra: str = "") -> DataError:
    """The one error for absent data: what, where we looked, what we expected, where to get it."""
    return DataError(
        f"dataset {dataset!r} not found: looked at '{path}', expected {layout}. Official source: {source}. "
        f"Put it under the dataset root (data.root=... or $VITEF_DATA){extra}"
    )


def corrupt_file(dataset: str, path: Path | str, why: str) -> DataError:
    return DataError(
        f"dataset {dataset!r}: file '{path}' is corrupt or truncated ({why}); delete it and download or extract "
        "it again"
    )


# ---------------------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 RGB ``(3, H, W)`` tensor (PIL; truncated files are errors)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(f"image file '{path}' is missing: {e}") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise DataError(f"image file '{path}' is corrupt or not an image ({type(e).__name__}: {e}): replace it") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class FileSource(ImageSource):
    """Images stored as files, decoded on access."""

    def __init__(self, paths: list[str], targets: list[int] | np.ndarray):
        self.paths = [str(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.int64)

    def image(self, index: int) -> torch.Tensor:
        return read_image(self.paths[index])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_class_folders(path: Path, dataset: str, layout: str, source: str) -> tuple[list[str], list[str], list[int]]:
    """``(classes, files, labels)`` of a ``<path>/<class>/<image>`` tree; classes sorted by folder name."""
    if not path.is_dir():
        raise missing(dataset, path, layout, source)
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        names = sorted(e.name for e in os.scandir(path / cls) if e.is_file() and _is_image(e.name))
        files += [str(path / cls / n) for n in names]
        labels += [label] * len(names)
    if not files:
        raise missing(dataset, path, layout, source, extra=" (the folder exists but holds no class folder of images)")
    return classes, files, labels


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision)
# ---------------------------------------------------------------------------------------------------------


def _torchvision(dataset: str, folder: Path, layout: str, download: bool, make: Any) -> Any:
    """Instantiate a torchvision dataset, turning its failures into one clear :class:`DataError`."""
    exists = folder.exists()
    if not exists and not download:
        raise missing(dataset, folder, layout, source_of(dataset), extra=", or set data.download=true")
    try:
        return make(download and not exists)
    except RuntimeError as e:
        if exists:
            raise corrupt_file(dataset, folder, f"torchvision's integrity check failed: {e}") from e
        raise missing(dataset, folder, layout, source_of(dataset), extra=f"; the download failed: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise corrupt_file(dataset, folder, f"{type(e).__name__}: {e}") from e
    except OSError as e:  # network errors (URLError is an OSError) and unreadable files
        if exists:
            raise corrupt_file(dataset, folder, f"{type(e).__name__}: {e}") from e
        raise missing(dataset, folder, layout, source_of(dataset), extra=f"; the download failed: {e}") from e


def load_cifar(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    from torchvision.datasets import CIFAR10, CIFAR100

    check_split(split)
    name = spec.kind
    cls, sub = (CIFAR10, "cifar-10-batches-py") if name == "cifar10" else (CIFAR100, "cifar-100-python")
    layout = f"torchvision's '{sub}/' folder of python pickle batches"
    ds = _torchvision(name, root / sub, layout, download, lambda dl: cls(str(root), train=split != "test", download=dl))
    data = np.asarray(ds.data)
    if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.dtype != np.uint8 or len(ds.targets) != len(data):
        raise corrupt_file(name, root / sub, f"expected (N, 32, 32, 3) uint8 images, got {data.shape} {data.dtype}")
    source = ArraySource(data, ds.targets)
    if split == "test":
        return source, np.arange(len(source)), 100 if name == "cifar100" else 10
    train, val = split_80_20(np.arange(len(source)), seed)  # PROTOCOL §3: random 80/20, run seed
    return source, train if split == "train" else val, 100 if name == "cifar100" else 10


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10-C / CIFAR-100-C (.npy)
# ---------------------------------------------------------------------------------------------------------


def load_cifar_c(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    check_split(split)
    key = spec.kind
    folder = root / ("CIFAR-10-C" if key == "cifar10_c" else "CIFAR-100-C")
    layout = f"'{folder.name}/<corruption>.npy' (50000 x 32 x 32 x 3 uint8: severities 1-5 x 10000) and 'labels.npy'"
    images_path, labels_path = folder / f"{spec.corruption}.npy", folder / "labels.npy"
    for path in (images_path, labels_path):
        if not path.is_file():
            raise missing(key, path, layout, source_of(key), extra=" and extract the tar there")
    images = _load_npy(key, images_path)
    labels = _load_npy(key, labels_path)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8 or len(images) % 5:
        raise corrupt_file(key, images_path, f"expected (5*N, 32, 32, 3) uint8, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),):
        raise corrupt_file(key, labels_path, f"expected {len(images)} labels, got shape {labels.shape}")
    n = len(images) // 5
    lo, hi = (spec.severity - 1) * n, spec.severity * n
    n_classes = 10 if key == "cifar10_c" else 100
    targets = np.asarray(labels[lo:hi], dtype=np.int64)
    if targets.min() < 0 or targets.max() >= n_classes:
        raise corrupt_file(key, labels_path, f"labels outside 0..{n_classes - 1}")
    # Copy the severity's slice into memory (30 MB): workers then share it without reopening the file.
    source = ArraySource(np.array(images[lo:hi]), targets)
    return source, three_way_split(n, split), n_classes


def _load_npy(dataset: str, path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise corrupt_file(dataset, path, f"{type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Folder datasets: DomainNet, ImageNet, ImageNet-C, imagefolder
# ---------------------------------------------------------------------------------------------------------


def load_domainnet(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    check_split(split)
    path = root / "domainnet" / spec.variant
    layout = f"'domainnet/{spec.variant}/<class>/<image>.jpg' ({spec.variant}.zip of the official release extracted)"
    classes, files, labels = scan_class_folders(path, f"domainnet-{spec.variant}", layout, source_of("domainnet"))
    if len(classes) != 345:
        logger.warning("domainnet-%s: %d class folders in %s (the official release has 345)", spec.variant,
                       len(classes), path)  # fmt: skip
    return FileSource(files, labels), three_way_split(len(files), split), len(classes)


def load_imagenet_c(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    check_split(split)
    path = root / "ImageNet-C" / spec.corruption / str(spec.severity)
    layout = f"'ImageNet-C/{spec.corruption}/{spec.severity}/<wnid>/<image>.JPEG' (official tars extracted)"
    classes, files, labels = scan_class_folders(path, spec.name, layout, source_of("imagenet_c"))
    return FileSource(files, labels), three_way_split(len(files), split), len(classes)


def load_imagenet(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    check_split(split)
    base = root / "imagenet"
    folder = "train" if split == "train" else "val"
    path = base / folder
    archive = "ILSVRC2012_img_train.tar" if folder == "train" else "ILSVRC2012_img_val.tar"
    layout = (
        f"class folders 'imagenet/{folder}/<wnid>/<image>.JPEG', or the official archives "
        f"'imagenet/{archive}' and 'imagenet/ILSVRC2012_devkit_t12.tar.gz'"
    )
    if not path.is_dir() and (base / archive).is_file() and (base / "ILSVRC2012_devkit_t12.tar.gz").is_file():
        from torchvision.datasets import ImageNet

        logger.info("preparing %s from the official archives in %s (once)", path, base)
        try:
            ImageNet(str(base), split=folder)
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise corrupt_file("imagenet", base, f"{type(e).__name__}: {e}") from e
    classes, files, labels = scan_class_folders(path, "imagenet", layout, source_of("imagenet"))
    return FileSource(files, labels), np.arange(len(files)), len(classes)


def imagefolder_classes(path: Path) -> list[str]:
    """Class names of an ``imagefolder:`` dataset (from ``train/`` when split folders exist)."""
    base = path / "train" if (path / "train").is_dir() else path
    layout = "'<path>/<class>/<image>' or '<path>/{train,val,test}/<class>/<image>'"
    return scan_class_folders(base, f"imagefolder:{path}", layout, "your own data")[0]


def load_imagefolder(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    check_split(split)
    path = Path(spec.variant).expanduser()
    name = spec.name
    layout = "'<path>/<class>/<image>' or '<path>/{train,val,test}/<class>/<image>'"
    if not (path / "train").is_dir():
        classes, files, labels = scan_class_folders(path, name, layout, "your own data")
        return FileSource(files, labels), three_way_split(len(files), split), len(classes)
    classes, files, labels = scan_class_folders(path / "train", name, layout, "your own data")
    if split == "test" or (split == "val" and (path / "val").is_dir()):
        sub = split if (path / split).is_dir() else "val"
        if not (path / sub).is_dir():
            raise missing(name, path / "test", layout, "your own data", extra=" (a test/ or val/ folder is needed)")
        sub_classes, files, labels = scan_class_folders(path / sub, name, layout, "your own data")
        if sub_classes != classes:
            extra = sorted(set(sub_classes) ^ set(classes))[:5]
            raise DataError(f"{name}: class folders of '{path / sub}' differ from those of train/ (e.g. {extra})")
        return FileSource(files, labels), np.arange(len(files)), len(classes)
    train, val = split_80_20(np.arange(len(files)), 42)  # no val/ folder: fixed 80/20 of train/
    return FileSource(files, labels), train if split == "train" else val, len(classes)


# ---------------------------------------------------------------------------------------------------------
# Flowers102 / Oxford-IIIT Pet (torchvision, files decoded by us)
# ---------------------------------------------------------------------------------------------------------


def load_flowers102(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    from torchvision.datasets import Flowers102

    check_split(split)
    layout = "torchvision's 'flowers-102/' (jpg/, imagelabels.mat, setid.mat)"
    ds = _torchvision(
        "flowers102", root / "flowers-102", layout, download, lambda dl: Flowers102(str(root), split=split, download=dl)
    )
    files, labels = [str(p) for p in ds._image_files], list(ds._labels)
    for p in files[:1] + files[-1:]:
        if not Path(p).is_file():
            raise corrupt_file("flowers102", p, "an image listed in setid.mat is missing")
    return FileSource(files, labels), np.arange(len(files)), 102


def load_pet(spec: Any, split: str, *, root: Path, seed: int, download: bool):
    from torchvision.datasets import OxfordIIITPet

    check_split(split)
    layout = "torchvision's 'oxford-iiit-pet/' (images/, annotations/trainval.txt, annotations/test.txt)"
    tv_split = "test" if split == "test" else "trainval"
    ds = _torchvision(
        "pet", root / "oxford-iiit-pet", layout, download, lambda dl: OxfordIIITPet(str(root), tv_split, download=dl)
    )
    files, labels = [str(p) for p in ds._images], list(ds._labels)
    source = FileSource(files, labels)
    if split == "test":
        return source, np.arange(len(files)), 37
    train, val = split_80_20(np.arange(len(files)), seed)  # PROTOCOL §3: trainval 80/20, run seed
    return source, train if split == "train" else val, 37


# ---------------------------------------------------------------------------------------------------------
# Bundled digits (scikit-learn)
# ---------------------------------------------------------------------------------------------------------


def load_digits(spec: Any, split: str, *, root: Path, seed: int, download: bool, digits_size: int = 32):
    """The bundled digits (``variant``: a digit subset such as ``56789``), fixed seed-42 three-way split."""
    from vitef.data.digits import NUM_DIGITS, digits_source, parse_digit_subset

    classes = parse_digit_subset(spec.variant) if spec.variant else None
    source = digits_source(digits_size, classes)
    return source, three_way_split(len(source), split), len(classes) if classes else NUM_DIGITS


# ---------------------------------------------------------------------------------------------------------
# Low-data tasks: fewshot-<k>:<dataset> (PROTOCOL.md §7, the authors' cifar100ld, cifar10ld_c, domainld, ptld)
# ---------------------------------------------------------------------------------------------------------

FEWSHOT_FORM = "fewshot-<k>:<dataset>"
# The authors draw their low-data subsets after NumPy's seed 42 (PROTOCOL.md §7); the legacy generator is what
# `np.random.seed(42)` seeds, so a permutation of the same pool is the same permutation as theirs.
FEWSHOT_SEED = 42


def fewshot_parts(argument: str) -> tuple[int, str]:
    """``"10:cifar100"`` (a parsed ``fewshot-`` argument) → ``(10, "cifar100")``."""
    k, _, inner = argument.partition(":")
    return int(k), inner


def fewshot_split(
    targets: np.ndarray, pool: np.ndarray, k: int, num_classes: int, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` indices of a low-data task drawn from ``pool`` (indices into ``targets``).

    ``pool`` is shuffled with the legacy NumPy generator seeded 42 (independent of the run), train is the first
    ``k`` images of each class in that order, and the rest is cut 80/20 by the run ``seed`` as the paper cuts
    its train pools: val is the 20 %. Raises a :class:`DataError` when a class has fewer than ``k`` images.
    """
    pool = np.sort(np.asarray(pool, dtype=np.int64))
    counts = np.bincount(targets[pool], minlength=num_classes)  # (num_classes,)
    smallest = int(counts.argmin())
    if counts[smallest] == 0:
        raise DataError(
            f"dataset name {name!r}: class {smallest} has no image in the train pool, so no {FEWSHOT_FORM} task "
            "can be drawn from this dataset (every class needs k images)"
        )
    if counts[smallest] < k:
        raise DataError(
            f"dataset name {name!r}: k={k} is larger than the smallest class of the train pool (class {smallest}: "
            f"{counts[smallest]} images); write {FEWSHOT_FORM} with k <= {counts[smallest]}"
        )
    order = pool[np.random.RandomState(FEWSHOT_SEED).permutation(len(pool))]
    labels = targets[order]
    # Rank of each image among the images of its class, in the shuffled order (a stable sort keeps that order).
    by_class = np.argsort(labels, kind="stable")
    sorted_labels = labels[by_class]
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_class] = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    train = np.sort(order[rank < k])
    rest = np.setdiff1d(pool, train, assume_unique=True)
    return train, split_80_20(rest, seed)[1]


def _same_pool(a: ImageSource, b: ImageSource) -> bool:
    """Whether two sources a loader returned for two splits are the same pool (same labels, same files)."""
    if type(a) is not type(b) or len(a) != len(b) or not np.array_equal(a.targets, b.targets):
        return False
    return getattr(a, "paths", None) == getattr(b, "paths", None)


def load_fewshot(spec: Any, split: str, *, root: Path, seed: int, download: bool, **options: Any):
    """``fewshot-<k>:<dataset>``: ``k`` training images per class of ``<dataset>``'s train pool (its train and
    val splits when both index one pool, else its train split), val from the rest (:func:`fewshot_split`),
    ``<dataset>``'s test split unchanged."""
    check_split(split)
    k, inner_name = fewshot_parts(spec.variant)
    inner = parse_name(inner_name)
    entry = dataset_entry(inner.kind)
    options = {key: value for key, value in options.items() if key in entry.load_options}

    def load(inner_split: str) -> tuple[Any, Any, int]:
        return entry.load(inner, inner_split, root=root, seed=seed, download=download, **options)

    if split == "test":
        return load("test")
    source, train, n_classes = load("train")
    val_source, val, _ = load("val")
    pool = np.union1d(train, val) if _same_pool(source, val_source) else np.asarray(train)
    train, val = fewshot_split(source.targets, pool, k, n_classes, seed, spec.name)
    return source, train if split == "train" else val, n_classes


def _fewshot(name: str, arg: str) -> dict[str, Any]:
    m = re.fullmatch(r"(\d+):(.+)", arg, re.DOTALL)
    if m is None:
        raise DataError(
            f"dataset name {name!r}: write {FEWSHOT_FORM}: k images per class (an integer >= 1), a colon, then a "
            "dataset name, e.g. fewshot-10:cifar100"
        )
    k = int(m.group(1))
    if k < 1:
        raise DataError(f"dataset name {name!r}: k={k}: write {FEWSHOT_FORM} with k >= 1 images per class")
    try:
        inner = parse_name(m.group(2))
    except DataError as e:
        raise DataError(f"dataset name {name!r}: write {FEWSHOT_FORM} with <dataset> a dataset name: {e}") from None
    if inner.kind == "fewshot":
        raise DataError(f"dataset name {name!r}: write {FEWSHOT_FORM} with <dataset> a full dataset, not a fewshot one")
    argument = f"{k}:{inner.canonical}"
    return {"variant": argument, "applied": inner.applied, "canonical": argument}


def _fewshot_wraps(arg: str) -> tuple[str, str, str]:
    m = re.fullmatch(r"(\d+):(.+)", arg, re.DOTALL)
    if m is None:
        raise DataError(f"not a {FEWSHOT_FORM} argument: {arg!r}")
    k = int(m.group(1))
    return f"{k}:", m.group(2), f"{k}-shot"


def _fewshot_classes(spec: DatasetSpec, root: Path) -> int:
    inner = parse_name(fewshot_parts(spec.variant)[1])
    return dataset_entry(inner.kind).num_classes(inner, root)


# ---------------------------------------------------------------------------------------------------------
# Name arguments
# ---------------------------------------------------------------------------------------------------------


def parse_corruption(name: str, arg: str, official: bool) -> dict[str, Any]:
    """``corruption-<type>-severity-<s>`` or ``<type>-<s>`` → ``(corruption, severity)``, canonical long form."""
    arg = arg.lower()
    m = re.fullmatch(r"corruption-([a-z_]+)-severity-(\d+)", arg) or re.fullmatch(r"([a-z_]+)-(\d+)", arg)
    if m is None:
        raise DataError(f"dataset name {name!r}: expected <prefix>-corruption-<type>-severity-<1..5>")
    corruption, severity = m.group(1), int(m.group(2))
    if not 1 <= severity <= 5:
        raise DataError(f"dataset name {name!r}: severity {severity} is not in 1..5")
    if official and corruption not in OFFICIAL_CORRUPTIONS:
        raise DataError(
            f"dataset name {name!r}: unknown corruption {corruption!r}; valid: {', '.join(OFFICIAL_CORRUPTIONS)}"
        )
    if not official:
        check_applied(name, corruption)
    return {"corruption": corruption, "severity": severity, "canonical": f"corruption-{corruption}-severity-{severity}"}


def _official_corruption(name: str, arg: str) -> dict[str, Any]:
    return parse_corruption(name, arg, official=True)


def _applied_corruption(name: str, arg: str) -> dict[str, Any]:
    fields = parse_corruption(name, arg, official=False)
    return {"applied": ((fields["corruption"], fields["severity"]),), "canonical": fields["canonical"]}


def corruption_variant(arg: str) -> tuple[str, str]:
    """Results-table key and label of a corruption argument: the paper uses severity 5, so ``snow-5`` and
    ``corruption-snow-severity-5`` are both the row ``snow``; other severities show in the label."""
    m = re.fullmatch(r"(?:corruption-)?([a-z_]+?)(?:-(?:severity-)?(\d))?", arg.lower())
    if m is None:
        return arg, arg
    label = m.group(1).replace("_", " ") + (f" (severity {m.group(2)})" if m.group(2) not in (None, "5") else "")
    return m.group(1), label


def _digit_subset(name: str, arg: str) -> dict[str, Any]:
    from vitef.data.digits import parse_digit_subset

    digits = "".join(str(d) for d in parse_digit_subset(arg))
    return {"variant": arg, "canonical": digits}


def _domain(name: str, arg: str) -> dict[str, Any]:
    domain = arg.lower()
    if domain not in DOMAINNET_DOMAINS:
        raise DataError(f"dataset name {name!r}: unknown DomainNet domain; valid: {', '.join(DOMAINNET_DOMAINS)}")
    return {"variant": domain, "canonical": domain}


def _folder(name: str, arg: str) -> dict[str, Any]:
    if not arg:
        raise DataError("dataset name 'imagefolder:' needs a path: imagefolder:/path/to/class_folders")
    return {"variant": arg}


def _folder_classes(spec: DatasetSpec, root: Path) -> int:
    return len(imagefolder_classes(Path(spec.variant)))


# ---------------------------------------------------------------------------------------------------------
# The table: one entry per dataset family (to add a dataset, write its loader above and an entry here)
# ---------------------------------------------------------------------------------------------------------

_C_SPLITS = (
    "the 10k images of severity s: fixed seed-42 80/20 → 8k train+val / 2k test; train+val 80/20 (seed 42) → "
    "6,400 / 1,600."
)
_DIGITS_SPLITS = "fixed seed-42 80/20 splits, as CIFAR-C (vitef.data.digits): 1,149 / 288 / 360 for all ten."
# The fields every family of the bundled digits shares: its loader, which also takes data.digits_size.
_DIGITS: dict[str, Any] = {"load": load_digits, "load_options": ("digits_size",)}


def _downloadable(key: str, *, home: str, **fields: Any) -> DatasetEntry:
    """The entry of a plain name whose data torchvision downloads; ``home``: the official page."""
    return DatasetEntry(
        key=key, source=f"{home} (torchvision downloads it with data.download=true)", examples=(key,), **fields
    )


def _corrupted(key: str, *, official: bool = True, **fields: Any) -> DatasetEntry:
    """The entry of a family named ``<key>-corruption-<type>-severity-<s>``: the official corrupted copies
    (``official``: CIFAR-C, ImageNet-C files) or corruptions computed on the fly; results tables show severity 5
    as the bare corruption."""
    return DatasetEntry(
        key=key,
        parse=_official_corruption if official else _applied_corruption,
        usage=f"{key}-corruption-<type>-severity-<1..5> (or {key}-<type>-<s>)",
        variant=corruption_variant,
        **fields,
    )


DATASETS = (
    DatasetEntry(
        key="digits",
        **_DIGITS,
        classes=10,
        splits=_DIGITS_SPLITS,
        layout="none: bundled with scikit-learn, rendered at data.digits_size pixels.",
        examples=("digits",),
    ),
    DatasetEntry(
        key="digits_subset",
        **_DIGITS,
        classes=lambda spec, root: len(spec.variant),
        splits="the listed digits only (labels 0..k-1 in digit order), split as digits.",
        parse=_digit_subset,
        usage="digits_subset-<digits> (e.g. digits_subset-01234, digits_subset-56789)",
        examples=("digits_subset-56789", "digits_subset-01234", "digits_subset-97865"),
    ),
    _corrupted(
        "digits_c",
        official=False,
        **_DIGITS,
        classes=10,
        splits="digits with an on-the-fly corruption (vitef.data.corruptions), split as digits.",
        examples=("digits_c-corruption-impulse_noise-severity-5", "digits_c-gaussian_noise-5"),
    ),
    _downloadable(
        "cifar10",
        load=load_cifar,
        classes=10,
        splits="official train (50k) 80/20 by the RUN seed → 40k / 10k; official test 10k.",
        layout="torchvision's 'cifar-10-batches-py/' (downloadable).",
        home="https://www.cs.toronto.edu/~kriz/cifar.html",
        label="CIFAR-10",
        order=0,
    ),
    _downloadable(
        "cifar100",
        load=load_cifar,
        classes=100,
        splits="as cifar10.",
        layout="torchvision's 'cifar-100-python/' (downloadable).",
        home="https://www.cs.toronto.edu/~kriz/cifar.html",
        label="CIFAR-100",
        order=1,
    ),
    _corrupted(
        "cifar10_c",
        load=load_cifar_c,
        classes=10,
        splits=_C_SPLITS,
        layout="'CIFAR-10-C/<type>.npy' (50k uint8 NHWC = severities 1..5 x 10k) + 'labels.npy'.",
        source="https://zenodo.org/records/2535967 (CIFAR-10-C.tar, Hendrycks & Dietterich 2019)",
        label="C10-C",
        order=2,
        examples=("cifar10_c-corruption-snow-severity-5", "cifar10_c-snow-5"),
    ),
    _corrupted(
        "cifar100_c",
        load=load_cifar_c,
        classes=100,
        splits="as cifar10_c.",
        layout="'CIFAR-100-C/<type>.npy' + 'labels.npy', as CIFAR-10-C.",
        source="https://zenodo.org/records/3555552 (CIFAR-100-C.tar, Hendrycks & Dietterich 2019)",
        label="C100-C",
        order=6,
        examples=("cifar100_c-corruption-contrast-severity-5",),
    ),
    DatasetEntry(
        key="domainnet",
        load=load_domainnet,
        classes=345,
        splits="all images of the domain: seed-42 80/20 → train+val / test, then 80/20.",
        layout="'domainnet/<domain>/<class>/*.jpg' (each official domain zip extracted into 'domainnet/').",
        source="https://ai.bu.edu/M3SDA/ (DomainNet, Peng et al. 2019: one zip per domain)",
        label="DomainNet",
        order=3,
        parse=_domain,
        usage=f"domainnet-<{'|'.join(DOMAINNET_DOMAINS)}>",
        examples=("domainnet-clipart", "domainnet-sketch"),
    ),
    _downloadable(
        "flowers102",
        load=load_flowers102,
        classes=102,
        splits="official 1,020 / 1,020 / 6,149.",
        layout="torchvision's 'flowers-102/' (jpg/, imagelabels.mat, setid.mat; downloadable).",
        home="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        label="Flowers102",
        order=4,
    ),
    _downloadable(
        "pet",
        load=load_pet,
        classes=37,
        splits="official trainval (3,680) 80/20 by the RUN seed → 2,944 / 736; test 3,669.",
        layout="torchvision's 'oxford-iiit-pet/' (images/, annotations/{trainval,test}.txt; downloadable).",
        home="https://www.robots.ox.ac.uk/~vgg/data/pets/",
        label="Pet",
        order=5,
    ),
    DatasetEntry(
        key="imagenet",
        load=load_imagenet,
        classes=1000,
        splits="val and test: the 50k ILSVRC-2012 validation images; train: the train set.",
        layout=(
            "'imagenet/val/<wnid>/*.JPEG' (and 'imagenet/train/<wnid>/'), or the official archives "
            "'imagenet/ILSVRC2012_img_val.tar' + 'ILSVRC2012_devkit_t12.tar.gz', unpacked once as torchvision's "
            "ImageNet does."
        ),
        source="https://image-net.org/download.php (ILSVRC-2012; registration needed, no automatic download)",
        label="ImageNet",
        order=7,
        examples=("imagenet",),
    ),
    _corrupted(
        "imagenet_c",
        load=load_imagenet_c,
        classes=1000,
        splits="as CIFAR-C: fixed seed-42 80/20 splits of the 50k images.",
        layout="'ImageNet-C/<type>/<severity>/<wnid>/*.JPEG'.",
        source="https://zenodo.org/records/2235448 (ImageNet-C, Hendrycks & Dietterich 2019)",
        label="IN-C",
        order=8,
        examples=("imagenet_c-corruption-fog-severity-3",),
    ),
    DatasetEntry(
        key="imagefolder",
        load=load_imagefolder,
        classes=_folder_classes,
        splits=(
            "one pool: as DomainNet; train/ val/ test/ folders: as given (no val/ → seed-42 80/20 of train/; "
            "no test/ → val/)."
        ),
        layout="'<path>/<class>/*' or '<path>/{train,val,test}/<class>/*' (an absolute or relative path).",
        parse=_folder,
        sep=":",
        usage="imagefolder:<path>",
        examples=("imagefolder:/data/my_images",),
    ),
    DatasetEntry(
        key="fewshot",
        load=load_fewshot,
        classes=_fewshot_classes,
        splits=(
            "k images per class of <dataset>'s train pool (its train + val; train only when val is another pool, "
            "as ImageNet's): the pool shuffled by NumPy's seed 42, the first k of each class → train; the rest 80/20 "
            "by the RUN seed → val (the 20 %); <dataset>'s test. fewshot-10:cifar100: 1,000 / 9,800 / 10,000."
        ),
        parse=_fewshot,
        wraps=_fewshot_wraps,
        usage=f"{FEWSHOT_FORM} (k images per class, e.g. fewshot-10:cifar100)",
        examples=("fewshot-10:cifar100", "fewshot-10:digits_subset-56789", "fewshot-10:cifar10_c-snow-5"),
        load_options=("digits_size",),
    ),
)

for _entry in DATASETS:
    register_dataset(_entry)

__doc__ = (__doc__ or "").replace("{split_table}", split_table(DATASETS))
