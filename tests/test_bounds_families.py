"""vitef.bounds on timm Eva (DINOv3, EVA-02, EVA-02 CLIP, mixed RoPE) and Beit: the tables against direct
computations, every bound against rates of change measured with the modules' own forward, RoPE and query-bias
counterexamples to the rotation-blind / bias-free formula, and the layouts the MHA bound refuses."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention
from timm.models.vision_transformer import Attention
from tiny import family_model, perturb_family
from torch import nn

from vitef.bounds import (
    ANGLE_STEP,
    bounds_table,
    estimate_radius,
    head_weights,
    mha_bound,
    relative_rotations,
    rope_angles,
    rope_of,
    rotation_matrices,
    sequence_length,
)
from vitef.errors import ComponentError
from vitef.landscape import top_directions

# The cases of tiny.FAMILY_CASES the bounds are checked on: RoPE in both layouts (DINOv3: half, 4 registers + CLS;
# EVA-02: interleaved, fused qkv + q_bias/v_bias, packed SwiGLU), separate q/k/v projections with an inner norm
# (EVA-02 CLIP), one rotary embedding per block and head (mixed RoPE), relative position biases (BEiT).
CASES = ("dinov3", "eva02", "eva02_clip", "rope_mixed", "beit")
# Sequence lengths: 4 patches (2 × 2 grid) plus the prefix tokens.
SEQUENCE = {"dinov3": 9, "eva02": 5, "eva02_clip": 5, "rope_mixed": 5, "beit": 5}


def build(key: str, *, zero_qk_bias: bool = True) -> nn.Module:
    """The case ``key`` with every parameter away from its init (gains near 1), float64, eval mode.

    ``zero_qk_bias``: zero the query and key biases, for which the paper's formula has no term (see
    :func:`test_query_bias_needs_the_augmented_bound`).
    """
    torch.manual_seed(0)
    model = family_model(key).double().eval().requires_grad_(False)
    perturb_family(model, seed=1, table_scale=0.3)  # drawn in float64, unlike the registry tests' models
    with torch.no_grad():
        if zero_qk_bias:
            for block in model.blocks:
                attn = block.attn
                for holder, name in ((attn, "q_bias"), (getattr(attn, "q_proj", None), "bias")):
                    if isinstance(getattr(holder, name, None), torch.Tensor):
                        getattr(holder, name).zero_()
                qkv = getattr(attn, "qkv", None)
                if isinstance(qkv, nn.Linear) and qkv.bias is not None:
                    qkv.bias[: 2 * qkv.out_features // 3] = 0  # the q and k thirds
    return model


def attention_call(model: nn.Module, layer: int):
    """Block ``layer``'s attention alone as timm's forward calls it: the rope of ``model._pos_embed`` (Eva), the
    shared relative position bias (Beit)."""
    attn = model.blocks[layer].attn
    attn.fused_attn = False  # the explicit path: forward-mode derivatives, and float64 throughout
    if type(model).__name__ == "Eva":
        blank = torch.zeros(1, 3, *model.patch_embed.img_size, dtype=torch.float64)
        _, rope = model._pos_embed(model.patch_embed(blank))
        if getattr(model, "rope_mixed", False):
            rope = rope[layer]
        return lambda x: attn(x, rope=rope)
    bias = model.rel_pos_bias() if getattr(model, "rel_pos_bias", None) is not None else None
    return lambda x: attn(x, shared_rel_pos_bias=bias)


def fc1_call(mlp: nn.Module):
    """FC1 as the linear map before the activation / gate, from the MLP's own layers."""
    if hasattr(mlp, "fc1_g"):
        return lambda x: torch.cat([mlp.fc1_g(x), mlp.fc1_x(x)], dim=-1)  # (B, N, 2H)
    return mlp.fc1


