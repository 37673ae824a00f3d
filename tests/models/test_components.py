"""The component registry: every parameter in exactly one component, exact counts, freezing."""

from __future__ import annotations

import pytest
import torch

from vitef.errors import ComponentError
from vitef.models import (
    BLOCK_COMPONENTS,
    COMPONENTS,
    assign_components,
    block_module,
    build_model,
    canonical,
    count_parameters,
    embed,
    mlp_activation,
    set_trainable,
)
from vitef.models.components import PATTERNS

VARIANTS = [
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224.dino", {"img_size": 64}),
    ("vit_small_patch14_dinov2", {"img_size": 56}),  # LayerScale
    ("vit_base_patch14_reg4_dinov2", {"img_size": 56}),  # register tokens + LayerScale
    ("vit_base_patch16_clip_224", {"img_size": 64}),  # norm_pre
    ("vit_medium_patch16_gap_256", {"img_size": 64}),  # fc_norm, no class token
    ("deit_tiny_distilled_patch16_224", {}),  # distillation token and head
]


@pytest.mark.parametrize("name, kwargs", VARIANTS)
def test_every_parameter_in_exactly_one_component(name, kwargs):
    model = build_model(name, pretrained=False, **kwargs)
    info = assign_components(model)
    assert len(info) == len(list(model.parameters()))
    for pname in info:
        matches = [c for c, p in PATTERNS.items() if p.match(pname)]
        assert len(matches) == 1, (pname, matches)
    counts = count_parameters(model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    depth = len(model.blocks)
    for comp in BLOCK_COMPONENTS:
        layers = {i.layer for i in info.values() if i.component == comp}
        assert layers == set(range(depth)), comp


def test_vit_b16_counts_match_protocol():
    model = build_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    expected = {"ln1": 18_432, "ln2": 18_432, "mha": 28_348_416, "fc1": 28_348_416, "fc2": 28_320_768}
    head = 768 * 2 + 768 * 10 + 10  # final LayerNorm + fresh linear head
    for comp, n in expected.items():
        assert set_trainable(model, [comp]) == {comp: n, "head": head}
    full = set_trainable(model, ["all"])
    assert sum(full.values()) == sum(p.numel() for p in model.parameters())
    assert set(full) == set(COMPONENTS)


def test_frozen_parameters_get_no_gradient_and_stay_identical():
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32)
    set_trainable(model, ["mha"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    info = assign_components(model)
    for n, p in model.named_parameters():
        comp = info[n].component
        if comp in ("mha", "head"):
            assert p.grad is not None
        else:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


def test_aliases_and_unknown_names():
    assert [canonical(a) for a in ("attn_norm", "ffn_norm", "ffn_fc1", "ffn_fc2", "MHA")] == [
        "ln1",
        "ln2",
        "fc1",
        "fc2",
        "mha",
    ]
    model = build_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert set_trainable(model, ["ffn_fc1"]) == set_trainable(model, ["fc1"])
    with pytest.raises(ComponentError, match="unknown component 'ffn'.*Valid components: emb, ln1, mha"):
        set_trainable(model, ["ffn"])
    with pytest.raises(ComponentError, match="no component"):
        set_trainable(model, [])


def test_accessors_compute_the_block():
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = embed(model, x)  # (B, N, D)
        assert h.shape == (2, 1 + 4, 192)
        blk = model.blocks[0]
        # Rebuild block 0 from the registry's modules and compare with timm's own forward.
        a = h + block_module(model, 0, "mha")(block_module(model, 0, "ln1")(h))
        z = mlp_activation(model, 0)(block_module(model, 0, "fc1")(block_module(model, 0, "ln2")(a)))
        out = a + block_module(model, 0, "fc2")(z)
        assert torch.allclose(out, blk(h), atol=1e-6)
        # embed + all blocks + final norm = forward_features
        for b in model.blocks:
            h = b(h)
        assert torch.allclose(model.norm(h), model.forward_features(x), atol=1e-6)
    with pytest.raises(ComponentError, match="not a per-block component"):
        block_module(model, 0, "head")


def test_display_names_and_order_are_the_registrys():
    from vitef.models.components import DISPLAY_NAMES, DISPLAY_ORDER, RANK_ORDER, display_name, display_order

    # One label and one place in the order for every component and for full finetuning.
    assert set(DISPLAY_NAMES) == set(DISPLAY_ORDER) == {*COMPONENTS, "all"}
    assert RANK_ORDER == ("mha", "fc1", "fc2", "ln2", "ln1") == DISPLAY_ORDER[:5]
    assert display_name("all") == "all" and display_name("fc1+fc2") == "FC1+FC2" and display_name("x") == "x"
    assert display_order(["fc1+fc2", "emb", "all", "ln1", "mha", "mha"]) == ["mha", "ln1", "all", "emb", "fc1+fc2"]
