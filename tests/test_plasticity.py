"""vitef.plasticity.measure against direct computations on tiny random ViTs (arXiv 2602.06883, §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from tiny import random_vit

from vitef.errors import ComponentError, ConfigError
from vitef.models import BLOCK_COMPONENTS, block_module, build_model, embed, mlp_activation
from vitef.plasticity import COLUMNS, RunningStats, iter_pairs, measure


def tiny_vit(seed: int = 0, dtype=torch.float64, **kwargs) -> VisionTransformer:
    return random_vit(seed, norm_noise=0.3, num_classes=0, **kwargs).to(dtype).eval()


def images(n: int, seed: int, dtype=torch.float64, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype)


def batches(x: torch.Tensor, bs: int, labels: bool = False):
    for i in range(0, len(x), bs):
        yield (x[i : i + bs], torch.zeros(len(x[i : i + bs]), dtype=torch.long)) if labels else x[i : i + bs]


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).flatten().norm())


def zero_pad(e: torch.Tensor, width: int) -> torch.Tensor:
    """[e, 0, ..., 0] along the feature axis, to ``width`` features."""
    return torch.cat([e, e.new_zeros(*e.shape[:-1], width - e.shape[-1])], -1)


def naive_embedding(model, x, y) -> np.ndarray:
    """(pairs, layers, comps) ratios, one pair and one component at a time, FC2 on the padded input."""
    out = np.zeros((len(x), len(model.blocks), len(BLOCK_COMPONENTS)))
    with torch.no_grad():
        for i in range(len(x)):
            ex, ey = embed(model, x[i : i + 1]), embed(model, y[i : i + 1])
            den = dist(ex, ey)
            for layer, block in enumerate(model.blocks):
                fns = {
                    "ln1": block.norm1,
                    "mha": block.attn,
                    "ln2": block.norm2,
                    "fc1": block.mlp.fc1,
                    "fc2": lambda e, b=block: b.mlp.fc2(zero_pad(e, b.mlp.fc2.in_features)),
                }
                for j, comp in enumerate(BLOCK_COMPONENTS):
                    out[i, layer, j] = dist(fns[comp](ex), fns[comp](ey)) / den
    return out


def stats_of(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return samples.mean(0), samples.std(0, ddof=1)


def test_embedding_mode_equals_naive_computation():
    model = tiny_vit()
    x, y = images(10, 1), images(10, 2)
    df = measure(model, batches(x, 4, labels=True), batches(y, 3), keep_samples=True)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 2 * 5
    assert list(df["component"][:5]) == list(BLOCK_COMPONENTS)
    naive = naive_embedding(model, x, y)
    np.testing.assert_allclose(df.attrs["samples"], naive, rtol=1e-9)
    mean, std = stats_of(naive)
    np.testing.assert_allclose(df["mean"].to_numpy(), mean.reshape(-1), rtol=1e-9)
    np.testing.assert_allclose(df["std"].to_numpy(), std.reshape(-1), rtol=1e-9)
    np.testing.assert_allclose(df["ci95"].to_numpy(), 1.96 * std.reshape(-1) / np.sqrt(10), rtol=1e-9)
    assert (df["n"] == 10).all()
    assert df.attrs["n_pairs"] == 10


def test_embedding_mode_fp32_matches_float64_naive():
    model64 = tiny_vit()
    model32 = tiny_vit().float()
    x, y = images(6, 3), images(6, 4)
    naive = naive_embedding(model64, x, y)
    df = measure(model32, [x.float()], [y.float()], keep_samples=True)
    np.testing.assert_allclose(df.attrs["samples"], naive, rtol=1e-5)


def test_padded_fc2_equals_first_columns():
    model = tiny_vit()
    fc2 = model.blocks[0].mlp.fc2
    e = embed(model, images(2, 5))  # (2, N, D)
    d = e.shape[-1]
    padded = torch.cat([e, e.new_zeros(*e.shape[:-1], fc2.in_features - d)], -1)
    direct = torch.nn.functional.linear(e, fc2.weight[:, :d], fc2.bias)
    torch.testing.assert_close(fc2(padded), direct, rtol=1e-12, atol=1e-12)


def test_orthogonal_linear_layers_have_plasticity_one():
    model = tiny_vit()
    with torch.no_grad():
        for block in model.blocks:
            w1 = block.mlp.fc1.weight  # (4D, D)
            block.mlp.fc1.weight.copy_(torch.linalg.qr(torch.randn_like(w1))[0])  # orthonormal columns
            w2 = block.mlp.fc2.weight  # (D, 4D): make its first D columns orthogonal
            w2[:, : w2.shape[0]] = torch.linalg.qr(torch.randn(w2.shape[0], w2.shape[0], dtype=w2.dtype))[0]
    df = measure(model, [images(5, 6)], [images(5, 7)], components=["fc1", "ffn_fc2"], keep_samples=True)
    assert set(df["component"]) == {"fc1", "fc2"}
    np.testing.assert_allclose(df.attrs["samples"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(df["mean"], 1.0, rtol=1e-12)


@pytest.mark.parametrize("mode", ["embedding", "hidden"])
def test_scaling_layernorm_gain_scales_its_plasticity(mode):
    model = tiny_vit()
    x, y = images(6, 8), images(6, 9)
    before = measure(model, [x], [y], components=["ln1", "mha"], mode=mode)
    c = 2.5
    with torch.no_grad():
        model.blocks[0].norm1.weight.mul_(c)
    after = measure(model, [x], [y], components=["ln1", "mha"], mode=mode)
    b0 = before.set_index(["layer", "component"])["mean"]
    a0 = after.set_index(["layer", "component"])["mean"]
    assert a0[(0, "ln1")] == pytest.approx(c * b0[(0, "ln1")], rel=1e-10)
    assert a0[(1, "ln1")] == pytest.approx(b0[(1, "ln1")], rel=1e-10) if mode == "embedding" else True
    if mode == "embedding":
        # The same e goes to every component: the change touches nothing else.
        assert a0[(0, "mha")] == pytest.approx(b0[(0, "mha")], rel=1e-12)


def manual_block(block, h):
    """A timm pre-norm block written out by hand: the input every component really receives."""
    n1 = block.norm1(h)
    a = block.attn(n1)
    r = h + block.ls1(a)
    n2 = block.norm2(r)
    f1 = block.mlp.fc1(n2)
    act = block.mlp.norm(block.mlp.act(f1))
    f2 = block.mlp.fc2(act)
    out = r + block.ls2(f2)
    inputs = {"ln1": h, "mha": n1, "ln2": r, "fc1": n2, "fc2": act}
    outputs = {"ln1": n1, "mha": a, "ln2": n2, "fc1": f1, "fc2": f2}
    return out, inputs, outputs


@pytest.mark.parametrize("init_values", [None, 0.1])  # 0.1: LayerScale (ls1/ls2) in the residual stream
def test_hidden_mode_equals_inputs_of_real_forward(init_values):
    model = tiny_vit(init_values=init_values)
    if init_values:
        with torch.no_grad():
            for block in model.blocks:
                block.ls1.gamma.copy_(torch.rand_like(block.ls1.gamma) + 0.5)
    x, y = images(5, 10), images(5, 11)
    df = measure(model, batches(x, 2), batches(y, 5), mode="hidden", keep_samples=True)

    # Hook-captured inputs of a real forward pass, one sample at a time.
    captured: dict = {}
    handles = [
        block_module(model, layer, comp).register_forward_pre_hook(
            lambda m, args, key=(layer, comp): captured.__setitem__(key, args[0].clone())
        )
        for layer in range(2)
        for comp in BLOCK_COMPONENTS
    ]
    expected = np.zeros((5, 2, 5))
    with torch.no_grad():
        for i in range(5):
            feats = {}
            for tag, img in (("x", x[i : i + 1]), ("y", y[i : i + 1])):
                h = embed(model, img)
                for layer, block in enumerate(model.blocks):
                    h_manual, inputs, _ = manual_block(block, h)
                    captured.clear()
                    h = block(h)
                    torch.testing.assert_close(h, h_manual)
                    for comp in BLOCK_COMPONENTS:
                        torch.testing.assert_close(captured[(layer, comp)], inputs[comp])
                        feats[(tag, layer, comp)] = captured[(layer, comp)]
            for layer in range(2):
                for j, comp in enumerate(BLOCK_COMPONENTS):
                    f = block_module(model, layer, comp)
                    ix, iy = feats[("x", layer, comp)], feats[("y", layer, comp)]
                    expected[i, layer, j] = dist(f(ix), f(iy)) / dist(ix, iy)
    for h in handles:
        h.remove()
    assert mlp_activation(model, 0) is model.blocks[0].mlp.act
    np.testing.assert_allclose(df.attrs["samples"], expected, rtol=1e-9)
    np.testing.assert_allclose(df["mean"].to_numpy(), expected.mean(0).reshape(-1), rtol=1e-9)
    # Block 0's LN1 sees the embedding itself in both modes.
    emb = measure(model, [x], [y], components=["ln1"])
    assert emb["mean"][0] == pytest.approx(df["mean"][0], rel=1e-10)


def test_identical_pairs_are_left_out():
    model = tiny_vit()
    x, y = images(4, 12), images(4, 13)
    y[1] = x[1]  # identical pair: zero distance everywhere
    df = measure(model, [x], [y], keep_samples=True)
    s = df.attrs["samples"]
    assert np.isnan(s[1]).all() and not np.isnan(s[[0, 2, 3]]).any()
    assert (df["n"] == 3).all() and df.attrs["n_pairs"] == 4
    np.testing.assert_allclose(df["mean"].to_numpy(), s[[0, 2, 3]].mean(0).reshape(-1), rtol=1e-12)
    hidden = measure(model, [x], [y], mode="hidden")
    assert (hidden["n"] == 3).all()


def test_n_pairs_and_rechunking():
    x, y = images(11, 14), images(9, 15)
    chunks = list(iter_pairs(batches(x, 4), batches(y, 3)))
    assert [len(a) for a, _ in chunks] == [3, 1, 2, 2, 1]
    torch.testing.assert_close(torch.cat([a for a, _ in chunks]), x[:9])
    torch.testing.assert_close(torch.cat([b for _, b in chunks]), y[:9])
    assert sum(len(a) for a, _ in iter_pairs(batches(x, 4), batches(y, 3), n_pairs=5)) == 5
    model = tiny_vit()
    whole = measure(model, [x[:7]], [y[:7]])
    split = measure(model, batches(x, 4), batches(y, 3), n_pairs=7)
    np.testing.assert_allclose(split["mean"], whole["mean"], rtol=1e-12)
    assert (split["n"] == 7).all()


def test_running_stats_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 3, 50))
    values[0, 0, 5] = np.nan
    stats = RunningStats((2, 3))
    for i in range(0, 50, 7):
        stats.update(values[..., i : i + 7])
    np.testing.assert_allclose(stats.mean, np.nanmean(values, -1), rtol=1e-12)
    np.testing.assert_allclose(stats.std(), np.nanstd(values, -1, ddof=1), rtol=1e-12)
    assert stats.count[0, 0] == 49 and stats.seen == 50


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_is_close(precision):
    model = tiny_vit(dtype=torch.float32)
    x, y = images(6, 16, torch.float32), images(6, 17, torch.float32)
    ref = measure(model, [x], [y])
    low = measure(model, [x], [y], precision=precision)
    np.testing.assert_allclose(low["mean"], ref["mean"], rtol=0.1)
    assert model.blocks[0].norm1.weight.dtype == torch.float32


def test_restores_training_mode_and_rejects_bad_arguments():
    model = tiny_vit().train()
    x = images(2, 18)
    measure(model, [x], [x.flip(0)])
    assert model.training
    with pytest.raises(ConfigError, match="mode='final'.*embedding, hidden"):
        measure(model, [x], [x], mode="final")
    with pytest.raises(ConfigError, match="precision='fp8'"):
        measure(model, [x], [x], precision="fp8")
    with pytest.raises(ComponentError, match="per-block components only; got head"):
        measure(model, [x], [x], components=["head"])
    with pytest.raises(ComponentError, match="unknown component 'ffn'"):
        measure(model, [x], [x], components=["ffn"])
    with pytest.raises(ConfigError, match="no image pairs"):
        measure(model, [], [x])
    with pytest.raises(ConfigError, match="differ in shape"):
        measure(model, [x], [images(2, 19, size=8)])


@pytest.mark.parametrize("mode", ["embedding", "hidden"])
def test_chunk_size_does_not_change_results(mode):
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2).eval()
    x, y = torch.randn(10, 3, 16, 16), torch.randn(10, 3, 16, 16)
    whole = measure(model, [x], [y], mode=mode, keep_samples=True)
    chunked = measure(model, [x], [y], mode=mode, keep_samples=True, chunk_size=3)
    np.testing.assert_allclose(chunked.attrs["samples"], whole.attrs["samples"], rtol=1e-5)
    assert (chunked["n"] == 10).all()
    with pytest.raises(ConfigError, match="chunk_size=0 must be positive"):
        measure(model, [x], [y], chunk_size=0)