def ratios(f, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||f(x_b) − f(y_b)||_F / ||x_b − y_b||_F`` per pair b."""
    with torch.no_grad():
        return (f(x) - f(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)  # (B,)


def min_std_on_segments(x: torch.Tensor, y: torch.Tensor, f=lambda z: z, points: int = 33) -> float:
    """The smallest per-token standard deviation of ``f`` at ``points`` points of the segments from x to y."""
    with torch.no_grad():
        return min(float(f(x + t * (y - x)).std(-1, unbiased=False).min()) for t in torch.linspace(0, 1, points))


@pytest.mark.parametrize("key", list(CASES))
def test_bounds_table_equals_direct_computation(key):
    model = build(key)
    n = sequence_length(model)
    assert n == SEQUENCE[key] == model.patch_embed.num_patches + model.num_prefix_tokens
    table = bounds_table(model, r=2.0, sigma=0.5)
    assert len(table) == 5 * len(model.blocks)
    assert table["bound"].gt(0).all() and table["bound"].map(math.isfinite).all()
    t = table.set_index(["layer", "component"])
    for layer, block in enumerate(model.blocks):
        for comp, norm in (("ln1", block.norm1), ("ln2", block.norm2)):
            assert t.loc[(layer, comp), "bound"] == pytest.approx(float(norm.weight.abs().max()) / 0.5, rel=1e-12)
        mlp = block.mlp
        w1 = torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight]) if hasattr(mlp, "fc1_g") else mlp.fc1.weight
        assert w1.shape[0] == 2 * mlp.fc2.in_features or key in ("dinov3", "rope_mixed", "beit")  # gated: (2H, D)
        assert t.loc[(layer, "fc1"), "bound"] == pytest.approx(float(torch.linalg.svdvals(w1)[0]), rel=1e-10)
        assert t.loc[(layer, "fc2"), "bound"] == pytest.approx(float(torch.linalg.svdvals(mlp.fc2.weight)[0]))
        for comp, gamma in (("mha", getattr(block, "gamma_1", None)), ("fc2", getattr(block, "gamma_2", None))):
            if gamma is None:
                gamma = getattr(getattr(block, "ls1" if comp == "mha" else "ls2", None), "gamma", None)
            expected = float(gamma.abs().max()) if gamma is not None else math.nan
            assert t.loc[(layer, comp), "layer_scale"] == pytest.approx(expected, nan_ok=True)
        row = t.loc[(layer, "mha")]
        assert bool(row["rope"]) == (key != "beit") and row["n"] == n and row["r"] == 2.0
    # The inner norm of EVA-02 CLIP's attention uses σ; no other MHA row does.
    assert t.xs("mha", level="component")["sigma"].notna().all() == (key == "eva02_clip")


@pytest.mark.parametrize("key", list(CASES))
def test_every_bound_exceeds_the_rates_measured_with_the_modules_forward(key):
    model = build(key)
    n, dim = sequence_length(model), model.embed_dim
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, n, dim, generator=g, dtype=torch.float64)  # (B, N, D)
    y = x + 0.7 * torch.randn(12, n, dim, generator=g, dtype=torch.float64)
    r = float(torch.cat([x, y]).norm(dim=-1).max())  # every token on the segments has norm <= r
    # σ: below every per-token std the LayerNorms (and EVA-02 CLIP's inner norm) see on the segments x → y.
    sigmas = [min_std_on_segments(x, y)]
    for layer, block in enumerate(model.blocks):
        inner = getattr(block.attn, "norm", None)
        if inner is not None and not isinstance(inner, nn.Identity):
            seen: list[torch.Tensor] = []  # per-token std of the inner norm's input

            def keep(_module, args, out=seen):
                out.append(args[0].std(-1, unbiased=False))

            hook = inner.register_forward_pre_hook(keep)
            min_std_on_segments(x, y, attention_call(model, layer))
            hook.remove()
            sigmas.append(float(torch.cat([s.flatten() for s in seen]).min()))
    sigma = 0.9 * min(sigmas)
    table = bounds_table(model, r=r, sigma=sigma).set_index(["layer", "component"])
    for layer, block in enumerate(model.blocks):
        hidden = block.mlp.fc2.in_features
        functions = {
            "ln1": block.norm1,
            "mha": attention_call(model, layer),
            "ln2": block.norm2,
            "fc1": fc1_call(block.mlp),
            "fc2": lambda e, fc2=block.mlp.fc2, h=hidden: fc2(nn.functional.pad(e, (0, h - e.shape[-1]))),
        }
        for comp, f in functions.items():
            measured = ratios(f, x, y)
            bound = table.loc[(layer, comp), "bound"]
            assert measured.max() <= bound * (1 + 1e-9), (key, layer, comp, float(measured.max()), bound)
    # The linear bounds are attained by the top singular direction: measured == bound there (the test can fail).
    mlp = model.blocks[0].mlp
    w1 = torch.cat([mlp.fc1_g.weight, mlp.fc1_x.weight]) if hasattr(mlp, "fc1_g") else mlp.fc1.weight  # (H', D)
    top = torch.linalg.svd(w1)[2][0]  # (D,) top right-singular vector
    along = ratios(fc1_call(mlp), x[:1], x[:1] + top)
    assert float(along[0]) == pytest.approx(table.loc[(0, "fc1"), "bound"], rel=1e-9)


@pytest.mark.parametrize("key", ["dinov3", "eva02", "rope_mixed"])
def test_rotations_are_timms_and_the_relative_set_is_every_pair(key):
    model = build(key)
    attn = model.blocks[0].attn
    half, prefix = bool(attn.rotate_half), attn.num_prefix_tokens
    rope = rope_of(model)  # (N_p, 2 d_h) or (H, N_p, 2 d_h)
    blank = torch.zeros(1, 3, *model.patch_embed.img_size, dtype=torch.float64)
    expected = model._pos_embed(model.patch_embed(blank))[1]
    torch.testing.assert_close(rope, expected[0] if getattr(model, "rope_mixed", False) else expected)
    d_h = rope.shape[-1] // 2
    heads_rope = rope if rope.dim() == 3 else rope.unsqueeze(0)  # (H or 1, N_p, 2 d_h)
    theta = rope_angles(heads_rope, half=half, prefix=prefix)  # (H or 1, N, d_h / 2)
    assert torch.equal(theta[:, :prefix], torch.zeros_like(theta[:, :prefix]))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(len(heads_rope), theta.shape[1] - prefix, d_h, generator=g, dtype=torch.float64)
    timm_rotated = apply_rot_embed_cat(q, heads_rope.double(), half=half)  # what the attention does
    for h in range(len(heads_rope)):
        mats = rotation_matrices(theta[h, prefix:], half=half)  # (N_p, d_h, d_h)
        torch.testing.assert_close(torch.einsum("nij,nj->ni", mats, q[h]), timm_rotated[h], atol=1e-6, rtol=0)
    # a^h = the largest ||Wqᵀ R_iᵀ R_j Wk|| over every pair of tokens, brute force.
    hw = head_weights(attn)
    shared = relative_rotations(rope, half=half, prefix=prefix)
    per_head = shared if isinstance(shared, list) else [shared] * attn.num_heads
    n = theta.shape[1]
    for h in range(attn.num_heads):
        mats = rotation_matrices(theta[h if len(theta) > 1 else 0], half=half)  # (N, d_h, d_h): R_i
        brute = max(
            float(torch.linalg.matrix_norm(hw["q"][h].T @ mats[i].T @ mats[j] @ hw["k"][h], ord=2))
            for i in range(n)
            for j in range(n)
        )
        forms = hw["q"][h].T @ per_head[h] @ hw["k"][h]  # (U, D, D): the deduplicated rotations
        dedup = float(torch.linalg.matrix_norm(forms, ord=2).max())
        assert dedup == pytest.approx(brute, rel=10 * ANGLE_STEP)
        assert len(per_head[h]) <= n * n
    bound = mha_bound(attn, n=n, r=2.0, rope=rope)
    plain = mha_bound(attn, n=n, r=2.0)
    assert bound["rope"] and not plain["rope"]
    assert bound["max_head_attn_norm"] >= plain["max_head_attn_norm"] and bound["bound"] >= plain["bound"]


def jacobian_norm(f, x: torch.Tensor) -> float:
    """The top singular value of f's Jacobian at x (a lower bound on its Lipschitz constant)."""
    return top_directions(f, x, iters=150, tol=1e-5).sigma1


def test_rope_breaks_the_rotation_blind_bound_and_not_the_rope_bound():
    """Queries on the first coordinate of each rotation pair, keys on the second: (W_Q)ᵀ W_K = 0, so the formula
    without rotations is that of uniform attention, but RoPE turns the pairs and the logits move with the input."""
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, embed_dim=16,
                              num_heads=1).double().eval()  # fmt: skip
    attn = model.blocks[0].attn
    assert not attn.rotate_half  # interleaved pairs (2m, 2m + 1)
    with torch.no_grad():
        w = attn.qkv.weight  # (3 d_h, D): rows [q; k; v]
        w.normal_()
        d_h = attn.head_dim
        w[1:d_h:2] = 0  # queries: first coordinate of each pair only
        w[d_h : 2 * d_h : 2] = 0  # keys: second coordinate only
        attn.q_bias.zero_()
    hw = head_weights(attn)
    assert float((hw["q"][0].T @ hw["k"][0]).abs().max()) == 0.0
    f = attention_call(model, 0)
    n, r = sequence_length(model), 4.0
    g = torch.Generator().manual_seed(3)
    measured = 0.0
    for _ in range(4):
        x = torch.randn(1, n, 16, generator=g, dtype=torch.float64)
        measured = max(measured, jacobian_norm(f, r * x / x.norm(dim=-1, keepdim=True)))  # tokens of norm r
    blind = mha_bound(attn, n=n, r=r)["bound"]
    aware = bounds_table(model, r=r, components=["mha"])["bound"].iloc[0]
    assert blind < measured <= aware  # the rotation-blind formula fails here; the RoPE bound holds


