"""vitef.bounds against direct torch.linalg computations; measured plasticity never exceeds FC bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from tiny import random_vit

from vitef.bounds import (
    attention_matrix_norm,
    bounds_table,
    compare,
    estimate_radius,
    head_weights,
    layernorm_bound,
    linear_bound,
    mha_bound,
    sequence_length,
)
from vitef.errors import ConfigError
from vitef.models import BLOCK_COMPONENTS, embed
from vitef.plasticity import measure


def tiny_vit(seed: int = 0) -> VisionTransformer:
    return random_vit(seed, norm_noise=0.5, num_heads=4, num_classes=0).eval()


def test_layernorm_and_linear_bounds_equal_direct_computation():
    model = tiny_vit()
    table = bounds_table(model, r=3.0, sigma=0.5).set_index(["layer", "component"])
    for layer, block in enumerate(model.blocks):
        for comp, norm in (("ln1", block.norm1), ("ln2", block.norm2)):
            g = norm.weight.detach().double()
            assert table.loc[(layer, comp), "bound"] == pytest.approx(float(g.abs().max()) / 0.5, rel=1e-12)
            assert table.loc[(layer, comp), "gamma_max"] == pytest.approx(float(g.max()), rel=1e-12)
        for comp, lin in (("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2)):
            w = lin.weight.detach().double()
            direct = float(torch.linalg.svdvals(w)[0])
            assert table.loc[(layer, comp), "bound"] == pytest.approx(direct, rel=1e-10)
            assert linear_bound(lin) == pytest.approx(direct, rel=1e-10)
    assert list(table.reset_index()["component"][:5]) == list(BLOCK_COMPONENTS)


def test_mha_bound_slices_heads_by_rows_and_matches_formula():
    model = tiny_vit()
    attn = model.blocks[1].attn
    heads, dim = attn.num_heads, 32
    dh = dim // heads
    w = attn.qkv.weight.detach().double()  # (3D, D): rows [q; k; v]
    wo = attn.proj.weight.detach().double()  # (D, D)
    hw = head_weights(attn)
    n, r = sequence_length(model), 2.5
    assert n == 17  # 16 patches + CLS
    expected = 0.0
    for h in range(heads):
        rows = slice(h * dh, (h + 1) * dh)
        q, k, v = w[:dim][rows], w[dim : 2 * dim][rows], w[2 * dim :][rows]  # (dh, D) rows of each projection
        o = wo[:, rows]  # (D, dh) input columns of W_O
        torch.testing.assert_close(hw["q"][h], q)
        torch.testing.assert_close(hw["k"][h], k)
        torch.testing.assert_close(hw["v"][h], v)
        torch.testing.assert_close(hw["o"][h], o)
        a = q.T @ k / math.sqrt(dh)  # (D, D)
        a_norm = torch.linalg.matrix_norm(a, ord=2)
        expected += float(
            torch.linalg.matrix_norm(o, ord=2)
            * torch.linalg.matrix_norm(v, ord=2)
            * torch.sqrt(3 * n + (12 * n + 3) * r**4 * a_norm**2)
        )
    # The slices are the heads timm's forward uses: qkv(x) reshaped (B, N, 3, H, d_h).
    x = torch.randn(1, n, dim, dtype=torch.float64)
    qkv = torch.nn.functional.linear(x, w, attn.qkv.bias.double()).reshape(1, n, 3, heads, dh)
    for h in range(heads):
        for i, name in enumerate("qkv"):
            bias = attn.qkv.bias.double().reshape(3, heads, dh)[i, h]
            torch.testing.assert_close(qkv[0, :, i, h], x[0] @ hw[name][h].T + bias)
    assert mha_bound(attn, n=n, r=r)["bound"] == pytest.approx(expected, rel=1e-10)
    direct = torch.stack([torch.linalg.matrix_norm(hw["q"][h].T @ hw["k"][h], ord=2) for h in range(heads)])
    torch.testing.assert_close(attention_matrix_norm(hw["q"], hw["k"]), direct)


def test_estimate_radius_is_mean_rms_token_norm():
    model = tiny_vit()
    torch.manual_seed(1)
    x = torch.randn(7, 3, 16, 16)
    loader = [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(4))]
    with torch.no_grad():
        e = embed(model, x).double()  # (7, N, D)
    expected = float(torch.stack([(t.norm(dim=-1) ** 2).mean().sqrt() for t in e]).mean())
    assert estimate_radius(model, loader) == pytest.approx(expected, rel=1e-6)
    first = float(torch.stack([(t.norm(dim=-1) ** 2).mean().sqrt() for t in e[:3]]).mean())
    assert estimate_radius(model, loader, max_batches=1) == pytest.approx(first, rel=1e-6)
    with pytest.raises(ConfigError, match="no images"):
        estimate_radius(model, [])


@pytest.mark.parametrize("mode", ["embedding", "hidden"])
def test_measured_never_exceeds_fc_bounds(mode):
    model = tiny_vit(seed=3)
    torch.manual_seed(4)
    x, y = torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
    measured = measure(model, [x], [y], mode=mode, keep_samples=True)
    table = compare(bounds_table(model, r=estimate_radius(model, [y])), measured)
    assert {"bound", "measured", "ratio"} <= set(table.columns)
    fc = table[table["component"].isin(["fc1", "fc2"])]
    assert len(fc) == 4
    assert (fc["measured"] <= fc["bound"]).all()
    # Every single pair, not only the mean.
    samples = measured.attrs["samples"]  # (pairs, layers, comps)
    for j, comp in enumerate(measured.attrs["components"]):
        if comp in ("fc1", "fc2"):
            for layer in range(2):
                bound = table.set_index(["layer", "component"]).loc[(layer, comp), "bound"]
                assert np.all(samples[:, layer, j] <= bound * (1 + 1e-6))
    np.testing.assert_allclose(table["ratio"], table["measured"] / table["bound"])


def test_bad_sigma_and_radius():
    model = tiny_vit()
    with pytest.raises(ConfigError, match="sigma=0"):
        layernorm_bound(model.blocks[0].norm1, sigma=0)
    with pytest.raises(ConfigError, match="positive sequence length and radius"):
        mha_bound(model.blocks[0].attn, n=17, r=0.0)
