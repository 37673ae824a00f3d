"""Batched multinomial logistic regression for linear probing (Odonnat et al., arXiv 2602.06883, §4).

The paper probes the frozen ViT at 8 points of every block (96 probes for ViT-B/16) with
scikit-learn's default ``LogisticRegression`` after ``StandardScaler``. Fitting 96 independent
problems one after another is slow, so this module fits all of them at once with one batched
L-BFGS in torch (CPU or GPU) whose every problem keeps its own line search, curvature history and
stopping test: one problem converging never stops, nor slows, another.

Objective (identical to scikit-learn's default ``LogisticRegression``: ``penalty="l2"``, ``C=1.0``,
``fit_intercept=True``, multinomial softmax over all ``k`` classes, intercept not penalised). For
each probe ``p`` with standardised features ``X_p`` (n, d), labels ``y`` and parameters ``W_p``
(d, k), ``b_p`` (k,)::

    minimise   C * sum_i [ logsumexp(z_i) - z_{i, y_i} ] + 1/2 * ||W_p||_F^2,   z_i = x_i W_p + b_p

We minimise the same function divided by ``C * n`` (the mean loss plus ``||W||^2 / (2 C n)``), which is
what scikit-learn's lbfgs solver minimises internally, and stop like it: when the largest absolute
entry of that scaled gradient is ``<= tol`` (scikit-learn's ``tol=1e-4`` is scipy's ``gtol``), or after
``max_iter`` iterations (then ``converged`` is ``False``).

Optional preconditioning (``precondition=True``) changes the path, never the optimum nor the stopping test: the
L-BFGS initial inverse Hessian is ``gamma * M^-1`` with ``M = X^T X / n + (1/(C n) + 1e-3) I`` per probe
(a Gauss-Newton-like whitening of correlated features), instead of scipy's ``gamma * I``. Features
of real networks are strongly correlated, where this cuts the iterations 2-4x; each iteration costs
more (a ``d x d`` matmul), so it pays when ``n`` is large compared with ``d``. Off by default: the
default path is scipy's L-BFGS algorithm, batched (same iteration counts as scikit-learn).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm.auto import tqdm

from vitef.config import option
from vitef.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class SolverConfig:
    """The batched logistic-regression solver (defaults = scikit-learn's LogisticRegression)."""

    C: float = option(1.0, "inverse L2 strength: minimise C*sum(logloss) + ||W||^2/2 (scikit-learn's C)")
    tol: float = option(1e-4, "stop when max |gradient| of the mean-scaled objective <= tol (scikit-learn's tol)")
    max_iter: int = option(5000, "L-BFGS iterations at most (per probe; converged=false if reached)")
    history: int = option(10, "L-BFGS memory (pairs kept), as scipy's default")
    dtype: str = option("float32", "float32 (fast) or float64 (closest to scikit-learn)")
    precondition: bool = option(False, "L-BFGS initial matrix from the feature covariance (fewer iterations)")
    precondition_rows: int = option(4096, "rows sampled to estimate that covariance (bounds its cost)")
    device: str = option("auto", "where to solve: auto (cuda if available), cpu, cuda, cuda:N")

    def validate(self) -> None:
        if not self.C > 0:
            raise ConfigError(f"solver.C={self.C} must be > 0 (scikit-learn's default is 1.0)")
        if not self.tol > 0:
            raise ConfigError(f"solver.tol={self.tol} must be > 0 (scikit-learn's default is 1e-4)")
        if self.max_iter < 1:
            raise ConfigError(f"solver.max_iter={self.max_iter} must be >= 1")
        if self.history < 1:
            raise ConfigError(f"solver.history={self.history} must be >= 1")
        if self.precondition_rows < 1:
            raise ConfigError(f"solver.precondition_rows={self.precondition_rows} must be >= 1")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"solver.dtype={self.dtype!r} is unknown: use float32 or float64")


