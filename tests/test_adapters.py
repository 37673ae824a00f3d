"""vitef.adapters: BitFit freezing, LoRA targets, merge equality, adapter and merged-checkpoint round trips."""

from __future__ import annotations

import pytest
import timm
import torch
from tiny import random_vit

from vitef.adapters import (
    LoraConfig,
    adapter_state,
    add_lora,
    base_fingerprint,
    load_adapter_state,
    load_merged,
    lora_targets,
    merged_model,
    train_biases,
    trainable_counts,
)
from vitef.errors import CheckpointError, ConfigError
from vitef.models import component_of, set_trainable
from vitef.monitor import save_weights


def test_bitfit_keeps_the_biases_of_the_trainable_components_and_the_head():
    model = random_vit()
    set_trainable(model, ["mha", "ln2"])
    counts = train_biases(model)
    for name, p in model.named_parameters():
        comp = component_of(name).component
        assert p.requires_grad == (comp == "head" or (comp in ("mha", "ln2") and name.endswith(".bias"))), name
    assert counts == trainable_counts(model) and set(counts) == {"mha", "ln2", "head"}
    set_trainable(model, ["mha"])
    for name, p in model.named_parameters():  # a model without biases in its chosen components says so
        if component_of(name).component == "mha" and name.endswith(".bias"):
            p.requires_grad_(False)
    with pytest.raises(ConfigError, match="method=bitfit"):
        train_biases(model)


def test_lora_targets_follow_trainable_and_modules():
    model = random_vit(depth=3)
    assert lora_targets(model, ["mha.1-2"], ["qkv"]) == ["blocks.1.attn.qkv", "blocks.2.attn.qkv"]
    assert len(lora_targets(model, ["all"], ["qkv", "proj", "fc1", "fc2"])) == 12
    with pytest.raises(ConfigError, match="trainable=ln1 has none"):
        lora_targets(model, ["ln1"], ["qkv"])
    with pytest.raises(ConfigError, match="has no module in trainable"):
        lora_targets(model, ["fc1"], ["qkv"])
    with pytest.raises(ConfigError, match="lora.modules"):
        LoraConfig(modules=["q"]).validate()


def test_lora_merge_gives_a_plain_timm_model_with_the_adapted_logits(tmp_path):
    torch.manual_seed(0)
    model = random_vit().eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = add_lora(model, LoraConfig(rank=2, alpha=4), ["all"])
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(images), random_vit().eval()(images))  # B = 0: the wrapped model starts as the base
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
        adapted = model(images)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith(("head.", "norm."))}
    fingerprint = base_fingerprint(model)
    plain = merged_model(wrapped)
    assert base_fingerprint(model) == fingerprint and any(".lora_" in n for n, _ in model.named_parameters())
    assert set(plain.state_dict()) == set(base)  # timm names, nothing else
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), adapted, atol=1e-5, rtol=0)
    # Round trip of a merged checkpoint + the adapters into a freshly wrapped model: the same function.
    save_weights(plain, tmp_path / "merged.safetensors")
    again = random_vit().eval()
    add_lora(again, LoraConfig(rank=2, alpha=4), ["all"])
    load_merged(again, tmp_path / "merged.safetensors")
    load_adapter_state(again, adapter_state(model))
    with torch.no_grad():
        assert torch.equal(again(images), adapted)
    with pytest.raises(CheckpointError, match="does not fit the LoRA model"):
        save_weights(random_vit(depth=1), tmp_path / "other.safetensors")
        load_merged(again, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="do not fit the model"):
        load_adapter_state(again, {})


# ---------------------------------------------------------------------------------------------------
# Eva (EVA-02, EVA-02 CLIP) and Beit
# ---------------------------------------------------------------------------------------------------

SMALL = {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 3}
FAMILIES = {
    # Separate q_proj/k_proj/v_proj (q and v biases), inner attention norm, SwiGLU fc1_g/fc1_x.
    "eva02_clip": ("eva02_base_patch16_clip_224", SMALL),
    # Fused qkv with q_bias/v_bias beside it, packed SwiGLU (one fc1), RoPE.
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2, "num_classes": 3}),
    # Fused qkv with q_bias/v_bias, relative position bias, LayerScale gamma_1/gamma_2.
    "beit": ("beit_base_patch16_224", SMALL),
}


