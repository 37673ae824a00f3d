"""Common image corruptions computed on the fly (arXiv 2602.06883 uses CIFAR-10-C; definitions follow
Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions").

This is an independent numpy implementation of the published definitions and severity parameters. Two
parameter tables exist, as in the benchmark: the CIFAR one (used for images whose shorter side is at most
64 px, e.g. the bundled digits and CIFAR) and the ImageNet one (larger images). Every corruption works on
an RGB float image in [0, 1] of shape (H, W, 3), draws its randomness from a ``numpy.random.Generator``
seeded per image, and returns values in [0, 1]; the public entry point :func:`corrupt` takes and returns a
uint8 ``(3, H, W)`` tensor, like the uint8 files of CIFAR-10-C.

| corruption | definition (c = severity parameter) |
|---|---|
| gaussian_noise | x + N(0, c²) |
| shot_noise | Poisson(x · c) / c |
| impulse_noise | salt-and-pepper noise on a fraction c of the values |
| speckle_noise | x + x · N(0, c²) |
| contrast | (x − m) · c + m, m = per-channel mean |
| brightness | V channel of HSV + c |
| gaussian_blur | Gaussian filter of std c pixels |
| motion_blur | one-sided Gaussian-weighted line blur (radius, sigma) in a random direction |
| snow | zoomed, thresholded, motion-blurred Gaussian flakes added twice; image whitened towards grey |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vitef.errors import DataError

SEVERITIES = (1, 2, 3, 4, 5)

# Severity parameters: (CIFAR table, ImageNet table), five entries each.
PARAMS: dict[str, tuple[Sequence, Sequence]] = {
    "gaussian_noise": ((0.04, 0.06, 0.08, 0.09, 0.10), (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": ((500, 250, 100, 75, 50), (60, 25, 12, 5, 3)),
    "impulse_noise": ((0.01, 0.02, 0.03, 0.05, 0.07), (0.03, 0.06, 0.09, 0.17, 0.27)),
    "speckle_noise": ((0.06, 0.10, 0.12, 0.16, 0.20), (0.15, 0.20, 0.35, 0.45, 0.60)),
    "contrast": ((0.75, 0.5, 0.4, 0.3, 0.15), (0.4, 0.3, 0.2, 0.1, 0.05)),
    "brightness": ((0.05, 0.1, 0.15, 0.2, 0.3), (0.1, 0.2, 0.3, 0.4, 0.5)),
    "gaussian_blur": ((0.4, 0.6, 0.7, 0.8, 1.0), (1, 2, 3, 4, 6)),
    "motion_blur": (((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)), ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),
    # (flake mean, flake std, zoom, threshold, blur radius, blur sigma, image blend)
    "snow": (
        (
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
            (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
            (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ),
        (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
    ),
}
SMALL_IMAGE = 64  # shorter side at or below which the CIFAR table applies


def _gray(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], dtype=x.dtype)


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``x`` moved by (dy, dx) pixels with edge replication: out[i, j] = x[clip(i - dy), clip(j - dx)]."""
    h, w = x.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return x[rows][:, cols]


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """Blur along one direction: a weighted sum of copies shifted by 0..2·radius pixels (weights
    exp(-i²/2σ²)), i.e. the trail an object leaves when moving that way."""
    width = 2 * int(radius) + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma**2))
    weights = weights[weights >= 1e-6]  # negligible taps skipped, then renormalised (weights sum to 1)
    weights /= weights.sum()
    a = math.radians(angle_deg)
    out = np.zeros_like(x)
    for i, wgt in enumerate(weights):
        out += wgt * _shift(x, int(round(i * math.sin(a))), int(round(i * math.cos(a))))
    return out


