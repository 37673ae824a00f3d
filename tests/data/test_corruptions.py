"""Corruptions: in range, deterministic per image, severity monotone (Hendrycks & Dietterich definitions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitef.data import CORRUPTIONS, build_dataset, corrupt
from vitef.data.corruptions import contrast, corrupt_array, gaussian_noise, speckle_noise

REQUIRED = ("contrast", "gaussian_noise", "motion_blur", "snow", "speckle_noise")


@pytest.fixture(scope="module")
def images():
    ds = build_dataset("digits", "test", size=32)
    return [ds.raw_image(i) for i in range(24)]  # uint8 (3, 32, 32) digits rendered at 32 px


def test_required_corruptions_exist():
    assert set(REQUIRED) <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_severity_monotone_in_range_deterministic(images, name):
    dist = []
    for severity in range(1, 6):
        d = []
        for k, img in enumerate(images):
            out = corrupt(img, name, severity, seed=1000 + k)
            assert out.dtype == torch.uint8 and out.shape == img.shape
            d.append((out.float() - img.float()).abs().mean().item())
        dist.append(np.mean(d))
    assert all(b > a for a, b in zip(dist, dist[1:])), (name, dist)
    assert dist[0] > 0
    a = corrupt(images[0], name, 3, seed=5)
    assert torch.equal(a, corrupt(images[0], name, 3, seed=5))


def test_float_outputs_stay_in_range():
    rng = np.random.default_rng(0)
    x = rng.random((40, 40, 3))
    for name in CORRUPTIONS:
        out = corrupt_array(x, name, 5, seed=3)
        assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0, name


def test_definitions_match_direct_formulas():
    x = np.random.default_rng(1).random((16, 16, 3)) * 0.5 + 0.25
    # contrast, CIFAR table severity 2: c = 0.5 around the per-channel mean
    m = x.mean(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(corrupt_array(x, "contrast", 2, 0), (x - m) * 0.5 + m)
    np.testing.assert_allclose(contrast(x, 0.5, None), (x - m) * 0.5 + m)
    # gaussian noise, severity 5: std 0.10 with the image's own generator
    noise = np.random.default_rng(7).normal(0, 0.10, x.shape)
    np.testing.assert_allclose(corrupt_array(x, "gaussian_noise", 5, 7), np.clip(x + noise, 0, 1))
    np.testing.assert_allclose(gaussian_noise(x, 0.1, np.random.default_rng(7)), x + noise)
    noise = np.random.default_rng(7).normal(0, 0.20, x.shape)
    np.testing.assert_allclose(speckle_noise(x, 0.2, np.random.default_rng(7)), x + x * noise)


def test_motion_blur_preserves_constant_and_blurs_edges():
    flat = np.full((20, 20, 3), 0.4)
    np.testing.assert_allclose(corrupt_array(flat, "motion_blur", 5, 0), flat, atol=1e-12)
    edge = np.zeros((20, 20, 3))
    edge[:, 10:] = 1.0
    out = corrupt_array(edge, "motion_blur", 5, 0)
    assert 0.01 < out.mean() < 0.99 and ((out > 0.01) & (out < 0.99)).any()


def test_digits_c_is_seeded_per_image(images):
    ds = build_dataset("digits_c-corruption-gaussian_noise-severity-5", "test", size=32, normalize="none")
    again = build_dataset("digits_c-gaussian_noise-5", "test", size=32, normalize="none")
    assert torch.equal(ds[0][0], again[0][0])  # same image → same corruption, in every build and process
    clean = build_dataset("digits", "test", size=32, normalize="none")
    n0 = ds[0][0] - clean[0][0]
    n1 = ds[1][0] - clean[1][0]
    assert not torch.allclose(n0, n1)  # different images get different noise
    assert ds.num_classes == 10 and len(ds) == 360
