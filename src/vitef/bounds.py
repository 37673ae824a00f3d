"""Theoretical upper bounds on the plasticity of ViT components (Odonnat et al., arXiv 2602.06883, §3).

Per block, from the weights alone (biases cancel or do not enter the bounds):

- LayerNorm with gain γ: ``P <= ||γ||_∞ / σ``, σ a lower bound on the per-token standard deviation of
  the inputs (configurable; the authors' figure plots ``max γ``, reported beside it).
- Linear layer W (FC1, FC2): ``P <= ||W||_2``, its largest singular value.
- Multi-head attention with H heads on n tokens of norm <= r:

      P <= Σ_h ||O^h||_2 · ||V^h||_2 · sqrt(3n + (12n + 3) · r⁴ · ||A^h||_2²),
      A^h = (W_Q^h)ᵀ W_K^h / sqrt(d_h).

  W_Q^h, W_K^h, W_V^h are head h's ROWS of the query/key/value projections (PyTorch stores them
  out × in, so head h owns output rows h·d_h … (h+1)·d_h − 1), and O^h is head h's block of input
  COLUMNS of the output projection. This is the per-head bilinear form the bound is about. Note: the
  authors' own code sliced the q/k/v weights along columns (input features), which mixes heads; vitef
  slices rows on purpose, so its MHA bounds differ from theirs.

r is estimated from data by :func:`estimate_radius`: per image ``sqrt(mean over tokens ||t||²)`` of the
embedded downstream images, averaged over images (the paper reports 19.4 for CIFAR-10 with ViT-B/16
ImageNet-21k).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import pandas as pd
import torch
from torch import nn

from vitef.errors import ComponentError, ConfigError
from vitef.models.components import BLOCK_COMPONENTS, block_module, embed, num_blocks
from vitef.plasticity import batch_images

logger = logging.getLogger(__name__)

BOUND_COLUMNS: tuple[str, ...] = ("layer", "component", "bound", "spectral_norm", "gamma_absmax", "gamma_max", "sigma")


def layernorm_bound(norm: nn.Module, sigma: float = 1.0) -> dict[str, float]:
    """``||γ||_∞ / σ`` for a LayerNorm, with ``||γ||_∞`` and ``max γ``.

    Returns
    -------
    dict
        ``bound``, ``gamma_absmax`` (``||γ||_∞``), ``gamma_max`` (``max γ``), ``sigma``.
    """
    if sigma <= 0:
        raise ConfigError(f"sigma={sigma} must be positive (a lower bound on the per-token std of the inputs)")
    weight = getattr(norm, "weight", None)
    if weight is None:
        # A LayerNorm without affine gain has γ = 1.
        absmax = gmax = 1.0
    else:
        g = weight.detach().double()
        absmax = float(g.abs().max())
        gmax = float(g.max())
    return {"bound": absmax / sigma, "gamma_absmax": absmax, "gamma_max": gmax, "sigma": float(sigma)}


def linear_bound(linear: nn.Linear) -> float:
    """The spectral norm ``||W||_2`` of a linear layer (its Lipschitz constant)."""
    return float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))


def head_weights(attn: nn.Module) -> dict[str, torch.Tensor]:
    """Per-head projection matrices of a timm ``Attention`` (float64).

    Returns
    -------
    dict
        ``q``, ``k``, ``v``: ``(H, d_h, D)``, head h's rows of W_Q, W_K, W_V (out × in);
        ``o``: ``(H, D_out, d_h)``, head h's input columns of W_O.
    """
    qkv = getattr(attn, "qkv", None)
    proj = getattr(attn, "proj", None)
    heads = getattr(attn, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or heads is None:
        raise ComponentError(
            f"attention module {type(attn).__name__} has no fused qkv/proj linear layers; "
            "the MHA bound supports timm Attention (blocks.N.attn.qkv / attn.proj)"
        )
    w = qkv.weight.detach().double()  # (3·H·d_h, D)
    d_h = w.shape[0] // (3 * heads)
    q, k, v = w.reshape(3, heads, d_h, w.shape[1]).unbind(0)  # each (H, d_h, D): rows per head
    wo = proj.weight.detach().double()  # (D_out, H·d_h)
    o = wo.reshape(wo.shape[0], heads, d_h).permute(1, 0, 2)  # (H, D_out, d_h): input columns per head
    return {"q": q, "k": k, "v": v, "o": o}


def mha_bound(attn: nn.Module, *, n: int, r: float) -> dict[str, float]:
    """The per-head MHA plasticity bound of PROTOCOL §1 for one attention module.

    Parameters
    ----------
    attn
        A timm ``Attention`` module.
    n
        Sequence length (tokens, prefix tokens included).
    r
        Bound on token norms (see :func:`estimate_radius`).

    Returns
    -------
    dict
        ``bound`` and ``max_head_attn_norm`` (the largest ``||A^h||_2``).
    """
    if n <= 0 or r <= 0:
        raise ConfigError(f"the MHA bound needs a positive sequence length and radius (got n={n}, r={r})")
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
        logger.warning("attention with q/k normalisation: the MHA bound assumes plain dot-product attention")
    w = head_weights(attn)
    d_h = w["q"].shape[1]
    o_norm = torch.linalg.matrix_norm(w["o"], ord=2)  # (H,)
    v_norm = torch.linalg.matrix_norm(w["v"], ord=2)  # (H,)
    a_norm = attention_matrix_norm(w["q"], w["k"]) / math.sqrt(d_h)  # (H,)
    per_head = o_norm * v_norm * torch.sqrt(3 * n + (12 * n + 3) * r**4 * a_norm**2)
    return {"bound": float(per_head.sum()), "max_head_attn_norm": float(a_norm.max())}


def attention_matrix_norm(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``||(W_Q^h)ᵀ W_K^h||_2`` per head without forming the ``D × D`` products.

    With thin QR factorisations ``(W_Q^h)ᵀ = U_q R_q`` and ``(W_K^h)ᵀ = U_k R_k`` (U with orthonormal
    columns), ``(W_Q^h)ᵀ W_K^h = U_q (R_q R_kᵀ) U_kᵀ`` has the singular values of the small
    ``d_h × d_h`` matrix ``R_q R_kᵀ``.

    Parameters
    ----------
    q, k
        ``(H, d_h, D)`` head rows of W_Q and W_K.
    """
    rq = torch.linalg.qr(q.transpose(-2, -1), mode="r")[1]  # (H, d_h, d_h)
    rk = torch.linalg.qr(k.transpose(-2, -1), mode="r")[1]
    return torch.linalg.matrix_norm(rq @ rk.transpose(-2, -1), ord=2)


