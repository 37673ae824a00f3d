"""Image transforms and normalisation (arXiv 2602.06883, §3 preprocessing).

Train: ``RandomResizedCrop(size)`` + horizontal flip. Eval: ``Resize(size)`` + ``CenterCrop(size)``. Both
run on ``uint8`` tensors with ``torchvision.transforms.v2`` (resizing a 32-px CIFAR image to 224 px in
uint8 is several times cheaper than on PIL images or float tensors); the image becomes float in [0, 1]
only at the end, then is normalised with ``(x - mean) / std``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from vitef.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


def resolve_normalization(
    normalize: str, model: nn.Module | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` for a ``normalize`` setting.

    Parameters
    ----------
    normalize
        ``"imagenet"`` (the paper's choice), ``"model"`` (the timm model's ``pretrained_cfg`` mean/std;
        Google's ImageNet-21k checkpoints use 0.5/0.5) or ``"none"`` (mean 0, std 1: images stay in [0, 1]).
    model
        The timm model, required for ``"model"``.
    """
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalize == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if normalize == "model":
        if model is None:
            raise ConfigError("normalize='model' needs the model (its pretrained_cfg mean/std): pass model=...")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is None or std is None:
            raise ConfigError(
                f"normalize='model' but {type(model).__name__} has no pretrained_cfg mean/std: "
                "use normalize=imagenet or normalize=none"
            )
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    raise ConfigError(f"normalize={normalize!r} is not one of imagenet, model, none")


def random_resized_crop_box(height: int, width: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area with aspect ratio in ``ratio``
    (log-uniform), the Inception-style crop of ``RandomResizedCrop``; 10 tries, then the central crop
    clamped to ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: int) -> torch.Tensor:
    """The crop ``image[:, top:top+height, left:left+width]`` resized to ``(3, size, size)`` (antialiased
    bilinear, uint8), bit for bit what ``torchvision``'s ``resized_crop(..., antialias=True)`` returns.

    The crop is first copied into a channels-last block of its own: torch's vectorised uint8 resampling
    kernel runs only on such input, and a strided view of the stored image (a crop of an ``H x W x 3``
    array) otherwise takes the generic path, about twice as slow (issue 13: this resize is most of what a
    cached image still costs). The copy is the crop only (at most the stored image).
    """
    crop = image[None, :, top : top + height, left : left + width]  # (1, 3, h, w) view
    crop = crop.contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
    return out[0].contiguous()  # (3, size, size)


class ImageTransform:
    """uint8 ``(3, H, W)`` tensor → normalised float32 ``(3, size, size)``.

    Parameters
    ----------
    size
        Output side in pixels (the model's input size: 224 for the paper's models).
    augment
        Train transform (RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip) if
        true, else Resize(size) (shorter side) + CenterCrop(size).
    mean, std
        Per-channel normalisation applied to the [0, 1] image.
    crop_scale
        Area range of the random crop, as a fraction of the image (default the paper's (0.08, 1)).
    hflip
        Flip horizontally with probability 1/2 when augmenting.
    output
        ``"float"``: the normalised float32 image. ``"uint8"``: the resized uint8 image, to be normalised a
        batch at a time by :attr:`normalizer` (on the GPU in the training loop: a batch then crosses from the
        loader workers and to the device in a quarter of the bytes, and the workers skip the float copies,
        about a third of what a cached image costs them). Both give the same floats, bit for bit.

    The random draws come from a ``random.Random`` passed by the caller (seeded per sample by the loaders,
    so augmentation is reproducible); without one they are seeded from torch's global RNG.
    """

    def __init__(
        self,
        size: int,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        output: str = "float",
    ):
        if output not in ("float", "uint8"):
            raise ConfigError(f"output={output!r} must be float (normalised) or uint8 (normalised later)")
        self.output = output
        if size <= 0:
            raise ConfigError(f"image size={size} must be positive")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale={list(crop_scale)} must be [low, high] with 0 < low <= high <= 1")
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.hflip = hflip
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"mean/std need 3 values each with std > 0, got mean={mean} std={std}")
        self.size = size
        self.augment = augment
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift: one multiply-subtract on the uint8 → float copy.
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t

    def __call__(self, image: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, image.shape
        size = [self.size, self.size]
        if self.augment:
            if rng is None:
                rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
            top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], rng, scale=self.crop_scale)
            out = resized_crop(image, top, left, h, w, self.size)  # (3, size, size) uint8
            # Draw the flip coin even when flips are off, so crops do not depend on the flip setting.
            if rng.random() < 0.5 and self.hflip:
                out = TF.horizontal_flip(out)
        else:
            out = TF.center_crop(TF.resize(image, self.size, antialias=True), size)
        if self.output == "uint8":
            return out.contiguous()
        return out.to(torch.float32).mul_(self.scale).sub_(self.shift)

    @property
    def normalizer(self) -> Normalizer:
        """The normalisation of this transform's float output, for its uint8 output (``output="uint8"``)."""
        return Normalizer(self.scale, self.shift)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, augment={self.augment}, output={self.output})"


class Normalizer:
    """uint8 images ``(..., 3, H, W)`` → normalised float32, on their device: ``x * scale - shift`` with
    ``scale = 1 / (255 std)`` and ``shift = mean / std``, the two operations :class:`ImageTransform` applies to
    one image, so a batch normalised here equals the stack of its float outputs bit for bit."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        self.scale = scale  # (3, 1, 1)
        self.shift = shift  # (3, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalizer takes uint8 images, got {images.dtype}")
        if images.device not in self._on:
            self._on[images.device] = (self.scale.to(images.device), self.shift.to(images.device))
        scale, shift = self._on[images.device]
        return images.to(torch.float32).mul_(scale).sub_(shift)
