"""vitef.adapters: BitFit freezing, LoRA targets, LoRA / DoRA merge equality, adapter and merged-checkpoint round
trips."""

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
    merged_state_dict,
    train_biases,
    trainable_counts,
)
from vitef.errors import CheckpointError, ConfigError
from vitef.models import component_of, set_trainable
from vitef.models.components import assign_components, count_units, unit_of
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


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_merge_gives_a_plain_timm_model_with_the_adapted_logits(tmp_path, dora):
    torch.manual_seed(0)
    model = random_vit().eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = add_lora(model, LoraConfig(rank=2, alpha=4), ["all"], dora=dora)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(images), random_vit().eval()(images))  # B = 0: the wrapped model starts as the base
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
            if ".lora_magnitude_vector." in name:
                p.mul_(torch.rand_like(p) + 0.5)  # DoRA: magnitudes away from the base's row norms too
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
    add_lora(again, LoraConfig(rank=2, alpha=4), ["all"], dora=dora)
    load_merged(again, tmp_path / "merged.safetensors")
    load_adapter_state(again, adapter_state(model))
    with torch.no_grad():
        assert torch.equal(again(images), adapted)
    with pytest.raises(CheckpointError, match="does not fit the LoRA model"):
        save_weights(random_vit(depth=1), tmp_path / "other.safetensors")
        load_merged(again, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="do not fit the model"):
        load_adapter_state(again, {})


def test_dora_trains_adapters_magnitudes_and_head_in_the_registry_and_starts_as_the_base():
    torch.manual_seed(0)
    model = random_vit().eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        reference = model(images)
    torch.manual_seed(1)
    add_lora(model, LoraConfig(rank=2, alpha=4, modules=["qkv", "fc2"]), ["mha", "fc2.1"], dora=True)
    targets = ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    kinds = ("lora_A", "lora_B", "lora_magnitude_vector")  # PEFT's names: <module>.<kind>.default.weight
    adapters = {f"{t}.{kind}.default.weight" for t in targets for kind in kinds}
    head = {n for n in base if component_of(n).component == "head"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters | head
    assert set(adapter_state(model)) == adapters  # what state.pt saves for a resume: the magnitudes too
    lora = random_vit().eval()
    torch.manual_seed(1)
    add_lora(lora, LoraConfig(rank=2, alpha=4, modules=["qkv", "fc2"]), ["mha", "fc2.1"])
    with torch.no_grad():  # LoRA's A and B from the same seed: the magnitudes draw nothing
        assert all(torch.equal(t, adapter_state(model)[n]) for n, t in adapter_state(lora).items())
    # The registry assigns every parameter; a magnitude lies in its module's component and block.
    assert set(assign_components(model)) == {n for n, _ in model.named_parameters()}
    assert sum(count_units(model).values()) == sum(p.numel() for p in model.parameters())
    assert unit_of("blocks.1.mlp.fc2.lora_magnitude_vector.default.weight") == "fc2.1"
    assert unit_of("blocks.0.attn.qkv.lora_magnitude_vector.default.weight") == "mha.0"
    # rank 2: qkv (32 -> 96) A 2x32, B 96x2, m 96 in two blocks; fc2 (128 -> 32) A 2x128, B 32x2, m 32 in block 1
    assert trainable_counts(model) == {
        "mha": 2 * (64 + 192 + 96), "fc2": 256 + 64 + 32, "head": sum(base[n].numel() for n in head)
    }  # fmt: skip
    for target in targets:  # the magnitudes start as the row norms of the pretrained weights, bit for bit
        magnitude = model.get_submodule(target).lora_magnitude_vector["default"].weight
        assert torch.equal(magnitude, torch.linalg.norm(base[f"{target}.weight"], dim=1))
    with torch.no_grad():  # m / ||W + 0|| is exactly 1 and B = 0: the pretrained function, bit for bit
        assert torch.equal(model(images), reference)


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


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("key", ["eva02", "beit"])
def test_lora_on_a_fused_qkv_with_q_and_v_biases_is_not_bypassed(key, dora):
    """BEiT / EVA-02 would compute F.linear(x, qkv.weight, bias) and skip the adapter on qkv."""
    model = family_model(key)
    images = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        reference = model.forward_features(images)  # (B, N, D): the head's random init is too small to tell
    wrapped = add_lora(model, LoraConfig(rank=2, alpha=4, modules=["qkv"]), ["mha"], dora=dora)
    assert all(block.attn.qkv_bias_separate for block in model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), reference, atol=1e-5, rtol=0)  # B = 0: the same
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
            if ".lora_magnitude_vector." in name:
                p.mul_(4)  # DoRA: the magnitudes act too
        adapted = model.forward_features(images)
        # The adapters act, 100x beyond the merge's tolerance below (DoRA keeps each qkv row at its magnitude m,
        # the small norms of the pretrained rows x 4, behind BEiT's LayerScale 0.1: a smaller change than LoRA's).
        assert (adapted - reference).abs().max() > (0.01 if dora else 0.1)
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


