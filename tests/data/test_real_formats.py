"""Each real loader on small data written in its official on-disk format (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.flowers102 as tv_flowers
from conftest import write_cifar, write_cifar_c, write_class_folders, write_flowers, write_image, write_pet

from vitef.data import build_dataset, build_loader, num_classes
from vitef.errors import DataError


@pytest.fixture
def no_md5(monkeypatch):
    """Bypass ONLY torchvision's md5 checks (our generated files cannot match the official checksums)."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_flowers, "check_integrity", lambda path, md5=None: __import__("os").path.isfile(path))


def _indices(ds):
    return set(ds.indices.tolist())


def _assert_partition(parts, n):
    a, b, c = (_indices(p) for p in parts)
    assert not a & b and not a & c and not b & c
    assert len(a | b | c) == n


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(data_root, no_md5, name):
    write_cifar(data_root, name, per_batch=20, n_test=30)
    kw = dict(root=data_root, size=32, normalize="none", seed=3)
    train, val, test = (build_dataset(name, s, **kw) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (80, 20, 30)
    assert not _indices(train) & _indices(val) and len(_indices(train) | _indices(val)) == 100
    assert train.num_classes == num_classes(name) == (10 if name == "cifar10" else 100)
    # The run seed drives the train/val split (PROTOCOL §3); the same seed reproduces it.
    np.testing.assert_array_equal(build_dataset(name, "train", **kw).indices, train.indices)
    assert _indices(build_dataset(name, "train", **{**kw, "seed": 4})) != _indices(train)
    # Pixels and labels are those of the pickle (eval transform at 32 px is the identity).
    ref = tv_cifar.CIFAR10(str(data_root)) if name == "cifar10" else tv_cifar.CIFAR100(str(data_root))
    x, y = val[0]
    src = int(val.indices[0])
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy() * 255, ref.data[src], atol=1e-3)
    assert y == ref.targets[src]
    loader = build_loader(name, "train", batch_size=16, size=48, root=data_root, seed=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 48, 48) and yb.shape == (16,) and loader.num_classes == train.num_classes


def test_cifar_truncated_batch_is_reported(data_root, no_md5):
    write_cifar(data_root)
    batch = data_root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match=r"cifar-10-batches-py.* is corrupt or truncated \(UnpicklingError"):
        build_dataset("cifar10", "train", root=data_root)


def test_cifar_checksum_failure_is_reported(data_root):
    write_cifar(data_root)  # real layout, but not the official bytes: torchvision's md5 check fails
    with pytest.raises(DataError, match="integrity check failed"):
        build_dataset("cifar10", "test", root=data_root)


def test_cifar_c_npy_layout_and_fixed_splits(data_root):
    write_cifar_c(data_root, "snow", n=50)
    parts = [build_dataset("cifar10_c-corruption-snow-severity-4", s, root=data_root, size=32, normalize="none")
             for s in ("train", "val", "test")]  # fmt: skip
    assert [len(p) for p in parts] == [32, 8, 10]  # 50 → 40 / 10, 40 → 32 / 8
    _assert_partition(parts, 50)
    # Severity 4 is the 4th block of 10k (here n) images; labels from labels.npy.
    x, y = parts[2][0]
    i = int(parts[2].indices[0])
    assert torch.allclose(x * 255, torch.full_like(x, 40 + i % 7), atol=1e-3) and y == i % 10
    # Fixed split (seed 42): independent of the run seed; the short name is the same dataset.
    again = build_dataset("cifar10_c-snow-4", "train", root=data_root, seed=99)
    np.testing.assert_array_equal(again.indices, parts[0].indices)
    write_cifar_c(data_root, "contrast", n=50, folder="CIFAR-100-C", classes=100)
    assert build_dataset("cifar100_c-contrast-1", "test", root=data_root).num_classes == 100


