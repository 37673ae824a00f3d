"""Plasticity of ViT components: their average rate of change (Odonnat et al., arXiv 2602.06883, §3).

The plasticity of a function f over a distribution of input pairs (x, y) is

    P(f) = E [ ||f(x) - f(y)||_F / ||x - y||_F ],

with Frobenius norms over the whole token sequence of one sample. :func:`measure` estimates it for
every per-block component (LN1, MHA, LN2, FC1, FC2 of the registry in :mod:`vitef.models.components`)
from two image streams: pair i is the i-th image of ``source`` (the pretraining proxy) and the i-th
image of ``target`` (the downstream data).

Two modes:

``embedding`` (the paper's estimator)
    Every component of every block gets the same embedded input e(.) (patch projection, prefix tokens,
    position embedding): LN1/LN2 apply the block's LayerNorm to e, MHA applies the attention module
    alone (no norm, no residual, no LayerScale), FC1 the first linear layer before the activation, FC2
    the second linear layer on e zero-padded to the MLP width. The ratio's denominator is
    ||e(x) - e(y)||_F for every component.
``hidden``
    Each component gets the input it really receives in the forward pass of that sample (LN1: the
    block input; MHA: the LN1 output; LN2: the residual stream after attention, LayerScale included;
    FC1: the LN2 output; FC2: its actual input, i.e. the activation output, through the MLP norm when
    the model has one), from one real forward pass run block by block
    (:func:`vitef.models.components.block_trace`, checked against hooks on timm's own forward). The
    denominator is the distance between those inputs.

Families (issue 14; :mod:`vitef.models.components`). Both modes work on timm ``VisionTransformer``,
``Eva`` (EVA-02, DINOv3) and ``Beit`` models:

- MHA under rotary position embeddings (RoPE: EVA-02, DINOv3). The rotation of the queries and keys by
  their patch positions is part of the attention, so "MHA applied to e(x)" is block l's attention
  module on e(x) *with* block l's rotary embedding: x ↦ proj(softmax(R(W_q x) R(W_k x)^T / √d) W_v x),
  R rotating the patch tokens (not the prefix tokens) by angles set by their positions. R has no
  parameters and does not depend on the input (an orthogonal map per position): it changes which tokens
  attend to which, hence the value of the ratio, but the ratio is still the rate of change of the
  attention exactly as the block applies it. Likewise BEiT's relative position biases (each block's table and the shared
  one) are added to the logits inside MHA in both modes. The q/k norms and the scale norm before the
  output projection (``attn.norm``, EVA-02 CLIP) are part of MHA too.
- Gated MLPs (SwiGLU: ``fc1_g``/``fc1_x``, or GluMlp's fused ``fc1``). FC1 is the linear map to the
  concatenated pre-gate projections [W_g x + b_g, W_x x + b_x] (width 2H); FC2 is the linear layer
  after the gate act(g) ⊙ v (input width H), so embedding mode pads e to H. The gate itself, like the
  GELU of a plain MLP, belongs to no component.

Speed and memory. x and y go through in one batched pass (concatenated), under
``torch.inference_mode``, one block at a time: nothing is held beyond the current block's outputs and
per-pair ratios are reduced on the fly (Chan/Welford running mean and variance in float64). In
embedding mode the linear components are computed on the difference only, since the bias cancels:
FC2 on [e, 0] equals e through the first d input columns of W2, so ||W2[:, :d] (e(x) - e(y))||;
FC1 uses ||W1 δ|| = ||R1 δ|| with W1 = Q1 R1 its thin QR factorisation (R1 is d × d, four times
cheaper than W1 for a 4x MLP and exact up to rounding, as Q1 has orthonormal columns).

Zero denominators. A pair of identical images (``x == y`` element-wise) has no defined rate of
change: all its ratios are NaN. So is any single ratio whose component inputs are exactly identical
(distance 0). NaN ratios are left out of that (layer, component)'s statistics, ``n`` counts only the
pairs that were used, and a warning says how many were dropped. The image-level check matters in
``hidden`` mode: batched kernels may round the two copies of one image differently, so their hidden
states can differ by rounding noise and would otherwise give meaningless ratios.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from vitef.errors import ComponentError, ConfigError
from vitef.models.components import (
    BLOCK_COMPONENTS,
    COMPONENT_IO,
    THEORETICAL_RANK,
    block_module,
    block_trace,
    canonical_list,
    embed_context,
    model_family,
    num_blocks,
    run_attention,
)
from vitef.utils import autocast_context, check_precision, precision_scope

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("embedding", "hidden")
COLUMNS: tuple[str, ...] = ("layer", "component", "mean", "std", "ci95", "n")


def measure(
    model: nn.Module,
    source: Iterable,
    target: Iterable,
    *,
    mode: str = "embedding",
    n_pairs: int | None = None,
    components: Iterable[str] | None = None,
    precision: str = "fp32",
    keep_samples: bool = False,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    chunk_size: int | None = None,
) -> pd.DataFrame:
    """Estimate the plasticity of every (block, component) of a timm ViT.

    Parameters
    ----------
    model
        A timm ``VisionTransformer``, ``Eva`` or ``Beit`` (:func:`vitef.models.components.model_family`). It is
        put in eval mode for the measurement (its mode is restored).
    source, target
        Iterables of image batches: ``(B, C, H, W)`` tensors or ``(images, labels)`` pairs as a
        ``DataLoader`` yields. Pair i is the i-th image of each stream; batch sizes may differ.
    mode
        ``"embedding"`` (the paper's estimator) or ``"hidden"`` (inputs of the real forward pass).
    n_pairs
        Stop after this many pairs (default: until either stream ends).
    components
        Subset of ``ln1, mha, ln2, fc1, fc2`` (aliases accepted); default all five.
    precision
        ``"fp32"`` (no autocast: the model's own dtype, float64 included, TF32 off), ``"tf32"`` (as fp32 with
        TensorFloat-32 matmuls on CUDA), ``"bf16"`` or ``"fp16"`` (autocast). Distances are always taken in at
        least float32. The backend flags are set for the call and restored (:func:`vitef.utils.precision_scope`).
    keep_samples
        Keep every per-pair ratio: ``df.attrs["samples"]`` is a float64 array ``(n_pairs, layers,
        components)`` (NaN for dropped identical pairs), with ``df.attrs["layers"]`` and
        ``df.attrs["components"]`` naming its axes.
    device
        Where to compute (default: the model's device). Batches are moved there.
    progress
        Called with the number of pairs after each chunk (e.g. a tqdm bar's ``update``).
    chunk_size
        At most this many pairs go through the model at once (default: a whole batch). Smaller chunks
        bound the activation memory (one block's outputs for ``2 * chunk_size`` images) at some speed
        cost; results do not depend on it beyond floating-point rounding.

    Returns
    -------
    pandas.DataFrame
        One row per (layer, component), layer-major: ``layer``, ``component``, ``mean``, ``std``
        (sample standard deviation, ddof=1), ``ci95`` (1.96·std/√n) and ``n`` (pairs used).
        ``df.attrs["n_pairs"]`` is the number of pairs seen and ``df.attrs["mode"]`` the mode.
    """
    if mode not in MODES:
        raise ConfigError(f"mode='{mode}' is not a plasticity mode; choose one of {', '.join(MODES)}")
    check_precision(precision)
    if chunk_size is not None and chunk_size <= 0:
        raise ConfigError(f"chunk_size={chunk_size} must be positive (or None for whole batches)")
    if n_pairs is not None and n_pairs <= 0:
        raise ConfigError(f"n_pairs={n_pairs} must be positive (or None for all pairs)")
    comps = resolve_components(components)
    model_family(model)  # raises ComponentError naming the supported families
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    n_layers = num_blocks(model)

    stats = RunningStats((n_layers, len(comps)))
    samples: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # Built outside autocast and with TF32 off: the FC1 QR factors are computed in full precision.
            with precision_scope("fp32"):
                step = _EmbeddingStep(model, comps, dev) if mode == "embedding" else _HiddenStep(model, comps)
            with step, precision_scope(precision), autocast_context(dev, precision):
                for x, y in iter_pairs(source, target, n_pairs, chunk_size):
                    images = torch.cat([x, y]).to(dev, non_blocking=True)  # (2B, C, H, W)
                    ratios = step(images, len(x))  # (layers, comps, B)
                    same = (x == y).flatten(1).all(dim=1).to(ratios.device)  # (B,) identical images
                    ratios = ratios.masked_fill(same, math.nan)
                    batch = ratios.to("cpu", torch.float64).numpy()
                    stats.update(batch)
                    if keep_samples:
                        samples.append(batch.transpose(2, 0, 1).copy())  # (B, layers, comps)
                    if progress is not None:
                        progress(len(x))
    finally:
        model.train(was_training)

    if stats.seen == 0:
        raise ConfigError("no image pairs: the source or target stream is empty (check the datasets and n_pairs)")
    dropped = stats.seen - stats.count
    if dropped.any():
        logger.warning(
            "%d (layer, component) ratios had identical inputs (zero distance) and were left out", int(dropped.sum())
        )
    df = stats.frame(comps)
    df.attrs["n_pairs"] = int(stats.seen)
    df.attrs["mode"] = mode
    if keep_samples:
        df.attrs["samples"] = np.concatenate(samples, axis=0)
        df.attrs["layers"] = list(range(n_layers))
        df.attrs["components"] = list(comps)
    return df


# ---------------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------------


def batch_images(batch: object) -> torch.Tensor:
    """The image tensor of a batch: the batch itself, or the first item of ``(images, labels)``."""
    if isinstance(batch, torch.Tensor):
        images = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        images = batch[0]
    else:
        raise ConfigError(
            f"a batch of type {type(batch).__name__} is not images: give (B, C, H, W) tensors or (images, labels)"
        )
    if images.ndim != 4:
        raise ConfigError(f"image batches must be (B, C, H, W), got shape {tuple(images.shape)}")
    return images


def iter_pairs(
    source: Iterable, target: Iterable, n_pairs: int | None = None, chunk_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield equal-sized ``(x, y)`` chunks pairing the i-th image of each stream.

    Streams with different batch sizes are re-chunked (chunks hold at most ``chunk_size`` pairs when
    given); iteration stops when either ends or after ``n_pairs`` pairs (no batch beyond what is needed
    is drawn).
    """
    src, tgt = iter(source), iter(target)
    bx: torch.Tensor | None = None
    by: torch.Tensor | None = None
    remaining = n_pairs
    while remaining is None or remaining > 0:
        if bx is None or len(bx) == 0:
            bx = _next_images(src)
        if bx is None:
            return
        if by is None or len(by) == 0:
            by = _next_images(tgt)
        if by is None:
            return
        if bx.shape[1:] != by.shape[1:]:
            raise ConfigError(
                f"source images {tuple(bx.shape[1:])} and target images {tuple(by.shape[1:])} differ in shape; "
                "load both at the model's resolution"
            )
        k = min(len(bx), len(by), remaining if remaining is not None else len(bx), chunk_size or len(bx))
        yield bx[:k], by[:k]
        bx, by = bx[k:], by[k:]
        if remaining is not None:
            remaining -= k


def _next_images(it: Iterator) -> torch.Tensor | None:
    batch = next(it, None)
    return None if batch is None else batch_images(batch)


# ---------------------------------------------------------------------------------------------------
# One chunk of pairs
# ---------------------------------------------------------------------------------------------------


def pair_distance(out: torch.Tensor, b: int) -> torch.Tensor:
    """``||out[i] - out[b + i]||_F`` for i < b, in at least float32; ``out`` is ``(2b, ...)``."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    return (out[:b].to(dtype) - out[b:].to(dtype)).flatten(1).norm(dim=1)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # Identical inputs (den == 0) have no rate of change: NaN, dropped from the statistics.
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(den, math.nan))


class _EmbeddingStep(contextlib.AbstractContextManager):
    """Ratios of the paper's estimator for one chunk: every component on the same e(x), e(y)."""

    def __init__(self, model: nn.Module, comps: tuple[str, ...], device: torch.device):
        self.model = model
        self.comps = comps
        self.fc1_r: list[torch.Tensor] = []
        self.fc2_w: list[torch.Tensor] = []
        for layer in range(num_blocks(model)):
            fc1 = block_module(model, layer, "fc1")
            fc2 = block_module(model, layer, "fc2")
            d = fc1.in_features
            if fc2.in_features < d:
                raise ComponentError(
                    f"block {layer}: FC2 input width {fc2.in_features} < embedding width {d}; "
                    "embedding mode cannot zero-pad e to the MLP width (use mode=hidden)"
                )
            if "fc1" in comps:
                # ||W1 δ|| = ||R1 δ|| for W1 = Q1 R1 (Q1 with orthonormal columns); R1 is (d, d).
                w1 = fc1.weight.detach().to(device)
                if w1.shape[0] > w1.shape[1]:
                    w1 = torch.linalg.qr(w1.to(torch.promote_types(w1.dtype, torch.float32)), mode="r")[1]
                self.fc1_r.append(w1)
            if "fc2" in comps:
                # W2 [e, 0, ..., 0] = W2[:, :d] e: the padded columns only ever multiply zeros.
                self.fc2_w.append(fc2.weight.detach()[:, :d].to(device))

    def __exit__(self, *exc: object) -> None:
        self.fc1_r.clear()
        self.fc2_w.clear()

    def __call__(self, images: torch.Tensor, b: int) -> torch.Tensor:
        e, ctx = embed_context(self.model, images)  # (2B, N, D), and the RoPE / shared bias the blocks need
        dtype = torch.promote_types(e.dtype, torch.float32)
        delta = e[:b].to(dtype) - e[b:].to(dtype)  # (B, N, D)
        den = delta.flatten(1).norm(dim=1)  # (B,)
        out = torch.empty(num_blocks(self.model), len(self.comps), b, dtype=den.dtype, device=den.device)
        for layer in range(num_blocks(self.model)):
            for j, comp in enumerate(self.comps):
                if comp in ("fc1", "fc2"):
                    # Linear: the bias cancels, so only the difference goes through (B rows, not 2B).
                    w = self.fc1_r[layer] if comp == "fc1" else self.fc2_w[layer]
                    num = nn.functional.linear(delta, w.to(dtype)).to(dtype).flatten(1).norm(dim=1)  # (B,)
                elif comp == "mha":
                    # Nonlinear: both sides in one batched call; RoPE / relative position bias inside.
                    num = pair_distance(run_attention(self.model, layer, e, ctx), b)
                else:
                    # LN1, LN2: nonlinear, so both sides go through in one batched call.
                    num = pair_distance(block_module(self.model, layer, comp)(e), b)
                out[layer, j] = _ratio(num.to(den.dtype), den)
        return out


class _HiddenStep(contextlib.AbstractContextManager):
    """Ratios for one chunk where each component sees the input it gets in the real forward pass."""

    def __init__(self, model: nn.Module, comps: tuple[str, ...]):
        self.model = model
        self.comps = comps

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, images: torch.Tensor, b: int) -> torch.Tensor:
        h, ctx = embed_context(self.model, images)  # (2B, N, D)
        dtype = torch.promote_types(h.dtype, torch.float32)
        out = torch.full((num_blocks(self.model), len(self.comps), b), math.nan, dtype=dtype, device=h.device)
        for layer in range(num_blocks(self.model)):
            # The block run piece by piece (the same modules, in the same order, as timm's forward): each
            # component's real input and output, (2B, N, width) each.
            trace = block_trace(self.model, layer, h, ctx)
            for j, comp in enumerate(self.comps):
                src, dst = COMPONENT_IO[comp]
                den = pair_distance(trace[src], b)
                out[layer, j] = _ratio(pair_distance(trace[dst], b).to(den.dtype), den)
            h = trace["res2"]
            del trace
        return out


# ---------------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------------


class RunningStats:
    """Running mean and variance of NaN-masked values over the last axis (Chan et al. batch merge).

    ``update`` takes arrays of shape ``shape + (B,)``; NaNs are ignored. float64 throughout.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.count = np.zeros(shape, dtype=np.int64)
        self.mean = np.zeros(shape)
        self.m2 = np.zeros(shape)
        self.seen = 0

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        self.seen += values.shape[-1]
        valid = ~np.isnan(values)
        nb = valid.sum(-1)
        if not nb.any():
            return
        safe = np.maximum(nb, 1)
        zeroed = np.where(valid, values, 0.0)
        mb = zeroed.sum(-1) / safe
        m2b = (np.where(valid, values - mb[..., None], 0.0) ** 2).sum(-1)
        total = self.count + nb
        tot_safe = np.maximum(total, 1)
        delta = mb - self.mean
        self.mean = np.where(nb > 0, self.mean + delta * nb / tot_safe, self.mean)
        self.m2 = np.where(nb > 0, self.m2 + m2b + delta**2 * self.count * nb / tot_safe, self.m2)
        self.count = total

    def std(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 1, np.sqrt(self.m2 / np.maximum(self.count - 1, 1)), np.nan)

    def frame(self, comps: tuple[str, ...]) -> pd.DataFrame:
        """Rows (layer, component, mean, std, ci95, n) for a ``(layers, comps)`` shape."""
        std = self.std()
        with np.errstate(invalid="ignore", divide="ignore"):
            ci = 1.96 * std / np.sqrt(self.count)
            mean = np.where(self.count > 0, self.mean, np.nan)
        rows = [
            {
                "layer": layer,
                "component": comp,
                "mean": float(mean[layer, j]),
                "std": float(std[layer, j]),
                "ci95": float(ci[layer, j]),
                "n": int(self.count[layer, j]),
            }
            for layer in range(self.count.shape[0])
            for j, comp in enumerate(comps)
        ]
        return pd.DataFrame(rows, columns=list(COLUMNS))


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def resolve_components(components: Iterable[str] | str | None) -> tuple[str, ...]:
    """Canonical per-block component names in forward order (``None`` or ``all``: all five)."""
    if components is None:
        return BLOCK_COMPONENTS
    names = canonical_list(components)
    if "all" in names:
        return BLOCK_COMPONENTS
    bad = [c for c in names if c not in BLOCK_COMPONENTS]
    if bad or not names:
        raise ComponentError(
            f"plasticity is measured for per-block components only; got {', '.join(bad) or 'none'}, "
            f"choose from {', '.join(BLOCK_COMPONENTS)} (or all)"
        )
    # Keep the registry's forward order whatever order the user gave.
    return tuple(c for c in BLOCK_COMPONENTS if c in names)


def summarize(df: pd.DataFrame) -> tuple[pd.DataFrame, float, float]:
    """Per-component summary of a :func:`measure` table against the theoretical ranking.

    Parameters
    ----------
    df
        Rows of (layer, component, mean, ...), as :func:`measure` returns or ``plasticity.csv`` holds.

    Returns
    -------
    per : pandas.DataFrame
        One row per component, in theoretical order: ``mean_over_layers``, ``std_over_layers``, ``min``,
        ``max`` of the per-block means, ``measured_rank`` (1 = most plastic) and ``theoretical_rank``.
    tau, p_value : float
        Kendall's tau between the measured and theoretical rankings and its two-sided p-value (NaN for
        fewer than two components).
    """
    # Imported here: scipy costs an import that measuring plasticity does not need.
    from scipy.stats import kendalltau

    per = df.groupby("component", sort=False)["mean"].agg(["mean", "std", "min", "max"]).reset_index()
    per = per.rename(columns={"mean": "mean_over_layers", "std": "std_over_layers"})
    per["measured_rank"] = per["mean_over_layers"].rank(ascending=False, method="min").astype(int)
    per["theoretical_rank"] = per["component"].map(THEORETICAL_RANK).astype(int)
    per = per.sort_values("theoretical_rank").reset_index(drop=True)
    if len(per) >= 2:
        result = kendalltau(per["measured_rank"], per["theoretical_rank"])
        tau, p_value = float(result.statistic), float(result.pvalue)
    else:
        tau = p_value = math.nan
    return per, tau, p_value
