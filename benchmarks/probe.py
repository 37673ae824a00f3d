"""Benchmark: the batched probe solver vs a scikit-learn loop (arXiv 2602.06883, §4 linear probing).

    .venv/bin/python benchmarks/probe.py                 # 96 probes, 2,000 x 768 train, 500 test, 10 classes
    .venv/bin/python benchmarks/probe.py --sklearn-points 24   # sklearn on a subset, extrapolated (reported)

The paper probes ViT-B/16 at 8 points of 12 blocks = 96 probes. The features here are generated with
the properties of real ViT features that make probing slow: class structure in a low-dimensional
latent space, strongly correlated and anisotropic dimensions (random mixing with a decaying spectrum),
a GELU nonlinearity, and a separability that varies across probes so accuracies span a wide range.
Both sides do the same work: L2-normalise rows, StandardScaler fit on train, multinomial logistic
regression (C=1, L2, tol=1e-4), accuracy on test. The baseline is scikit-learn's
``StandardScaler`` + ``LogisticRegression(max_iter=5000)`` run probe after probe, in this process.

Printed: wall time of each side, the speed ratio (goal >= 10x), probes/s, the max test-accuracy
difference (goal <= 0.5 point), iterations, and peak memory (RSS high-water mark; CUDA peak if used).
Timings on a shared machine are noisy: run it alone when you can.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vitef.probe import SolverConfig, fit_logreg, preprocess


def make_features(P: int, n: int, n_test: int, d: int, k: int, seed: int):
    """``(P, n + n_test, d)`` float32 features and labels with varied, realistic class structure."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n + n_test,), generator=g)
    latent = 32
    sep = torch.linspace(0.3, 1.6, P)[torch.randperm(P, generator=g)]  # hard ... easy probes
    feats = torch.empty(P, n + n_test, d)
    spectrum = torch.logspace(0, -2, d)  # anisotropic: a few directions dominate, like real features
    for p in range(P):
        centers = torch.randn(k, latent, generator=g) * sep[p]
        z = centers[y] + torch.randn(n + n_test, latent, generator=g)  # (n, latent)
        mix = torch.randn(latent, d, generator=g) / latent**0.5
        noise = torch.randn(n + n_test, d, generator=g) * spectrum.sqrt() * 0.5
        feats[p] = torch.nn.functional.gelu(z @ mix + noise + 0.3) * (1 + spectrum * 3)
    return feats[:, :n].contiguous(), feats[:, n:].contiguous(), y[:n].contiguous(), y[n:].contiguous()


def sklearn_probe(Xtr: np.ndarray, Xte: np.ndarray, ytr: np.ndarray, yte: np.ndarray) -> tuple[float, int]:
    """The reference pipeline for one probe: normalise rows, StandardScaler, LogisticRegression."""
    Xtr = Xtr / np.linalg.norm(Xtr, axis=1, keepdims=True)
    Xte = Xte / np.linalg.norm(Xte, axis=1, keepdims=True)
    scaler = StandardScaler().fit(Xtr)
    clf = LogisticRegression(max_iter=5000).fit(scaler.transform(Xtr), ytr)
    return float(clf.score(scaler.transform(Xte), yte)), int(clf.n_iter_.max())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=96, help="probes fitted by our solver (default 96)")
    ap.add_argument("--sklearn-points", type=int, default=None, help="probes fitted by sklearn (default: all)")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu", help="our solver's device (cpu, cuda)")
    ap.add_argument("--precondition", action="store_true", help="covariance-preconditioned L-BFGS (see solver)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    P = args.points
    P_sk = min(P, args.sklearn_points or P)

    print(f"generating {P} probes: {args.n_train} x {args.dim} train, {args.n_test} test, {args.classes} classes")
    Xtr, Xte, ytr, yte = make_features(P, args.n_train, args.n_test, args.dim, args.classes, args.seed)
    rss0 = peak_rss_mb()

    # --- ours: preprocessing + one batched fit + scoring, all included in the timing -----------------
    cfg = SolverConfig(dtype=args.dtype, device=args.device, precondition=args.precondition)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    A, B = Xtr.clone().to(device), Xte.clone().to(device)
    preprocess(A, B)
    fit = fit_logreg(A, ytr, args.classes, cfg, progress=True)
    ours = fit.accuracy(B.to(fit.weight.dtype), yte).numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - start
    mem_ours = peak_rss_mb()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    # --- scikit-learn: the same pipeline, probe after probe --------------------------------------------
    warnings.simplefilter("ignore", ConvergenceWarning)
    Xtr_np, Xte_np, ytr_np, yte_np = Xtr.numpy(), Xte.numpy(), ytr.numpy(), yte.numpy()
    ref, ref_iter = np.zeros(P_sk), np.zeros(P_sk, dtype=int)
    start = time.perf_counter()
    for p in range(P_sk):
        ref[p], ref_iter[p] = sklearn_probe(Xtr_np[p], Xte_np[p], ytr_np, yte_np)
        print(f"\rscikit-learn probe {p + 1}/{P_sk}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    t_sk_measured = time.perf_counter() - start
    t_sk = t_sk_measured * P / P_sk

    diff = np.abs(ours[:P_sk] - ref) * 100
    print("\n== linear probing benchmark ==")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, dtype {args.dtype}, "
        f"preconditioned={cfg.precondition}"
    )
    print(
        f"ours (batched, {P} probes)      : {t_ours:8.2f} s   {P / t_ours:7.2f} probes/s   "
        f"iterations median {int(fit.n_iter.median())} max {int(fit.n_iter.max())}, "
        f"converged {int(fit.converged.sum())}/{P}"
    )
    sk_note = "" if P_sk == P else f" (measured {t_sk_measured:.1f} s on {P_sk} probes, extrapolated x{P / P_sk:.2f})"
    print(
        f"scikit-learn loop ({P} probes)   : {t_sk:8.2f} s   {P / t_sk:7.2f} probes/s   "
        f"iterations median {int(np.median(ref_iter))} max {int(ref_iter.max())}{sk_note}"
    )
    print(f"speed ratio                      : {t_sk / t_ours:8.1f}x  (goal >= 10x)")
    print(
        f"test accuracy                    : ours {100 * ours.min():.1f}..{100 * ours.max():.1f}%, "
        f"sklearn {100 * ref.min():.1f}..{100 * ref.max():.1f}%"
    )
    print(
        f"max |accuracy difference|        : {diff.max():8.2f} points over {P_sk} probes (goal <= 0.5), "
        f"mean {diff.mean():.3f}"
    )
    print(
        f"peak memory (RSS high-water)     : {rss0:8.0f} MB after generating data, {mem_ours:.0f} MB after ours, "
        f"{peak_rss_mb():.0f} MB at the end" + (f"; CUDA peak {gpu_peak:.0f} MB" if gpu_peak else "")
    )


if __name__ == "__main__":
    main()
