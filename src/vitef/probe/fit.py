"""Fit and score every probe of a feature bank at once (Odonnat et al., arXiv 2602.06883, §4).

Per probe point: rows L2-normalised, standardised with the train split's mean/std (applied to the
test split), then the batched multinomial logistic regression of :mod:`vitef.probe.solver`.
"""

from __future__ import annotations

import logging

import torch

from vitef.probe.features import FeatureBank
from vitef.probe.solver import SolverConfig, fit_logreg, preprocess

logger = logging.getLogger(__name__)


def fit_probes(
    train: FeatureBank, test: FeatureBank, num_classes: int, cfg: SolverConfig | None = None, *, progress: bool = True
) -> list[dict]:
    """Preprocess, fit on ``train`` and score on ``test`` for every probe; one row per probe.

    The banks are preprocessed IN PLACE (their features are standardised afterwards). Rows are in block
    order: ``layer, point, dim, train_acc, test_acc, n_train, n_test, iterations, converged, loss``
    (accuracies are fractions in [0, 1]).
    """
    cfg = cfg or SolverConfig()
    if train.keys != test.keys:
        raise ValueError("train and test banks must hold the same probes")
    results: dict[tuple[int, str], dict] = {}
    for width, Xtr in train.groups.items():
        Xte = test.groups[width]
        preprocess(Xtr, Xte)
        logger.info("fitting %d probes of width %d on %d samples", Xtr.shape[0], width, Xtr.shape[1])
        fit = fit_logreg(Xtr, train.labels, num_classes, cfg, progress=progress)
        dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        train_acc = _accuracy(fit, Xtr, train.labels, dtype)
        test_acc = _accuracy(fit, Xte, test.labels, dtype)
        for key in train.keys:
            w, row = train.index[key]
            if w != width:
                continue
            results[key] = {
                "layer": key[0],
                "point": key[1],
                "dim": width,
                "train_acc": float(train_acc[row]),
                "test_acc": float(test_acc[row]),
                "n_train": train.num_samples,
                "n_test": test.num_samples,
                "iterations": int(fit.n_iter[row]),
                "converged": bool(fit.converged[row]),
                "loss": float(fit.loss[row]),
            }
    return [results[k] for k in train.keys]


def _accuracy(fit, X: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Score one probe at a time so no second copy of the whole bank is made in float64.
    return torch.stack([fit_row_accuracy(fit, i, X[i].to(dtype), y) for i in range(X.shape[0])])


def fit_row_accuracy(fit, i: int, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy of probe ``i`` of ``fit`` on features ``X`` ``(n, d)``."""
    logits = X @ fit.weight[i].to(X.dtype).T + fit.bias[i].to(X.dtype)
    return (logits.argmax(-1) == y).double().mean()
