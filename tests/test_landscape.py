"""Loss landscape library: trajectory, PCA plane, loss grid, rate-of-change surface (arXiv 2602.06883 §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from tiny import random_vit
from torch import nn

from vitef.errors import VitefError
from vitef.landscape import (
    ComponentVector,
    LandscapeError,
    component_function,
    grid,
    loss_grid,
    mean_loss,
    pca_plane,
    rate_surface,
    sgd_trajectory,
    top_directions,
)
from vitef.models import embed
from vitef.models.components import component_of, parameters_of
from vitef.optim import OptimConfig


def tiny_vit(seed: int = 0) -> VisionTransformer:
    return random_vit(seed).eval()


def fake_batches(n: int, seed: int = 0, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


SGD = OptimConfig(name="sgd", lr=0.05, momentum=0.9, warmup_steps=0, scheduler="constant", clip_grad=1.0)


# --------------------------------------------------------------------------------------------- PCA plane


def test_pca_directions_orthonormal_and_reconstruction_matches_explained_variance():
    rng = np.random.default_rng(0)
    # A trajectory mostly in a 2-D subspace plus small noise in a 200-D space.
    basis = np.linalg.qr(rng.normal(size=(200, 2)))[0].T  # (2, 200)
    t = np.linspace(0, 1, 12)[:, None]
    pts = (np.hstack([3 * t, np.sin(4 * t)]) @ basis + 0.01 * rng.normal(size=(12, 200))).astype(np.float32)
    plane = pca_plane(pts)
    d = plane.directions.astype(np.float64)
    np.testing.assert_allclose(d @ d.T, np.eye(2), atol=1e-6)
    # Centre at the final point: the final point projects to the origin.
    np.testing.assert_allclose(plane.coords[-1], 0.0, atol=1e-6)
    m = pts.astype(np.float64) - pts[-1]
    recon = plane.coords @ d
    residual = ((m - recon) ** 2).sum() / (m**2).sum()
    np.testing.assert_allclose(residual, 1.0 - plane.explained.sum(), atol=1e-5)
    assert plane.explained.sum() > 0.99
    # The trajectory starts in the non-positive quadrant (sign convention).
    assert (plane.coords[0] <= 0).all()


def test_pca_mean_centre_and_degenerate_trajectory():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(6, 30)).astype(np.float32)
    plane = pca_plane(pts, center="mean")
    d = plane.directions.astype(np.float64)
    centred = pts - pts.mean(0)
    # Same directions as an ordinary PCA (up to sign).
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(d @ vh[:2].T), np.eye(2), atol=1e-5)
    with pytest.raises(LandscapeError, match="does not span a plane"):
        pca_plane(np.repeat(pts[:1], 4, axis=0))
    with pytest.raises(LandscapeError, match="center"):
        pca_plane(pts, center="middle")


# --------------------------------------------------------------------------------------------- trajectory


def test_trajectory_records_component_only_and_head_moves():
    model = tiny_vit()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    traj = sgd_trajectory(model, "mha", iter(fake_batches(5)), steps=5, optim=SGD)
    vec = ComponentVector(model, "mha")
    assert traj.points.shape == (6, vec.numel)
    assert vec.numel == sum(p.numel() for _, p in parameters_of(model, "mha"))
    np.testing.assert_array_equal(traj.points[0], torch.cat([before[n].reshape(-1) for n in vec.names]).numpy())
    np.testing.assert_array_equal(traj.points[-1], vec.get().numpy())
    assert np.all(np.isfinite(traj.losses)) and traj.losses.shape == (5,)
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        comp_or_head = component_of(name).component in ("mha", "head")  # head = final norm + linear
        assert moved == comp_or_head, name


def test_trajectory_errors():
    model = tiny_vit()
    with pytest.raises(LandscapeError, match="at least 2 steps"):
        sgd_trajectory(model, "fc1", iter(fake_batches(3)), steps=1, optim=SGD)
    with pytest.raises(LandscapeError, match="ran out"):
        sgd_trajectory(model, "fc1", iter(fake_batches(2)), steps=4, optim=SGD)
    with pytest.raises(VitefError, match="unknown component"):
        ComponentVector(model, "mlp")
    with pytest.raises(LandscapeError, match="per-block"):
        ComponentVector(model, "head")


# --------------------------------------------------------------------------------------------- loss grid


def test_loss_grid_centre_and_exact_restore():
    model = tiny_vit()
    traj = sgd_trajectory(model, "fc1", iter(fake_batches(4)), steps=4, optim=SGD)
    plane = pca_plane(traj.points)
    evals = fake_batches(2, seed=7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    alphas, betas = grid(5, 0.5), grid(3, 0.2)
    surface = loss_grid(model, "fc1", plane, alphas, betas, evals, unit=0.7)
    assert surface.shape == (5, 3) and np.all(np.isfinite(surface))
    # Bit-identical parameters after the grid.
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Centre = θ* exactly.
    assert surface[2, 1] == pytest.approx(mean_loss(model, evals), rel=1e-6, abs=1e-7)
    # An off-centre point equals a direct evaluation at θ* + unit (α d1 + β d2).
    vec = ComponentVector(model, "fc1")
    theta = torch.from_numpy(plane.origin + 0.7 * (alphas[0] * plane.directions[0] + betas[2] * plane.directions[1]))
    with vec.preserved():
        vec.set(theta)
        direct = mean_loss(model, evals)
    assert surface[0, 2] == pytest.approx(direct, rel=1e-5)
    assert not np.allclose(surface, surface[2, 1])


def test_preserved_restores_on_error():
    model = tiny_vit()
    vec = ComponentVector(model, "ln2")
    saved = vec.get()
    with pytest.raises(RuntimeError):
        with vec.preserved():
            vec.set(torch.zeros(vec.numel))
            raise RuntimeError("boom")
    assert torch.equal(vec.get(), saved)


# --------------------------------------------------------------------------------------------- rate surface


def test_linear_map_rate_is_spectral_norm_single_token():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    w = lin.weight.detach()
    s = torch.linalg.svdvals(w)
    x = torch.randn(1, 1, 6, dtype=torch.float64)
    dirs = top_directions(lin, x, seed=3)
    assert dirs.sigma1 == pytest.approx(float(s[0]), rel=1e-6)
    assert dirs.sigma2 == pytest.approx(float(s[1]), rel=1e-5)
    assert float((dirs.u * dirs.v).sum()) == pytest.approx(0.0, abs=1e-10)
    a, b = grid(6, 0.5), grid(6, 0.5)
    rate = rate_surface(lin, x, dirs.u, dirs.v, a, b)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    expected = np.sqrt(aa**2 * float(s[0]) ** 2 + bb**2 * float(s[1]) ** 2) / np.sqrt(aa**2 + bb**2)
    np.testing.assert_allclose(rate, expected, rtol=1e-5)
    # Along u alone (b = 0) the rate is σ_max everywhere.
    along_u = rate_surface(lin, x, dirs.u, dirs.v, grid(7, 0.5), np.array([0.0]))
    assert np.isnan(along_u[3, 0])  # δ = 0
    np.testing.assert_allclose(np.delete(along_u[:, 0], 3), float(s[0]), rtol=1e-6)


def test_linear_map_rate_is_spectral_norm_token_sequence():
    torch.manual_seed(1)
    lin = nn.Linear(8, 8, bias=False)
    x = torch.randn(1, 5, 8)
    dirs = top_directions(lin, x)
    smax = float(torch.linalg.matrix_norm(lin.weight.detach(), ord=2))
    assert dirs.sigma1 == pytest.approx(smax, rel=1e-4)
    rate = rate_surface(lin, x, dirs.u, dirs.v, grid(10, 1.0), np.array([0.0]), relative=False)
    np.testing.assert_allclose(rate[:, 0], smax, rtol=1e-4)


@pytest.mark.parametrize("component", ["ln1", "mha", "ln2", "fc1", "fc2"])
def test_component_function_and_directions_on_vit(component):
    model = tiny_vit()
    e = embed(model, torch.randn(1, 3, 16, 16)).detach()  # (1, N, D)
    attn_mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    fused_before = [m.fused_attn for m in attn_mods]
    f = component_function(model, 1, component)
    blk = model.blocks[1]
    if component == "fc2":
        padded = torch.cat([e, e.new_zeros(*e.shape[:2], blk.mlp.fc2.in_features - e.shape[-1])], dim=-1)
        torch.testing.assert_close(f(e), blk.mlp.fc2(padded))
    elif component == "mha":
        torch.testing.assert_close(f(e), blk.attn(e))
    dirs = top_directions(f, e, iters=300, tol=1e-6)
    rate = rate_surface(f, e, dirs.u, dirs.v, grid(4, 1e-4), grid(4, 1e-4))
    # The explicit attention path is only used inside the call.
    assert all(m.fused_attn == fused for m, fused in zip(attn_mods, fused_before))
    assert dirs.u.shape == e.shape and dirs.sigma1 >= dirs.sigma2 * (1 - 1e-3) > 0
    # Near e the surface is the linearisation: rate along u ≈ σ1, and nothing exceeds σ1 by much.
    near_u = rate_surface(f, e, dirs.u, dirs.v, np.array([1e-4]), np.array([0.0]))[0, 0]
    assert near_u == pytest.approx(dirs.sigma1, rel=1e-2)
    assert np.nanmax(rate) <= dirs.sigma1 * 1.01
    # The Jacobian's spectral norm bounds every directional rate (check against a random direction).
    r = torch.randn_like(e)
    r = r / r.norm()
    from torch.func import jvp

    assert float(jvp(f, (e,), (r,))[1].detach().norm()) <= dirs.sigma1 * (1 + 1e-3)


# --------------------------------------------------------------------------------------------- Eva and Beit


def small_family(name: str, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, depth=2, **kwargs).eval()


def test_landscape_on_a_small_eva_with_rope_and_swiglu():
    """EVA-02 CLIP layout: separate q/k/v, RoPE, inner attention norm, SwiGLU fc1_g/fc1_x (one small model)."""
    model = small_family("eva02_base_patch16_clip_224", img_size=32, embed_dim=64, num_heads=2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    # The trajectory moves exactly the component's parameters (q_proj/k_proj/v_proj, attn.norm, proj) and the head.
    vec = ComponentVector(model, "mha")
    assert {n.split(".", 2)[-1] for n in vec.names} == {
        "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.v_proj.weight", "attn.v_proj.bias",
        "attn.norm.weight", "attn.norm.bias", "attn.proj.weight", "attn.proj.bias",
    }  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    traj = sgd_trajectory(model, "mha", batches, 3, SGD)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= set(vec.names) | {n for n in before if n.startswith(("head.", "norm."))}
    assert moved & set(vec.names)
    np.testing.assert_allclose(traj.points[-1], vec.get().numpy())
    plane = pca_plane(traj.points)
    losses = loss_grid(model, "mha", plane, grid(3, 0.1), grid(3, 0.1), batches[:1])
    assert losses[1, 1] == pytest.approx(mean_loss(model, batches[:1]), rel=1e-6)  # the centre is θ*
    # MHA: the attention with the rope of the model's forward; FC1: the concatenated pre-gate projections.
    images = batches[0][0][:1]
    x, rope = model._pos_embed(model.patch_embed(images))  # timm's own embedding and rotary embedding
    blk = model.blocks[1]
    with torch.no_grad():
        torch.testing.assert_close(component_function(model, 1, "mha")(x), blk.attn(x, rope=rope))
        assert not torch.allclose(blk.attn(x, rope=rope), blk.attn(x))  # the rope matters
        torch.testing.assert_close(
            component_function(model, 1, "fc1")(x), torch.cat([blk.mlp.fc1_g(x), blk.mlp.fc1_x(x)], dim=-1)
        )
    e = embed(model, images).detach()
    torch.testing.assert_close(e, x.detach())
    f = component_function(model, 1, "mha")
    dirs = top_directions(f, e, iters=100, tol=1e-4)
    rate = rate_surface(f, e, dirs.u, dirs.v, grid(3, 1e-4), grid(3, 1e-4))
    assert np.nanmax(rate) <= dirs.sigma1 * 1.01 and dirs.sigma1 > 0


def test_component_function_of_beit_attention_has_the_relative_position_biases():
    model = small_family("beit_base_patch16_224", img_size=32, embed_dim=32, num_heads=2, use_shared_rel_pos_bias=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and p.shape[-1] == 2:  # the (distances, heads) relative position bias tables
                p.normal_()
    x = torch.randn(2, 5, 32)
    shared = model.rel_pos_bias()
    with torch.no_grad():
        torch.testing.assert_close(component_function(model, 0, "mha")(x), model.blocks[0].attn(x, shared))
        assert not torch.allclose(model.blocks[0].attn(x, shared), model.blocks[0].attn(x))
