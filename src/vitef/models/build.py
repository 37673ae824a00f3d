"""Building timm ViTs from any of the sources researchers use (arXiv 2602.06883, §4).

``build_model`` accepts a timm name, the paper's short names (``base``/``large``/``huge`` = Google's
ImageNet-21k originals), a Hugging Face hub id or local directory in transformers layout, and an
optional timm-layout ``.safetensors`` file as weights. Whatever the source, the result is a timm
``VisionTransformer``, ``Eva`` (EVA-02, DINOv3) or ``Beit`` whose parameter names the component registry
understands (:data:`vitef.models.components.FAMILIES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vitef.config import option
from vitef.errors import ComponentError, ConfigError, ModelError
from vitef.models.components import model_family
from vitef.models.convert import (
    HFDinov2Arch,
    HFDinov3Arch,
    HFViTArch,
    hf_dinov2_to_timm,
    hf_dinov3_to_timm,
    hf_vit_to_timm,
)
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

    name: str = option(
        "base", "timm ViT name, base/large/huge, HF hub id, local transformers directory, or carded .safetensors file"
    )
    pretrained: bool = option(
        True, "load pretrained weights (false: random init of the architecture; refused when name is a weights file)"
    )
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
        if Path(self.name).suffix == ".safetensors" and not self.pretrained and not self.checkpoint:
            # Naming a weights file and then not loading it is never what was meant: it silently measured a
            # random model (issue 10). Random init of an architecture is asked for by naming the architecture.
            raise ConfigError(
                f"model.name='{self.name}' is a weights file but model.pretrained=false would not read it and "
                "would use random weights: set model.pretrained=true to use the file, or, for a random model of the "
                "same architecture, set model.name (and model.img_size/model.overrides) to the 'model' entry of "
                f"its card '{Path(self.name).with_suffix('.json').name}'"
            )
        try:
            check_overrides(self.overrides, self.name)
        except ModelError as e:
            raise ConfigError(str(e)) from None


def model_label(name: str) -> str:
    """A short file-name-safe label for a model name: a checkpoint file's stem, a directory's name, or the name."""
    path = Path(name).expanduser()
    if path.suffix == ".safetensors":
        name = path.stem
    elif path.is_dir():
        name = path.resolve().name
    return safe_name(name)


def read_card(name: str | os.PathLike) -> dict | None:
    """The JSON card beside a ``.safetensors`` weights file (``apps.vit.pretrain`` writes it), or None.

    None when ``name`` is not a ``.safetensors`` path, has no card, or the card is not a JSON object: the
    callers (reports, plots) describe models, they do not load them (:func:`build_model` checks cards strictly).
    """
    path = Path(name)
    card = path.with_suffix(".json")
    if path.suffix != ".safetensors" or not card.is_file():
        return None
    try:
        data = json.loads(card.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pretraining_step(name: str | os.PathLike) -> int | None:
    """The pretraining step of a snapshot exported by ``apps.vit.pretrain`` (its card's ``step``), else None."""
    step = (read_card(name) or {}).get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def build_model_from_config(cfg: ModelConfig, num_classes: int | None = None) -> nn.Module:
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
) -> nn.Module:
    """Build a timm ``VisionTransformer``, ``Eva`` or ``Beit``.

    Parameters
    ----------
    name
        A timm ViT, Eva or Beit name (``vit_base_patch16_224.orig_in21k``, ``vit_small_patch16_dinov3``,
        ``eva02_tiny_patch14_224``, ``beit_base_patch16_224``), a short name (``base``, ``large``,
        ``huge``), a Hugging Face hub id of a transformers ViT (``google/vit-base-patch16-224-in21k``),
        or a local directory in transformers layout (``config.json`` + ``model.safetensors``), or a
        timm-layout ``.safetensors`` file with a JSON card beside it naming its architecture (as
        ``apps.vit.pretrain`` exports; the card's ``sha256``, when present, is checked before loading).
    pretrained
        ``True`` loads the source's weights (through timm / huggingface_hub and their cache), ``False``
        builds the architecture with random weights, a path loads a timm-layout ``.safetensors`` file.
    num_classes
        ``None`` keeps the head of the weights that are loaded, with its shape taken from them (no head
        when they have none, e.g. a transformers ``ViTModel``); without weights, the head the source
        describes (a card file's head, a transformers config's labels, timm's default). ``0``: no head.
        ``k``: a fresh, randomly initialised ``k``-class head.
    img_size
        Input resolution; the position embedding is interpolated when it differs from pretraining.
    **overrides
        Passed to the timm constructor (``drop_path_rate``, ``patch_size``...): see :func:`check_overrides`.

    Raises
    ------
    ModelError
        Unknown source, unreadable or mismatched weights, or an architecture that cannot be built.
    """
    check_overrides(overrides, name)
    if num_classes is not None and num_classes < 0:
        raise ModelError(f"num_classes={num_classes} must be >= 0 (0: no head)")
    state: dict[str, torch.Tensor] | None = None
    head = num_classes
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        state = _read_safetensors(Path(pretrained))
        use_source_weights = False
        if num_classes is None:
            # Keep the file's head: the head's shape comes from the weights, whatever the source says.
            head = _head_size(state)
    else:
        use_source_weights = bool(pretrained)

    local = Path(name).expanduser()
    if local.suffix == ".safetensors":
        model = _from_card(local, use_source_weights, head, img_size, overrides)
    elif local.is_dir():
        model = _from_transformers_dir(local, use_source_weights, head, img_size, overrides)
    elif "/" in name and not name.startswith(("hf-hub:", "hf_hub:")) and not local.exists():
        model = _from_transformers_hub(name, use_source_weights, head, img_size, overrides)
    else:
        model = _from_timm(SHORT_NAMES.get(name, name), use_source_weights, head, img_size, overrides)
    if state is not None:
        _load_state(model, state, str(pretrained), keep_head=num_classes is None)
    return model


