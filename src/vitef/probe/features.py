"""Features of a frozen ViT at the 8 probe points of every block (Odonnat et al., arXiv 2602.06883, §4).

A timm block computes ``x + ls1(attn(norm1(x)))`` then ``x + ls2(fc2(act(fc1(norm2(x)))))``. The
probe points, in block order (names are the contract in docs/ARCHITECTURE.md):

========  ==================================================================================
``ln1``   after LN1: ``norm1(x)``
``mha``   after MHA, before the residual: ``ls1(attn(ln1))`` (LayerScale ``ls1`` included when the
          model has one, e.g. DINOv2, or ``gamma_1`` for Eva/Beit; it is the identity for the paper's
          ViTs; RoPE and relative position biases are applied inside ``attn``)
``res1``  after the attention residual: ``x + mha``
``ln2``   after LN2: ``norm2(res1)``
``fc1``   after FC1, before the activation (MLP width, 4x the embedding for ViT-B; for a gated MLP,
          SwiGLU, the concatenated gate and value projections: twice the width of ``act``)
``act``   after the activation (MLP width; for a gated MLP, after the gate ``act(g) * v``)
``fc2``   after FC2, before the residual: ``ls2(fc2(norm(act)))`` (the optional MLP norm and
          LayerScale ``ls2`` included, as for ``mha``)
``res2``  after the MLP residual = the block output
========  ==================================================================================

All 8 come from ONE forward pass per batch that runs each block's pieces explicitly through the
component registry (:func:`vitef.models.block_trace`, :func:`~vitef.models.embed_context`), for timm
``VisionTransformer``, ``Eva`` (EVA-02, DINOv3) and ``Beit`` alike; the test suite checks them against
timm's own block forward.
Tokens are pooled per image: ``mean`` over the patch tokens (prefix tokens — CLS, registers — left
out, as timm's ``global_pool="avg"``) or the ``cls`` token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vitef.errors import ConfigError
from vitef.models import BlockContext, block_module, block_trace, embed_context, mlp_width, num_blocks
from vitef.utils import autocast_context, check_precision, precision_scope

logger = logging.getLogger(__name__)

PROBE_POINTS: tuple[str, ...] = ("ln1", "mha", "res1", "ln2", "fc1", "act", "fc2", "res2")
POOLS: tuple[str, ...] = ("mean", "cls")


def check_points(points: Iterable[str]) -> list[str]:
    """Validated probe point names in block order (duplicates removed); raises :class:`ConfigError`."""
    pts = [str(p).strip().lower() for p in points]
    unknown = [p for p in pts if p not in PROBE_POINTS]
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ConfigError(f"unknown probe point(s) {names}: choose from {', '.join(PROBE_POINTS)}")
    if not pts:
        raise ConfigError(f"no probe point given: choose from {', '.join(PROBE_POINTS)}")
    return [p for p in PROBE_POINTS if p in pts]


def check_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    """Block indices (negative counts from the end; ``None`` = all), sorted and validated."""
    if layers is None:
        return list(range(depth))
    out = set()
    for layer in layers:
        i = int(layer)
        if not -depth <= i < depth:
            raise ConfigError(f"layers: block {layer} does not exist; the model has {depth} blocks (0..{depth - 1})")
        out.add(i % depth)
    if not out:
        raise ConfigError("layers is empty: give block indices, or leave it unset (null) for all blocks")
    return sorted(out)


def point_dim(model: nn.Module, point: str) -> int:
    """Feature width at ``point``: FC1's output width for ``fc1`` (2H for a gated MLP), the MLP hidden width H
    for ``act``, the embedding width otherwise."""
    if point == "fc1":
        return int(block_module(model, 0, "fc1").out_features)
    if point == "act":
        return mlp_width(model, 0)
    return model.embed_dim  # type: ignore[return-value]


def block_points(
    model: nn.Module, layer: int, x: torch.Tensor, points: Sequence[str], ctx: BlockContext | None = None
) -> tuple[torch.Tensor, dict]:
    """Run block ``layer`` piece by piece on tokens ``x`` ``(B, N, D)``.

    Returns the block output ``(B, N, D)`` and ``{point: tokens}`` for the requested ``points``. ``ctx`` is
    the block context :func:`vitef.models.embed_context` returns with the tokens (required for Eva and Beit:
    the rotary embedding, the shared relative position bias). Stochastic depth and dropout are skipped: the
    model is assumed frozen in eval mode.
    """
    # LayerScale and the MLP's optional norm are not registry components of their own: they belong to the
    # MHA / FC2 branch (see vitef.models.components); block_trace applies them where the model does.
    trace = block_trace(model, layer, x, ctx)
    return trace["res2"], {p: trace[p] for p in points}


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    """``(B, N, C)`` → ``(B, C)``: mean over the patch tokens, or the CLS token (index 0)."""
    if pool == "cls":
        return tokens[:, 0]
    return tokens[:, num_prefix_tokens:].mean(dim=1)


def check_pool(model: nn.Module, pool: str) -> str:
    """Validate ``pool`` for ``model`` (``cls`` needs a class token)."""
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r} is unknown: use mean (the paper's) or cls")
    if pool == "cls" and getattr(model, "cls_token", None) is None:
        raise ConfigError("pool=cls but this model has no class token: use pool=mean")
    return pool


@dataclass
class FeatureBank:
    """Pooled features of a dataset split, grouped by feature width so each group is one solver batch.

    Attributes
    ----------
    keys
        ``(layer, point)`` of every probe, in block order.
    groups
        ``{width: (P_w, n, width) float32}``; ``index[(layer, point)] = (width, row)`` locates a probe.
    labels
        ``(n,)`` int64.
    """

    keys: list[tuple[int, str]]
    groups: dict[int, torch.Tensor]
    index: dict[tuple[int, str], tuple[int, int]]
    labels: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.labels.numel())

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.groups.values())


def extract_features(
    model: nn.Module,
    loader: Iterable,
    *,
    layers: Sequence[int] | None = None,
    points: Sequence[str] = PROBE_POINTS,
    pool: str = "mean",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    num_samples: int | None = None,
    desc: str = "features",
) -> FeatureBank:
    """Stream ``loader`` through the frozen ``model`` and keep pooled features at every probe.

    Parameters
    ----------
    model
        A timm ``VisionTransformer``, ``Eva`` or ``Beit`` (put in eval mode here).
    loader
        Yields ``(images (B, 3, H, W), labels (B,))``.
    layers, points
        Which blocks (default all) and probe points (default the 8 of :data:`PROBE_POINTS`).
    pool
        ``mean`` (patch tokens) or ``cls``.
    precision
        A name of :data:`vitef.utils.PRECISIONS` (``fp32``, ``tf32``, ``bf16``, ``fp16``): autocast and float32
        matmul flags for the forward (restored after each batch); stored features are float32.
    num_samples
        Number of samples the loader yields (default ``len(loader.dataset)``): the bank is
        preallocated, ``n_samples x n_probes x width`` float32 in CPU memory.
    """
    device = torch.device(device)
    model.eval().to(device)
    depth = num_blocks(model)
    layer_ids = check_layers(layers, depth)
    pts = check_points(points)
    check_pool(model, pool)
    check_precision(precision)
    n = num_samples if num_samples is not None else len(loader.dataset)  # type: ignore[attr-defined]
    keys = [(layer, p) for layer in layer_ids for p in pts]
    index: dict[tuple[int, str], tuple[int, int]] = {}
    counts: dict[int, int] = {}
    for key in keys:
        w = point_dim(model, key[1])
        index[key] = (w, counts.get(w, 0))
        counts[w] = counts.get(w, 0) + 1
    groups = {w: torch.empty(c, n, w, dtype=torch.float32) for w, c in counts.items()}
    labels = torch.empty(n, dtype=torch.long)
    last = layer_ids[-1]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    pos = 0
    for images, targets in tqdm(loader, desc=desc, unit="batch", leave=False):
        b = images.shape[0]
        if pos + b > n:
            raise ValueError(f"loader yielded more than num_samples={n} samples")
        # The bank is allocated outside inference mode so callers can preprocess it in place.
        with torch.inference_mode(), precision_scope(precision), autocast_context(device, precision):
            x, ctx = embed_context(model, images.to(device, non_blocking=True))  # (B, N, D)
            for layer in range(last + 1):
                want = pts if layer in layer_ids else ()
                x, feats = block_points(model, layer, x, want, ctx)
                for p, tokens in feats.items():
                    w, row = index[(layer, p)]
                    groups[w][row, pos : pos + b] = pool_tokens(tokens, pool, prefix).float().cpu()
        labels[pos : pos + b] = torch.as_tensor(targets)
        pos += b
    if pos != n:
        raise ValueError(f"loader yielded {pos} samples, expected {n}")
    return FeatureBank(keys=keys, groups=groups, index=index, labels=labels)
