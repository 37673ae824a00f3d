"""Eva (EVA-02, DINOv3) and Beit in the component registry, against timm's own forward (issue 14, item 1).

Every family is built at a small size (tiny.FAMILY_CASES) with random weights (tiny.perturb_family, so that
LayerScale gains, relative position bias tables and q/v biases are not their trivial initial values), in float64 so
that equalities are tight.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
from tiny import FAMILY_CASES, FAMILY_OF, FAMILY_SMALL, family_model, perturb_family
from torch import nn

from vitef.errors import ComponentError, ModelError
from vitef.models import (
    BLOCK_COMPONENTS,
    COMPONENT_IO,
    assign_components,
    block_module,
    block_trace,
    build_model,
    count_parameters,
    embed,
    embed_context,
    layer_scales,
    mlp_activation,
    mlp_width,
    model_family,
    run_attention,
    run_block,
    set_trainable,
)
from vitef.models.components import PATTERNS, count_units, unit_of, units_of
from vitef.plasticity import measure
from vitef.probe import PROBE_POINTS, block_points, extract_features, point_dim


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)  # once: timm draws every case's initial values in turn (perturb_family replaces them)
    out = {}
    for key in FAMILY_CASES:
        out[key] = perturb_family(family_model(key), seed=1, table_scale=0.5).double().eval()
    return out


def images(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    size = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------


def module_owner(model: nn.Module) -> dict[int, tuple[str, int | None]]:
    """The component of every parameter from the modules that hold it (independent of the name patterns)."""
    owner: dict[int, tuple[str, int | None]] = {}

    def put(params, comp, layer=None):
        for p in params:
            assert id(p) not in owner
            owner[id(p)] = (comp, layer)

    for i, block in enumerate(model.blocks):
        put(block.norm1.parameters(), "ln1", i)
        put(block.attn.parameters(), "mha", i)
        put(block.norm2.parameters(), "ln2", i)
        mlp = block.mlp
        for name in ("fc1", "fc1_g", "fc1_x"):
            if hasattr(mlp, name):
                put(getattr(mlp, name).parameters(), "fc1", i)
        put(mlp.fc2.parameters(), "fc2", i)
        put(mlp.norm.parameters(), "fc2", i)
        for name, comp in (("ls1", "mha"), ("gamma_1", "mha"), ("ls2", "fc2"), ("gamma_2", "fc2")):
            part = getattr(block, name, None)
            if isinstance(part, nn.Module):
                put(part.parameters(), comp, i)
            elif part is not None:
                put([part], comp, i)
    for name in ("patch_embed", "norm_pre", "rel_pos_bias", "rope"):
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            put(part.parameters(), "emb")
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(model, name, None) is not None:
            put([getattr(model, name)], "emb")
    for p in model.parameters():
        owner.setdefault(id(p), ("head", None))  # norm, fc_norm, head
    return owner


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_every_parameter_in_exactly_one_component_and_unit(models, case):
    model = models[case]
    assert model_family(model) == FAMILY_OF[case]
    info = assign_components(model)
    owner = module_owner(model)
    params = dict(model.named_parameters())
    assert len(info) == len(params)
    for name, p in params.items():
        matches = [c for c, pat in PATTERNS.items() if pat.match(name)]
        assert len(matches) == 1, (name, matches)
        assert (info[name].component, info[name].layer) == owner[id(p)], name
    units = units_of(model)
    assert sorted({unit_of(n) for n in params}) == sorted(units)  # every finest unit holds parameters
    counts = count_units(model)
    assert sum(counts.values()) == sum(p.numel() for p in params.values())
    assert sum(count_parameters(model).values()) == sum(p.numel() for p in params.values())


def test_family_specific_names_land_where_documented(models):
    names = {case: {n: i.component for n, i in assign_components(m).items()} for case, m in models.items()}
    assert names["dinov3"]["blocks.0.gamma_1"] == "mha" and names["dinov3"]["blocks.1.gamma_2"] == "fc2"
    assert names["dinov3"]["reg_token"] == "emb"
    assert names["eva02"]["blocks.0.attn.q_bias"] == "mha" and names["eva02"]["blocks.0.attn.v_bias"] == "mha"
    assert names["eva02"]["blocks.0.mlp.fc1.weight"] == "fc1"  # GluMlp: gate and value in one fc1
    clip = names["eva02_clip"]
    for key in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.bias", "attn.norm.weight"):
        assert clip[f"blocks.1.{key}"] == "mha", key
    assert clip["blocks.1.mlp.fc1_g.weight"] == clip["blocks.1.mlp.fc1_x.bias"] == "fc1"
    assert clip["blocks.1.mlp.norm.weight"] == "fc2"
    assert "blocks.0.gamma_2" not in names["eva02_kwargs"] and names["eva02_kwargs"]["blocks.0.gamma_1"] == "mha"
    assert names["rope_mixed"]["rope.freqs"] == "emb"
    assert names["beit"]["blocks.0.attn.relative_position_bias_table"] == "mha"
    assert names["beit_shared"]["rel_pos_bias.relative_position_bias_table"] == "emb"
    assert "blocks.0.attn.relative_position_bias_table" not in names["beit_shared"]


@pytest.mark.parametrize("case", ["dinov3", "eva02_clip", "beit_both"])
@pytest.mark.parametrize("trainable", [["mha"], ["fc1"], ["fc2", "ln1"], ["emb"], ["mha.1"], ["fc1.0"]])
def test_set_trainable_freezes_exactly_the_right_tensors(models, case, trainable):
    model = models[case]
    owner = module_owner(model)
    counts = set_trainable(model, trainable)
    wanted = set()
    for t in trainable:
        comp, _, block = t.partition(".")
        wanted |= {(comp, int(block))} if block else {(comp, i) for i in [None, *range(len(model.blocks))]}
    wanted |= {("head", None)}
    expected: dict[str, int] = {}
    for p in model.parameters():
        comp, layer = owner[id(p)]
        assert p.requires_grad == ((comp, layer) in wanted)
        if p.requires_grad:
            expected[comp] = expected.get(comp, 0) + p.numel()
    assert counts == expected
    set_trainable(model, ["all"])
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_layouts_name_the_supported_families():
    with pytest.raises(
        ComponentError, match=r"matches no component; vitef supports timm VisionTransformer .*Eva.*Beit"
    ):
        assign_components(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ComponentError, match="Sequential is not a supported model.*Eva.*Beit"):
        model_family(nn.Sequential(nn.Linear(2, 2)))
    post = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, use_post_norm=True)
    with pytest.raises(ComponentError, match="post-norm blocks"):
        model_family(post)


def test_build_model_accepts_eva_and_beit_and_refuses_others():
    assert type(build_model("vit_small_patch16_dinov3", pretrained=False, **FAMILY_SMALL)).__name__ == "Eva"
    beit = build_model("beit_base_patch16_224", pretrained=False, use_shared_rel_pos_bias=True, **FAMILY_SMALL)
    assert type(beit).__name__ == "Beit"
    # Overrides are checked against the named model's own class: qkv_fused is an Eva argument, not a ViT one.
    eva = build_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, qkv_fused=False)
    assert eva.blocks[0].attn.q_proj is not None
    with pytest.raises(ModelError, match="unknown key 'qkv_fused' \\(not an argument of timm's VisionTransformer\\)"):
        build_model("vit_tiny_patch16_224", pretrained=False, qkv_fused=False)
    with pytest.raises(ModelError, match="unknown key 'qkv_fusd' \\(not an argument of timm's Eva\\).*'qkv_fused'"):
        build_model("eva02_tiny_patch14_224", pretrained=False, qkv_fusd=False)
    with pytest.raises(ModelError, match="is a ResNet, not a timm VisionTransformer, Eva or Beit"):
        build_model("resnet18", pretrained=False)
    with pytest.raises(ModelError, match="post-norm blocks"):
        build_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, use_post_norm=True)


# ---------------------------------------------------------------------------------------------------
# Blocks against timm's own forward
# ---------------------------------------------------------------------------------------------------


def timm_forward_capture(model: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Inputs and outputs of every module of interest during ``model.forward_features`` (forward hooks)."""
    seen: dict = {}
    handles = []

    def keep(key):
        def hook(module, args, output):
            seen[key] = (args[0], output)

        return hook

    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_hook(keep((i, "block"))))
        for name in ("norm1", "attn", "norm2", "mlp"):
            handles.append(getattr(block, name).register_forward_hook(keep((i, name))))
        for name in ("fc1", "fc1_g", "fc1_x", "fc2"):
            if hasattr(block.mlp, name):
                handles.append(getattr(block.mlp, name).register_forward_hook(keep((i, name))))
    try:
        with torch.no_grad():
            out = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=msg)


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_blocks_and_trace_equal_timm_forward(models, case):
    model = models[case]
    x = images(model, 3, seed=2)
    seen, features = timm_forward_capture(model, x)
    with torch.no_grad():
        h, ctx = embed_context(model, x)
        close(h, embed(model, x))
        for i in range(len(model.blocks)):
            block_in, block_out = seen[(i, "block")]
            close(h, block_in, f"block {i} input")
            out = run_block(model, i, h, ctx)
            close(out, block_out, f"block {i} output")
            t = block_trace(model, i, h, ctx)
            close(t["res2"], out, f"block {i} trace")
            # Every component's input and output in the trace is the one timm's forward computes.
            timm_io = {
                "ln1": seen[(i, "norm1")],
                "mha": seen[(i, "attn")],
                "ln2": seen[(i, "norm2")],
                "fc2": seen[(i, "fc2")],
            }
            if (i, "fc1_g") in seen:  # SwiGLU: FC1 is the concatenation [gate, value], (B, N, 2H)
                gate, value = seen[(i, "fc1_g")][1], seen[(i, "fc1_x")][1]
                timm_io["fc1"] = (seen[(i, "mlp")][0], torch.cat([gate, value], -1))
            else:
                timm_io["fc1"] = seen[(i, "fc1")]
            for comp, (src, dst) in COMPONENT_IO.items():
                close(t[src], timm_io[comp][0], f"block {i} {comp} input")
                close(t[dst], timm_io[comp][1], f"block {i} {comp} output")
            close(t["fc1"], block_module(model, i, "fc1")(t["ln2"]))
            assert t["fc1"].shape[-1] == block_module(model, i, "fc1").out_features
            assert t["act"].shape[-1] == mlp_width(model, i) == t["fc2_in"].shape[-1]
            close(t["fc2"], seen[(i, "mlp")][1] * _gain(model.blocks[i], 2), f"block {i} MLP branch")
            h = out
        close(model.norm(h), features, "forward_features")


