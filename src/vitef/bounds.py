"""Theoretical upper bounds on the plasticity of ViT components (Odonnat et al., arXiv 2602.06883, §3).

Per block, from the weights alone:

- LayerNorm with gain γ: ``P <= ||γ||_∞ / σ``, σ a lower bound on the per-token standard deviation of
  the inputs (configurable; the authors' figure plots ``max γ``, reported beside it). An RMSNorm has the
  same bound with σ a lower bound on the per-token root mean square.
- Linear layer W (FC1, FC2): ``P <= ||W||_2``, its largest singular value. FC1 is the linear map before
  the activation: in a gated MLP (SwiGLU, ``act(W_g x) ⊙ W_x x``) it is ``x ↦ (W_g x, W_x x)``, whose
  bound is the spectral norm of the stacked ``[W_g; W_x]`` (timm's ``GluMlp`` stores that stack as one
  ``fc1``; ``SwiGLU`` as ``fc1_g`` and ``fc1_x``, which the registry's ``block_module`` joins into one
  ``ConcatLinear``). FC2 is the second linear layer alone (a ``mlp.norm``
  before it is not part of the function the estimator measures).
- Multi-head attention with H heads on n tokens of norm <= r:

      P <= Σ_h ||O^h||_2 · ||V^h||_2 · sqrt(3n + (12n + 3) · r⁴ · ||A^h||_2²),
      A^h = (W_Q^h)ᵀ W_K^h / sqrt(d_h).

  W_Q^h, W_K^h, W_V^h are head h's ROWS of the query/key/value projections (PyTorch stores them
  out × in, so head h owns output rows h·d_h … (h+1)·d_h − 1), and O^h is head h's block of input
  COLUMNS of the output projection. This is the per-head bilinear form the bound is about. Note: the
  authors' own code sliced the q/k/v weights along columns (input features), which mixes heads; vitef
  slices rows on purpose, so its MHA bounds differ from theirs. The projections are read from a fused
  ``qkv`` (ViT, BEiT, EVA-02) or from separate ``q_proj`` / ``k_proj`` / ``v_proj`` (EVA-02 CLIP).

What the MHA bound assumes, and what vitef computes for other attention layers
------------------------------------------------------------------------------
The paper's bound is for plain dot-product softmax attention on the token sequence,
``f(X) = Σ_h softmax(X A^h Xᵀ) X (W_V^h)ᵀ (O^h)ᵀ``, with ``||x_i|| <= r`` for every token. vitef's reading
of its derivation (an assumption: the bound depends on the tokens through r alone, so ``||X||_2`` can only
enter as ``<= sqrt(n) r``, which a pair-by-pair bound matches) is that A^h enters only through the
bilinear form of a pair of tokens, ``|uᵀ A^h w| <= ||A^h||_2 ||u|| ||w||``. MHA is
the attention module alone, as the plasticity estimator applies it (no norm before it, no residual, no
LayerScale); the blocks of timm ``Eva`` and ``Beit`` differ as follows.

- **RoPE** (DINOv3, EVA-02). Token i's query and key are rotated by an orthogonal ``R_i`` that depends
  on its position (prefix tokens: ``R_i = I``), so the logit of the pair (i, j) is
  ``x_iᵀ (W_Q^h)ᵀ R_iᵀ R_j W_K^h x_j / sqrt(d_h)``: a bilinear form ``A^h_ij`` that depends on the pair.
  The rotation does NOT leave ``||A^h||_2`` unchanged: ``||(W_Q^h)ᵀ R W_K^h||_2`` can exceed
  ``||(W_Q^h)ᵀ W_K^h||_2`` (if the queries use the first coordinate of a rotation pair and the keys the
  second, ``(W_Q^h)ᵀ W_K^h = 0`` while a quarter turn makes the form non-zero; tests/test_bounds_families.py
  measures a Jacobian above the rotation-blind bound). What the rotation leaves unchanged is every token
  norm and the norms of the rotated queries and keys, so the derivation goes through pair by pair with
  ``||A^h||_2`` replaced by ``a^h = max_ij ||A^h_ij||_2``. vitef computes that maximum over the relative
  rotations ``R_iᵀ R_j`` the model's grid realises (:func:`relative_rotations`: RoPE rotates fixed
  coordinate pairs, so ``R_iᵀ R_j`` is the rotation by the angle difference, and the distinct differences
  are few), through the small ``d_h × d_h`` factors of :func:`attention_matrix_norm`. Since ``i = j`` gives
  ``R_iᵀ R_j = I``, ``a^h >= ||A^h||_2``: the RoPE bound is never below the rotation-blind one. The
  rotations are those of the eval-mode model (DINOv3 jitters its coordinates only in training).
- **Relative position bias** (BEiT) adds a learned, input-independent term to the logits; the Jacobian
  with respect to the tokens does not change, and neither does the bound.
- **LayerScale** (``gamma_1`` / ``gamma_2`` in Eva and Beit, ``ls1`` / ``ls2`` in ViT) scales the branch
  after the component. The registry assigns ``gamma_1`` to MHA and ``gamma_2`` to FC2 (their parameters
  train with them), but the function bounded is the attention alone and the second linear layer alone,
  as the plasticity estimator measures them; :func:`bounds_table` reports ``||γ||_∞`` in ``layer_scale``
  so that a bound of the scaled branch is ``bound · layer_scale``.
- **An inner norm** after attention, before the output projection (EVA-02 CLIP's ``attn.norm``,
  timm's ``scale_norm``), mixes the heads: vitef bounds ``W_O ∘ LN ∘ concat_h`` by
  ``||W_O||_2 · (||γ||_∞ / σ) · sqrt(Σ_h L_h²)``, ``L_h = ||V^h||_2 · sqrt(3n + (12n + 3) r⁴ ||A^h||²)``,
  with the LayerNorms' σ (now a lower bound on the per-token standard deviation of the attention output).
- **q/k normalisation** (``q_norm`` / ``k_norm``), **gated attention** (``attn.gate``) and grouped
  key/value heads are not dot-product attention of the tokens' projections: :func:`mha_bound` refuses
  them with a :class:`~vitef.errors.ComponentError`.
- **Biases.** Key and value biases cancel without RoPE (a key bias shifts a softmax row by a constant; a
  value bias adds a constant, as softmax rows sum to one, with or without RoPE). A query bias does not: it
  adds ``b_qᵀ W_K x_j`` to the logits (and under RoPE a key bias adds ``x_iᵀ W_Qᵀ R_iᵀ R_j b_k``). The
  paper's formula, and vitef's default, leave biases out (a counterexample is in the tests). ``bias=True``
  gives a bound of the biased attention: it is bias-free attention of the augmented tokens ``(x, 1)`` with
  weights ``[W | b]``, whose norms are at most ``sqrt(r² + 1)`` and whose differences are those of x, so
  the same formula applies to them.

r is estimated from data by :func:`estimate_radius`: per image ``sqrt(mean over tokens ||t||²)`` of the
embedded downstream images, averaged over images (the paper reports 19.4 for CIFAR-10 with ViT-B/16
ImageNet-21k). The sequence length n (:func:`sequence_length`) counts the patches and the prefix tokens
(class, register and distillation tokens), whether or not the model has a learned position embedding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from vitef.errors import ComponentError, ConfigError
from vitef.models.components import BLOCK_COMPONENTS, BlockContext, block_module, embed, embed_context, num_blocks
from vitef.plasticity import batch_images

logger = logging.getLogger(__name__)

BOUND_COLUMNS: tuple[str, ...] = ("layer", "component", "bound", "spectral_norm", "gamma_absmax", "gamma_max", "sigma")
# The MHA columns, then the LayerScale gain of the branch (mha, fc2) and whether RoPE entered the MHA bound.
EXTRA_COLUMNS: tuple[str, ...] = ("max_head_attn_norm", "r", "n", "layer_scale", "rope")

# Relative rotation angles are snapped to multiples of this (radians) before deduplication: timm computes the
# angles in float32, so equal position offsets give angle differences that agree to ~1e-6 only. Each true
# rotation is then within ANGLE_STEP / 2 of its representative in every coordinate pair, which changes a
# spectral norm ||Wqᵀ R Wk|| by at most ||Wq|| ||Wk|| ANGLE_STEP / 2: :func:`attention_matrix_norm` adds that
# allowance, so the RoPE bound stays an upper bound.
ANGLE_STEP = 1e-5


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


def linear_bound(linear: nn.Module) -> float:
    """The spectral norm ``||W||_2`` of a linear layer (its Lipschitz constant).

    ``linear`` is an ``nn.Linear`` or anything with a ``weight`` ``(out, in)`` that it applies as one linear map,
    such as the registry's :class:`~vitef.models.components.ConcatLinear` (a SwiGLU's FC1, ``[W_g; W_x]``).
    """
    return float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2))


def layer_scale(model: nn.Module, layer: int, component: str) -> float:
    """``||γ||_∞`` of the LayerScale after ``component`` (``mha``: ``gamma_1`` / ``ls1``; ``fc2``: ``gamma_2`` /
    ``ls2``) in block ``layer``; NaN when the branch has none (or for another component)."""
    block = model.blocks[layer]  # type: ignore[index]
    index = {"mha": 1, "fc2": 2}.get(component)
    if index is None:
        return math.nan
    gamma = getattr(block, f"gamma_{index}", None)
    if gamma is None:
        gamma = getattr(getattr(block, f"ls{index}", None), "gamma", None)
    if not isinstance(gamma, torch.Tensor):
        return math.nan
    return float(gamma.detach().double().abs().max())


# ---------------------------------------------------------------------------------------------------
# Multi-head attention
# ---------------------------------------------------------------------------------------------------


def _unsupported_attention(attn: nn.Module) -> str | None:
    """Why the MHA bound does not apply to ``attn`` (None when it does)."""
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(attn, name, None) or nn.Identity(), nn.Identity):
            return f"it normalises queries and keys ({name})"
    if getattr(attn, "gate", None) is not None:
        return "it gates its output (attn.gate)"
    kv_heads = getattr(attn, "num_kv_heads", None)
    if kv_heads is not None and kv_heads != attn.num_heads:
        return f"it shares {kv_heads} key/value heads among {attn.num_heads} query heads"
    return None


def head_weights(attn: nn.Module) -> dict[str, torch.Tensor]:
    """Per-head projection matrices and biases of a timm attention module (float64).

    Reads a fused ``qkv`` Linear (ViT ``Attention``; BEiT and EVA-02 with ``q_bias`` / ``v_bias``
    parameters beside it) or separate ``q_proj`` / ``k_proj`` / ``v_proj`` (EVA-02 CLIP).

    Returns
    -------
    dict
        ``q``, ``k``, ``v``: ``(H, d_h, D)``, head h's rows of W_Q, W_K, W_V (out × in);
        ``o``: ``(H, D_out, d_h)``, head h's input columns of W_O;
        ``q_bias``, ``k_bias``, ``v_bias``: ``(H, d_h)``, zero where the module has none.
    """
    heads = getattr(attn, "num_heads", None)
    proj = getattr(attn, "proj", None)
    qkv = getattr(attn, "qkv", None)
    separate = [getattr(attn, f"{c}_proj", None) for c in "qkv"]
    if heads is None or not isinstance(proj, nn.Linear):
        qkv = None  # reported below
    if isinstance(qkv, nn.Linear):
        w = qkv.weight.detach().double()  # (3·H·d_h, D)
        if qkv.bias is not None:
            b = qkv.bias.detach().double()  # (3·H·d_h,)
        else:
            # BEiT / EVA-02 keep the biases beside the fused weight; k_bias is a zero buffer.
            b = torch.cat([_param_or_zero(attn, f"{c}_bias", w.shape[0] // 3) for c in "qkv"])
        weights, biases = w.chunk(3), b.chunk(3)  # each (H·d_h, D) / (H·d_h,)
    elif heads is not None and isinstance(proj, nn.Linear) and all(isinstance(m, nn.Linear) for m in separate):
        weights = tuple(m.weight.detach().double() for m in separate)
        biases = tuple(
            m.bias.detach().double() if m.bias is not None else torch.zeros(m.out_features, dtype=torch.float64)
            for m in separate
        )
    else:
        raise ComponentError(
            f"attention module {type(attn).__name__} has neither a fused qkv nor q_proj/k_proj/v_proj Linear layers "
            "with an output proj; the MHA bound supports timm Attention, Beit Attention and EvaAttention"
        )
    d_h = weights[0].shape[0] // heads
    out = {c: wc.reshape(heads, d_h, wc.shape[1]) for c, wc in zip("qkv", weights)}  # (H, d_h, D): rows per head
    out.update({f"{c}_bias": bc.reshape(heads, d_h) for c, bc in zip("qkv", biases)})  # (H, d_h)
    wo = proj.weight.detach().double()  # (D_out, H·d_h)
    out["o"] = wo.reshape(wo.shape[0], heads, d_h).permute(1, 0, 2)  # (H, D_out, d_h): input columns per head
    return out


def _param_or_zero(module: nn.Module, name: str, size: int) -> torch.Tensor:
    t = getattr(module, name, None)
    return t.detach().double() if isinstance(t, torch.Tensor) else torch.zeros(size, dtype=torch.float64)


def mha_bound(
    attn: nn.Module,
    *,
    n: int,
    r: float,
    rope: torch.Tensor | None = None,
    rotations: torch.Tensor | Sequence[torch.Tensor] | None = None,
    sigma: float = 1.0,
    bias: bool = False,
) -> dict[str, float]:
    """The per-head MHA plasticity bound of PROTOCOL §1 for one attention module (see the module doc).

    Parameters
    ----------
    attn
        A timm ``Attention``, BEiT ``Attention`` or ``EvaAttention`` module.
    n
        Sequence length (tokens, prefix tokens included).
    r
        Bound on token norms (see :func:`estimate_radius`).
    rope
        The rotary embedding the module is called with (``(N_patches, 2·d_h)`` as ``Eva._pos_embed``
        returns it, or one per head ``(H, N_patches, 2·d_h)``); ``||A^h||`` becomes the largest norm over
        the relative rotations it realises. ``None``: no rotation (the module called without ``rope``).
    rotations
        The relative rotations already computed by :func:`relative_rotations` (instead of ``rope``).
    sigma
        Lower bound on the per-token standard deviation of the attention output, used only when the module
        normalises it before the output projection (``attn.norm``).
    bias
        Bound the attention with its query/key biases (augmented tokens ``(x, 1)``) instead of the paper's
        bias-free formula.

    Returns
    -------
    dict
        ``bound``, ``max_head_attn_norm`` (the largest ``||A^h||_2``, or ``a^h`` under RoPE), ``rope`` (whether
        rotations entered it) and, for an attention with an inner norm, the ``sigma`` it assumed.

    Raises
    ------
    ComponentError
        q/k normalisation, gated attention, grouped key/value heads, or an unknown projection layout.
    ConfigError
        A non-positive ``n``, ``r`` or ``sigma``.
    """
    if n <= 0 or r <= 0:
        raise ConfigError(f"the MHA bound needs a positive sequence length and radius (got n={n}, r={r})")
    if sigma <= 0:
        raise ConfigError(f"sigma={sigma} must be positive (a lower bound on the per-token std of the inputs)")
    why = _unsupported_attention(attn)
    if why is not None:
        raise ComponentError(
            f"the MHA bound assumes plain dot-product softmax attention, but {type(attn).__name__} is not: {why}; "
            "leave mha out of the bounds (components=[ln1, ln2, fc1, fc2])"
        )
    w = head_weights(attn)
    d_h = w["q"].shape[1]
    q, k = w["q"], w["k"]  # (H, d_h, D)
    if bias:
        # Biased attention of x is bias-free attention of (x, 1) with weights [W | b] (module doc).
        q = torch.cat([q, w["q_bias"].unsqueeze(-1)], dim=-1)  # (H, d_h, D + 1)
        k = torch.cat([k, w["k_bias"].unsqueeze(-1)], dim=-1)
        r = math.sqrt(r**2 + 1)
    if rotations is None and rope is not None:
        rotations = relative_rotations(
            rope, half=bool(getattr(attn, "rotate_half", False)), prefix=int(getattr(attn, "num_prefix_tokens", 0))
        )
    o_norm = torch.linalg.matrix_norm(w["o"], ord=2)  # (H,)
    v_norm = torch.linalg.matrix_norm(w["v"], ord=2)  # (H,)
    a_norm = attention_matrix_norm(q, k, rotations) / math.sqrt(d_h)  # (H,)
    softmax_part = v_norm * torch.sqrt(3 * n + (12 * n + 3) * r**4 * a_norm**2)  # (H,) Lip of softmax(·)XVᵀ
    inner = getattr(attn, "norm", None)
    if inner is None or isinstance(inner, nn.Identity):
        bound = float((o_norm * softmax_part).sum())
    else:
        # LN across the concatenated heads: Lip(concat) <= sqrt(Σ L_h²), then the LN and the whole W_O.
        gain = layernorm_bound(inner, sigma)["bound"]
        wo = attn.proj.weight.detach().double()
        bound = float(torch.linalg.matrix_norm(wo, ord=2) * gain * softmax_part.pow(2).sum().sqrt())
    out = {"bound": bound, "max_head_attn_norm": float(a_norm.max()), "rope": rotations is not None}
    if inner is not None and not isinstance(inner, nn.Identity):
        out["sigma"] = float(sigma)  # the σ the bound of the inner norm assumed
    return out


def attention_matrix_norm(
    q: torch.Tensor, k: torch.Tensor, rotations: torch.Tensor | Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """``||(W_Q^h)ᵀ W_K^h||_2`` per head without forming the ``D × D`` products; with ``rotations``, the largest
    ``||(W_Q^h)ᵀ R W_K^h||_2`` over them.

    With thin QR factorisations ``(W_Q^h)ᵀ = U_q R_q`` and ``(W_K^h)ᵀ = U_k R_k`` (U with orthonormal
    columns), ``(W_Q^h)ᵀ R W_K^h = U_q (R_q R R_kᵀ) U_kᵀ`` has the singular values of the small
    ``d_h × d_h`` matrix ``R_q R R_kᵀ``.

    Parameters
    ----------
    q, k
        ``(H, d_h, D)`` head rows of W_Q and W_K.
    rotations
        ``(U, d_h, d_h)`` rotations shared by the heads, or one such tensor per head (:func:`relative_rotations`);
        the result includes the allowance of their rounding (``||W_Q^h||_2 ||W_K^h||_2 · ANGLE_STEP / 2``).
    """
    rq = torch.linalg.qr(q.transpose(-2, -1), mode="r")[1]  # (H, d_h, d_h)
    rk = torch.linalg.qr(k.transpose(-2, -1), mode="r")[1]
    if rotations is None:
        return torch.linalg.matrix_norm(rq @ rk.transpose(-2, -1), ord=2)
    per_head = [rotations] * len(rq) if isinstance(rotations, torch.Tensor) else list(rotations)
    if len(per_head) != len(rq):
        raise ComponentError(f"{len(per_head)} sets of rotations for an attention of {len(rq)} heads")
    # A rotation within ANGLE_STEP / 2 of a representative R: ||R' − R||_2 <= ANGLE_STEP / 2 (relative_rotations).
    allowance = torch.linalg.matrix_norm(rq, ord=2) * torch.linalg.matrix_norm(rk, ord=2) * (ANGLE_STEP / 2)  # (H,)
    norms = []
    for h, rot in enumerate(per_head):
        m = rq[h] @ rot.to(rq) @ rk[h].T  # (U, d_h, d_h)
        # ||M||_2² is the top eigenvalue of M Mᵀ (symmetric eigensolver: cheaper than an SVD per rotation).
        top = torch.linalg.eigvalsh(m @ m.transpose(-2, -1))[:, -1].clamp_min(0).sqrt()  # (U,)
        norms.append(top.max() + allowance[h])
    return torch.stack(norms)


def rope_angles(rope: torch.Tensor, *, half: bool, prefix: int = 0) -> torch.Tensor:
    """The rotation angle of every coordinate pair of every token, from timm's concatenated ``[sin, cos]`` RoPE.

    timm rotates the coordinate pairs ``(2m, 2m+1)`` (interleaved) or ``(m, m + d_h/2)`` (``half``) of each
    query and key by angles ``θ_im`` (:func:`timm.layers.apply_rot_embed_cat`); the first ``prefix`` tokens are
    not rotated (angle 0).

    Parameters
    ----------
    rope
        ``(..., N_patches, 2·d_h)``: ``sin`` then ``cos`` of each coordinate's angle.

    Returns
    -------
    torch.Tensor
        ``(..., prefix + N_patches, d_h/2)`` float64 angles in ``(−π, π]``.

    Raises
    ------
    ComponentError
        When the two coordinates of a pair do not share one angle (a layout vitef does not know).
    """
    sin, cos = rope.detach().double().chunk(2, dim=-1)  # (..., N_p, d_h) each
    d_h = sin.shape[-1]
    if half:
        pairs = (slice(0, d_h // 2), slice(d_h // 2, d_h))
    else:
        pairs = (slice(0, d_h, 2), slice(1, d_h, 2))
    s, c = sin[..., pairs[0]], cos[..., pairs[0]]  # (..., N_p, d_h/2)
    consistent = torch.allclose(s, sin[..., pairs[1]], atol=1e-6) and torch.allclose(c, cos[..., pairs[1]], atol=1e-6)
    if d_h % 2 or not consistent or not torch.allclose(s**2 + c**2, torch.ones_like(s), atol=1e-5):
        layout = "half" if half else "interleaved"
        raise ComponentError(
            f"the rotary embedding ({tuple(rope.shape)}) is not one angle per {layout} coordinate pair as timm's "
            "apply_rot_embed_cat uses it; the RoPE-aware MHA bound cannot read it"
        )
    theta = torch.atan2(s, c)
    pad = torch.zeros((*theta.shape[:-2], prefix, theta.shape[-1]), dtype=theta.dtype)
    return torch.cat([pad, theta], dim=-2)


def rotation_matrices(angles: torch.Tensor, *, half: bool) -> torch.Tensor:
    """The ``d_h × d_h`` rotations of coordinate-pair ``angles`` ``(U, d_h/2)``, in the layout of
    :func:`rope_angles`: ``R @ q`` is what timm's ``apply_rot_embed_cat`` does to a query ``q`` of those angles.

    Returns ``(U, d_h, d_h)`` float64.
    """
    u, m = angles.shape
    d_h = 2 * m
    first = torch.arange(m) if half else torch.arange(0, d_h, 2)
    second = first + m if half else first + 1
    c, s = angles.cos(), angles.sin()  # (U, d_h/2)
    rot = torch.zeros(u, d_h, d_h, dtype=angles.dtype)
    rot[:, first, first] = c
    rot[:, second, second] = c
    rot[:, first, second] = -s
    rot[:, second, first] = s
    return rot


def relative_rotations(rope: torch.Tensor, *, half: bool, prefix: int = 0) -> torch.Tensor | list[torch.Tensor]:
    """The distinct relative rotations ``R_iᵀ R_j`` between the tokens of a sequence under RoPE.

    All ``R_i`` rotate the same coordinate pairs, so ``R_iᵀ R_j`` is the rotation by ``θ_j − θ_i``; the differences
    are computed for every pair of tokens (prefix tokens unrotated) and deduplicated: snapped to multiples of
    :data:`ANGLE_STEP` (the representative of each rotation is within ``ANGLE_STEP / 2`` of it in every pair).

    Returns
    -------
    torch.Tensor or list
        ``(U, d_h, d_h)`` float64 for a rope shared by the heads (``(N_patches, 2·d_h)``); one such tensor per head
        for a per-head rope (``(H, N_patches, 2·d_h)``).
    """
    theta = rope_angles(rope, half=half, prefix=prefix)  # (..., N, d_h/2)
    if theta.dim() == 3:
        return [_relative(t, half) for t in theta]
    if theta.dim() != 2:
        raise ComponentError(f"a rotary embedding of shape {tuple(rope.shape)}: expected (N, 2·d_h) or (H, N, 2·d_h)")
    return _relative(theta, half)


def _relative(theta: torch.Tensor, half: bool) -> torch.Tensor:
    delta = (theta.unsqueeze(0) - theta.unsqueeze(1)).reshape(-1, theta.shape[-1])  # (N², d_h/2): θ_j − θ_i
    delta = torch.atan2(delta.sin(), delta.cos())  # wrap to (−π, π], so equal rotations get equal angles
    steps = torch.unique(torch.round(delta / ANGLE_STEP), dim=0)  # (U, d_h/2) representatives, in steps
    return rotation_matrices(steps * ANGLE_STEP, half=half)


def block_context(model: nn.Module) -> BlockContext:
    """The :class:`~vitef.models.components.BlockContext` of the eval-mode forward at the model's own input size.

    Neither part depends on the image: the rotary embedding (Eva) depends on the patch grid only, once DINOv3's
    training-time coordinate jitter is off, and BEiT's shared relative position bias on nothing. It is taken from the
    registry's :func:`~vitef.models.components.embed_context` on one blank image, in eval mode (restored after).
    """
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        size = model.patch_embed.img_size  # (H, W)
        channels = model.patch_embed.proj.in_channels
        with torch.no_grad():
            _, ctx = embed_context(model, torch.zeros(1, channels, *size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return ctx


def rope_of(model: nn.Module, layer: int = 0) -> torch.Tensor | None:
    """The rotary embedding block ``layer``'s attention receives in the eval-mode forward (``None`` without RoPE):
    ``(N_patches, 2·d_h)``, or ``(H, N_patches, 2·d_h)`` for depth-dependent (``rope_mixed``) embeddings
    (:func:`block_context`)."""
    if getattr(model, "rope", None) is None:
        return None
    rope = block_context(model).kwargs(layer).get("rope")
    return None if rope is None else rope.detach()


def sequence_length(model: nn.Module) -> int:
    """Number of tokens the blocks see: patches plus prefix (CLS, register, distillation) tokens.

    Read from the patch grid and ``num_prefix_tokens`` (the class token when the model does not say), so it
    holds for models without a learned position embedding (BEiT, DINOv3) too.
    """
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:
        tokens = ("cls_token", "dist_token")
        prefix = sum(getattr(model, t, None) is not None for t in tokens)
    return int(model.patch_embed.num_patches) + int(prefix)


# ---------------------------------------------------------------------------------------------------
# The token radius
# ---------------------------------------------------------------------------------------------------


def estimate_radius(
    model: nn.Module, loader: Iterable, *, max_batches: int | None = None, device: torch.device | str | None = None
) -> float:
    """Mean token norm r of embedded images: per image ``sqrt(mean_t ||t||²)``, averaged over images.

    Parameters
    ----------
    model
        A timm ``VisionTransformer``, ``Eva`` or ``Beit`` (used in eval mode; its mode is restored).
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


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------


