"""DINOv2 / DINOv3 transformers folders converted to timm: equal to transformers' forward, loud on bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from vitef.errors import ModelError
from vitef.models import build_model
from vitef.models.convert import HFDinov2Arch, HFDinov3Arch, hf_dinov2_to_timm, hf_dinov3_to_timm

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
# name -> (transformers model class, config class, config, native image size)
VARIANTS = {
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(TINY, image_size=56, patch_size=14)),
    # giant's MLP: SwiGLU with the fused weights_in (gate rows, then up rows)
    "dinov2_swiglu": ("Dinov2Model", "Dinov2Config", dict(TINY, image_size=56, patch_size=14, use_swiglu_ffn=True)),
    "dinov2_reg": (
        "Dinov2WithRegistersModel",
        "Dinov2WithRegistersConfig",
        dict(TINY, image_size=42, patch_size=14, num_register_tokens=4, qkv_bias=False, layer_norm_eps=1e-5),
    ),
    # ViT-S/B/L style: registers, GELU MLP, q and v biases (no k bias), RoPE theta 100
    "dinov3": (
        "DINOv3ViTModel",
        "DINOv3ViTConfig",
        dict(TINY, intermediate_size=128, image_size=64, patch_size=16, num_register_tokens=4),
    ),
    # ViT-H+ style: gated SiLU MLP; here also without registers or q/v biases, another RoPE theta
    "dinov3_gated": (
        "DINOv3ViTModel",
        "DINOv3ViTConfig",
        dict(
            TINY,
            intermediate_size=96,
            image_size=48,
            patch_size=8,
            use_gated_mlp=True,
            hidden_act="silu",
            query_bias=False,
            value_bias=False,
            rope_theta=50.0,
        ),
    ),
}
READERS = {"Dinov2Model": HFDinov2Arch, "Dinov2WithRegistersModel": HFDinov2Arch, "DINOv3ViTModel": HFDinov3Arch}
REMAPS = {HFDinov2Arch: hf_dinov2_to_timm, HFDinov3Arch: hf_dinov3_to_timm}
TIMM = {HFDinov2Arch: VisionTransformer, HFDinov3Arch: Eva}


def _save_hf(path, variant):
    """A tiny random transformers model of ``variant`` saved to ``path``; every parameter perturbed."""
    model_name, config_name, cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**cfg)).eval()
    # Random init leaves LayerNorms at identity, biases at zero and LayerScale at one; perturb everything so a
    # parameter loaded into the wrong place (or not at all) changes the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model, cfg["image_size"]


def _arch(path):
    config = json.loads((path / "config.json").read_text())
    return READERS[config["architectures"][0]].from_config(config)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_remap_loads_strictly_and_equals_transformers(tmp_path, variant):
    hf, size = _save_hf(tmp_path, variant)
    arch = _arch(tmp_path)
    state = REMAPS[type(arch)](load_file(str(tmp_path / "model.safetensors")), arch)
    model = TIMM[type(arch)](img_size=arch.img_size, num_classes=0, **arch.timm_kwargs()).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        tokens = model.forward_features(x)  # (B, 1 + R + N, D) after the final norm
        pooled = model(x)  # (B, D): the CLS token, no head
    assert tokens.shape == ref.last_hidden_state.shape
    assert (tokens - ref.last_hidden_state).abs().max().item() <= 1e-4
    assert (pooled - ref.pooler_output).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_build_model_from_folder_equals_transformers(tmp_path, variant):
    hf, size = _save_hf(tmp_path, variant)
    model = build_model(str(tmp_path)).eval()
    assert model.num_classes == 0
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        tokens = model.forward_features(x)
    assert (tokens - ref).abs().max().item() <= 1e-4
    assert model.blocks[0].norm1.eps == hf.config.layer_norm_eps


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_init_has_the_converted_parameters(tmp_path, variant):
    # pretrained=False builds from config.json alone: exactly the parameters (names, shapes) the weights fill.
    _save_hf(tmp_path, variant)
    arch = _arch(tmp_path)
    state = REMAPS[type(arch)](load_file(str(tmp_path / "model.safetensors")), arch)
    model = build_model(str(tmp_path), pretrained=False)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}


def test_registers_fold_the_cls_position_into_the_cls_token(tmp_path):
    _save_hf(tmp_path, "dinov2_reg")
    hf_state = load_file(str(tmp_path / "model.safetensors"))
    out = hf_dinov2_to_timm(hf_state, _arch(tmp_path))
    pos = hf_state["embeddings.position_embeddings"]  # (1, 1 + 3 * 3, 64)
    assert torch.equal(out["cls_token"], hf_state["embeddings.cls_token"] + pos[:, :1])
    assert torch.equal(out["pos_embed"], pos[:, 1:])
    assert torch.equal(out["reg_token"], hf_state["embeddings.register_tokens"])
    assert "embeddings.mask_token" in hf_state and not any("mask" in k for k in out)


def test_dinov3_fuses_qkv_and_keeps_q_v_biases(tmp_path):
    _save_hf(tmp_path, "dinov3")
    hf_state = load_file(str(tmp_path / "model.safetensors"))
    out = hf_dinov3_to_timm(hf_state, _arch(tmp_path))
    qkv = out["blocks.1.attn.qkv.weight"]  # (3 * 64, 64), rows q, k, v
    assert torch.equal(qkv[:64], hf_state["layer.1.attention.q_proj.weight"])
    assert torch.equal(qkv[64:128], hf_state["layer.1.attention.k_proj.weight"])
    assert torch.equal(qkv[128:], hf_state["layer.1.attention.v_proj.weight"])
    assert torch.equal(out["blocks.1.attn.v_bias"], hf_state["layer.1.attention.v_proj.bias"])
    assert torch.equal(out["blocks.1.gamma_2"], hf_state["layer.1.layer_scale2.lambda1"])
    # transformers' in-memory prefix (model.layer.N) converts to the same tensors
    renamed = {("model." + k if k.startswith("layer.") else k): v for k, v in hf_state.items()}
    again = hf_dinov3_to_timm(renamed, _arch(tmp_path))
    assert again.keys() == out.keys() and all(torch.equal(again[k], out[k]) for k in out)


def test_gated_mlp_maps_gate_up_down(tmp_path):
    _save_hf(tmp_path, "dinov3_gated")
    hf_state = load_file(str(tmp_path / "model.safetensors"))
    out = hf_dinov3_to_timm(hf_state, _arch(tmp_path))
    assert torch.equal(out["blocks.0.mlp.fc1_g.weight"], hf_state["layer.0.mlp.gate_proj.weight"])
    assert torch.equal(out["blocks.0.mlp.fc1_x.weight"], hf_state["layer.0.mlp.up_proj.weight"])
    assert torch.equal(out["blocks.0.mlp.fc2.weight"], hf_state["layer.0.mlp.down_proj.weight"])
    assert "blocks.0.attn.q_bias" not in out


@pytest.mark.parametrize(
    "variant, missing, extra",
    [
        ("dinov2", "encoder.layer.1.layer_scale2.lambda1", "encoder.layer.0.mlp.fc3.weight"),
        ("dinov2_swiglu", "encoder.layer.0.mlp.weights_in.bias", "pooler.dense.weight"),
        ("dinov3", "layer.1.attention.v_proj.bias", "layer.0.attention.k_proj.bias"),
    ],
)
def test_corrupted_folder_lists_missing_and_unexpected_keys(tmp_path, variant, missing, extra):
    _save_hf(tmp_path, variant)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    del state[missing]
    state[extra] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(ModelError) as e:
        build_model(str(tmp_path))
    msg = str(e.value)
    assert f"missing keys [{missing}]" in msg
    assert f"unexpected keys [{extra}]" in msg


def test_fresh_head_and_other_resolution(tmp_path):
    _save_hf(tmp_path, "dinov2_reg")
    ref = build_model(str(tmp_path))
    model = build_model(str(tmp_path), num_classes=3, img_size=70)
    assert model.head.out_features == 3
    assert model.pos_embed.shape == (1, 5 * 5, 64)  # patches only: prefix tokens carry no position embedding
    assert torch.equal(model.cls_token, ref.cls_token)
    assert torch.equal(model.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight)
    assert model(torch.randn(1, 3, 70, 70)).shape == (1, 3)


def test_dinov3_fresh_head_and_other_resolution(tmp_path):
    hf, _ = _save_hf(tmp_path, "dinov3")
    model = build_model(str(tmp_path), num_classes=3, img_size=96).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = hf(pixel_values=x).pooler_output  # RoPE has no table to resize: any grid is exact
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (features - ref).abs().max().item() <= 1e-4
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(model_type="dinov3_vit", key_bias=True), "key_bias=true"),
        (dict(model_type="dinov3_vit", value_bias=False), "query_bias=True but value_bias=False"),
        (dict(model_type="dinov3_vit", use_gated_mlp=True), "hidden_act='gelu' with use_gated_mlp=True"),
        (dict(model_type="dinov3_vit", mlp_bias=False), "mlp_bias=false"),
        (dict(model_type="dinov2", hidden_act="relu"), "hidden_act='relu'"),
        (dict(model_type="dinov2", architectures=["Dinov2ForImageClassification"]), "model.dinov2.save_pretrained"),
        (dict(model_type="dinov2", hidden_size="wide"), "wrong type"),
        (dict(model_type="vit_mae"), "model_type='vit_mae'"),
    ],
)
def test_unsupported_configs_are_refused_by_name(tmp_path, change, needle):
    config = dict(TINY, intermediate_size=128, image_size=32, patch_size=16, **change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="config.json") as e:
        build_model(str(tmp_path), pretrained=False)
    assert needle in str(e.value)


# Released sizes (hub config values) -> the timm model of the same family; built on the meta device (no memory).
RELEASED = [
    (
        "Dinov2Config",
        dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518),
        "vit_small_patch14_dinov2",
    ),
    (
        "Dinov2Config",
        dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, image_size=518, use_swiglu_ffn=True),
        "vit_giant_patch14_dinov2",
    ),
    (
        "Dinov2WithRegistersConfig",
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518, patch_size=14),
        "vit_base_patch14_reg4_dinov2",
    ),
    ("DINOv3ViTConfig", dict(num_register_tokens=4), "vit_small_patch16_dinov3_qkvb"),
    ("DINOv3ViTConfig", dict(num_register_tokens=4, query_bias=False, value_bias=False), "vit_small_patch16_dinov3"),
    (
        "DINOv3ViTConfig",
        dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            use_gated_mlp=True,
            hidden_act="silu",
            num_register_tokens=4,
        ),
        "vit_huge_plus_patch16_dinov3_qkvb",
    ),
]


@pytest.mark.parametrize("config_name, config, timm_name", RELEASED)
def test_released_sizes_have_the_parameters_of_timms_models(config_name, config, timm_name):
    import timm

    cfg = getattr(transformers, config_name)(**config).to_dict()
    arch = (HFDinov3Arch if cfg["model_type"] == "dinov3_vit" else HFDinov2Arch).from_config(cfg)
    with torch.device("meta"):
        ours = TIMM[type(arch)](img_size=arch.img_size, num_classes=0, **arch.timm_kwargs())
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=arch.img_size)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
