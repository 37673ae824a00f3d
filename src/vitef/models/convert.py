"""Conversion of foreign ViT checkpoints to timm parameter names.

The paper's models are Google's ImageNet-21k ViTs (arXiv 2602.06883, §4). They exist in timm layout
(``vit_*_patch*_224.orig_in21k``) and in Hugging Face transformers layout (``google/vit-*-in21k``).
Checkpoints in transformers layout are turned into timm state dicts by a pure key remap: nothing is
loaded or guessed, and any key the remap does not expect — or any expected key that is absent — is an
error listing them all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vitef.errors import ModelError


@dataclass(frozen=True)
class HFViTArch:
    """The architecture fields of a transformers ``ViTConfig`` that timm needs."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    img_size: int
    patch_size: int
    in_chans: int
    qkv_bias: bool
    eps: float
    num_labels: int  # classes of the head the config describes; 0 for a model without one (ViTModel)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HFViTArch:
        """Read a transformers ``config.json`` dict (``model_type`` must be ``vit``)."""
        if config.get("model_type", "vit") != "vit":
            raise ModelError(f"config.json has model_type={config.get('model_type')!r}; only 'vit' is supported")
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ModelError(f"config.json has hidden_act={act!r}; timm's ViT uses exact 'gelu'")
        try:
            img = config.get("image_size", 224)
            patch = config.get("patch_size", 16)
            return cls(
                embed_dim=int(config["hidden_size"]),
                depth=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                mlp_dim=int(config["intermediate_size"]),
                img_size=int(img if not isinstance(img, (list, tuple)) else img[0]),
                patch_size=int(patch if not isinstance(patch, (list, tuple)) else patch[0]),
                in_chans=int(config.get("num_channels", 3)),
                qkv_bias=bool(config.get("qkv_bias", True)),
                eps=float(config.get("layer_norm_eps", 1e-12)),
                num_labels=_num_labels(config),
            )
        except KeyError as e:
            raise ModelError(f"config.json lacks the key {e.args[0]!r} needed to build the ViT") from e
        except (TypeError, ValueError) as e:
            raise ModelError(f"config.json has a value of the wrong type for a ViT ({e})") from e


def _num_labels(config: Mapping[str, Any]) -> int:
    """The head size a ``config.json`` describes (only used when no weights say it).

    ``architectures`` tells a classifier from a bare ``ViTModel`` (which may still list labels). A
    classifier's labels are ``id2label``, else ``num_labels``, else transformers' default of two:
    transformers 5 omits both from ``config.json`` when they are the default.
    """
    labels = config.get("id2label")
    count = len(labels) if labels else int(config.get("num_labels") or 0)
    archs = config.get("architectures") or []
    if any(str(a).endswith("ForImageClassification") for a in archs):
        return count or 2
    return 0 if archs else count


# transformers-name suffix (inside encoder.layer.N.) -> timm suffix (inside blocks.N.)
_BLOCK_MAP = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_QKV = ("query", "key", "value")
# The transformers ViTModel pooler (dense + tanh on the CLS token) has no counterpart in timm's ViT:
# Google's in21k checkpoints in timm drop this pre-logits layer, and classification uses the final
# norm's CLS token directly. These keys are dropped by design, not by accident.
_DROPPED = re.compile(r"^pooler\.dense\.(weight|bias)$")


def hf_vit_to_timm(
    state_dict: Mapping[str, torch.Tensor], depth: int, *, qkv_bias: bool = True
) -> dict[str, torch.Tensor]:
    """Rename a transformers ``ViTModel``/``ViTForImageClassification`` state dict to timm names.

    Parameters
    ----------
    state_dict
        transformers tensors, with or without the ``vit.`` prefix of ``ViTForImageClassification``.
    depth
        Number of blocks (``num_hidden_layers``).
    qkv_bias
        Whether query/key/value have biases.

    Returns
    -------
    dict
        timm ``VisionTransformer`` tensors; q/k/v are fused into ``attn.qkv`` (rows ordered q, k, v);
        ``classifier`` becomes ``head`` when present.

    Raises
    ------
    ModelError
        Listing every missing and every unexpected key.
    """
    sd = dict(state_dict)
    prefix = "vit." if any(k.startswith("vit.") for k in sd) else ""
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()

    def take(src: str, dst: str) -> None:
        if src in sd:
            out[dst] = sd[src]
            used.add(src)
        else:
            missing.append(src)

    e = f"{prefix}embeddings."
    take(f"{e}cls_token", "cls_token")
    take(f"{e}position_embeddings", "pos_embed")
    take(f"{e}patch_embeddings.projection.weight", "patch_embed.proj.weight")
    take(f"{e}patch_embeddings.projection.bias", "patch_embed.proj.bias")
    for i in range(depth):
        src_block = f"{prefix}encoder.layer.{i}."
        dst_block = f"blocks.{i}."
        for src, dst in _BLOCK_MAP.items():
            take(f"{src_block}{src}.weight", f"{dst_block}{dst}.weight")
            take(f"{src_block}{src}.bias", f"{dst_block}{dst}.bias")
        kinds = ("weight", "bias") if qkv_bias else ("weight",)
        for kind in kinds:
            names = [f"{src_block}attention.attention.{q}.{kind}" for q in _QKV]
            absent = [n for n in names if n not in sd]
            if absent:
                missing.extend(absent)
                continue
            out[f"{dst_block}attn.qkv.{kind}"] = torch.cat([sd[n] for n in names], dim=0)  # (3D, D) or (3D,)
            used.update(names)
    take(f"{prefix}layernorm.weight", "norm.weight")
    take(f"{prefix}layernorm.bias", "norm.bias")
    if "classifier.weight" in sd:
        take("classifier.weight", "head.weight")
        take("classifier.bias", "head.bias")
    unexpected = sorted(k for k in sd if k not in used and not _DROPPED.match(k.removeprefix(prefix)))
    if missing or unexpected:
        raise ModelError(
            "cannot convert the transformers ViT checkpoint to timm layout: "
            f"missing keys [{', '.join(missing) or 'none'}]; unexpected keys [{', '.join(unexpected) or 'none'}]"
        )
    return out
