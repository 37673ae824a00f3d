"""The tests' tiny models and the configs around them, in one place.

- ``TINY_MODEL``: the model config of the app tests (train, eval, probing, bad inputs): vit_tiny_patch16_224 cut
  to 2 blocks, 32 wide, 2 heads, with 8 px patches on 16 px digits (4 patches and the class token). It builds in
  milliseconds and trains a step in a few. ``tiny_vit`` builds it as the apps do, ``tiny_train`` is a training
  config around it, ``TINY_ARGV`` the same model as command-line overrides.
- ``random_vit``: a seeded timm VisionTransformer, for library tests that need a model but no config.
- ``SWEEP_ARCH``, ``sweep_train_overrides`` and ``digits_train_sweep``: smaller still, for sweep tests that
  train several runs.

Test files import it as ``from tiny import ...``: pytest puts tests/ on sys.path when it loads tests/conftest.py
(no __init__.py, the default prepend import mode). Every helper returns a fresh copy, so a test that edits its
config cannot change another's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from vitef.models import build_model

ROOT = Path(__file__).resolve().parents[1]

TINY_ARCH = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_MODEL = {"name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 16, "overrides": TINY_ARCH}
# Digits at the model's 16 px, loaded in the test process.
TINY_DATA = {"num_workers": 0, "digits_size": 16}
TINY_ARGV = [
    f"model.name={TINY_MODEL['name']}",
    "model.pretrained=false",
    f"model.img_size={TINY_MODEL['img_size']}",
    "model.overrides={" + ", ".join(f"{k}: {v}" for k, v in TINY_ARCH.items()) + "}",
]

# Four steps of 16 images on the 5 classes of digits_subset-56789, a validation at steps 2 and 4.
_TINY_TRAIN = {
    "dataset_name": "digits_subset-56789",
    "model": TINY_MODEL,
    "data": TINY_DATA,
    "optim": {"lr": 0.05, "warmup_steps": 0},
    "trainable": ["mha"],
    "steps": 4,
    "eval_period": 2,
    "batch_size": 16,
    "eval_batch_size": 64,
    "tensorboard": False,
}


def tiny_train(**over) -> dict:
    """A training config (the apps.vit.train keys) of the tiny model; ``over`` replaces whole top-level keys."""
    return copy.deepcopy({**_TINY_TRAIN, **over})


def tiny_vit(pretrained=False, **kwargs):
    """``TINY_MODEL`` built by vitef.models.build_model (``pretrained``: False or a weights file); ``kwargs``
    go to build_model too (num_classes, ...)."""
    name, img_size = TINY_MODEL["name"], TINY_MODEL["img_size"]
    return build_model(name, pretrained=pretrained, img_size=img_size, **TINY_ARCH, **kwargs)


def random_vit(seed: int = 0, norm_noise: float = 0.0, **kwargs) -> VisionTransformer:
    """A timm VisionTransformer seeded with ``seed``: 16 px inputs, 4 px patches, 32 wide, 2 blocks of 2 heads,
    3 classes, ``kwargs`` over those. It is in training mode, as timm returns it.

    ``norm_noise`` adds Gaussian noise of that scale to every LayerNorm parameter: timm initialises them to
    γ = 1, β = 0, which would hide whether a computation uses them.
    """
    torch.manual_seed(seed)
    model = VisionTransformer(**{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                                 "num_classes": 3, **kwargs})  # fmt: skip
    if norm_noise:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(p + norm_noise * torch.randn_like(p))
    return model


# Sweep tests launch the training app once per run, some in subprocesses: one 16-wide block on 32 px images.
SWEEP_ARCH = {"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}
SWEEP_MODEL = {"name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32, "overrides": SWEEP_ARCH}


def sweep_train_overrides(steps: int, eval_period: int, model: dict | None = None, **more) -> dict:
    """A sweep's ``overrides`` for the training app: ``model`` (by default only ``SWEEP_ARCH``, over the model of
    the sweep's base config), ``steps`` CPU steps of 8 images after one warm-up step, no TensorBoard; ``more``
    adds or replaces keys."""
    overrides = {
        "model": model if model is not None else {"overrides": SWEEP_ARCH},
        "steps": steps,
        "eval_period": eval_period,
        "batch_size": 8,
        "eval_batch_size": 256,
        "device": "cpu",
        "optim.warmup_steps": 1,
        "tensorboard": False,
    }
    return copy.deepcopy({**overrides, **more})


def digits_train_sweep(name: str, root: Path, run_name: str, steps: int, eval_period: int, **more) -> dict:
    """A sweep config of the real training app from apps/vit/configs/digits.yaml with the ``SWEEP_ARCH`` model
    (``sweep_train_overrides(steps, eval_period, **more)``): two runs, one training MHA, one LN1."""
    return {
        "name": name,
        "app": "train",
        "base": [str(ROOT / "apps/vit/configs/digits.yaml")],
        "root": str(root),
        "overrides": sweep_train_overrides(steps, eval_period, **more),
        "grid": {"trainable": [["mha"], ["ln1"]]},
        "run_name": run_name,
    }