def test_cifar_c_missing_and_truncated(data_root):
    with pytest.raises(DataError, match=r"not found: looked at '.*CIFAR-10-C/motion_blur.npy'.*zenodo"):
        build_dataset("cifar10_c-motion_blur-5", "test", root=data_root)
    base = write_cifar_c(data_root, "snow", n=50)
    raw = (base / "snow.npy").read_bytes()
    (base / "snow.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        build_dataset("cifar10_c-snow-5", "test", root=data_root)
    with pytest.raises(DataError, match="unknown corruption 'sun'"):
        build_dataset("cifar10_c-sun-5", "test", root=data_root)


def test_domainnet_folders(data_root):
    write_class_folders(data_root / "domainnet" / "sketch", ["aircraft_carrier", "zebra", "bee"], per_class=10)
    parts = [build_dataset("domainnet-sketch", s, root=data_root, size=24) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [19, 5, 6]  # 30 → 24 / 6, 24 → 19 / 5
    _assert_partition(parts, 30)
    x, y = parts[0][0]
    assert x.shape == (3, 24, 24) and parts[0].num_classes == 3
    # Classes in sorted folder order.
    assert parts[0].source.paths[0].split("/")[-2] == "aircraft_carrier" and parts[0].source.targets[0] == 0
    with pytest.raises(DataError, match=r"domainnet-clipart.*domainnet/clipart.*ai.bu.edu"):
        build_dataset("domainnet-clipart", "train", root=data_root)


def test_imagenet_and_imagenet_c_folders(data_root):
    write_class_folders(data_root / "imagenet" / "val", ["n01440764", "n01443537"], per_class=3)
    for split in ("val", "test"):
        ds = build_dataset("imagenet", split, root=data_root, size=16)
        assert len(ds) == 6 and ds.num_classes == 2
    with pytest.raises(DataError, match=r"imagenet/train.*ILSVRC2012_img_train.tar.*image-net.org"):
        build_dataset("imagenet", "train", root=data_root)
    write_class_folders(data_root / "ImageNet-C" / "fog" / "3", ["n01440764", "n01443537"], per_class=10)
    parts = [build_dataset("imagenet_c-corruption-fog-severity-3", s, root=data_root, size=16)
             for s in ("train", "val", "test")]  # fmt: skip
    assert [len(p) for p in parts] == [12, 4, 4]
    _assert_partition(parts, 20)


def test_imagefolder_flat_and_split_layouts(data_root):
    flat = data_root / "flat"
    write_class_folders(flat, ["a", "b"], per_class=5, ext=".png")
    parts = [build_dataset(f"imagefolder:{flat}", s, size=30, normalize="none") for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [6, 2, 2] and num_classes(f"imagefolder:{flat}") == 2
    x, y = parts[0][0]  # PNG is lossless: the pixel values come back exactly (40x30 → resize 30 → crop 30)
    assert x.shape == (3, 30, 30) and 0 <= x.min() and x.max() <= 1
    split = data_root / "split"
    write_class_folders(split / "train", ["a", "b", "c"], per_class=5, ext=".png")
    write_class_folders(split / "test", ["a", "b", "c"], per_class=2, ext=".png")
    tr, va, te = (build_dataset(f"imagefolder:{split}", s, size=16) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (12, 3, 6) and te.num_classes == 3
    write_class_folders(split / "val", ["a", "b"], per_class=1, ext=".png")
    with pytest.raises(DataError, match="differ from those of train"):
        build_dataset(f"imagefolder:{split}", "val", size=16)
    with pytest.raises(DataError, match="not found"):
        build_dataset(f"imagefolder:{data_root / 'nope'}", "train")


def test_corrupt_image_file_is_reported(data_root):
    base = data_root / "bad"
    write_class_folders(base, ["a", "b"], per_class=5)
    victim = sorted((base / "a").iterdir())[0]
    victim.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    for split in ("train", "val", "test"):
        ds = build_dataset(f"imagefolder:{base}", split, size=16)
        paths = [ds.source.paths[i] for i in ds.indices]
        if str(victim) in paths:
            with pytest.raises(DataError, match="corrupt or not an image"):
                ds[paths.index(str(victim))]
            ds[paths.index(str(victim)) - 1]  # the other images still load
            return
    raise AssertionError("victim not in any split")


def test_flowers102_official_splits(data_root, no_md5):
    write_flowers(data_root, per_split=4)
    parts = [build_dataset("flowers102", s, root=data_root, size=20) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [4, 4, 4] and parts[0].num_classes == 102
    assert parts[1].targets.tolist() == [(i % 102) for i in range(4, 8)]  # setid 'valid', labels 1-based on disk
    x, _ = parts[2][0]
    assert x.shape == (3, 20, 20)


def test_pet_trainval_split_by_run_seed(data_root):
    write_pet(data_root, trainval=20, test=6)
    tr, va, te = (build_dataset("pet", s, root=data_root, size=20, seed=1) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (16, 4, 6) and tr.num_classes == 37
    assert not _indices(tr) & _indices(va)
    assert te.targets.tolist() == [i % 3 for i in range(6)]
    assert _indices(build_dataset("pet", "train", root=data_root, seed=2)) != _indices(tr)


def test_corrupt_prefix_applies_to_any_dataset(data_root):
    write_cifar_c(data_root, "snow", n=50)
    clean = build_dataset("cifar10_c-snow-1", "test", root=data_root, size=32, normalize="none")
    noisy = build_dataset("corrupt:gaussian_noise-5:cifar10_c-snow-1", "test", root=data_root, size=32,
                          normalize="none")  # fmt: skip
    np.testing.assert_array_equal(noisy.indices, clean.indices)
    a, b = clean[0][0], noisy[0][0]
    assert (a - b).abs().mean() > 0.02 and torch.equal(noisy[0][0], b)  # corrupted, and the same every time
    with pytest.raises(DataError, match="no on-the-fly implementation"):
        build_dataset("corrupt:frost-3:digits", "test")


def test_write_image_helper_roundtrip(tmp_path):
    # Guards the fixtures themselves: what we write is what torchvision decodes.
    from vitef.data.datasets import read_image

    write_image(tmp_path / "x.png", 77)
    img = read_image(tmp_path / "x.png")
    assert img.shape == (3, 30, 40) and int(img[0, 5, 5]) == 77
