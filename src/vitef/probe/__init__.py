"""Linear probing of frozen ViTs at 8 points of every block (Odonnat et al., arXiv 2602.06883, §4).

- :mod:`vitef.probe.features`: one forward pass per batch → pooled features at every probe point.
- :mod:`vitef.probe.solver`: preprocessing and the batched multinomial logistic regression (the
  objective of scikit-learn's default ``LogisticRegression``), all probes fitted at once in torch.
- :mod:`vitef.probe.fit`: fit on train, score on test, one result row per probe.
"""

from vitef.probe.features import (
    POOLS,
    PROBE_POINTS,
    FeatureBank,
    block_points,
    check_layers,
    check_points,
    check_pool,
    extract_features,
    point_dim,
    pool_tokens,
)
from vitef.probe.fit import fit_probes
from vitef.probe.solver import LogRegFit, SolverConfig, fit_logreg, l2_normalize_, preprocess, standardize_

__all__ = [
    "POOLS",
    "PROBE_POINTS",
    "FeatureBank",
    "LogRegFit",
    "SolverConfig",
    "block_points",
    "check_layers",
    "check_points",
    "check_pool",
    "extract_features",
    "fit_logreg",
    "fit_probes",
    "l2_normalize_",
    "point_dim",
    "pool_tokens",
    "preprocess",
    "standardize_",
]
