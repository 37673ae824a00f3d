"""Conversion of foreign ViT checkpoints to timm parameter names.

The paper's models are Google's ImageNet-21k ViTs (Odonnat et al., arXiv 2602.06883, §4). They exist in
timm layout (``vit_*_patch*_224.orig_in21k``) and in Hugging Face transformers layout
(``google/vit-*-in21k``); so do the self-supervised DINOv2 (``facebook/dinov2-*``, timm
``vit_*_patch14_dinov2``) and DINOv3 (``facebook/dinov3-vit*``, timm's Eva ``vit_*_patch16_dinov3``)
backbones that issue 14 compares them with. Checkpoints in transformers layout are turned into timm
state dicts by a pure key remap: nothing is loaded or guessed, and any key the remap does not expect —
or any expected key that is absent — is an error listing them all.
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


# ---------------------------------------------------------------------------------------------------------------------
# DINOv2 and DINOv3 (issue 14): the self-supervised families beside the paper's supervised ViTs.
#
# transformers writes both in the layout of its original conversion (save_pretrained undoes its load-time renames), so
# the on-disk names below are those of the hub checkpoints (facebook/dinov2-*, facebook/dinov3-vit*) and of any folder
# written by ``save_pretrained``. DINOv2 becomes a timm ``VisionTransformer`` laid out as timm's own
# ``vit_*_patch14_dinov2`` / ``vit_*_patch14_reg4_dinov2``; DINOv3 becomes a timm ``Eva`` laid out as timm's
# ``vit_*_patch16_dinov3``, so a converted folder and the timm-named model of the same size have the same parameters.
# ---------------------------------------------------------------------------------------------------------------------


def _size(value: Any) -> int:
    """An image or patch size of a config: an int, or a square ``[h, w]`` pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ValueError(f"non-square size {list(value)}")
        return int(value[0])
    return int(value)


def _refuse_classifier(config: Mapping[str, Any], kind: str, backbone: str) -> None:
    """Refuse a ``*ForImageClassification`` config: its head has no timm counterpart (see the callers)."""
    archs = [str(a) for a in config.get("architectures") or []]
    heads = [a for a in archs if a.endswith("ForImageClassification")]
    if heads:
        raise ModelError(
            f"config.json describes a {heads[0]}, whose classifier reads [CLS, mean of the patch tokens] (2 x "
            f"hidden_size inputs) and has no counterpart in timm's {kind}: save its backbone alone "
            f"(model.{backbone}.save_pretrained(folder)) and give that folder; vitef adds its own head"
        )


@dataclass(frozen=True)
class HFDinov2Arch:
    """The architecture fields of a transformers ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` that timm needs."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int  # hidden width of the MLP; for SwiGLU, of one of its two branches
    img_size: int
    patch_size: int
    in_chans: int
    qkv_bias: bool
    eps: float
    layerscale: float
    swiglu: bool
    num_reg_tokens: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HFDinov2Arch:
        """Read a transformers ``config.json`` dict (``model_type`` ``dinov2`` or ``dinov2_with_registers``)."""
        kind = config.get("model_type")
        if kind not in ("dinov2", "dinov2_with_registers"):
            raise ModelError(f"config.json has model_type={kind!r}, not 'dinov2' or 'dinov2_with_registers'")
        _refuse_classifier(config, "VisionTransformer", "dinov2" if kind == "dinov2" else "dinov2_with_registers")
        swiglu = bool(config.get("use_swiglu_ffn", False))
        act = config.get("hidden_act", "gelu")
        if not swiglu and act != "gelu":
            # With use_swiglu_ffn transformers ignores hidden_act (SiLU gate); without it, timm's ViT MLP is exact GELU.
            raise ModelError(f"config.json has hidden_act={act!r}; timm's ViT MLP uses exact 'gelu'")
        try:
            embed_dim = int(config["hidden_size"])
            width = int(embed_dim * config.get("mlp_ratio", 4))
            if swiglu:
                # transformers' SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8
                width = (int(width * 2 / 3) + 7) // 8 * 8
            return cls(
                embed_dim=embed_dim,
                depth=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                mlp_dim=width,
                img_size=_size(config.get("image_size", 224)),
                # the two config classes have different default patch sizes
                patch_size=_size(config.get("patch_size", 14 if kind == "dinov2" else 16)),
                in_chans=int(config.get("num_channels", 3)),
                qkv_bias=bool(config.get("qkv_bias", True)),
                eps=float(config.get("layer_norm_eps", 1e-6)),
                layerscale=float(config.get("layerscale_value", 1.0)),
                swiglu=swiglu,
                num_reg_tokens=int(config.get("num_register_tokens", 4)) if kind != "dinov2" else 0,
            )
        except KeyError as e:
            raise ModelError(f"config.json lacks the key {e.args[0]!r} needed to build the DINOv2 ViT") from e
        except (TypeError, ValueError) as e:
            raise ModelError(f"config.json has a value of the wrong type for a DINOv2 ViT ({e})") from e

    def timm_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the timm ``VisionTransformer`` (all but ``img_size`` and ``num_classes``)."""
        from functools import partial

        from timm.layers import SwiGLUPacked
        from torch import nn

        kwargs: dict[str, Any] = {
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            # timm sizes the MLP as int(embed_dim * mlp_ratio); the half unit makes that exact for any width. The
            # packed SwiGLU holds both branches in one fc1 (gate rows first), hence twice the width.
            "mlp_ratio": ((2 if self.swiglu else 1) * self.mlp_dim + 0.5) / self.embed_dim,
            "qkv_bias": self.qkv_bias,
            # LayerScale exists iff init_values is truthy; its value is overwritten by the checkpoint's lambdas
            "init_values": self.layerscale or 1.0,
            "norm_layer": partial(nn.LayerNorm, eps=self.eps),
            "global_pool": "token",
            "class_token": True,
            "reg_tokens": self.num_reg_tokens,
            # as timm's reg4 models: neither the CLS nor the register tokens carry a position embedding; the CLS
            # token's is folded into it by hf_dinov2_to_timm
            "no_embed_class": self.num_reg_tokens > 0,
        }
        if self.swiglu:
            kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        return kwargs