# Constructor arguments that are not the architecture's to override: the head is sized by num_classes
# (or the weights), the resolution by img_size (a duplicate keyword would be a TypeError).
_RESERVED = {
    "num_classes": "the head is sized by the dataset or the weights; remove it from the overrides",
    "img_size": "use model.img_size",
}
# Sizes that must be positive (0 divides by zero deep in timm, negatives make negative shapes).
_POSITIVE = ("patch_size", "embed_dim", "depth", "num_heads", "in_chans", "mlp_ratio")
# timm.create_model keywords that are not VisionTransformer arguments.
_CREATE_MODEL_KEYS = ("pretrained_cfg_overlay",)


def check_overrides(overrides: dict, name: str | None = None) -> None:
    """Check the keys of ``model.overrides`` against the constructor arguments of the model's timm class.

    ``name`` a timm name: its class (``VisionTransformer``, ``Eva`` or ``Beit``); other sources (a file, a
    transformers folder, unknown or no name): any of the three, the constructor then says which key it refuses.

    Raises
    ------
    ModelError
        Naming the first unknown or reserved key, with the closest valid name and the valid ones.
    """
    if not isinstance(overrides, dict):
        raise ModelError(f"model.overrides={overrides!r} must be a mapping, e.g. {{patch_size: 8, depth: 6}}")
    cls = _timm_class(name)
    valid = _override_keys(cls)
    for key in overrides:
        if key in _RESERVED:
            raise ModelError(f"model.overrides has '{key}': {_RESERVED[key]}")
        if key not in valid:
            guess = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            raise ModelError(
                f"model.overrides has an unknown key '{key}' (not an argument of timm's {cls}).{hint} "
                f"Valid keys: {', '.join(valid)}"
            )
        if key in _POSITIVE and not _positive(overrides[key], integer=key != "mlp_ratio", pair=key == "patch_size"):
            kind = "a positive number" if key == "mlp_ratio" else "a positive integer"
            raise ModelError(f"model.overrides.{key}={overrides[key]!r} must be {kind}")