@dataclasses.dataclass
class LogRegFit:
    """Fitted batch of probes.

    Attributes
    ----------
    weight
        ``(P, k, d)`` coefficients (scikit-learn's ``coef_`` layout).
    bias
        ``(P, k)`` intercepts.
    n_iter
        ``(P,)`` L-BFGS iterations used per probe.
    converged
        ``(P,)`` whether the gradient test passed before ``max_iter``.
    loss
        ``(P,)`` final value of the mean-scaled objective.
    grad_max
        ``(P,)`` final max |gradient| of the mean-scaled objective.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    loss: torch.Tensor
    grad_max: torch.Tensor

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Class indices ``(P, n)`` for features ``X`` ``(P, n, d)`` (already preprocessed)."""
        W = self.weight.to(X.device, X.dtype)
        b = self.bias.to(X.device, X.dtype)
        return torch.baddbmm(b.unsqueeze(1), X, W.transpose(1, 2)).argmax(-1)

    def accuracy(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy (fraction in [0, 1]) per probe, ``(P,)`` float64."""
        return (self.predict(X) == y.to(X.device).unsqueeze(0)).double().mean(1).cpu()


# ---------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------


def l2_normalize_(X: torch.Tensor) -> torch.Tensor:
    """Divide every row (last dimension) by its Euclidean norm, in place; zero rows stay zero."""
    norm = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    return X.div_(norm.clamp_min(torch.finfo(X.dtype).tiny))


def standardize_(train: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise ``train`` ``(P, n, d)`` with its own per-feature mean/std and apply them to ``others``.

    As scikit-learn's ``StandardScaler``: population std (``ddof=0``), a zero std is replaced by 1.
    Works in place; returns ``(mean, std)``, each ``(P, 1, d)``.
    """
    # float64 statistics, one probe at a time (bounded extra memory for large feature banks).
    mean = torch.stack([x.mean(dim=0, keepdim=True, dtype=torch.float64) for x in train])  # (P, 1, d)
    std = torch.stack([(x.double() - mu).square_().mean(dim=0, keepdim=True) for x, mu in zip(train, mean)]).sqrt_()
    # StandardScaler treats (near-)constant features as std=1 so they become exactly 0.
    std = torch.where(std < 10 * torch.finfo(torch.float64).eps * mean.abs().clamp_min(1.0), 1.0, std)
    mean_t, std_t = mean.to(train.dtype), std.to(train.dtype)
    for X in (train, *others):
        X.sub_(mean_t.to(X.device)).div_(std_t.to(X.device))
    return mean_t, std_t


def preprocess(train: torch.Tensor, *others: torch.Tensor) -> None:
    """The paper's probe preprocessing, in place: L2-normalise rows, then standardise with train stats."""
    for X in (train, *others):
        l2_normalize_(X)
    standardize_(train, *others)


# ---------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------


def _loss_grad(
    X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-scaled objective and its gradient for a batch of problems.

    ``X`` (P, n, d), ``y`` (n,) int64, ``W`` (P, k, d) (scikit-learn's ``coef_`` layout), ``b`` (P, k),
    ``alpha = 1 / (C n)``. Returns ``f`` (P,), ``gW`` (P, k, d), ``gb`` (P, k).
    """
    n = X.shape[1]
    z = torch.baddbmm(b.unsqueeze(1), X, W.transpose(1, 2))  # (P, n, k)
    target = y.view(1, n, 1).expand(z.shape[0], n, 1)
    z = z - z.amax(dim=-1, keepdim=True)  # stable softmax; few large ops (cheap on a busy CPU)
    G = z.exp()  # (P, n, k)
    total = G.sum(dim=-1, keepdim=True)  # (P, n, 1)
    f = (total.log() - z.gather(-1, target)).mean(dim=(1, 2)) + 0.5 * alpha * W.square().sum(dim=(1, 2))
    # dloss/dz = softmax - onehot, already divided by n for the mean.
    G.div_(total * n).scatter_add_(-1, target, torch.full_like(G[..., :1], -1.0 / n))
    # G^T X streams X row-major, which BLAS does much faster than X^T G with a transposed X.
    gW = torch.baddbmm(W, G.transpose(1, 2), X, beta=alpha)  # (P, k, d)
    gb = G.sum(dim=1)  # (P, k)
    return f, gW, gb


def _flat(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([W.flatten(1), b], dim=1)


def _unflat(theta: torch.Tensor, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return theta[:, : d * k].view(-1, k, d), theta[:, d * k :]


# ---------------------------------------------------------------------------------------------------
# Batched L-BFGS
# ---------------------------------------------------------------------------------------------------


def fit_logreg(
    X: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None = None,
    cfg: SolverConfig | None = None,
    *,
    progress: bool = False,
) -> LogRegFit:
    """Fit ``P`` independent multinomial logistic regressions at once.

    Parameters
    ----------
    X
        ``(P, n, d)`` features (already preprocessed, see :func:`preprocess`); one problem per probe.
    y
        ``(n,)`` integer labels in ``[0, num_classes)``, shared by all problems.
    num_classes
        ``k``; default ``y.max() + 1``.
    cfg
        Solver options (:class:`SolverConfig`); defaults match scikit-learn's ``LogisticRegression``.
    progress
        Show a tqdm bar of converged problems.

    Returns
    -------
    LogRegFit
        Parameters on the CPU, iterations and convergence per problem.
    """
    cfg = cfg or SolverConfig()
    cfg.validate()
    from vitef.utils import resolve_device

    device = resolve_device(cfg.device)
    dtype = _DTYPES[cfg.dtype]
    if X.ndim != 3:
        raise ValueError(f"X must be (P, n, d), got shape {tuple(X.shape)}")
    P, n, d = X.shape
    if y.shape != (n,):
        raise ValueError(f"y must be ({n},), got shape {tuple(y.shape)}")
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    if k < 2:
        raise ConfigError(f"linear probing needs at least 2 classes in the training labels, got {k}")
    alpha = 1.0 / (cfg.C * n)
    X_all = X.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=torch.long)
    m = d * k + k

    # Results for every problem; the working set below holds only the active ones.
    theta_out = torch.zeros(P, m, device=device, dtype=dtype)
    f_out = torch.zeros(P, device=device, dtype=dtype)
    gmax_out = torch.zeros(P, device=device, dtype=dtype)
    iters_out = torch.zeros(P, dtype=torch.long)
    conv_out = torch.zeros(P, dtype=torch.bool)

    chol = _preconditioner(X_all, alpha, cfg) if cfg.precondition else None  # (P, d, d) M^-1
    idx = torch.arange(P, device=device)  # global ids of the working set
    Xw = X_all
    theta = torch.zeros(P, m, device=device, dtype=dtype)
    f, gW, gb = _loss_grad(Xw, y, *_unflat(theta, d, k), alpha)
    g = _flat(gW, gb)
    S = torch.zeros(cfg.history, P, m, device=device, dtype=dtype)
    Yh = torch.zeros_like(S)
    rho = torch.zeros(cfg.history, P, device=device, dtype=dtype)  # 0 marks an empty / rejected slot
    gamma = torch.ones(P, device=device, dtype=dtype)  # initial inverse-Hessian scale
    first = torch.ones(P, dtype=torch.bool, device=device)
    it_count = torch.zeros(P, dtype=torch.long, device=device)
    slot = 0
    eps = torch.finfo(dtype).eps
    bar = tqdm(total=P, desc="probe solver", unit="probe", disable=not progress, leave=False)

    for _ in range(cfg.max_iter + 1):
        gmax = g.abs().amax(dim=1)
        done = gmax <= cfg.tol
        out_of_iters = it_count >= cfg.max_iter
        finished = done | out_of_iters
        if bool(finished.any()):
            fin = finished.nonzero().squeeze(1)
            gid = idx[fin]
            theta_out[gid], f_out[gid], gmax_out[gid] = theta[fin], f[fin], gmax[fin]
            iters_out[gid.cpu()] = it_count[fin].cpu()
            conv_out[gid.cpu()] = done[fin].cpu()
            bar.update(int(fin.numel()))
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            idx, theta, f, g = idx[keep], theta[keep], f[keep], g[keep]
            S, Yh, rho = S[:, keep], Yh[:, keep], rho[:, keep]
            gamma, first, it_count = gamma[keep], first[keep], it_count[keep]
            chol = chol[keep] if chol is not None else None
            # Copying X is costly: compact the features only when enough problems have left.
            Xw = X_all[idx] if keep.numel() < 0.75 * Xw.shape[0] or Xw is X_all else Xw[keep]
        direction = -_two_loop(g, S, Yh, rho, gamma, slot, chol, d, k)
        # First step (no curvature pair yet): length 1 / ||direction|| so the trial point is on a sane scale.
        dn = torch.linalg.vector_norm(direction, dim=1).clamp_min(eps)
        t = torch.where(first, 1.0 / dn, torch.ones_like(f))
        slope = (g * direction).sum(dim=1)  # (A,) < 0 for a descent direction
        bad = slope >= 0
        if bool(bad.any()):  # numerical breakdown of the history: restart those problems from -g
            direction[bad] = -g[bad]
            slope[bad] = -(g[bad] * g[bad]).sum(dim=1)
            rho[:, bad] = 0
            t[bad] = 1.0 / torch.linalg.vector_norm(g[bad], dim=1).clamp_min(eps)
        theta_new, f_new, g_new, failed = _line_search(Xw, y, theta, f, slope, direction, t, alpha, d, k, eps)
        if bool(failed.any()):  # no decrease found (rounding floor): keep the old point, stop that problem
            theta_new[failed], f_new[failed], g_new[failed] = theta[failed], f[failed], g[failed]
        s = theta_new - theta
        yv = g_new - g
        sy = (s * yv).sum(dim=1)
        yy = (yv * yv).sum(dim=1)
        # Keep the pair only with positive curvature (always true for this convex loss up to rounding).
        ok = sy > eps * yy.sqrt() * torch.linalg.vector_norm(s, dim=1)
        S[slot] = torch.where(ok.unsqueeze(1), s, 0.0)
        Yh[slot] = torch.where(ok.unsqueeze(1), yv, 0.0)
        rho[slot] = torch.where(ok, 1.0 / sy.where(ok, 1.0), 0.0)
        yHy = yy if chol is None else (yv * _apply_h0(yv, chol, d, k)).sum(dim=1)
        gamma = torch.where(ok, sy / yHy.clamp_min(eps), gamma)
        first = first & ~ok
        slot = (slot + 1) % cfg.history
        theta, f, g = theta_new, f_new, g_new
        it_count += 1
        if bool(failed.any()):
            it_count[failed] = cfg.max_iter
    bar.close()
    W, b = _unflat(theta_out, d, k)
    if not bool(conv_out.all()):
        logger.warning(
            "%d of %d probes did not reach tol=%g within max_iter=%d (max |grad| %.2e)",
            int((~conv_out).sum()),
            P,
            cfg.tol,
            cfg.max_iter,
            float(gmax_out[~conv_out.to(device)].max()),
        )
    return LogRegFit(
        weight=W.cpu().contiguous(),
        bias=b.cpu().contiguous(),
        n_iter=iters_out,
        converged=conv_out,
        loss=f_out.cpu(),
        grad_max=gmax_out.cpu(),
    )


def _preconditioner(X: torch.Tensor, alpha: float, cfg: SolverConfig) -> torch.Tensor:
    """``M^-1`` ``(P, d, d)`` for ``M = X^T X / n + (alpha + 1e-3) I`` (rows subsampled, see config).

    The explicit inverse is applied with one batched matmul per iteration, much faster than two
    triangular solves with only ``k`` right-hand sides.
    """
    P, n, d = X.shape
    rows = X if n <= cfg.precondition_rows else X[:, torch.linspace(0, n - 1, cfg.precondition_rows).long()]
    M = torch.bmm(rows.transpose(1, 2), rows).div_(rows.shape[1])  # (P, d, d)
    ridge = alpha + 1e-3
    for _ in range(6):  # a rank-deficient covariance in float32 may need a larger ridge
        L, info = torch.linalg.cholesky_ex(M + ridge * torch.eye(d, device=X.device, dtype=X.dtype))
        if not bool(info.any()):
            return torch.cholesky_inverse(L)
        ridge *= 10
    raise RuntimeError("could not factor the feature covariance; use solver.precondition=false")


def _apply_h0(v: torch.Tensor, minv: torch.Tensor | None, d: int, k: int) -> torch.Tensor:
    """``M^-1`` on the weight block (``M`` is symmetric: rows times ``M^-1``), identity on the intercepts."""
    if minv is None:
        return v.clone()
    out = torch.empty_like(v)
    torch.bmm(v[:, : d * k].view(-1, k, d), minv, out=out[:, : d * k].view(-1, k, d))  # (A, k, d)
    out[:, d * k :] = v[:, d * k :]
    return out


def _two_loop(
    g: torch.Tensor,
    S: torch.Tensor,
    Yh: torch.Tensor,
    rho: torch.Tensor,
    gamma: torch.Tensor,
    slot: int,
    chol: torch.Tensor | None,
    d: int,
    k: int,
) -> torch.Tensor:
    """L-BFGS two-loop recursion, batched: returns ``H g`` per problem (rows of ``g``).

    The history is a ring buffer shared by all problems (``slot`` is the next write position); a slot
    whose ``rho`` is 0 for a problem is empty for it and contributes nothing. The initial matrix is
    ``gamma * M^-1`` (``M = I`` without preconditioner).
    """
    h = S.shape[0]
    order = [(slot - 1 - j) % h for j in range(h)]  # newest first
    q = g.clone()
    alphas = []
    for j in order:
        a = rho[j] * torch.linalg.vecdot(S[j], q)  # (A,)
        q.addcmul_(Yh[j], a.unsqueeze(1), value=-1.0)
        alphas.append(a)
    r = _apply_h0(q, chol, d, k).mul_(gamma.unsqueeze(1))
    for j, a in zip(reversed(order), reversed(alphas)):
        beta = rho[j] * torch.linalg.vecdot(Yh[j], r)
        r.addcmul_(S[j], (a - beta).unsqueeze(1))
    return r


def _line_search(
    X: torch.Tensor,
    y: torch.Tensor,
    theta: torch.Tensor,
    f: torch.Tensor,
    slope: torch.Tensor,
    direction: torch.Tensor,
    t: torch.Tensor,
    alpha: float,
    d: int,
    k: int,
    eps: float,
    c1: float = 1e-4,
    max_ls: int = 50,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-problem backtracking (Armijo) line search; only problems still searching are evaluated.

    Returns the new point, value and gradient for every problem, and a ``(A,)`` mask of the problems
    whose Armijo test never held within ``max_ls`` halvings (their returned point is meaningless).
    """
    A = theta.shape[0]
    theta_new = torch.empty_like(theta)
    f_new = torch.empty_like(f)
    g_new = torch.empty_like(theta)
    pending = torch.arange(A, device=theta.device)
    t = t.clone()
    for _ in range(max_ls):
        th = theta[pending] + t[pending].unsqueeze(1) * direction[pending]
        Xp = X if pending.numel() == A else X[pending]
        fp, gW, gb = _loss_grad(Xp, y, *_unflat(th, d, k), alpha)
        theta_new[pending], f_new[pending], g_new[pending] = th, fp, _flat(gW, gb)
        # Armijo, with a rounding slack so that a flat objective in float32 is not mistaken for failure.
        slack = 4 * eps * f[pending].abs()
        ok = fp <= f[pending] + c1 * t[pending] * slope[pending] + slack
        ok &= torch.isfinite(fp)
        pending = pending[~ok]
        if pending.numel() == 0:
            break
        t[pending] *= 0.5
    failed = torch.zeros(A, dtype=torch.bool, device=theta.device)
    failed[pending] = True
    return theta_new, f_new, g_new, failed


def num_parameters(d: int, k: int) -> int:
    """Parameters per probe: ``d * k`` weights plus ``k`` intercepts."""
    return d * k + k


def solver_memory_bytes(P: int, n: int, d: int, k: int, cfg: SolverConfig) -> int:
    """Rough peak memory of :func:`fit_logreg` (features + history + activations), for logging."""
    size = torch.finfo(_DTYPES[cfg.dtype]).bits // 8
    m = num_parameters(d, k)
    return int(size * (2 * P * n * d + (2 * cfg.history + 8) * P * m + 4 * P * n * k))


__all__ = [
    "LogRegFit",
    "SolverConfig",
    "fit_logreg",
    "l2_normalize_",
    "num_parameters",
    "preprocess",
    "solver_memory_bytes",
    "standardize_",
]
