"""Image transforms and normalisation (arXiv 2602.06883, §3 preprocessing).

Train: ``RandomResizedCrop(size)`` + horizontal flip. Eval: ``Resize(size)`` + ``CenterCrop(size)``. Both
run on ``uint8`` tensors with ``torchvision.transforms.v2`` (resizing a 32-px CIFAR image to 224 px in
uint8 is several times cheaper than on PIL images or float tensors); the image becomes float in [0, 1]
only at the end, then is normalised with ``(x - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms import v2

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


class ImageTransform:
    """uint8 ``(3, H, W)`` tensor → normalised float32 ``(3, size, size)``.

    Parameters
    ----------
    size
        Output side in pixels (the model's input size: 224 for the paper's models).
    augment
        Train transform (random resized crop + flip) if true, else resize + center crop.
    mean, std
        Per-channel normalisation applied to the [0, 1] image.
    """

    def __init__(self, size: int, augment: bool, mean: Sequence[float], std: Sequence[float]):
        if size <= 0:
            raise ConfigError(f"image size={size} must be positive")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"mean/std need 3 values each with std > 0, got mean={mean} std={std}")
        self.size = size
        self.augment = augment
        if augment:
            self.geometry = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
        else:
            self.geometry = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        # Multiplying by 1/(255 std) folds the uint8 → [0, 1] scaling into the normalisation.
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(3, 1, 1)
        self.shift = (self.mean / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)).view(3, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3, image.shape
        out = self.geometry(image)  # (3, size, size) uint8
        return out.to(torch.float32).mul_(self.scale).sub_(self.shift)

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, augment={self.augment}, geometry={self.geometry})"
