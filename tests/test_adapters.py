"""vitef.adapters: BitFit freezing, LoRA targets, merge equality, adapter and merged-checkpoint round trips."""

from __future__ import annotations

import pytest
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