def _positive(value: Any, *, integer: bool, pair: bool) -> bool:
    if pair and isinstance(value, (list, tuple)) and len(value) == 2:
        return all(_positive(v, integer=integer, pair=False) for v in value)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return value > 0


# The timm classes build_model returns, by the timm module that defines their models.
_TIMM_CLASSES: dict[str, type[nn.Module]] = {"vision_transformer": VisionTransformer, "eva": Eva, "beit": Beit}


def _timm_class(name: str | None) -> str:
    """``VisionTransformer``, ``Eva`` or ``Beit`` for a timm name of that class; ``any`` for anything else."""
    if name:
        arch = SHORT_NAMES.get(str(name), str(name)).split(".")[0]
        if timm.is_model(arch):
            for module, cls in _TIMM_CLASSES.items():
                if timm.models.is_model_in_modules(arch, [module]):
                    return cls.__name__
    return "any"


@functools.cache
def _override_keys(cls: str = "VisionTransformer") -> list[str]:
    """Constructor keywords of the timm class ``cls`` (``any``: of any of the three, in a stable order)."""
    classes = list(_TIMM_CLASSES.values()) if cls == "any" else [c for c in _TIMM_CLASSES.values() if c.__name__ == cls]
    keys: list[str] = []
    for c in classes:
        for k in inspect.signature(c.__init__).parameters:
            if k != "self" and k not in _RESERVED and k not in keys:
                keys.append(k)
    return keys + list(_CREATE_MODEL_KEYS)


def _head_size(state: dict[str, torch.Tensor]) -> int:
    """Classes of the head in a timm-layout state dict (0 when it has none)."""
    return int(state["head.weight"].shape[0]) if "head.weight" in state else 0


def _file_head_size(path: Path) -> int:
    """Classes of the head in a timm-layout ``.safetensors`` file, from its header only (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("head.weight").get_shape()[0]) if "head.weight" in f.keys() else 0
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"'{path}' is not a readable .safetensors file ({e}); re-download or re-export it") from e


def _from_card(
    path: Path, pretrained: bool, num_classes: int | None, img_size: int | None, overrides: dict
) -> nn.Module:
    """A self-describing checkpoint: ``x.safetensors`` (timm layout) with its card ``x.json`` beside it.

    The card's ``model`` entry (timm ``name``, ``img_size``, ``overrides``) gives the architecture, as
    written by ``apps.vit.pretrain``; the file's own tensors are the weights when ``pretrained`` (after
    the card's ``sha256`` is checked). Without them, ``num_classes=None`` still sizes the head as the
    file's: the card describes that model, head included.
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
        card = json.loads(card_path.read_text())
        arch = card["model"]
        arch_name = arch["name"]
        arch_overrides = dict(arch.get("overrides") or {})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"card '{card_path}' is not valid: it needs a 'model' entry with a 'name' ({e})") from e
    if Path(arch_name).suffix == ".safetensors":
        raise ModelError(f"card '{card_path}' names another checkpoint as its architecture: give a timm name")
    try:
        check_overrides(arch_overrides, arch_name)
    except ModelError as e:
        raise ModelError(f"card '{card_path}': {e}") from e
    kwargs = {**arch_overrides, **overrides}
    size = img_size or arch.get("img_size")
    if pretrained:
        _check_sha256(path, card.get("sha256"), card_path)
        return build_model(arch_name, pretrained=str(path), num_classes=num_classes, img_size=size, **kwargs)
    head = _file_head_size(path) if num_classes is None else num_classes
    return build_model(arch_name, pretrained=False, num_classes=head, img_size=size, **kwargs)


def _check_sha256(path: Path, expected: Any, card_path: Path) -> None:
    """Compare a weights file with the digest its card recorded (cards without one are not checked)."""
    if not expected:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != str(expected).lower():
        raise ModelError(
            f"'{path}' does not match the sha256 recorded in its card '{card_path}' (file {digest.hexdigest()}, "
            f"card {expected}): the file was modified or damaged. Restore or re-download the file, re-export it "
            "with python -m apps.vit.pretrain (which writes both), or, if the change is intended, put the file's "
            "sha256 in the card"
        )


