"""build_model: transformers checkpoints, timm safetensors, heads, resolution, and loud failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitef.errors import ModelError
from vitef.models import build_model, hf_vit_to_timm, save_timm_safetensors

transformers = pytest.importorskip("transformers")


def _save_hf_vit(path, *, classifier: bool = True, **config):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(**config)
    model = (transformers.ViTForImageClassification if classifier else transformers.ViTModel)(cfg).eval()
    # Random-init LayerNorms are the identity; perturb them so the test sees whether they are loaded.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


HF_CONFIGS = {
    # ViT-Ti/16 at 224 px.
    "tiny16": dict(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=224,
        patch_size=16,
        num_labels=7,
    ),
    # Other patch size, depth, MLP ratio, no qkv bias, the authors' LayerNorm eps.
    "odd8": dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=40,
        patch_size=8,
        num_labels=5,
        qkv_bias=False,
        layer_norm_eps=1e-12,
    ),
}


@pytest.mark.parametrize("variant", sorted(HF_CONFIGS))
def test_transformers_dir_gives_same_logits(tmp_path, variant):
    cfg = HF_CONFIGS[variant]
    hf = _save_hf_vit(tmp_path, **cfg)
    ours = build_model(str(tmp_path)).eval()
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        out = ours(x)
    assert out.shape == (2, cfg["num_labels"])
    assert (out - ref).abs().max().item() <= 1e-4
    assert ours.blocks[0].norm1.eps == hf.config.layer_norm_eps


def test_transformers_vitmodel_without_head_drops_pooler(tmp_path):
    hf = _save_hf_vit(tmp_path, classifier=False, **HF_CONFIGS["odd8"])
    ours = build_model(str(tmp_path)).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state  # (B, N, D) after the final LayerNorm
        tokens = ours.forward_features(x)
    assert (tokens - ref).abs().max().item() <= 1e-4
    assert ours.num_classes == 0


def test_fresh_head_and_resized_position_embedding(tmp_path):
    _save_hf_vit(tmp_path, **HF_CONFIGS["odd8"])
    ref = build_model(str(tmp_path))
    model = build_model(str(tmp_path), num_classes=3, img_size=56)
    assert model.head.out_features == 3
    assert model.pos_embed.shape == (1, 1 + 7 * 7, 64)
    # Everything but the head and the resized position embedding is the checkpoint's.
    assert torch.equal(model.blocks[1].attn.qkv.weight, ref.blocks[1].attn.qkv.weight)
    assert torch.equal(model.pos_embed[:, 0], ref.pos_embed[:, 0])  # CLS position untouched
    assert model(torch.randn(1, 3, 56, 56)).shape == (1, 3)


def test_conversion_lists_missing_and_unexpected_keys(tmp_path):
    _save_hf_vit(tmp_path, **HF_CONFIGS["odd8"])
    state = load_file(str(tmp_path / "model.safetensors"))
    state["vit.encoder.layer.0.extra.weight"] = torch.zeros(1)
    del state["vit.encoder.layer.2.output.dense.bias"]
    with pytest.raises(ModelError) as e:
        hf_vit_to_timm(state, depth=3, qkv_bias=False)
    msg = str(e.value)
    assert "missing keys [vit.encoder.layer.2.output.dense.bias]" in msg
    assert "unexpected keys [vit.encoder.layer.0.extra.weight]" in msg


def test_conversion_fuses_qkv_rows_in_order(tmp_path):
    _save_hf_vit(tmp_path, **HF_CONFIGS["odd8"])
    state = load_file(str(tmp_path / "model.safetensors"))
    out = hf_vit_to_timm(state, depth=3, qkv_bias=False)
    q = state["vit.encoder.layer.1.attention.attention.query.weight"]
    v = state["vit.encoder.layer.1.attention.attention.value.weight"]
    assert torch.equal(out["blocks.1.attn.qkv.weight"][:64], q)
    assert torch.equal(out["blocks.1.attn.qkv.weight"][128:], v)


def test_timm_safetensors_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32).eval()
    path = tmp_path / "w.safetensors"
    save_timm_safetensors(model, path)
    again = build_model("vit_tiny_patch16_224", pretrained=str(path), img_size=32, num_classes=None).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_timm_safetensors_wrong_architecture(tmp_path):
    model = build_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32)
    path = tmp_path / "w.safetensors"
    save_timm_safetensors(model, path)
    with pytest.raises(ModelError, match="do not fit the model architecture: .*shape mismatch"):
        build_model("vit_small_patch16_224", pretrained=str(path), img_size=32)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        build_model("vit_tiny_patch16_224", pretrained=str(bad))
    with pytest.raises(ModelError, match="weights file not found"):
        build_model("vit_tiny_patch16_224", pretrained=str(tmp_path / "none.safetensors"))
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        build_model(str(empty))
    (empty / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 8}))
    (empty / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickle files are not loaded"):
        build_model(str(empty))


def test_truncated_safetensors(tmp_path):
    model = build_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        build_model("vit_tiny_patch16_224", pretrained=str(path), img_size=32)


def test_unknown_model_name_suggests():
    with pytest.raises(ModelError, match="unknown model 'vit_tiny_patch16_22'.*Did you mean vit_tiny_patch16_224"):
        build_model("vit_tiny_patch16_22", pretrained=False)


def test_not_a_vit():
    with pytest.raises(ModelError, match="not a timm VisionTransformer"):
        build_model("resnet18", pretrained=False)


def test_offline_without_cache_names_model_cache_and_fix(run_app, tmp_path):
    code = "from vitef.models import build_model\nbuild_model('vit_tiny_patch16_224.augreg_in21k', pretrained=True)\n"
    import subprocess
    import sys

    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "ModelError" in r.stderr
    assert "vit_tiny_patch16_224.augreg_in21k" in r.stderr
    assert str(tmp_path / "hf") in r.stderr
    assert "model.checkpoint=" in r.stderr


def test_offline_app_exits_2_with_one_message(run_inprocess, tmp_path, monkeypatch):
    # In-process: the hub reads HF_HOME and HF_HUB_OFFLINE once, at import (the subprocess test above sets them
    # in the environment), so point its constants at an empty cache here.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = run_inprocess("apps.vit.components", "model.name=base", "model.pretrained=true")
    assert r.returncode == 2
    assert r.stderr.count("error:") == 1 and "vit_base_patch16_224.orig_in21k" in r.stderr


def test_self_describing_checkpoint_with_card(tmp_path):
    torch.manual_seed(0)
    arch = {"name": "vit_tiny_patch16_224", "img_size": 32, "overrides": {"patch_size": 8, "depth": 2}}
    model = build_model(arch["name"], pretrained=False, num_classes=3, img_size=32, **arch["overrides"]).eval()
    path = tmp_path / "mine.safetensors"
    save_timm_safetensors(model, path)
    with pytest.raises(ModelError, match="has no card 'mine.json'.*model.checkpoint="):
        build_model(str(path))
    path.with_suffix(".json").write_text(json.dumps({"model": arch}))
    again = build_model(str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    fresh = build_model(str(path), num_classes=7)
    assert fresh.head.out_features == 7 and torch.equal(
        fresh.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight
    )
    random_init = build_model(str(path), pretrained=False)
    assert len(random_init.blocks) == 2 and not torch.equal(
        random_init.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight
    )
