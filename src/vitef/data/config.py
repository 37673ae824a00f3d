"""``DataConfig``: the ``data:`` sub-config every app embeds (arXiv 2602.06883, §3 data protocol)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from vitef.config import option
from vitef.errors import ConfigError

NORMALIZATIONS = ("imagenet", "model", "none")
DEFAULT_ROOT = "./datasets"
ROOT_ENV = "VITEF_DATA"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The dataset root: ``root`` if given, else ``$VITEF_DATA``, else ``./datasets``."""
    if root is None or str(root) == "":
        root = os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    return Path(root).expanduser()


@dataclasses.dataclass
class DataConfig:
    """Where datasets live and how they are loaded (the dataset name itself belongs to the app)."""

    root: str | None = option(None, "dataset root (default: $VITEF_DATA, else ./datasets)")
    normalize: str = option("imagenet", "normalisation: imagenet (the paper's), model (its pretrained mean/std), none")
    num_workers: int = option(2, "DataLoader worker processes (0 = load in the main process)")
    download: bool = option(True, "download CIFAR/Flowers102/Pet into the root when missing (torchvision)")
    digits_size: int = option(32, "side in pixels at which the bundled 8x8 digits are rendered before transforms")
    crop_scale: list[float] = option([0.08, 1.0], "area range [low, high] of the train RandomResizedCrop")
    hflip: bool = option(True, "random horizontal flips when augmenting (off for digits)")
    cache: str | None = option(
        None,
        "folder of the decoded-image cache: file-backed datasets (DomainNet, Flowers102, Pet, ImageNet, imagefolder) "
        "are decoded once, stored with the shorter side at 256 px (for 224-px inputs) and shared by every run; "
        "null: decode images on every access (vitef.data.cache)",
    )

    def validate(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"data.normalize={self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale={list(self.crop_scale)} must be [low, high] with 0 < low <= high <= 1")
        if self.digits_size < 8:
            raise ConfigError(f"data.digits_size={self.digits_size} must be >= 8 (the digits are 8x8 originals)")
        if self.cache is not None:
            if str(self.cache).strip() == "":
                raise ConfigError("data.cache is empty: give a folder (e.g. data.cache=~/.cache/vitef) or null")
            from vitef.data.cache import check_cache_dir

            check_cache_dir(self.cache, writable=False)  # a read-only folder may still hold built entries

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`vitef.data.build_loader` taken from this config."""
        return {
            "root": self.root,
            "normalize": self.normalize,
            "num_workers": self.num_workers,
            "download": self.download,
            "digits_size": self.digits_size,
            "crop_scale": tuple(self.crop_scale),
            "hflip": self.hflip,
            "cache": self.cache,
        }