def _check_vit(model: nn.Module, name: str) -> nn.Module:
    """``model`` if the component registry supports it: a timm ``VisionTransformer``, ``Eva`` or ``Beit``."""
    if not isinstance(model, tuple(_TIMM_CLASSES.values())):
        raise ModelError(
            f"model '{name}' is a {type(model).__name__}, not a timm VisionTransformer, Eva or Beit; vitef's "
            "component registry needs pre-norm blocks with norm1/attn/norm2/mlp (e.g. vit_base_patch16_224, "
            "vit_small_patch16_dinov3, eva02_tiny_patch14_224, beit_base_patch16_224)"
        )
    if len(model.blocks) == 0:
        raise ModelError(f"model '{name}' was built with no blocks (depth=0): give model.overrides.depth >= 1")
    try:
        model_family(model)  # Eva post-norm blocks are refused there
    except ComponentError as e:
        raise ModelError(f"model '{name}': {e}") from None
    if 0 in tuple(model.patch_embed.grid_size):
        raise ModelError(
            f"model '{name}' has a {model.patch_embed.patch_size[0]}-pixel patch, larger than its "
            f"{model.patch_embed.img_size[0]}-pixel input: lower model.overrides.patch_size or raise model.img_size"
        )
    return model


def _build_error(name: str, kwargs: dict, err: Exception) -> ModelError:
    """A constructor failure on user-given arguments (``patch_size: 0``, ``num_heads`` not dividing...)."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "norm_layer")
    first = (str(err).splitlines() or [""])[0][:200]
    return ModelError(
        f"cannot build '{name}' with {args or 'its defaults'} ({type(err).__name__}: {first}): fix model.overrides "
        "/ model.img_size (sizes must be positive, embed_dim divisible by num_heads, patch_size at most img_size)"
    )


# What a constructor raises on impossible sizes: timm and torch check with asserts, divisions and shapes.
_BUILD_ERRORS = (TypeError, ValueError, ZeroDivisionError, AssertionError, RuntimeError)


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
) -> nn.Module:
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
    except Exception as e:
        error = _create_error(name, pretrained, kwargs, e)
        if error is e:
            raise
        raise error from e
    return _check_vit(model, name)


def _create_error(name: str, pretrained: bool, kwargs: dict, err: Exception) -> Exception:
    """Tell apart, after ``timm.create_model`` failed, impossible arguments, unfit weights and no hub access."""
    hub = "huggingface_hub" in type(err).__module__ or isinstance(err, (OSError, ConnectionError))
    if pretrained and hub:
        return _hub_error(name, err)
    if not isinstance(err, _BUILD_ERRORS):
        return err  # a bug, not an input error: keep its traceback
    if not pretrained:
        return _build_error(name, kwargs, err)
    # timm builds, then loads, in one call: building again without weights (on the meta device: no
    # memory, no init cost) says which of the two failed.
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, **kwargs)
    except _BUILD_ERRORS:
        return _build_error(name, kwargs, err)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return ModelError(
        f"the pretrained weights of '{name}' do not fit the architecture built with {args} "
        f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}): drop the model.overrides that change "
        "parameter shapes, or set model.pretrained=false"
    )


def _from_transformers_hub(
    repo_id: str, pretrained: bool, num_classes: int | None, img_size: int | None, overrides: dict
) -> nn.Module:
    from huggingface_hub import hf_hub_download

    try:
        config_path = Path(hf_hub_download(repo_id, "config.json"))
        weights = Path(hf_hub_download(repo_id, "model.safetensors")) if pretrained else None
    except Exception as e:  # offline, unknown repo, or no safetensors file
        raise _hub_error(repo_id, e) from e
    return _build_transformers(config_path, weights, repo_id, num_classes, img_size, overrides)


def _from_transformers_dir(
    path: Path, pretrained: bool, num_classes: int | None, img_size: int | None, overrides: dict
) -> nn.Module:
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
) -> nn.Module:
    """A transformers folder's model in timm layout: ``config.json``'s ``model_type`` picks the family."""
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ModelError(f"{config_path} must hold a JSON object (a transformers ViTConfig)")
    kind = config.get("model_type", "vit")
    if kind in _HF_FAMILIES:
        return _build_hf_family(config, weights, name, num_classes, img_size, overrides)
    if kind != "vit":
        raise ModelError(
            f"{config_path} has model_type={kind!r}; vitef converts transformers folders of model_type 'vit' "
            "(ViTModel, ViTForImageClassification), 'dinov2' (Dinov2Model), 'dinov2_with_registers' "
            "(Dinov2WithRegistersModel) and 'dinov3_vit' (DINOv3ViTModel)"
        )
    arch = HFViTArch.from_config(config)
    state = None
    if weights is not None:
        state = hf_vit_to_timm(_read_safetensors(weights), arch.depth, qkv_bias=arch.qkv_bias)
    head = num_classes
    if head is None:
        # The weights decide (config.json may omit the labels: transformers 5 writes no id2label for its
        # default two); without weights, the config's own description of its head.
        head = _head_size(state) if state is not None else arch.num_labels
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
    try:
        model = _check_vit(VisionTransformer(**kwargs), name)
    except _BUILD_ERRORS as e:
        raise _build_error(name, kwargs, e) from e
    # mlp_ratio is a float; make sure it reproduced the exact hidden width.
    if model.blocks[0].mlp.fc1.out_features != arch.mlp_dim:
        raise ModelError(f"{name}: cannot build an MLP of width {arch.mlp_dim} with embed_dim {arch.embed_dim}")
    if state is not None:
        _load_state(model, state, name, keep_head=num_classes is None)
    return model


# The self-supervised families (issue 14): model_type -> (config reader, key remap, timm class). DINOv2 is a timm
# VisionTransformer (LayerScale, registers, packed SwiGLU for giant), DINOv3 a timm Eva (RoPE, registers, SwiGLU).
_HF_FAMILIES: dict[str, tuple[Any, Any, type[nn.Module]]] = {
    "dinov2": (HFDinov2Arch, hf_dinov2_to_timm, VisionTransformer),
    "dinov2_with_registers": (HFDinov2Arch, hf_dinov2_to_timm, VisionTransformer),
    "dinov3_vit": (HFDinov3Arch, hf_dinov3_to_timm, Eva),
}


def _build_hf_family(
    config: dict,
    weights: Path | None,
    name: str,
    num_classes: int | None,
    img_size: int | None,
    overrides: dict,
) -> nn.Module:
    """A DINOv2 / DINOv3 transformers folder as the timm model of the same architecture (see ``_HF_FAMILIES``).

    These folders hold backbones (a ``*ForImageClassification`` config is refused by its reader), so
    ``num_classes=None`` builds no head and ``k`` a fresh ``k``-class head on the final norm's CLS token, which is
    transformers' ``pooler_output``.
    """
    reader, remap, model_cls = _HF_FAMILIES[config["model_type"]]
    arch = reader.from_config(config)
    state = remap(_read_safetensors(weights), arch) if weights is not None else None
    kwargs: dict[str, Any] = {"img_size": img_size or arch.img_size, "num_classes": num_classes or 0}
    kwargs.update(arch.timm_kwargs())
    kwargs.update(overrides)
    try:
        model = _check_vit(model_cls(**kwargs), name)
    except _BUILD_ERRORS as e:
        raise _build_error(name, kwargs, e) from e
    # mlp_ratio is a float: make sure it gave the config's hidden width (fc2 reads it in every MLP kind).
    width = model.blocks[0].mlp.fc2.in_features
    if not {"mlp_ratio", "embed_dim"} & set(overrides) and width != arch.mlp_dim:
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

        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens  # Beit: no such flag
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