def family_model(key: str, seed: int = 0) -> torch.nn.Module:
    """The small random model of ``key``, with non-zero q/v biases (timm initialises them to zero)."""
    name, kwargs = FAMILIES[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
                p.normal_(0, 0.2)
    return model


def test_lora_targets_name_each_familys_linear_layers():
    clip = family_model("eva02_clip")
    assert lora_targets(clip, ["mha.1"], ["qkv", "proj"]) == [
        "blocks.1.attn.q_proj", "blocks.1.attn.k_proj", "blocks.1.attn.v_proj", "blocks.1.attn.proj"
    ]  # fmt: skip
    assert lora_targets(clip, ["fc1.0", "fc2.0"], ["fc1", "fc2"]) == [
        "blocks.0.mlp.fc1_g", "blocks.0.mlp.fc1_x", "blocks.0.mlp.fc2"
    ]  # fmt: skip
    for key in ("eva02", "beit"):
        assert lora_targets(family_model(key), ["all"], ["qkv", "fc1"]) == [
            f"blocks.{i}.{path}" for i in range(2) for path in ("attn.qkv", "mlp.fc1")
        ]
    with pytest.raises(ConfigError, match="has no Linear mlp.fc1 or mlp.fc1_g\\+mlp.fc1_x for 'fc1'"):
        lora_targets(_blocks_without_mlp(), ["fc1"], ["fc1"])


def _blocks_without_mlp() -> torch.nn.Module:
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    return model


def test_lora_on_separate_qkv_trains_only_the_adapters_and_merges_to_timm_names():
    model = family_model("eva02_clip")
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    torch.manual_seed(1)
    wrapped = add_lora(model, LoraConfig(rank=2, alpha=4), ["mha", "fc1"])
    names = {n for n, _ in model.named_modules() if n.endswith(".base_layer")}
    assert names == {f"blocks.{i}.{m}.base_layer" for i in range(2) for m in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1_g", "mlp.fc1_x")}  # fmt: skip
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)  # B = 0 would leave A without a gradient in the first step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()
    model.eval()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (".lora_" in name or name.startswith(("head.", "norm."))), name
    with torch.no_grad():
        adapted = model(images)
        plain = merged_model(wrapped).eval()
        torch.testing.assert_close(plain(images), adapted, atol=1e-5, rtol=0)
    assert set(plain.state_dict()) == set(base)  # the timm names, nothing else
    merged_weights = plain.state_dict()
    adapted_paths = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".attn.proj.weight", ".fc1_g.weight",
                     ".fc1_x.weight")  # fmt: skip
    for name, tensor in base.items():  # only the adapted Linear weights (and the head) moved
        moved = name.endswith(adapted_paths) or name.startswith(("head.", "norm."))
        assert torch.equal(merged_weights[name], tensor) != moved, name


@pytest.mark.parametrize("key", ["eva02", "beit"])
def test_lora_on_a_fused_qkv_with_q_and_v_biases_is_not_bypassed(key):
    """BEiT / EVA-02 would compute F.linear(x, qkv.weight, bias) and skip the adapter on qkv."""
    model = family_model(key)
    images = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        reference = model.forward_features(images)  # (B, N, D): the head's random init is too small to tell
    wrapped = add_lora(model, LoraConfig(rank=2, alpha=4, modules=["qkv"]), ["mha"])
    assert all(block.attn.qkv_bias_separate for block in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), reference, atol=1e-5, rtol=0)  # B = 0: the same
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
        adapted = model.forward_features(images)
        assert (adapted - reference).abs().max() > 0.1  # the adapters act
        plain = merged_model(wrapped).eval()
        assert not any(block.attn.qkv_bias_separate for block in plain.blocks)  # as a fresh timm model computes
        assert all(block.attn.qkv_bias_separate for block in model.blocks)  # the wrapped model is left as it was
        torch.testing.assert_close(plain.forward_features(images), adapted, atol=1e-4, rtol=0)


def test_bitfit_trains_q_and_v_biases_not_position_tables():
    model = family_model("beit")
    set_trainable(model, ["mha"])
    train_biases(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"blocks.{i}.attn.{b}" for i in range(2) for b in ("q_bias", "v_bias", "proj.bias")}
    assert trainable == expected | {n for n, _ in model.named_parameters() if n.startswith(("head.", "fc_norm."))}
