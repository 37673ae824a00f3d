"""Small datasets written in the REAL on-disk formats the loaders read (no network, no download)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_cifar(root: Path, name: str = "cifar10", per_batch: int = 20, n_test: int = 30, seed: int = 0) -> None:
    """torchvision's CIFAR layout: python pickle batches of (N, 3072) uint8 rows + label lists, and meta."""
    rng = np.random.default_rng(seed)
    n_classes = 10 if name == "cifar10" else 100

    def dump(path: Path, n: int, label_key: str) -> None:
        entry = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, n_classes, n).tolist(),
        }
        path.write_bytes(pickle.dumps(entry))

    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True)
        for i in range(1, 6):
            dump(base / f"data_batch_{i}", per_batch, "labels")
        dump(base / "test_batch", n_test, "labels")
        (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True)
        dump(base / "train", 5 * per_batch, "fine_labels")
        dump(base / "test", n_test, "fine_labels")
        (base / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def write_cifar_c(root: Path, corruption: str = "snow", n: int = 50, folder: str = "CIFAR-10-C", classes: int = 10):
    """The official CIFAR-C layout: <corruption>.npy of 5*n uint8 NHWC images (severity-major) + labels.npy."""
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    images = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
    for s in range(5):
        # Severity s is recognisable: every pixel of its block equals 10 * (s + 1) plus the image's index mod 7.
        images[s * n : (s + 1) * n] = (10 * (s + 1) + np.arange(n) % 7)[:, None, None, None]
    np.save(base / f"{corruption}.npy", images)
    np.save(base / "labels.npy", np.tile(np.arange(n) % classes, 5).astype(np.uint8))
    return base


def write_image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    arr[0, 0] = (255 - value, value // 2, 7)
    Image.fromarray(arr).save(path)


def write_class_folders(base: Path, classes: list[str], per_class: int, ext: str = ".jpg") -> None:
    for c, cls in enumerate(classes):
        for i in range(per_class):
            write_image(base / cls / f"{cls}_{i:03d}{ext}", 20 * c + i)


def write_flowers(root: Path, per_split: int = 4) -> None:
    """torchvision's Flowers102 layout: flowers-102/jpg/image_XXXXX.jpg + imagelabels.mat + setid.mat."""
    from scipy.io import savemat

    base = root / "flowers-102"
    n = 3 * per_split
    for i in range(1, n + 1):
        write_image(base / "jpg" / f"image_{i:05d}.jpg", 10 * i)
    savemat(base / "imagelabels.mat", {"labels": np.array([(i % 102) + 1 for i in range(n)])})
    ids = np.arange(1, n + 1)
    savemat(
        base / "setid.mat",
        {"trnid": ids[:per_split], "valid": ids[per_split : 2 * per_split], "tstid": ids[2 * per_split :]},
    )


PET_BREEDS = ["Abyssinian", "beagle", "Bengal"]


def write_pet(root: Path, trainval: int = 20, test: int = 6) -> None:
    """torchvision's Oxford-IIIT Pet layout: images/<Breed>_<n>.jpg + annotations/{trainval,test}.txt."""
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, count, offset in (("trainval", trainval, 0), ("test", test, 1000)):
        lines = []
        for i in range(count):
            b = i % len(PET_BREEDS)
            image_id = f"{PET_BREEDS[b]}_{offset + i}"
            write_image(base / "images" / f"{image_id}.jpg", 5 * i)
            lines.append(f"{image_id} {b + 1} {1 + (b == 1)} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def data_root(tmp_path):
    return tmp_path