@dataclass(frozen=True)
class HFDinov3Arch:
    """The architecture fields of a transformers ``DINOv3ViTConfig`` that timm's ``Eva`` needs."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int  # intermediate_size: hidden width of the MLP (of each SwiGLU branch)
    img_size: int
    patch_size: int
    in_chans: int
    qkv_bias: bool  # query and value biases (DINOv3 has no key bias)
    eps: float
    layerscale: float
    gated: bool
    num_reg_tokens: int
    rope_theta: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HFDinov3Arch:
        """Read a transformers ``config.json`` dict (``model_type`` must be ``dinov3_vit``)."""
        if config.get("model_type") != "dinov3_vit":
            raise ModelError(f"config.json has model_type={config.get('model_type')!r}, not 'dinov3_vit'")
        gated = bool(config.get("use_gated_mlp", False))
        act = config.get("hidden_act", "gelu")
        want = "silu" if gated else "gelu"
        if act != want:
            raise ModelError(
                f"config.json has hidden_act={act!r} with use_gated_mlp={gated}; timm's Eva "
                f"{'SwiGLU' if gated else 'MLP'} uses {want!r}"
            )
        if config.get("key_bias", False):
            # Under RoPE a key bias is rotated with its position, so (unlike plain attention) it changes the logits;
            # timm's Eva attention has no key bias to hold it.
            raise ModelError("config.json has key_bias=true; timm's Eva attention has no key bias (DINOv3 has none)")
        q_bias, v_bias = bool(config.get("query_bias", True)), bool(config.get("value_bias", True))
        if q_bias != v_bias:
            raise ModelError(
                f"config.json has query_bias={q_bias} but value_bias={v_bias}; timm's Eva has both or neither"
            )
        for key in ("proj_bias", "mlp_bias"):
            if not config.get(key, True):
                raise ModelError(f"config.json has {key}=false; timm's Eva layers always have biases")
        try:
            return cls(
                embed_dim=int(config["hidden_size"]),
                depth=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                mlp_dim=int(config["intermediate_size"]),
                img_size=_size(config.get("image_size", 224)),
                patch_size=_size(config.get("patch_size", 16)),
                in_chans=int(config.get("num_channels", 3)),
                qkv_bias=q_bias,
                eps=float(config.get("layer_norm_eps", 1e-5)),
                layerscale=float(config.get("layerscale_value", 1.0)),
                gated=gated,
                num_reg_tokens=int(config.get("num_register_tokens", 0)),
                rope_theta=float(config.get("rope_theta", 100.0)),
            )
        except KeyError as e:
            raise ModelError(f"config.json lacks the key {e.args[0]!r} needed to build the DINOv3 ViT") from e
        except (TypeError, ValueError) as e:
            raise ModelError(f"config.json has a value of the wrong type for a DINOv3 ViT ({e})") from e

    def timm_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the timm ``Eva`` (all but ``img_size`` and ``num_classes``).

        As timm's ``vit_*_patch16_dinov3``: fused qkv with q/v biases, LayerScale, registers, RoPE on the patch
        tokens with DINOv3's coordinates (patch centres in [-1, 1], periods ``rope_theta ** (4 i / head_dim)``,
        half rotation), no absolute position embedding, the final norm before the CLS-token head. transformers'
        training-time RoPE coordinate augmentations (``pos_embed_shift/jitter/rescale``) are not carried over: as
        timm's own DINOv3 models, the converted model uses the exact patch grid in training too.
        """
        from functools import partial

        from timm.layers import LayerNorm

        return {
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "qkv_bias": self.qkv_bias,
            "qkv_fused": True,
            # int(embed_dim * mlp_ratio) is the width; the half unit makes it exact
            "mlp_ratio": (self.mlp_dim + 0.5) / self.embed_dim,
            "swiglu_mlp": self.gated,
            # any alignment selects timm's SwiGLU with separate gate/value layers (fc1_g, fc1_x); 1 keeps the width
            "swiglu_align_to": 1 if self.gated else 0,
            "init_values": self.layerscale or 1.0,
            "class_token": True,
            "num_reg_tokens": self.num_reg_tokens,
            "use_abs_pos_emb": False,
            "use_rot_pos_emb": True,
            "rope_type": "dinov3",
            "rope_temperature": self.rope_theta,
            "rope_rotate_half": True,
            "dynamic_img_size": True,
            "global_pool": "token",
            "use_fc_norm": False,
            "norm_layer": partial(LayerNorm, eps=self.eps),
        }


