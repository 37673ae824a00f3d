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
    canonical_list,
    count_parameters,
    embed,
    mlp_activation,
    set_trainable,
)
from vitef.models.components import PATTERNS, canonical_unit, count_units, unit_of, units_of

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


# ---------------------------------------------------------------------------------------------------
# Units (issue 12): one component in some blocks
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written, canonical_name",
    [
        ("mha.3", "mha.3"),
        ("attn.03", "mha.3"),  # aliases and leading zeros
        (" FC1.0-5 ", "fc1.0-5"),
        ("fc1.2-2", "fc1.2"),  # a one-block range is that block
        ("ln2.*", "ln2"),  # every block is the component
        ("ffn_norm.1", "ln2.1"),
        ("emb", "emb"),
        ("head", "head"),
        ("all", "all"),
    ],
)
def test_unit_parsing(written, canonical_name):
    assert canonical_unit(written) == canonical_name


@pytest.mark.parametrize(
    "written, match",
    [
        ("mha.x", r"unit 'mha.x': 'x' is not a block.*write <component>\.<blocks>: mha\.3 \(block 3\), fc1\.0-5"),
        ("mha.", r"'' is not a block"),
        ("mha.1-", r"is not a block"),
        ("mha.5-2", r"range 5-2 is reversed, write mha\.2-5"),
        ("emb.3", r"emb has no blocks, write emb \(units with blocks: ln1, mha, ln2, fc1, fc2\)"),
        ("head.*", r"head has no blocks"),
        ("all.0", r"all has no blocks"),
        ("mlp.3", r"unknown component 'mlp'.*in unit 'mlp.3'; a unit is written <component>\.<blocks>"),
    ],
)
def test_bad_units_name_the_valid_forms(written, match):
    with pytest.raises(ComponentError, match=match):
        canonical_unit(written)
    with pytest.raises(ComponentError, match=match):
        canonical_list(["mha", written])


def test_canonical_list_takes_units_next_to_components():
    assert canonical_list(["attn", "mha.3", "attention.3", "ln2.*", "ln2", "fc1.0-1"]) == [
        "mha",
        "mha.3",
        "ln2",
        "fc1.0-1",
    ]
    assert canonical_list("fc2.1") == ["fc2.1"]


def test_every_parameter_in_exactly_one_unit():
    for name, kwargs in VARIANTS[:3] + VARIANTS[-2:]:
        model = build_model(name, pretrained=False, **kwargs)
        depth = len(model.blocks)
        units = units_of(model)
        assert units[0] == "emb" and units[-1] == "head" and len(units) == 2 + 5 * depth
        assert units[1:6] == ["ln1.0", "mha.0", "ln2.0", "fc1.0", "fc2.0"]
        counts = count_units(model)
        assert list(counts) == units
        assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
        # Units add up to their component.
        per_comp = count_parameters(model)
        for comp in COMPONENTS:
            assert sum(n for u, n in counts.items() if u.split(".")[0] == comp) == per_comp[comp], (name, comp)
        # Each parameter's unit, and only it, trains it: set_trainable on a unit covers exactly its parameters.
        for unit in ("mha.0", f"fc2.{depth - 1}", "emb"):
            set_trainable(model, [unit])
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            expected = {n for n, _ in model.named_parameters() if unit_of(n) in (unit, "head")}
            assert trained == expected, (name, unit)


def test_set_trainable_with_units_trains_exactly_their_blocks():
    model = build_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=4)
    units = count_units(model)
    counts = set_trainable(model, ["mha.1", "fc1.0-2", "ln2.*"])
    head = units["head"]
    assert counts == {
        "mha": units["mha.1"],
        "ln2": sum(units[f"ln2.{i}"] for i in range(4)),
        "fc1": sum(units[f"fc1.{i}"] for i in range(3)),
        "head": head,
    }
    info = assign_components(model)
    for n, p in model.named_parameters():
        i = info[n]
        want = (
            i.component in ("ln2", "head")
            or (i.component == "mha" and i.layer == 1)
            or (i.component == "fc1" and i.layer <= 2)
        )
        assert p.requires_grad == want, n
    # A component and its every-block unit train the same parameters; whole components behave as before.
    assert set_trainable(model, ["ln2.*"]) == set_trainable(model, ["ln2"])
    assert set_trainable(model, ["mha.0-3"]) == set_trainable(model, ["mha"])
    assert set_trainable(model, ["all", "mha.1"]) == set_trainable(model, ["all"])


def test_out_of_range_units_fail_before_changing_the_model():
    model = build_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    set_trainable(model, ["ln1"])
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for unit, match in [("mha.2", r"unit 'mha.2' names block 2, but this model has blocks 0-1: write mha\.0 … mha\.1"),
                        ("fc1.0-5", r"unit 'fc1.0-5' names block 5.*fc1\.0-1.*fc1\.\* \(every block\)")]:  # fmt: skip
        with pytest.raises(ComponentError, match=match):
            set_trainable(model, ["mha", unit])
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