# ---------------------------------------------------------------------------------------------------
# merged_state_dict: merged_model's state dict without the copy
# ---------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (torch.equal calls -0.0 and 0.0 equal; the bytes do not)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_same_bits(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)  # the same keys in the same order
    for name, tensor in expected.items():
        assert (got[name].dtype, got[name].shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(_bits(got[name]), _bits(tensor)), name


def _wrapped(key: str, dtype: torch.dtype = torch.float32, dora: bool = False):
    """A seeded small model of ``key`` with LoRA (or DoRA) on qkv and fc1 of every block and non-zero ``B``; DoRA's
    after three SGD steps besides, so that its magnitudes have moved from the base's row norms too."""
    if key == "vit":
        torch.manual_seed(0)
        model = random_vit().eval()
    else:
        model = family_model(key)
    model.to(dtype)
    torch.manual_seed(1)
    wrapped = add_lora(model, LoraConfig(rank=2, alpha=6, modules=["qkv", "fc1"]), ["all"], dora=dora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    if dora:
        _sgd_steps(model, 3)
    return wrapped, model


def _sgd_steps(model: torch.nn.Module, steps: int) -> None:
    """``steps`` seeded SGD updates of the trainable parameters on random images and labels (eval mode kept)."""
    generator = torch.Generator().manual_seed(2)
    dtype = next(model.parameters()).dtype
    images = torch.randn(4, 3, *model.patch_embed.img_size, generator=generator).to(dtype)
    labels = torch.randint(0, model.num_classes, (4,), generator=generator)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images).float(), labels).backward()
        optimizer.step()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(
    ("key", "dtype"),
    [("vit", torch.float32), ("vit", torch.bfloat16), ("beit", torch.float32), ("eva02_clip", torch.float32)],
)
def test_merged_state_dict_is_merged_models_state_dict_bit_for_bit_and_leaves_the_model(key, dtype, dora):
    """ViT (fused qkv, fc1), BEiT (fused qkv beside q/v biases: the qkv_bias_separate marker), EVA-02 CLIP (q/k/v_proj,
    SwiGLU fc1_g/fc1_x); bfloat16 weights with float32 adapters (PEFT keeps the adapters in float32); LoRA and DoRA
    (after a few optimizer steps)."""
    wrapped, model = _wrapped(key, dtype, dora)
    before = {n: t.clone() for n, t in model.state_dict().items()}  # base_layer / lora_* names
    flags = {n: p.requires_grad for n, p in wrapped.named_parameters()}
    separate = [getattr(m, "qkv_bias_separate", None) for m in model.modules()]
    got = merged_state_dict(wrapped)
    _assert_same_bits(model.state_dict(), before)  # the wrapped model is left as it was, adapters included
    assert {n: p.requires_grad for n, p in wrapped.named_parameters()} == flags
    assert [getattr(m, "qkv_bias_separate", None) for m in model.modules()] == separate
    plain = merged_model(wrapped)
    _assert_same_bits(got, plain.state_dict())
    assert not any(t.requires_grad for t in got.values())
    adapted = [n for n in got if n.replace(".weight", ".base_layer.weight") in before and n.endswith(".weight")]
    assert len(adapted) == {"vit": 4, "beit": 4, "eva02_clip": 10}[key]  # 2 blocks x (qkv or q/k/v) + (fc1 or g/x)
    for name in adapted:  # the adapters moved them (B != 0), by the update PEFT computes
        base = before[name.replace(".weight", ".base_layer.weight")]
        assert not torch.equal(got[name], base), name
    # A fresh timm model loads it strictly and computes what merged_model computes.
    if key == "vit":
        fresh = random_vit().to(dtype).eval()
        fresh.load_state_dict(got, strict=True)
        images = torch.randn(2, 3, 16, 16, dtype=dtype)
        with torch.no_grad():
            assert torch.equal(fresh(images), plain.eval()(images))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_state_dict_copies_only_the_adapted_weights(dora):
    """Bounded extra memory: every entry but the adapted weights is the live tensor; those are new, on ``device``."""
    wrapped, model = _wrapped("vit", dora=dora)
    live = model.state_dict()  # base_layer / lora_* names; detached views of the parameters
    live_ptrs = {t.untyped_storage().data_ptr() for t in live.values()}
    got = merged_state_dict(wrapped)
    adapted = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "mlp.fc1")}
    new_bytes = 0
    for name, tensor in got.items():
        source = name
        if name.rpartition(".")[0] in {a.rpartition(".")[0] for a in adapted}:  # weight or bias of an adapted module
            source = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if name in adapted:
            assert tensor.untyped_storage().data_ptr() not in live_ptrs, name
            new_bytes += tensor.numel() * tensor.element_size()
        else:
            assert tensor.data_ptr() == live[source].data_ptr(), name
    assert new_bytes == sum(live[a.replace(".weight", ".base_layer.weight")].nbytes for a in adapted)
    # merged_model copies everything: none of its tensors is the live one.
    assert not {t.untyped_storage().data_ptr() for t in merged_model(wrapped).state_dict().values()} & live_ptrs
    # device: the merged weights go there (one at a time), the rest stay the live tensors.
    on_meta = merged_state_dict(wrapped, device="meta")
    assert list(on_meta) == list(got)
    for name, tensor in on_meta.items():
        where = "meta" if name in adapted else "cpu"
        assert (tensor.device.type, tensor.shape, tensor.dtype) == (where, got[name].shape, got[name].dtype), name
        if name not in adapted:
            assert tensor.data_ptr() == got[name].data_ptr(), name


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_state_dict_after_merge_adapter(dora):
    wrapped, model = _wrapped("vit", dora=dora)
    expected = merged_state_dict(wrapped)
    wrapped.merge_adapter()  # the base weights now hold the update: merge_and_unload adds nothing more
    _assert_same_bits(merged_state_dict(wrapped), expected)
    with pytest.warns(UserWarning, match="already merged"):
        _assert_same_bits(merged_state_dict(wrapped), merged_model(wrapped).state_dict())


