"""Bundled digits, normalisation, loaders and exact resumption of make_iterable (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from vitef.config import build_config
from vitef.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    build_dataset,
    build_loader,
    make_iterable,
    num_classes,
    resolve_normalization,
    resolve_root,
)
from vitef.errors import ConfigError, DataError


def test_digits_split_sizes_disjoint_and_fixed():
    parts = {s: build_dataset("digits", s, size=32) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in parts.items()} == {"train": 1149, "val": 288, "test": 360}
    idx = {s: set(d.indices.tolist()) for s, d in parts.items()}
    assert not idx["train"] & idx["val"] and not idx["train"] & idx["test"] and not idx["val"] & idx["test"]
    assert len(idx["train"] | idx["val"] | idx["test"]) == 1797
    # Independent of the run seed (a fixed benchmark split), identical on rebuild.
    again = build_dataset("digits", "train", size=32, seed=123)
    np.testing.assert_array_equal(again.indices, parts["train"].indices)
    assert parts["train"].num_classes == 10 == num_classes("digits")


def test_digits_images_are_the_sklearn_digits():
    raw = load_digits()
    ds = build_dataset("digits", "test", size=8, digits_size=8, normalize="none")
    i = 5
    x, y = ds[i]
    src = int(ds.indices[i])
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert y == raw.target[src]
    expected = np.round(raw.images[src] / 16.0 * 255.0) / 255.0
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-6)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_digits_size_and_normalisation():
    ds = build_dataset("digits", "val", size=24, digits_size=32)
    raw = build_dataset("digits", "val", size=24, digits_size=32, normalize="none")
    x, _ = ds[0]
    x0, _ = raw[0]
    assert x.shape == (3, 24, 24)
    assert 0.0 <= x0.min() and x0.max() <= 1.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (x0 - mean) / std, atol=1e-5, rtol=1e-5)


def test_digit_subsets_relabel_in_sorted_order():
    raw = load_digits()
    ds = build_dataset("digits_subset-97865", "train", size=16)
    assert ds.name == "digits_subset-97865" and ds.num_classes == 5 == num_classes("digits_subset-56789")
    assert set(ds.targets.tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(raw.target[ds.source.origin[ds.indices]] - 5, ds.targets)
    low = build_dataset("digits_subset-01234", "test", size=16)
    assert set(raw.target[low.source.origin[low.indices]].tolist()) <= {0, 1, 2, 3, 4}
    n = sum(len(build_dataset("digits_subset-56789", s, size=16)) for s in ("train", "val", "test"))
    assert n == int((raw.target >= 5).sum())


@pytest.mark.parametrize("bad", ["digits_subset-", "digits_subset-1", "digits_subset-112", "digits_subset-1a"])
def test_bad_digit_subsets(bad):
    with pytest.raises(DataError, match="digits_subset"):
        build_dataset(bad, "train", size=16)


def test_unknown_name_and_split_list_valid_choices():
    with pytest.raises(DataError, match=r"unknown dataset 'cifar11'.*cifar10.*imagefolder:<path>"):
        build_dataset("cifar11", "train")
    with pytest.raises(DataError, match="train, val, test"):
        build_dataset("digits", "training")


def test_loader_shapes_classes_and_pinning():
    loader = build_loader("digits", "train", batch_size=32, size=16, seed=0, device="cpu")
    assert loader.num_classes == 10 and not loader.pin_memory
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    ev = build_loader("digits", "test", batch_size=100, size=16)
    labels = torch.cat([b[1] for b in ev])
    np.testing.assert_array_equal(labels.numpy(), ev.dataset.targets)  # eval: natural order, no augmentation


def test_resolve_normalization():
    assert resolve_normalization("imagenet") == (IMAGENET_MEAN, IMAGENET_STD)
    assert resolve_normalization("none") == ((0.0,) * 3, (1.0,) * 3)

    class Model(torch.nn.Module):
        pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    assert resolve_normalization("model", Model()) == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match="needs the model"):
        resolve_normalization("model")


def test_data_config_and_root(monkeypatch, tmp_path):
    cfg = build_config(DataConfig, {"normalize": "none", "num_workers": 0})
    assert cfg.loader_kwargs()["normalize"] == "none"
    with pytest.raises(ConfigError, match="data.normalize"):
        build_config(DataConfig, {"normalize": "imagenet21k"})
    monkeypatch.setenv("VITEF_DATA", str(tmp_path))
    assert resolve_root(None) == tmp_path
    assert resolve_root("elsewhere").name == "elsewhere"
    monkeypatch.delenv("VITEF_DATA")
    assert str(resolve_root(None)) == "datasets"


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


@pytest.mark.parametrize("workers", [0, 2])
def test_make_iterable_resumes_exactly(workers):
    """Kill after k steps, rebuild everything, load the state: the stream equals an uninterrupted one,
    across epoch boundaries (augmentation included), whatever the number of workers."""
    kw = dict(batch_size=20, size=16, seed=7, drop_last=True)
    full = _batches(make_iterable(build_loader("digits_subset-01", "train", num_workers=0, **kw), seed=7), 25)
    first = make_iterable(build_loader("digits_subset-01", "train", num_workers=workers, **kw), seed=7)
    head = _batches(first, 13)  # 11 batches per epoch: stops inside epoch 1
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 2, "seed": 7}
    del first
    resumed = make_iterable(build_loader("digits_subset-01", "train", num_workers=workers, **kw), seed=7)
    resumed.load_state_dict(state)
    _assert_same(head + _batches(resumed, 12), full)
    # Epochs differ in order, and another seed gives another stream.
    assert not torch.equal(full[0][1], full[11][1])
    other = _batches(make_iterable(build_loader("digits_subset-01", "train", num_workers=0, **kw), seed=8), 1)
    assert not torch.equal(other[0][1], full[0][1])


def test_sharded_resume_and_partition():
    kw = dict(batch_size=50, size=8, seed=1, world_size=3)
    per_rank = []
    for rank in range(3):
        it = make_iterable(build_loader("digits", "train", rank=rank, **kw))
        head = _batches(it, 5)
        state = it.state_dict()
        again = make_iterable(build_loader("digits", "train", rank=rank, **kw))
        again.load_state_dict(state)
        tail = _batches(again, 4)
        ref = _batches(make_iterable(build_loader("digits", "train", rank=rank, **kw)), 9)
        _assert_same(head + tail, ref)
        per_rank.append(build_loader("digits", "train", rank=rank, **kw).sampler.epoch_indices(0))
    # The ranks partition the epoch (padded to a multiple of world_size by repeating a few indices).
    assert len({len(p) for p in per_rank}) == 1
    assert set().union(*map(set, per_rank)) == set(range(1149))
    assert sum(map(len, per_rank)) == 1149 + (-1149) % 3


def test_make_iterable_empty_loader_errors():
    it = make_iterable(build_loader("digits", "val", batch_size=1000, size=8, drop_last=True))
    with pytest.raises(DataError, match="no batch"):
        next(it)


def test_crop_scale_and_hflip_settings():
    import random

    from vitef.data.transforms import ImageTransform

    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    # A full-area square crop without flips is exactly the eval transform of a square image.
    full = ImageTransform(24, True, mean, std, crop_scale=(1.0, 1.0), hflip=False)
    plain = ImageTransform(24, False, mean, std)
    for seed in range(5):
        assert torch.equal(full(image, random.Random(seed)), plain(image))
    # With flips on, some of the same draws come out mirrored.
    flipping = ImageTransform(24, True, mean, std, crop_scale=(1.0, 1.0), hflip=True)
    flipped = [not torch.equal(flipping(image, random.Random(s)), plain(image)) for s in range(20)]
    assert any(flipped) and not all(flipped)
    for s in range(20):
        out = flipping(image, random.Random(s))
        assert torch.equal(out, plain(image)) or torch.equal(out, plain(image).flip(-1))