def _zoom_center(x: np.ndarray, zoom: float) -> np.ndarray:
    """Crop the central 1/zoom of a 2-D array and resize it back to the full size (bilinear)."""
    if zoom == 1:
        return x
    h, w = x.shape
    ch, cw = max(1, math.ceil(h / zoom)), max(1, math.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = torch.from_numpy(np.ascontiguousarray(x[top : top + ch, left : left + cw]))[None, None]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def gaussian_noise(x, c, rng):
    return x + rng.normal(0.0, c, x.shape)


def shot_noise(x, c, rng):
    return rng.poisson(x * c) / c


def impulse_noise(x, c, rng):
    u = rng.random(x.shape)
    out = x.copy()
    out[u < c / 2] = 0.0
    out[(u >= c / 2) & (u < c)] = 1.0
    return out


def speckle_noise(x, c, rng):
    return x + x * rng.normal(0.0, c, x.shape)


def contrast(x, c, rng):
    m = x.mean(axis=(0, 1), keepdims=True)
    return (x - m) * c + m


def brightness(x, c, rng):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(np.clip(x, 0, 1))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return hsv_to_rgb(hsv)


def gaussian_blur(x, c, rng):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(c, c, 0), mode="nearest")


def motion_blur(x, c, rng):
    radius, sigma = c
    return _motion_blur(x, radius, sigma, rng.uniform(-45, 45))


def snow(x, c, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = c
    h, w = x.shape[:2]
    flakes = _zoom_center(rng.normal(loc, scale, (h, w)), zoom)
    flakes[flakes < threshold] = 0
    flakes = _motion_blur(np.clip(flakes, 0, 1)[..., None], radius, sigma, rng.uniform(-135, -45))
    x = blend * x + (1 - blend) * np.maximum(x, _gray(x)[..., None] * 1.5 + 0.5)
    return x + flakes + np.rot90(flakes, 2)


CORRUPTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "contrast": contrast,
    "brightness": brightness,
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "snow": snow,
}


def corrupt_array(x: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt a float (H, W, 3) image in [0, 1]; returns float64 in [0, 1]. Deterministic in ``seed``."""
    if corruption not in CORRUPTIONS:
        raise DataError(f"unknown corruption {corruption!r}; implemented: {', '.join(sorted(CORRUPTIONS))}")
    if severity not in SEVERITIES:
        raise DataError(f"corruption severity {severity} is not in 1..5")
    table = PARAMS[corruption][0 if min(x.shape[:2]) <= SMALL_IMAGE else 1]
    rng = np.random.default_rng(seed)
    out = CORRUPTIONS[corruption](x.astype(np.float64), table[severity - 1], rng)
    return np.clip(out, 0.0, 1.0)


def corrupt(image: torch.Tensor, corruption: str, severity: int, seed: int) -> torch.Tensor:
    """Corrupt a uint8 ``(3, H, W)`` image; returns uint8 ``(3, H, W)`` (rounded, like the CIFAR-C files)."""
    x = image.permute(1, 2, 0).numpy().astype(np.float64) / 255.0
    out = corrupt_array(x, corruption, severity, seed)
    return torch.from_numpy(np.ascontiguousarray((out * 255.0).round().astype(np.uint8).transpose(2, 0, 1)))


class Corruption:
    """A picklable ``(image uint8, seed) → image uint8`` applying corruptions in order (for workers)."""

    def __init__(self, steps: Sequence[tuple[str, int]]):
        for name, severity in steps:
            if name not in CORRUPTIONS:
                raise DataError(f"unknown corruption {name!r}; implemented: {', '.join(sorted(CORRUPTIONS))}")
            if severity not in SEVERITIES:
                raise DataError(f"corruption severity {severity} is not in 1..5")
        self.steps = tuple(steps)

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        for k, (name, severity) in enumerate(self.steps):
            image = corrupt(image, name, severity, seed + k)
        return image

    def __repr__(self) -> str:
        return "Corruption(" + ", ".join(f"{n}-{s}" for n, s in self.steps) + ")"


def compose_corruptions(steps: Sequence[tuple[str, int]]) -> Corruption:
    return Corruption(steps)
