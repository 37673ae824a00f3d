"""Building timm ViTs from any of the sources researchers use (arXiv 2602.06883, §4).

``build_model`` accepts a timm name, the paper's short names (``base``/``large``/``huge`` = Google's
ImageNet-21k originals), a Hugging Face hub id or local directory in transformers layout, and an
optional timm-layout ``.safetensors`` file as weights. Whatever the source, the result is a timm
``VisionTransformer`` whose parameter names the component registry understands.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitef.config import option
from vitef.errors import ConfigError, ModelError
from vitef.models.convert import HFViTArch, hf_vit_to_timm
from vitef.utils import safe_name

logger = logging.getLogger(__name__)

# The paper's models: Google's ImageNet-21k-only checkpoints (PROTOCOL.md §2).
SHORT_NAMES: dict[str, str] = {
    "base": "vit_base_patch16_224.orig_in21k",
    "large": "vit_large_patch16_224.orig_in21k",
    "huge": "vit_huge_patch14_224.orig_in21k",
}


@dataclasses.dataclass
class ModelConfig:
    """Which ViT to build and from which weights."""

    name: str = option("base", "timm ViT name, base/large/huge, HF hub id, or local transformers directory")
    pretrained: bool = option(True, "load pretrained weights (false: random init of the architecture)")
    checkpoint: str | None = option(None, "timm-layout .safetensors file to load instead of the hub weights")
    img_size: int | None = option(None, "input resolution (default: the checkpoint's); pos. embedding is resized")
    overrides: dict = option({}, "extra timm constructor arguments, e.g. {patch_size: 8, depth: 6, embed_dim: 96}")

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("model.name is empty: give a timm ViT name (e.g. vit_base_patch16_224) or base")
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError(f"model.img_size={self.img_size} must be positive")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ConfigError(f"model.checkpoint='{self.checkpoint}' does not exist (give a .safetensors file)")


def model_label(name: str) -> str:
    """A short file-name-safe label for a model name: a checkpoint file's stem, a directory's name, or the name."""
    path = Path(name).expanduser()
    if path.suffix == ".safetensors":
        name = path.stem
    elif path.is_dir():
        name = path.resolve().name
    return safe_name(name)


def build_model_from_config(cfg: ModelConfig, num_classes: int | None = None) -> VisionTransformer:
    """:func:`build_model` from a :class:`ModelConfig`."""
    pretrained: bool | str = cfg.checkpoint if cfg.checkpoint else cfg.pretrained
    return build_model(
        cfg.name, pretrained=pretrained, num_classes=num_classes, img_size=cfg.img_size, **dict(cfg.overrides)
    )


def build_model(
    name: str,
    *,
    pretrained: bool | str | os.PathLike = True,
    num_classes: int | None = None,
    img_size: int | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Build a timm ``VisionTransformer``.

    Parameters
    ----------
    name
        A timm ViT name (``vit_base_patch16_224.orig_in21k``), a short name (``base``, ``large``,
        ``huge``), a Hugging Face hub id of a transformers ViT (``google/vit-base-patch16-224-in21k``),
        or a local directory in transformers layout (``config.json`` + ``model.safetensors``), or a
        timm-layout ``.safetensors`` file with a JSON card beside it naming its architecture (as
        ``apps.vit.pretrain`` exports).
    pretrained
        ``True`` loads the source's weights (through timm / huggingface_hub and their cache), ``False``
        builds the architecture with random weights, a path loads a timm-layout ``.safetensors`` file.
    num_classes
        Replace the head with a fresh linear layer with this many outputs (``0``: no head). ``None``
        keeps the checkpoint's head.
    img_size
        Input resolution; the position embedding is interpolated when it differs from pretraining.
    **overrides
        Passed to the timm constructor (``drop_path_rate``...).
    """
    state: dict[str, torch.Tensor] | None = None
    build_classes = num_classes
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        state = _read_safetensors(Path(pretrained))
        use_source_weights = False
        if num_classes is None:
            # Keep the file's head: size the model's head from it (0 when the file has none).
            build_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    else:
        use_source_weights = bool(pretrained)

    local = Path(name).expanduser()
    if local.suffix == ".safetensors":
        return _from_card(
            local,
            pretrained=state is not None or use_source_weights,
            num_classes=num_classes,
            img_size=img_size,
            overrides=overrides,
            weights=state,
        )
    if local.is_dir():
        model = _from_transformers_dir(local, use_source_weights, build_classes, img_size, overrides)
    elif "/" in name and not name.startswith(("hf-hub:", "hf_hub:")) and not local.exists():
        model = _from_transformers_hub(name, use_source_weights, build_classes, img_size, overrides)
    else:
        model = _from_timm(SHORT_NAMES.get(name, name), use_source_weights, build_classes, img_size, overrides)
    if state is not None:
        _load_state(model, state, str(pretrained), keep_head=num_classes is None)
    return model


