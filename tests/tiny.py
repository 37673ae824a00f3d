"""The tests' tiny models and the configs around them, in one place.

- ``TINY_MODEL``: the model config of the app tests (train, eval, probing, bad inputs): vit_tiny_patch16_224 cut
  to 2 blocks, 32 wide, 2 heads, with 8 px patches on 16 px digits (4 patches and the class token). It builds in
  milliseconds and trains a step in a few. ``tiny_vit`` builds it as the apps do, ``tiny_train`` is a training
  config around it, ``TINY_ARGV`` the same model as command-line overrides.
- ``random_vit``: a seeded timm VisionTransformer, for library tests that need a model but no config.
- ``SWEEP_ARCH``, ``sweep_train_overrides`` and ``digits_train_sweep``: smaller still, for sweep tests that
  train several runs.
- ``FAMILY_CASES``, ``family_model`` and ``perturb_family``: timm's other families (Eva: DINOv3, EVA-02, mixed
  RoPE; Beit) and a ViT with LayerScale, 2 blocks on 28-32 px images, one case per layout the component registry
  must know, for the family tests of the registry and of vitef.bounds.

Test files import it as ``from tiny import ...``: pytest puts tests/ on sys.path when it loads tests/conftest.py
(no __init__.py, the default prepend import mode). Every helper returns a fresh copy, so a test that edits its
config cannot change another's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

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


# Other families at a small size: 2 blocks, 64 wide (EVA-02 tiny keeps its 192), 2 heads, 4 patches per image.
FAMILY_SMALL = {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}
# key -> (timm name, kwargs): one case per layout the component registry must know.
FAMILY_CASES: dict[str, tuple[str, dict]] = {
    # RoPE (half rotation), 4 registers + CLS, LayerScale gamma_1/gamma_2, fused qkv without bias, plain MLP.
    "dinov3": ("vit_small_patch16_dinov3", FAMILY_SMALL),
    # RoPE (interleaved), fused qkv with q_bias/v_bias, packed SwiGLU (GluMlp fc1), patch 14.
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}),
    # EVA-02 CLIP: separate q_proj/k_proj/v_proj, scale norm attn.norm, SwiGLU fc1_g/fc1_x with mlp.norm.
    "eva02_clip": ("eva02_base_patch16_clip_224", FAMILY_SMALL),
    # EVA-02 with timm kwargs: LayerScale on the attention branch only (no gamma_2), split SwiGLU.
    "eva02_kwargs": (
        "eva02_tiny_patch14_224",
        {
            "img_size": 28,
            "depth": 2,
            "qkv_fused": False,
            "scale_mlp": True,
            "init_values": 0.1,
            "attn_only_layer_scale": True,
        },
    ),
    # Mixed RoPE (learnable frequencies rope.freqs, one embedding per block and per head), timm's AttentionRope.
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", FAMILY_SMALL),
    # BEiT: a relative position bias table in every block, gamma_1/gamma_2, no absolute position embedding.
    "beit": ("beit_base_patch16_224", FAMILY_SMALL),
    # BEiT with one relative position bias shared by all blocks (rel_pos_bias.*), none of their own.
    "beit_shared": (
        "beit_base_patch16_224",
        {**FAMILY_SMALL, "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False},
    ),
    # Both: the shared bias adds to each block's own.
    "beit_both": ("beit_base_patch16_224", {**FAMILY_SMALL, "use_shared_rel_pos_bias": True}),
    # The paper's family, for reference: the same tests hold for a VisionTransformer with LayerScale.
    "vit": ("vit_small_patch14_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 64, "num_heads": 2}),
}
# The registry's family (vitef.models.model_family) of every case.
FAMILY_OF = {"dinov3": "eva", "eva02": "eva", "eva02_clip": "eva", "eva02_kwargs": "eva", "rope_mixed": "eva",
             "beit": "beit", "beit_shared": "beit", "beit_both": "beit", "vit": "vit"}  # fmt: skip


def family_model(key: str) -> nn.Module:
    """The case ``key`` of ``FAMILY_CASES`` as timm creates it: float32, training mode, initialised from torch's
    global generator (the caller seeds it)."""
    name, kwargs = FAMILY_CASES[key]
    return timm.create_model(name, pretrained=False, **kwargs)


def perturb_family(model: nn.Module, *, seed: int, table_scale: float) -> nn.Module:
    """Replace every parameter of ``model`` by seeded Gaussian noise, in place, in the parameters' own dtype.

    timm's initial values (LayerScale gains, relative position bias tables, q/v biases, norms at γ = 1, β = 0)
    would hide whether a computation uses them. Gains and norm weights become 1 + 0.3 N(0, 1), relative position
    bias tables ``table_scale`` N(0, 1), other matrices 0.1 N(0, 1), everything else (biases, tokens) 0.3 N(0, 1).
    The noise comes from a generator seeded with ``seed``, one draw per parameter in ``named_parameters`` order.
    Returns ``model``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "relative_position_bias_table" in name:
                p.copy_(table_scale * noise)
            elif p.ndim >= 2:
                p.copy_(0.1 * noise)
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma_1", "gamma_2")):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return model


def untimed(result: dict) -> dict:
    """A run's eval.json without its measured speed (``images_per_s``): the part that two runs of one config, or a
    run and its resumed self, share bit for bit."""
    return {k: v for k, v in result.items() if k != "images_per_s"}