class _Remap:
    """Collects a key remap: which source keys were used, which expected ones were missing."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.sd = dict(state_dict)
        self.out: dict[str, torch.Tensor] = {}
        self.missing: list[str] = []
        self.used: set[str] = set()

    def get(self, src: str) -> torch.Tensor | None:
        """The source tensor ``src`` (marked used), or None (recorded missing)."""
        if src not in self.sd:
            self.missing.append(src)
            return None
        self.used.add(src)
        return self.sd[src]

    def take(self, src: str, dst: str) -> None:
        value = self.get(src)
        if value is not None:
            self.out[dst] = value

    def fuse(self, srcs: list[str], dst: str) -> None:
        """Concatenate rows (q, k, v order) into one timm tensor."""
        values = [self.get(s) for s in srcs]
        if all(v is not None for v in values):
            self.out[dst] = torch.cat(values, dim=0)  # (3D, D) or (3D,)

    def finish(self, what: str, dropped: re.Pattern[str]) -> dict[str, torch.Tensor]:
        unexpected = sorted(k for k in self.sd if k not in self.used and not dropped.match(k))
        if self.missing or unexpected:
            raise ModelError(
                f"cannot convert the transformers {what} checkpoint to timm layout: missing keys "
                f"[{', '.join(self.missing) or 'none'}]; unexpected keys [{', '.join(unexpected) or 'none'}]"
            )
        return self.out


# The mask token is used only by masked-image pretraining; timm's models have none.
_DINO_DROPPED = re.compile(r"^embeddings\.mask_token$")


def hf_dinov2_to_timm(state_dict: Mapping[str, torch.Tensor], arch: HFDinov2Arch) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict to timm names.

    Parameters
    ----------
    state_dict
        transformers tensors, as ``save_pretrained`` writes them (``encoder.layer.N.attention.attention.query``...).
    arch
        The config's architecture (depth, qkv bias, SwiGLU, registers).

    Returns
    -------
    dict
        timm ``VisionTransformer`` tensors: q/k/v fused into ``attn.qkv`` (rows q, k, v), LayerScale lambdas into
        ``ls1.gamma``/``ls2.gamma``, SwiGLU ``weights_in``/``weights_out`` into the packed ``mlp.fc1``/``mlp.fc2``.
        With registers, the CLS token's position embedding is added to the CLS token (transformers adds it there
        on every forward; timm's register models give prefix tokens no position embedding) and ``pos_embed`` keeps
        the patch positions only. The mask token is dropped.

    Raises
    ------
    ModelError
        Listing every missing and every unexpected key.
    """
    r = _Remap(state_dict)
    r.take("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight")
    r.take("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias")
    cls, pos = r.get("embeddings.cls_token"), r.get("embeddings.position_embeddings")  # (1, 1, D), (1, 1 + N, D)
    if arch.num_reg_tokens:
        r.take("embeddings.register_tokens", "reg_token")
        if cls is not None and pos is not None:
            r.out["cls_token"] = cls + pos[:, :1]
            r.out["pos_embed"] = pos[:, 1:]
    else:
        if cls is not None:
            r.out["cls_token"] = cls
        if pos is not None:
            r.out["pos_embed"] = pos
    mlp = (("weights_in", "fc1"), ("weights_out", "fc2")) if arch.swiglu else (("fc1", "fc1"), ("fc2", "fc2"))
    for i in range(arch.depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            r.take(f"{src}norm1.{kind}", f"{dst}norm1.{kind}")
            r.take(f"{src}norm2.{kind}", f"{dst}norm2.{kind}")
            r.take(f"{src}attention.output.dense.{kind}", f"{dst}attn.proj.{kind}")
            for a, b in mlp:
                r.take(f"{src}mlp.{a}.{kind}", f"{dst}mlp.{b}.{kind}")
        for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
            r.fuse([f"{src}attention.attention.{q}.{kind}" for q in _QKV], f"{dst}attn.qkv.{kind}")
        r.take(f"{src}layer_scale1.lambda1", f"{dst}ls1.gamma")
        r.take(f"{src}layer_scale2.lambda1", f"{dst}ls2.gamma")
    r.take("layernorm.weight", "norm.weight")
    r.take("layernorm.bias", "norm.bias")
    return r.finish("DINOv2", _DINO_DROPPED)


def hf_dinov3_to_timm(state_dict: Mapping[str, torch.Tensor], arch: HFDinov3Arch) -> dict[str, torch.Tensor]:
    """Rename a transformers ``DINOv3ViTModel`` state dict to the names of timm's ``Eva``.

    Parameters
    ----------
    state_dict
        transformers tensors, as ``save_pretrained`` writes them (``layer.N.attention.q_proj``...; the in-memory
        prefix ``model.layer.N.`` is accepted too).
    arch
        The config's architecture (depth, q/v biases, gated MLP, registers).

    Returns
    -------
    dict
        timm ``Eva`` tensors: q/k/v weights fused into ``attn.qkv.weight`` (rows q, k, v), the q and v biases as
        ``attn.q_bias``/``attn.v_bias`` (timm's key bias is a fixed zero buffer, as DINOv3 has none), LayerScale
        lambdas as ``gamma_1``/``gamma_2``, the MLP as ``fc1``/``fc2`` or, gated, ``fc1_g`` (gate), ``fc1_x`` (up) and
        ``fc2`` (down). The mask token is dropped.

    Raises
    ------
    ModelError
        Listing every missing and every unexpected key.
    """
    r = _Remap(state_dict)
    r.take("embeddings.patch_embeddings.weight", "patch_embed.proj.weight")
    r.take("embeddings.patch_embeddings.bias", "patch_embed.proj.bias")
    r.take("embeddings.cls_token", "cls_token")
    if arch.num_reg_tokens:
        r.take("embeddings.register_tokens", "reg_token")
    elif "embeddings.register_tokens" in r.sd and r.sd["embeddings.register_tokens"].numel() == 0:
        r.used.add("embeddings.register_tokens")  # transformers keeps a (1, 0, D) parameter when there are none
    layer = "model.layer." if any(k.startswith("model.layer.") for k in r.sd) else "layer."
    mlp = (
        (("gate_proj", "fc1_g"), ("up_proj", "fc1_x"), ("down_proj", "fc2"))
        if arch.gated
        else (
            ("up_proj", "fc1"),
            ("down_proj", "fc2"),
        )
    )
    for i in range(arch.depth):
        src, dst = f"{layer}{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            r.take(f"{src}norm1.{kind}", f"{dst}norm1.{kind}")
            r.take(f"{src}norm2.{kind}", f"{dst}norm2.{kind}")
            r.take(f"{src}attention.o_proj.{kind}", f"{dst}attn.proj.{kind}")
            for a, b in mlp:
                r.take(f"{src}mlp.{a}.{kind}", f"{dst}mlp.{b}.{kind}")
        r.fuse([f"{src}attention.{p}_proj.weight" for p in "qkv"], f"{dst}attn.qkv.weight")
        if arch.qkv_bias:
            r.take(f"{src}attention.q_proj.bias", f"{dst}attn.q_bias")
            r.take(f"{src}attention.v_proj.bias", f"{dst}attn.v_bias")
        r.take(f"{src}layer_scale1.lambda1", f"{dst}gamma_1")
        r.take(f"{src}layer_scale2.lambda1", f"{dst}gamma_2")
    r.take("norm.weight", "norm.weight")
    r.take("norm.bias", "norm.bias")
    return r.finish("DINOv3", _DINO_DROPPED)