def _gain(block, k):
    """The LayerScale gain of branch k as a tensor (1 when absent), read from the block's attributes directly."""
    if hasattr(block, f"ls{k}"):
        ls = getattr(block, f"ls{k}")
        return ls.gamma if hasattr(ls, "gamma") else 1.0
    gamma = getattr(block, f"gamma_{k}", None)
    return 1.0 if gamma is None else gamma


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_layer_scales_multiply_by_the_gains(models, case):
    model = models[case]
    z = torch.randn(2, 5, model.embed_dim, dtype=torch.float64)
    for i, block in enumerate(model.blocks):
        ls1, ls2 = layer_scales(model, i)
        close(ls1(z), z * _gain(block, 1))
        close(ls2(z), z * _gain(block, 2))


def rotate(x: torch.Tensor, emb: torch.Tensor, half: bool) -> torch.Tensor:
    """Rotary embedding written out: pairs (x_j, x_j') turned by the angles whose sin/cos ``emb`` concatenates."""
    sin, cos = emb.chunk(2, -1)
    if half:  # pairs (j, j + d/2)
        a, b = x.chunk(2, -1)
        turned = torch.cat([-b, a], -1)
    else:  # pairs (2j, 2j + 1)
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + turned * sin


def direct_attention(model: nn.Module, layer: int, x: torch.Tensor, ctx) -> torch.Tensor:
    """Multi-head attention of block ``layer`` computed from its weights, RoPE and relative position biases."""
    attn = model.blocks[layer].attn
    B, N, _ = x.shape
    H = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        w = attn.qkv.weight
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        else:
            bias = attn.qkv.bias
        q, k, v = nn.functional.linear(x, w, bias).chunk(3, -1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = (t.reshape(B, N, H, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
    if hasattr(attn, "q_norm"):  # Eva (Identity unless qk_norm)
        q, k = attn.q_norm(q), attn.k_norm(k)
    if ctx.rope is not None:
        rope = ctx.rope[layer] if ctx.per_block else ctx.rope
        n = attn.num_prefix_tokens
        half = attn.rotate_half
        q = torch.cat([q[:, :, :n], rotate(q[:, :, n:], rope, half)], 2)
        k = torch.cat([k[:, :, :n], rotate(k[:, :, n:], rope, half)], 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    table = getattr(attn, "relative_position_bias_table", None)
    if table is not None:
        logits = logits + table[attn.relative_position_index.reshape(-1)].reshape(N, N, H).permute(2, 0, 1)
    if ctx.rel_pos_bias is not None:
        shared = model.rel_pos_bias
        bias = shared.relative_position_bias_table[shared.relative_position_index.reshape(-1)]
        logits = logits + bias.reshape(N, N, H).permute(2, 0, 1)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
    return attn.proj(attn.norm(out) if hasattr(attn, "norm") else out)


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_run_attention_equals_direct_computation(models, case):
    model = models[case]
    with torch.no_grad():
        e, ctx = embed_context(model, images(model, 2, seed=3))
        if FAMILY_OF[case] == "eva":
            assert ctx.rope is not None
        if case in ("beit_shared", "beit_both"):
            assert ctx.rel_pos_bias is not None
        for i in range(len(model.blocks)):
            close(run_attention(model, i, e, ctx), direct_attention(model, i, e, ctx), f"block {i}")


def test_block_context_is_required_where_it_matters(models):
    model = models["dinov3"]
    e = embed(model, images(model, 1, seed=4))
    with pytest.raises(ComponentError, match="needs its context.*embed_context"):
        run_block(model, 0, e)
    vit = models["vit"]
    e = embed(vit, images(vit, 1, seed=4))
    close(run_block(vit, 0, e), vit.blocks[0](e))  # a VisionTransformer's blocks need none


@pytest.mark.parametrize("case", ["eva02", "eva02_clip", "dinov3"])
def test_gated_activation_is_the_mlp_between_fc1_and_fc2(models, case):
    model = models[case]
    mlp = model.blocks[0].mlp
    z = torch.randn(2, 5, model.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        hidden = mlp_activation(model, 0)(block_module(model, 0, "fc1")(z))  # (B, N, H)
        norm = mlp.norm if hasattr(mlp, "norm") else nn.Identity()
        close(mlp.fc2(norm(hidden)), mlp(z))
        if hasattr(mlp, "fc1_g"):
            close(hidden, nn.functional.silu(mlp.fc1_g(z)) * mlp.fc1_x(z))
            fc1 = block_module(model, 0, "fc1")
            close(fc1.weight, torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight]))
            close(nn.functional.linear(z, fc1.weight, fc1.bias), fc1(z))


def test_registry_counts_per_block_components(models):
    """Every block of every family holds each of the five per-block components."""
    for case, model in models.items():
        info = assign_components(model)
        for comp in BLOCK_COMPONENTS:
            layers = {i.layer for i in info.values() if i.component == comp}
            assert layers == set(range(len(model.blocks))), (case, comp)
    np.testing.assert_equal(len(units_of(models["beit"])), 2 + 5 * 2)


# ---------------------------------------------------------------------------------------------------
# Plasticity in both modes
# ---------------------------------------------------------------------------------------------------

PLASTICITY_CASES = ["dinov3", "eva02", "eva02_clip", "rope_mixed", "beit", "beit_shared"]


def pair_ratios(out_x, out_y, in_x, in_y) -> np.ndarray:
    """Per-sample ||out_x - out_y|| / ||in_x - in_y|| over the whole token sequence."""
    num = (out_x - out_y).flatten(1).norm(dim=1)
    den = (in_x - in_y).flatten(1).norm(dim=1)
    return (num / den).numpy()


@pytest.mark.parametrize("case", PLASTICITY_CASES)
def test_hidden_mode_uses_the_inputs_of_timm_forward(models, case):
    model = models[case]
    x, y = images(model, 4, seed=5), images(model, 4, seed=6)
    df = measure(model, [x[:3], x[3:]], [y], mode="hidden", keep_samples=True)
    sx, _ = timm_forward_capture(model, x)
    sy, _ = timm_forward_capture(model, y)
    expected = np.zeros((4, len(model.blocks), len(BLOCK_COMPONENTS)))
    for i in range(len(model.blocks)):
        for j, comp in enumerate(BLOCK_COMPONENTS):
            key = {"ln1": "norm1", "mha": "attn", "ln2": "norm2", "fc1": "fc1", "fc2": "fc2"}[comp]
            if comp == "fc1" and (i, "fc1_g") in sx:  # SwiGLU: [gate, value] on the MLP's input
                io = [(s[(i, "mlp")][0], torch.cat([s[(i, "fc1_g")][1], s[(i, "fc1_x")][1]], -1)) for s in (sx, sy)]
            else:
                io = [s[(i, key)] for s in (sx, sy)]
            (in_x, out_x), (in_y, out_y) = io
            expected[:, i, j] = pair_ratios(out_x, out_y, in_x, in_y)
    np.testing.assert_allclose(df.attrs["samples"], expected, rtol=1e-9)
    assert np.isfinite(df["mean"]).all() and (df["n"] == 4).all()


def zero_pad(e: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([e, e.new_zeros(*e.shape[:-1], width - e.shape[-1])], -1)


@pytest.mark.parametrize("case", PLASTICITY_CASES)
def test_embedding_mode_equals_direct_computation(models, case):
    model = models[case]
    x, y = images(model, 3, seed=7), images(model, 3, seed=8)
    df = measure(model, [x], [y], keep_samples=True)
    expected = np.zeros((3, len(model.blocks), len(BLOCK_COMPONENTS)))
    with torch.no_grad():
        (ex, cx), (ey, cy) = embed_context(model, x), embed_context(model, y)
        for i, block in enumerate(model.blocks):
            mlp = block.mlp
            if hasattr(mlp, "fc1_g"):  # SwiGLU: FC1 is the concatenated gate and value projections

                def fc1(e, mlp=mlp):
                    return torch.cat([mlp.fc1_g(e), mlp.fc1_x(e)], -1)
            else:
                fc1 = mlp.fc1
            fns = {
                "ln1": lambda e, c, b=block: b.norm1(e),
                "mha": lambda e, c, i=i: direct_attention(model, i, e, c),  # RoPE / rel. pos. bias inside
                "ln2": lambda e, c, b=block: b.norm2(e),
                "fc1": lambda e, c, f=fc1: f(e),
                "fc2": lambda e, c, m=mlp: m.fc2(zero_pad(e, m.fc2.in_features)),
            }
            for j, comp in enumerate(BLOCK_COMPONENTS):
                expected[:, i, j] = pair_ratios(fns[comp](ex, cx), fns[comp](ey, cy), ex, ey)
    np.testing.assert_allclose(df.attrs["samples"], expected, rtol=1e-9)
    # Block 0's LN1 sees the embedding itself in both modes.
    hidden = measure(model, [x], [y], mode="hidden", components=["ln1"])
    assert hidden["mean"][0] == pytest.approx(df["mean"][0], rel=1e-10)


@pytest.mark.parametrize("name, kwargs", [FAMILY_CASES[c] for c in ("dinov3", "eva02", "beit")])
def test_acceptance_build_freeze_measure_probe_in_float32(name, kwargs):
    """The issue's acceptance path at small size: build_model, set_trainable, measure (both modes), probe."""
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, num_classes=3, **kwargs)
    assert set_trainable(model, ["fc1"])["fc1"] == count_parameters(model)["fc1"]
    x, y = images(model, 4, seed=9).float(), images(model, 4, seed=10).float()
    for mode in ("embedding", "hidden"):
        df = measure(model, [x], [y], mode=mode)
        assert len(df) == 5 * len(model.blocks) and np.isfinite(df["mean"]).all(), mode
    labels = torch.arange(4) % 3
    bank = extract_features(model, [(x, labels)], num_samples=4, layers=[-1])
    assert bank.num_samples == 4 and all(np.isfinite(g.numpy()).all() for g in bank.groups.values())


# ---------------------------------------------------------------------------------------------------
# Probe features
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dinov3", "eva02_clip", "rope_mixed", "beit_both"])
def test_probe_points_equal_timm_forward(models, case):
    model = models[case]
    x = images(model, 3, seed=11)
    seen, features = timm_forward_capture(model, x)
    with torch.no_grad():
        h, ctx = embed_context(model, x)
        for i, block in enumerate(model.blocks):
            h, feats = block_points(model, i, h, PROBE_POINTS, ctx)
            assert list(feats) == list(PROBE_POINTS)
            close(feats["ln1"], seen[(i, "norm1")][1])
            close(feats["mha"], seen[(i, "attn")][1] * _gain(block, 1))
            close(feats["res1"], seen[(i, "norm2")][0])
            close(feats["ln2"], seen[(i, "norm2")][1])
            close(feats["fc2"], seen[(i, "mlp")][1] * _gain(block, 2))
            close(feats["res2"], seen[(i, "block")][1])
            assert feats["fc1"].shape[-1] == point_dim(model, "fc1") and feats["act"].shape[-1] == point_dim(
                model, "act"
            )
        close(model.norm(h), features)
    # extract_features: the last block's pooled output is forward_features' block output, pooled the same way.
    labels = torch.zeros(3, dtype=torch.long)
    single = copy.deepcopy(model).float()  # the shared fixture stays float64
    bank = extract_features(single, [(x.float(), labels)], num_samples=3, points=["res2", "fc1", "act"])
    last = len(model.blocks) - 1
    w, row = bank.index[(last, "res2")]
    n = model.num_prefix_tokens
    with torch.no_grad():
        blocks_out = seen[(last, "block")][1]
    torch.testing.assert_close(bank.groups[w][row], blocks_out[:, n:].mean(1).float(), rtol=1e-4, atol=1e-5)
    assert {w for w, _ in bank.index.values()} == {model.embed_dim, point_dim(model, "fc1"), point_dim(model, "act")}