def sequence_length(model: nn.Module) -> int:
    """Number of tokens the blocks see: patches plus prefix (CLS, register, distillation) tokens."""
    return int(model.patch_embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))


def estimate_radius(
    model: nn.Module, loader: Iterable, *, max_batches: int | None = None, device: torch.device | str | None = None
) -> float:
    """Mean token norm r of embedded images: per image ``sqrt(mean_t ||t||²)``, averaged over images.

    Parameters
    ----------
    model
        A timm ``VisionTransformer`` (used in eval mode; its mode is restored).
    loader
        Batches of images or ``(images, labels)`` (the downstream data, in the paper).
    max_batches
        Use at most this many batches (default: all).
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                e = embed(model, batch_images(batch).to(dev))  # (B, N, D)
                per_image = e.double().pow(2).sum(-1).mean(-1).sqrt()  # (B,)
                total += float(per_image.sum())
                count += len(per_image)
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("cannot estimate the token radius r: the loader yielded no images")
    return total / count


def bounds_table(
    model: nn.Module,
    *,
    r: float,
    n: int | None = None,
    sigma: float = 1.0,
    components: Iterable[str] | None = None,
) -> pd.DataFrame:
    """The theoretical bound of every (layer, component).

    Parameters
    ----------
    r
        Token-norm radius for the MHA bound (:func:`estimate_radius`).
    n
        Sequence length for the MHA bound (default: the model's, :func:`sequence_length`).
    sigma
        Lower bound on the per-token standard deviation for the LayerNorm bounds.
    components
        Per-block components to include (default all five).

    Returns
    -------
    pandas.DataFrame
        Columns ``layer, component, bound, spectral_norm`` (FC), ``gamma_absmax, gamma_max, sigma``
        (LN), ``max_head_attn_norm, r, n`` (MHA); NaN where a column does not apply.
    """
    comps = tuple(BLOCK_COMPONENTS if components is None else components)
    n = sequence_length(model) if n is None else n
    rows = []
    for layer in range(num_blocks(model)):
        for comp in comps:
            module = block_module(model, layer, comp)
            row: dict = {"layer": layer, "component": comp}
            if comp in ("ln1", "ln2"):
                row.update(layernorm_bound(module, sigma))
            elif comp in ("fc1", "fc2"):
                row["bound"] = row["spectral_norm"] = linear_bound(module)
            else:
                row.update(mha_bound(module, n=n, r=r))
                row.update({"r": float(r), "n": int(n)})
            rows.append(row)
    cols = [*BOUND_COLUMNS, "max_head_attn_norm", "r", "n"]
    return pd.DataFrame(rows).reindex(columns=cols)


def compare(bounds: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """``bounds`` with the measured plasticity (``measured``: its ``mean``) and ``ratio = measured / bound``."""
    m = measured[["layer", "component", "mean"]].rename(columns={"mean": "measured"})
    out = bounds.merge(m, on=["layer", "component"], how="left")
    out["ratio"] = out["measured"] / out["bound"]
    return out