def test_merged_state_dict_refuses_merges_it_does_not_reproduce():
    import peft

    def wrap(**kwargs):
        return peft.get_peft_model(random_vit(), peft.LoraConfig(r=2, target_modules=["blocks.0.attn.qkv"], **kwargs))

    with pytest.raises(NotImplementedError, match="blocks.0.attn.qkv has a LoRA variant other than DoRA"):
        merged_state_dict(wrap(init_lora_weights="mica"))
    with pytest.raises(NotImplementedError, match="blocks.0.attn.qkv has lora_bias"):
        merged_state_dict(wrap(lora_bias=True))
    two = wrap(use_dora=True)  # PEFT's DoRA merge of several adapters unmerges and remerges the others: not ours
    two.add_adapter("other", peft.LoraConfig(r=2, target_modules=["blocks.0.attn.qkv"]))
    two.base_model.set_adapter(["default", "other"])
    with pytest.raises(NotImplementedError, match="blocks.0.attn.qkv has a DoRA adapter beside other adapters"):
        merged_state_dict(two)


@pytest.mark.parametrize("key", ["vit", "beit"])
def test_dora_merge_scales_each_row_of_the_adapted_weight_to_its_magnitude(key):
    """DoRA's merged weight is m * (W + s B A) / ||W + s B A||, the norm over each output row (nn.Linear's
    (out, in) weight), after training steps moved A, B and m; the merged model computes as the wrapped one."""
    wrapped, model = _wrapped(key, dora=True)
    got = merged_state_dict(wrapped)
    layers = {n: m for n, m in model.named_modules() if "default" in getattr(m, "lora_magnitude_vector", {})}
    assert len(layers) == 4  # qkv and fc1 of both blocks
    for name, layer in layers.items():
        weight, scale = layer.base_layer.weight, layer.scaling["default"]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()
        assert scale == 3.0 and not torch.equal(magnitude, torch.linalg.norm(weight, dim=1))  # alpha / r; m trained
        adapted = weight + scale * (b @ a)
        expected = magnitude[:, None] * adapted / torch.linalg.norm(adapted, dim=1, keepdim=True)
        torch.testing.assert_close(got[f"{name}.weight"], expected.detach())  # fp32 defaults: rtol 1.3e-6, atol 1e-5
    images = torch.randn(3, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = merged_model(wrapped).eval()
        torch.testing.assert_close(plain.forward_features(images), model.forward_features(images))
