"""Linear probing: features at the 8 probe points vs timm's own forward, preprocessing vs scikit-learn,
and the batched solver vs scikit-learn's LogisticRegression (arXiv 2602.06883, §4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler, normalize
from tiny import random_vit
from torch.utils.data import DataLoader, TensorDataset

from vitef.errors import ConfigError
from vitef.probe import (
    PROBE_POINTS,
    SolverConfig,
    block_points,
    check_points,
    extract_features,
    fit_logreg,
    fit_probes,
    preprocess,
)


def _problems(P=4, n=300, n_test=200, d=24, k=4, seed=0):
    """Gaussian classes with separations from hard to easy, one problem per probe."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n + n_test,), generator=g)
    means = torch.randn(P, k, d, generator=g)
    scale = torch.linspace(0.15, 0.8, P).view(P, 1, 1)
    mix = torch.randn(P, d, d, generator=g) / d**0.5 + torch.eye(d)  # correlated features
    X = (means[:, y] * scale + torch.randn(P, n + n_test, d, generator=g)) @ mix + 3.0
    return X[:, :n].contiguous(), X[:, n:].contiguous(), y[:n], y[n:]


def _sklearn(Xtr, Xte, ytr, yte):
    accs, coefs, iters = [], [], []
    for p in range(Xtr.shape[0]):
        a = normalize(Xtr[p].double().numpy())
        b = normalize(Xte[p].double().numpy())
        scaler = StandardScaler().fit(a)
        clf = LogisticRegression(max_iter=5000, tol=1e-6).fit(scaler.transform(a), ytr.numpy())
        accs.append(clf.score(scaler.transform(b), yte.numpy()))
        coefs.append(clf.coef_)
        iters.append(int(clf.n_iter_[0]))
    return np.array(accs), np.stack(coefs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_solver_matches_sklearn(dtype):
    Xtr, Xte, ytr, yte = _problems()
    ref_acc, ref_coef = _sklearn(Xtr, Xte, ytr, yte)
    Xtr_p, Xte_p = Xtr.clone(), Xte.clone()
    preprocess(Xtr_p, Xte_p)
    fit = fit_logreg(Xtr_p, ytr, 4, SolverConfig(dtype=dtype, device="cpu", tol=1e-6 if dtype == "float64" else 1e-4))
    acc = fit.accuracy(Xte_p.to(fit.weight.dtype), yte).numpy()
    assert fit.converged.all()
    assert 0.3 < ref_acc.min() < ref_acc.max() < 1.0  # non-trivial, varied problems
    assert np.abs(acc - ref_acc).max() <= 0.005
    if dtype == "float64":
        # Same objective, same optimum: the coefficients agree closely, not just the accuracies.
        np.testing.assert_allclose(fit.weight.numpy(), ref_coef, atol=2e-4 * np.abs(ref_coef).max())


def test_solver_objective_is_sklearn_default():
    """C * sum(logloss) + ||W||^2 / 2 is minimal at our solution: its gradient vanishes (autograd check)."""
    Xtr, _, ytr, _ = _problems(P=2, n=150, d=10, k=3)
    preprocess(Xtr)
    C = 0.7
    fit = fit_logreg(Xtr, ytr, 3, SolverConfig(C=C, dtype="float64", tol=1e-9, device="cpu"))
    for p in range(2):
        W = fit.weight[p].clone().requires_grad_(True)
        b = fit.bias[p].clone().requires_grad_(True)
        logits = Xtr[p].double() @ W.T + b
        obj = C * torch.nn.functional.cross_entropy(logits, ytr, reduction="sum") + 0.5 * W.square().sum()
        obj.backward()
        # The mean-scaled gradient is <= tol; scaled back by C*n it is still tiny.
        assert W.grad.abs().max() < 1e-9 * C * 150 * 10 and b.grad.abs().max() < 1e-9 * C * 150 * 10


def test_each_problem_converges_independently():
    """A problem fitted alone equals the same problem fitted in a batch with easier/harder ones."""
    Xtr, _, ytr, _ = _problems(P=4)
    preprocess(Xtr)
    cfg = SolverConfig(dtype="float64", device="cpu")
    batch = fit_logreg(Xtr, ytr, 4, cfg)
    assert len(set(batch.n_iter.tolist())) > 1  # problems stop at different iterations
    for p in (0, 3):
        alone = fit_logreg(Xtr[p : p + 1], ytr, 4, cfg)
        assert alone.n_iter[0] == batch.n_iter[p]
        torch.testing.assert_close(alone.weight[0], batch.weight[p], rtol=1e-9, atol=1e-9)


def test_max_iter_reports_not_converged():
    Xtr, _, ytr, _ = _problems(P=2)
    preprocess(Xtr)
    fit = fit_logreg(Xtr, ytr, 4, SolverConfig(max_iter=2, device="cpu"))
    assert not fit.converged.any() and (fit.n_iter == 2).all()


def test_preprocessing_matches_sklearn():
    Xtr, Xte, _, _ = _problems(P=2, d=6)
    Xtr[:, :, 2] = 0.0  # a constant column: StandardScaler keeps it at 0 (std treated as 1)
    a, b = Xtr.clone().double(), Xte.clone().double()
    preprocess(a, b)
    for p in range(2):
        nt, ne = normalize(Xtr[p].double().numpy()), normalize(Xte[p].double().numpy())
        scaler = StandardScaler().fit(nt)
        np.testing.assert_allclose(a[p].numpy(), scaler.transform(nt), atol=1e-10)
        np.testing.assert_allclose(b[p].numpy(), scaler.transform(ne), atol=1e-10)
    assert torch.all(a[:, :, 2] == 0)


def test_solver_rejects_bad_config():
    with pytest.raises(ConfigError, match="solver.C"):
        SolverConfig(C=0.0).validate()
    with pytest.raises(ConfigError, match="float32 or float64"):
        SolverConfig(dtype="half").validate()


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------


def _tiny_vit(**kw):
    return random_vit(depth=3, num_classes=5, **kw).eval()


MODELS = {
    "plain": {},
    "layerscale_registers": {"init_values": 0.5, "reg_tokens": 2},
    "gap_no_cls": {"class_token": False, "global_pool": "avg"},
}


def _hooked_forward(model, images):
    """Tokens at every probe point captured with hooks during timm's own forward_features."""
    got: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def save(key, pre=False):
        def hook(module, args, output=None):
            got[key] = (args[0] if pre else output).detach().clone()

        return hook

    for i, blk in enumerate(model.blocks):
        handles += [
            blk.norm1.register_forward_hook(save((i, "ln1"))),
            blk.ls1.register_forward_hook(save((i, "mha"))),
            blk.norm2.register_forward_pre_hook(save((i, "res1"), pre=True)),
            blk.norm2.register_forward_hook(save((i, "ln2"))),
            blk.mlp.fc1.register_forward_hook(save((i, "fc1"))),
            blk.mlp.act.register_forward_hook(save((i, "act"))),
            blk.ls2.register_forward_hook(save((i, "fc2"))),
            blk.register_forward_hook(save((i, "res2"))),
        ]
    with torch.no_grad():
        final = model.forward_features(images)
    for h in handles:
        h.remove()
    return got, final


@pytest.mark.parametrize("variant", list(MODELS))
def test_block_points_equal_timm_forward(variant):
    model = _tiny_vit(**MODELS[variant])
    images = torch.randn(3, 3, 16, 16)
    ref, final = _hooked_forward(model, images)
    from vitef.models import embed

    with torch.no_grad():
        x = embed(model, images)
        for i in range(len(model.blocks)):
            x, feats = block_points(model, i, x, PROBE_POINTS)
            assert list(feats) == list(PROBE_POINTS)
            for p in PROBE_POINTS:
                torch.testing.assert_close(feats[p], ref[(i, p)], rtol=1e-5, atol=1e-6, msg=f"block {i} {p}")
        torch.testing.assert_close(model.norm(x), final, rtol=1e-5, atol=1e-6)
    assert feats["fc1"].shape[-1] == 4 * 32 and feats["res2"].shape[-1] == 32


def _loader(model, n=10, batch_size=4):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.arange(n) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size), images, labels


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_extract_features_pools_the_hooked_tokens(pool):
    model = _tiny_vit(init_values=0.5, reg_tokens=2)
    loader, images, labels = _loader(model)
    bank = extract_features(model, loader, pool=pool, layers=[0, -1], points=["res2", "ln1", "act"])
    assert bank.keys == [(0, "ln1"), (0, "act"), (0, "res2"), (2, "ln1"), (2, "act"), (2, "res2")]
    assert set(bank.groups) == {32, 128} and bank.groups[128].shape == (2, 10, 128)
    assert torch.equal(bank.labels, labels)
    ref, _ = _hooked_forward(model, images)
    for key in bank.keys:
        tokens = ref[key]
        expected = tokens[:, 0] if pool == "cls" else tokens[:, 3:].mean(1)  # 1 CLS + 2 registers left out
        w, row = bank.index[key]
        torch.testing.assert_close(bank.groups[w][row], expected, rtol=1e-5, atol=1e-6)


def test_feature_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown probe point.*'attn2'.*choose from ln1, mha"):
        check_points(["res2", "attn2"])
    model = _tiny_vit(class_token=False, global_pool="avg")
    loader, _, _ = _loader(model)
    with pytest.raises(ConfigError, match="no class token"):
        extract_features(model, loader, pool="cls")
    with pytest.raises(ConfigError, match="block 7 does not exist"):
        extract_features(model, loader, layers=[7])


def test_fit_probes_end_to_end_on_a_tiny_model():
    model = _tiny_vit()
    loader, _, _ = _loader(model, n=24)
    train = extract_features(model, loader, points=["res2", "fc1"])
    test = extract_features(model, loader, points=["res2", "fc1"])
    rows = fit_probes(train, test, 3, SolverConfig(device="cpu"), progress=False)
    assert [(r["layer"], r["point"]) for r in rows] == [(i, p) for i in range(3) for p in ("fc1", "res2")]
    for r in rows:
        assert r["n_train"] == r["n_test"] == 24 and r["converged"]
        # Train == test here and 24 points in >= 32 dims are separable: the probe fits them all.
        assert r["train_acc"] == r["test_acc"] == 1.0