def _from_card(
    path: Path,
    *,
    pretrained: bool,
    num_classes: int | None,
    img_size: int | None,
    overrides: dict,
    weights: dict[str, torch.Tensor] | None,
) -> VisionTransformer:
    """A self-describing checkpoint: ``x.safetensors`` (timm layout) with its card ``x.json`` beside it.

    The card's ``model`` entry (timm ``name``, ``img_size``, ``overrides``) gives the architecture, as
    written by ``apps.vit.pretrain``; the file's own tensors are the weights (unless ``pretrained`` is
    false, or other weights are given).
    """
    card_path = path.with_suffix(".json")
    if not path.is_file():
        raise ModelError(f"weights file not found: '{path}'")
    if not card_path.is_file():
        raise ModelError(
            f"'{path}' has no card '{card_path.name}' describing its architecture: pass the timm architecture as "
            f"model.name (e.g. vit_base_patch16_224) and the file as model.checkpoint={path}"
        )
    try:
        arch = json.loads(card_path.read_text())["model"]
        arch_name = arch["name"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelError(f"card '{card_path}' is not valid: it needs a 'model' entry with a 'name' ({e})") from e
    if Path(arch_name).suffix == ".safetensors":
        raise ModelError(f"card '{card_path}' names another checkpoint as its architecture: give a timm name")
    kwargs = {**(arch.get("overrides") or {}), **overrides}
    source: bool | str = str(path) if pretrained and weights is None else False
    model = build_model(
        arch_name, pretrained=source, num_classes=num_classes, img_size=img_size or arch.get("img_size"), **kwargs
    )
    if weights is not None:
        _load_state(model, weights, str(path), keep_head=num_classes is None)
    return model


def _check_vit(model: nn.Module, name: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ModelError(
            f"model '{name}' is a {type(model).__name__}, not a timm VisionTransformer; "
            "vitef's component registry needs blocks with norm1/attn/norm2/mlp (e.g. vit_base_patch16_224)"
        )
    return model


def _hub_error(name: str, err: Exception) -> ModelError:
    from huggingface_hub import constants

    return ModelError(
        f"could not load pretrained weights for '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"Nothing usable is cached in {constants.HF_HUB_CACHE} and the hub cannot be reached. Download the weights "
        "on a machine with network (they are cached there; copy the cache or set HF_HOME), or pass a local file: "
        "model.checkpoint=/path/to/weights.safetensors (timm layout) or model.name=/path/to/transformers_dir"
    )


def _from_timm(
    name: str, pretrained: bool, num_classes: int | None, img_size: int | None, overrides: dict
) -> VisionTransformer:
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        vits = timm.list_models("vit_*")
        guess = difflib.get_close_matches(arch, vits, n=3)
        hint = f" Did you mean {', '.join(guess)}?" if guess else ""
        raise ModelError(
            f"unknown model '{name}'.{hint} Use a timm ViT name (timm.list_models('vit_*')), "
            f"one of {', '.join(SHORT_NAMES)}, a Hugging Face id like google/vit-base-patch16-224-in21k, "
            "or a local transformers directory"
        )
    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError, ValueError, ConnectionError) as e:
        if not pretrained:
            raise
        raise _hub_error(name, e) from e
    except Exception as e:  # huggingface_hub raises its own error classes when offline
        if not pretrained or "huggingface_hub" not in type(e).__module__:
            raise
        raise _hub_error(name, e) from e
    return _check_vit(model, name)


def _from_transformers_hub(
    repo_id: str, pretrained: bool, num_classes: int | None, img_size: int | None, overrides: dict
) -> VisionTransformer:
    from huggingface_hub import hf_hub_download

    try:
        config_path = Path(hf_hub_download(repo_id, "config.json"))
        weights = Path(hf_hub_download(repo_id, "model.safetensors")) if pretrained else None
    except Exception as e:  # offline, unknown repo, or no safetensors file
        raise _hub_error(repo_id, e) from e
    return _build_transformers(config_path, weights, repo_id, num_classes, img_size, overrides)


def _from_transformers_dir(
    path: Path, pretrained: bool, num_classes: int | None, img_size: int | None, overrides: dict
) -> VisionTransformer:
    config_path = path / "config.json"
    weights = path / "model.safetensors"
    if not config_path.is_file():
        raise ModelError(f"'{path}' is not a transformers ViT directory: config.json is missing")
    if pretrained and not weights.is_file():
        bins = [p.name for p in path.glob("*.bin")]
        extra = (
            f" (found {', '.join(bins)}: pickle files are not loaded; re-save with safe_serialization)" if bins else ""
        )
        raise ModelError(f"'{path}' has no model.safetensors{extra}")
    return _build_transformers(
        config_path, weights if pretrained else None, str(path), num_classes, img_size, overrides
    )


def _build_transformers(
    config_path: Path,
    weights: Path | None,
    name: str,
    num_classes: int | None,
    img_size: int | None,
    overrides: dict,
) -> VisionTransformer:
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{config_path} is not valid JSON: {e}") from e
    arch = HFViTArch.from_config(config)
    state = None
    if weights is not None:
        state = hf_vit_to_timm(_read_safetensors(weights), arch.depth, qkv_bias=arch.qkv_bias)
    # A ViTModel checkpoint has no classifier: keep no head unless one is asked for.
    has_head = state is None or "head.weight" in state
    head = (arch.num_labels if has_head else 0) if num_classes is None else num_classes
    kwargs: dict[str, Any] = {
        "img_size": img_size or arch.img_size,
        "patch_size": arch.patch_size,
        "in_chans": arch.in_chans,
        "num_classes": head,
        "embed_dim": arch.embed_dim,
        "depth": arch.depth,
        "num_heads": arch.num_heads,
        "mlp_ratio": arch.mlp_dim / arch.embed_dim,
        "qkv_bias": arch.qkv_bias,
        "norm_layer": functools.partial(nn.LayerNorm, eps=arch.eps),
        "global_pool": "token",
        "class_token": True,
    }
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs)
    # mlp_ratio is a float; make sure it reproduced the exact hidden width.
    if model.blocks[0].mlp.fc1.out_features != arch.mlp_dim:
        raise ModelError(f"{name}: cannot build an MLP of width {arch.mlp_dim} with embed_dim {arch.embed_dim}")
    if state is not None:
        _load_state(model, state, name, keep_head=num_classes is None)
    return model


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file not found: '{path}'")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"'{path}' is not a readable .safetensors file ({e}); re-download or re-export it") from e


def _load_state(model: VisionTransformer, state: dict[str, torch.Tensor], name: str, *, keep_head: bool) -> None:
    """Load a timm-layout state dict strictly, resizing the position embedding when needed."""
    state = dict(state)
    if not keep_head:
        # A fresh head was requested: keep the model's new initialisation.
        for k in [k for k in state if k.startswith("head.")]:
            del state[k]
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
        )
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not (not keep_head and k.startswith("head.")))
    unexpected = sorted(k for k in state if k not in own)
    shape = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or shape:
        details = "; ".join(
            f"{what} [{', '.join(keys)}]"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shape))
            if keys
        )
        raise ModelError(f"weights '{name}' do not fit the model architecture: {details}")
    model.load_state_dict(state, strict=False)


def save_timm_safetensors(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a model's state dict (timm names) as ``.safetensors``, atomically."""
    from safetensors.torch import save_file

    from vitef.utils import atomic_path

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