def test_query_bias_needs_the_augmented_bound():
    """W_Q = 0 with a query bias: the bias-free formula sees no logits at all, yet they move with the keys."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=16,
                              num_heads=1).double().eval()  # fmt: skip
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight.normal_()
        attn.qkv.weight[:16] = 0  # W_Q = 0
        attn.q_bias.normal_().mul_(3)
    hw = head_weights(attn)
    torch.testing.assert_close(hw["q_bias"].flatten(), attn.q_bias.detach())
    assert torch.equal(hw["k_bias"], torch.zeros(1, 16, dtype=torch.float64))  # BEiT's k_bias is a zero buffer
    f = attention_call(model, 0)
    n, r = sequence_length(model), 1.0
    g = torch.Generator().manual_seed(0)
    measured = 0.0
    for _ in range(4):
        x = torch.randn(1, n, 16, generator=g, dtype=torch.float64)
        measured = max(measured, jacobian_norm(f, r * x / x.norm(dim=-1, keepdim=True)))
    plain = mha_bound(attn, n=n, r=r)["bound"]
    augmented = bounds_table(model, r=r, components=["mha"], mha_bias=True)["bound"].iloc[0]
    assert plain < measured <= augmented


@pytest.mark.parametrize("key", ["eva02", "eva02_clip", "beit"])
def test_head_weights_give_the_modules_queries_keys_and_values(key):
    model = build(key, zero_qk_bias=False)
    attn = model.blocks[0].attn
    hw = head_weights(attn)
    heads, d_h = attn.num_heads, hw["q"].shape[1]
    x = torch.randn(2, 5, model.embed_dim, dtype=torch.float64)
    if getattr(attn, "qkv", None) is not None:  # fused weight, biases beside it
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        qkv = nn.functional.linear(x, attn.qkv.weight, bias).reshape(2, 5, 3, heads, d_h)
        direct = dict(zip("qkv", qkv.unbind(2)))  # each (B, N, H, d_h)
    else:
        direct = {c: getattr(attn, f"{c}_proj")(x).reshape(2, 5, heads, d_h) for c in "qkv"}
    for c in "qkv":
        mine = torch.einsum("bnd,hed->bnhe", x, hw[c]) + hw[f"{c}_bias"]
        torch.testing.assert_close(mine, direct[c].detach())
    torch.testing.assert_close(hw["o"].permute(1, 0, 2).reshape(attn.proj.weight.shape), attn.proj.weight.detach())


@pytest.mark.parametrize("key", ["dinov3", "eva02_clip", "beit"])
def test_radius_uses_the_tokens_timm_feeds_the_first_block(key):
    model = build(key)
    images = torch.randn(5, 3, *model.patch_embed.img_size, dtype=torch.float64)
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model.forward_features(images)
    hook.remove()
    tokens = seen[0]  # (B, N, D)
    assert tokens.shape[1] == sequence_length(model)
    expected = float(tokens.pow(2).sum(-1).mean(-1).sqrt().mean())
    assert estimate_radius(model, [(images[:2], None), (images[2:], None)]) == pytest.approx(expected, rel=1e-12)


def test_attention_outside_the_formula_is_refused():
    for attn, what in (
        (EvaAttention(16, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm), "q_norm"),
        (Attention(16, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm), "q_norm"),
        (EvaAttention(16, num_heads=2, gated=True, scale_norm=False), "attn.gate"),
    ):
        with pytest.raises(ComponentError, match=f"plain dot-product softmax attention.*{what}.*components="):
            mha_bound(attn, n=5, r=1.0)
    with pytest.raises(ComponentError, match="neither a fused qkv nor q_proj/k_proj/v_proj"):
        mha_bound(nn.MultiheadAttention(16, 2), n=5, r=1.0)