def bounds_table(
    model: nn.Module,
    *,
    r: float,
    n: int | None = None,
    sigma: float = 1.0,
    components: Iterable[str] | None = None,
    mha_bias: bool = False,
) -> pd.DataFrame:
    """The theoretical bound of every (layer, component).

    Parameters
    ----------
    r
        Token-norm radius for the MHA bound (:func:`estimate_radius`).
    n
        Sequence length for the MHA bound (default: the model's, :func:`sequence_length`).
    sigma
        Lower bound on the per-token standard deviation for the LayerNorm bounds (and an attention's inner norm).
    components
        Per-block components to include (default all five).
    mha_bias
        Include the query/key biases in the MHA bound (:func:`mha_bound`'s ``bias``; default: the paper's formula).

    Returns
    -------
    pandas.DataFrame
        Columns ``layer, component, bound, spectral_norm`` (FC), ``gamma_absmax, gamma_max, sigma``
        (LN), ``max_head_attn_norm, r, n`` (MHA), ``layer_scale`` (MHA, FC2: the branch's LayerScale
        ``||γ||_∞``, not in the bound), ``rope`` (MHA: whether RoPE entered it); NaN where a column does not apply.
    """
    comps = tuple(BLOCK_COMPONENTS if components is None else components)
    n = sequence_length(model) if n is None else n
    shared_rotations = None
    rows = []
    for layer in range(num_blocks(model)):
        for comp in comps:
            row: dict = {"layer": layer, "component": comp}
            if comp in ("ln1", "ln2"):
                row.update(layernorm_bound(block_module(model, layer, comp), sigma))
            elif comp in ("fc1", "fc2"):
                # A SwiGLU's FC1 is the registry's ConcatLinear: its weight is the stacked [W_g; W_x].
                row["bound"] = row["spectral_norm"] = linear_bound(block_module(model, layer, comp))
            else:
                attn = block_module(model, layer, comp)
                rotations = None
                if getattr(model, "rope", None) is not None:
                    if getattr(model, "rope_mixed", False) or shared_rotations is None:
                        rotations = relative_rotations(
                            rope_of(model, layer),
                            half=bool(getattr(attn, "rotate_half", False)),
                            prefix=int(getattr(attn, "num_prefix_tokens", 0)),
                        )
                        if not getattr(model, "rope_mixed", False):
                            shared_rotations = rotations
                    else:
                        rotations = shared_rotations
                row.update(mha_bound(attn, n=n, r=r, rotations=rotations, sigma=sigma, bias=mha_bias))
                row.update({"r": float(r), "n": int(n)})
            if comp in ("mha", "fc2"):
                row["layer_scale"] = layer_scale(model, layer, comp)
            rows.append(row)
    cols = [*BOUND_COLUMNS, *EXTRA_COLUMNS]
    return pd.DataFrame(rows).reindex(columns=cols)


def compare(bounds: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """``bounds`` with the measured plasticity (``measured``: its ``mean``) and ``ratio = measured / bound``."""
    m = measured[["layer", "component", "mean"]].rename(columns={"mean": "measured"})
    out = bounds.merge(m, on=["layer", "component"], how="left")
    out["ratio"] = out["measured"] / out["bound"]
    return out
