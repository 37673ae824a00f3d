"""Loss landscape of one component and its rate-of-change surface (arXiv 2602.06883, §6 figures).

The paper pictures why plastic components finetune well with two surfaces for one component type C:

1. **Loss surface.** A short SGD trajectory finetunes C (in every block) and records C's flattened
   parameter vector θ_t after every step (:func:`sgd_trajectory`). The first two principal directions
   of the trajectory span a plane through the final point θ* (:func:`pca_plane`); the loss is evaluated
   on a fixed evaluation set at θ* + u·(α d1 + β d2) over a grid of (α, β) (:func:`loss_grid`), and the
   trajectory is projected onto the plane.
2. **Rate-of-change surface.** C of one block, applied exactly as in the paper's plasticity estimator
   (MHA alone, FC1 before the activation, FC2 on the zero-padded input, LayerNorms directly) to one
   embedded input e = e(x) (:func:`component_function`), has a most sensitive input direction: the top
   right-singular vector u of its Jacobian at e, in the flattened token space (:func:`top_directions`,
   power iteration with forward- and reverse-mode products). Along u and the next singular direction
   v the surface is ``‖f(e + δ) − f(e)‖_F / ‖δ‖_F`` with ``δ = ‖e‖_F (a u + b v)``
   (:func:`rate_surface`).

Families. Everything goes through the component registry (:mod:`vitef.models.components`), so timm ``Eva``
(DINOv3, EVA-02) and ``Beit`` work as ``VisionTransformer`` does: C's parameters are the registry's (``gamma_1``
with MHA, ``fc1_g``/``fc1_x`` with FC1, ...), the rate surface's MHA applies the rotary embedding or relative
position biases inside the attention, as the model's forward does, and a gated MLP's FC1 is its concatenated
pre-gate projections.

Choices (documented because the paper leaves them open):

- **Head.** Finetuning C trains the classifier head too (the registry's rule, :func:`set_trainable`),
  so the trajectory does. The plane lives in C's parameters only; during the grid evaluation the head
  stays at its value at the end of the trajectory, like every other parameter outside C.
- **Centre.** The plane is centred at the final point θ* (Li et al. 2018's trajectory plots): the rows
  of the PCA matrix are θ_t − θ*, without further mean-centring, so the directions explain the
  trajectory's displacement from θ* and the grid's centre is θ* itself. ``center="mean"`` centres the
  PCA at the trajectory mean instead (the plane is still drawn through θ*).
- **Scale.** Directions have unit Euclidean norm. With ``scale="unit"`` a grid coordinate α is a
  distance in parameter space (the paper's [−0.5, 0.5]² with normalised directions); with
  ``scale="trajectory"`` one grid unit is ``extent / (0.8 · range)``, where ``extent`` is the largest
  absolute coordinate of the projected trajectory, so the trajectory always fills 80 % of the grid.
- **Second rate direction.** v is the second right-singular vector (power iteration deflated against
  u), i.e. the most sensitive direction orthogonal to u. For a linear map the surface is then exactly
  ``sqrt(a²σ1² + b²σ2²) / sqrt(a² + b²)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitef.bounds import block_context
from vitef.errors import ConfigError, VitefError
from vitef.models.components import (
    BLOCK_COMPONENTS,
    BlockContext,
    block_module,
    canonical,
    parameters_of,
    run_attention,
    set_trainable,
)
from vitef.optim import OptimConfig, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

SCALES = ("unit", "trajectory")
CENTERS = ("final", "mean")
# With scale="trajectory", the projected trajectory reaches this fraction of the grid's half-width.
TRAJECTORY_FILL = 0.8
# A computed landscape folder (apps.vit.loss_landscape writes it, apps.plots.loss_landscape draws from it):
# every array (npz, no pickle) and the JSON summary with the config.
ARRAYS_FILE = "landscape.npz"
SUMMARY_FILE = "landscape.json"


def landscape_component(name: str) -> str:
    """The canonical name of ``name``, which must be a per-block component (a landscape is computed for one).

    Raises
    ------
    ComponentError
        An unknown component (the message names the valid ones).
    ConfigError
        A component that is not per block (``head``, ``emb``, ``all``, ...).
    """
    comp = canonical(name)
    if comp not in BLOCK_COMPONENTS:
        raise ConfigError(
            f"component={name}: the landscape needs a per-block component, one of {', '.join(BLOCK_COMPONENTS)}"
        )
    return comp


def default_dir(root: str | Path, component: str) -> Path:
    """Where the landscape of ``component`` is written under the output root ``root`` by default."""
    return Path(root) / "landscapes" / component


Batch = tuple[torch.Tensor, torch.Tensor]


class LandscapeError(VitefError):
    """The landscape cannot be computed from these inputs (e.g. the trajectory did not move)."""


# ---------------------------------------------------------------------------------------------------
# The component's parameters as one flat vector
# ---------------------------------------------------------------------------------------------------


class ComponentVector:
    """The parameters of one per-block component (all blocks) viewed as one flat vector.

    Parameters
    ----------
    model
        A timm ``VisionTransformer``, ``Eva`` or ``Beit`` (the registry's families).
    component
        One of ``ln1``, ``mha``, ``ln2``, ``fc1``, ``fc2`` (aliases accepted).
    """

    def __init__(self, model: nn.Module, component: str):
        comp = canonical(component)
        if comp not in BLOCK_COMPONENTS:
            raise LandscapeError(
                f"component '{component}' has no per-block parameters to plot: "
                f"choose one of {', '.join(BLOCK_COMPONENTS)}"
            )
        self.component = comp
        named = parameters_of(model, comp)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.numel = sum(p.numel() for p in self.params)

    def get(self) -> torch.Tensor:
        """A detached copy of the flat parameter vector ``(P,)``, on the parameters' device and dtype."""
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    @torch.no_grad()
    def set(self, vec: torch.Tensor) -> None:
        """Write the flat vector ``vec`` ``(P,)`` into the parameters (in place)."""
        if vec.numel() != self.numel:
            raise ValueError(f"vector has {vec.numel()} entries, component {self.component} has {self.numel}")
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(vec[offset : offset + n].view_as(p))
            offset += n

    @contextlib.contextmanager
    def preserved(self) -> Iterator[None]:
        """Restore the parameters bit for bit when the block exits (even on error)."""
        saved = [p.detach().clone() for p in self.params]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


# ---------------------------------------------------------------------------------------------------
# 1. The SGD trajectory
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trajectory:
    """Flat component parameters along a finetuning trajectory.

    Attributes
    ----------
    points
        ``(steps + 1, P)`` float32: the initial vector, then the vector after each optimiser step.
    losses
        ``(steps,)`` training loss of each step's batch (before its update).
    """

    points: np.ndarray
    losses: np.ndarray


def sgd_trajectory(
    model: nn.Module,
    component: str,
    batches: Iterable[Batch],
    steps: int,
    optim: OptimConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Trajectory:
    """Finetune ``component`` (every block, plus the head) for ``steps`` steps and record its parameters.

    Parameters
    ----------
    model
        The model, already on ``device``; it is modified in place (it ends at the trajectory's end).
    component
        The per-block component to finetune.
    batches
        Training ``(images, labels)`` batches; at least ``steps`` of them are consumed.
    steps
        Number of optimiser steps (at least 2, so that the trajectory spans a plane).
    optim
        Optimiser, schedule and clipping (:class:`vitef.optim.OptimConfig`).

    Raises
    ------
    LandscapeError
        When the loss becomes non-finite or ``batches`` runs out.
    """
    from tqdm.auto import tqdm

    if steps < 2:
        raise LandscapeError(f"steps={steps}: the trajectory needs at least 2 steps to span a plane")
    vec = ComponentVector(model, component)
    set_trainable(model, [vec.component])
    optimizer = build_optimizer(model.parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    points = np.empty((steps + 1, vec.numel), dtype=np.float32)
    points[0] = vec.get().float().cpu().numpy()
    losses = np.empty(steps, dtype=np.float64)
    model.train()
    it = iter(batches)
    for step in tqdm(range(steps), desc=f"trajectory ({vec.component})", disable=not progress, leave=False):
        try:
            images, labels = next(it)
        except StopIteration:
            raise LandscapeError(f"the training data ran out after {step} of {steps} steps") from None
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels)
        if not torch.isfinite(loss):
            raise LandscapeError(f"the training loss is {loss.item()} at step {step}: lower the learning rate (lr=...)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(trainable, optim.clip_grad)
        optimizer.step()
        scheduler.step()
        losses[step] = loss.item()
        points[step + 1] = vec.get().float().cpu().numpy()
    model.eval()
    return Trajectory(points=points, losses=losses)


# ---------------------------------------------------------------------------------------------------
# 2. The PCA plane
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plane:
    """A 2-D plane through ``origin`` spanned by two orthonormal directions.

    Attributes
    ----------
    origin
        ``(P,)`` float32, the final point θ* of the trajectory (the grid's centre).
    directions
        ``(2, P)`` float32 orthonormal directions (first two principal directions).
    coords
        ``(T, 2)`` projection of the trajectory onto the directions, relative to ``origin``
        (parameter-space units).
    explained
        ``(2,)`` fraction of the trajectory's total squared deviation (from the PCA centre) that each
        direction explains.
    singular_values
        All singular values of the centred trajectory matrix, descending.
    center
        ``"final"`` or ``"mean"``: where the PCA was centred.
    """

    origin: np.ndarray
    directions: np.ndarray
    coords: np.ndarray
    explained: np.ndarray
    singular_values: np.ndarray
    center: str

    def extent(self) -> float:
        """Largest absolute coordinate of the projected trajectory on either axis."""
        return float(np.abs(self.coords).max())

    def unit(self, scale: str, grid_range: float) -> float:
        """Parameter-space length of one grid unit for ``scale`` (see the module doc)."""
        if scale == "unit":
            return 1.0
        if scale == "trajectory":
            return self.extent() / (TRAJECTORY_FILL * grid_range)
        raise LandscapeError(f"scale='{scale}' is unknown: choose one of {', '.join(SCALES)}")


def pca_plane(points: np.ndarray, center: str = "final") -> Plane:
    """The plane of the first two principal directions of a trajectory, through its final point.

    Parameters
    ----------
    points
        ``(T, P)`` parameter vectors along the trajectory (last row = final point θ*).
    center
        ``"final"``: PCA of the displacements θ_t − θ* (no mean-centring); ``"mean"``: ordinary PCA
        centred at the trajectory mean.

    Returns
    -------
    Plane
        Directions are unit-norm and orthogonal, signed so that the trajectory's first point has
        non-positive coordinates (the trajectory runs towards the origin from the lower left).
    """
    if center not in CENTERS:
        raise LandscapeError(f"center='{center}' is unknown: choose one of {', '.join(CENTERS)}")
    pts = torch.from_numpy(np.asarray(points)).double()  # (T, P)
    origin = pts[-1]
    ref = origin if center == "final" else pts.mean(0)
    m = pts - ref  # (T, P)
    # Thin SVD; T (number of steps) is small, so this is cheap even for millions of parameters.
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    total = float((s**2).sum())
    if len(s) < 2 or total == 0.0 or float(s[1]) <= 1e-12 * float(s[0]):
        raise LandscapeError(
            "the trajectory does not span a plane (the parameters barely moved or moved along one line): "
            "increase lr or steps"
        )
    d = vh[:2].clone()  # (2, P), orthonormal rows
    coords = (pts - origin) @ d.T  # (T, 2)
    for k in range(2):
        if coords[0, k] > 0:
            d[k] = -d[k]
            coords[:, k] = -coords[:, k]
    return Plane(
        origin=origin.float().numpy(),
        directions=d.float().numpy(),
        coords=coords.numpy(),
        explained=(s[:2] ** 2 / total).numpy(),
        singular_values=s.numpy(),
        center=center,
    )


# ---------------------------------------------------------------------------------------------------
# 3. The loss surface
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean cross-entropy of ``model`` over every example of ``batches`` (already on the model's device)."""
    total, count = 0.0, 0
    for images, labels in batches:
        total += F.cross_entropy(model(images), labels, reduction="sum").item()
        count += labels.numel()
    return total / count


@torch.no_grad()
def loss_grid(
    model: nn.Module,
    component: str,
    plane: Plane,
    alphas: np.ndarray,
    betas: np.ndarray,
    batches: Sequence[Batch],
    *,
    unit: float = 1.0,
    progress: bool = False,
) -> np.ndarray:
    """Loss at ``θ* + unit·(α d1 + β d2)`` for every α in ``alphas`` and β in ``betas``.

    Only the component's parameters move; everything else (the head included) keeps its current
    value. The model's parameters are restored bit for bit afterwards.

    Returns
    -------
    np.ndarray
        ``(len(alphas), len(betas))`` mean losses; entry ``[i, j]`` is at ``(alphas[i], betas[j])``.
    """
    from tqdm.auto import tqdm

    vec = ComponentVector(model, component)
    if plane.origin.shape != (vec.numel,):
        raise LandscapeError(f"the plane has {plane.origin.size} coordinates, component {component} {vec.numel}")
    p0 = vec.params[0]
    origin = torch.from_numpy(plane.origin).to(device=p0.device, dtype=p0.dtype)
    d1, d2 = (torch.from_numpy(plane.directions[k]).to(device=p0.device, dtype=p0.dtype) for k in range(2))
    out = np.empty((len(alphas), len(betas)), dtype=np.float64)
    was_training = model.training
    model.eval()
    with vec.preserved():
        bar = tqdm(total=out.size, desc=f"loss grid ({vec.component})", disable=not progress, leave=False)
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                # Always from the origin (never accumulated), so (0, 0) is θ* exactly.
                vec.set(origin + (float(a) * unit) * d1 + (float(b) * unit) * d2)
                out[i, j] = mean_loss(model, batches)
                bar.update()
        bar.close()
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------
# 4. The rate-of-change surface
# ---------------------------------------------------------------------------------------------------


def component_function(
    model: nn.Module, layer: int, component: str, ctx: BlockContext | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Component ``component`` of block ``layer`` as applied by the paper's plasticity estimator.

    The returned function maps tokens ``(B, N, D)`` to the component's output: MHA is the attention
    module alone (no norm, no residual, no LayerScale; Eva's rotary embedding and BEiT's relative position
    biases inside it, :func:`~vitef.models.components.run_attention`), FC1 the first linear layer before its
    activation (a gated MLP's concatenated pre-gate projections), FC2 the second linear layer on the input
    zero-padded to the hidden width, LN1/LN2 the LayerNorms. Attention runs its explicit (non-fused) path so
    that forward-mode derivatives exist (see :func:`eager_attention`).

    ``ctx`` is the attention's context (:func:`~vitef.models.components.embed_context`); by default that of the
    eval-mode model at its input size (:func:`vitef.bounds.block_context`), which does not depend on the image.
    """
    comp = canonical(component)
    module = block_module(model, layer, comp)
    if comp == "mha":
        context = ctx if ctx is not None else block_context(model)

        def attention(x: torch.Tensor) -> torch.Tensor:
            with eager_attention(module):
                return run_attention(model, layer, x, context)

        return attention
    if comp != "fc2":
        return module
    hidden = module.in_features

    def fc2_padded(x: torch.Tensor) -> torch.Tensor:
        # [e, 0, ..., 0]: the embedding fills the first D of the hidden units (PROTOCOL.md §1).
        return module(F.pad(x, (0, hidden - x.shape[-1])))

    return fc2_padded


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Use timm's explicit attention (softmax(QKᵀ)V) instead of the fused kernel inside the block.

    The fused CPU kernel has no forward-mode derivative; the explicit path computes the same function,
    so Jacobian-vector products work on every device.
    """
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in mods]
    try:
        for m in mods:
            m.fused_attn = False
        yield
    finally:
        for m, s in zip(mods, saved):
            m.fused_attn = s


@dataclasses.dataclass
class SensitiveDirections:
    """Top two right-singular vectors of a Jacobian and their singular values.

    ``u`` and ``v`` have the shape of the input (``(1, N, D)``), unit Frobenius norm, and are orthogonal.
    """

    u: torch.Tensor
    v: torch.Tensor
    sigma1: float
    sigma2: float
    iterations: int


def top_directions(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    iters: int = 500,
    tol: float = 1e-6,
    seed: int = 0,
) -> SensitiveDirections:
    """The two most sensitive input directions of ``f`` at ``x``: top right-singular vectors of J_f(x).

    Block power iteration with Rayleigh–Ritz on the operator JᵀJ, with Jv from
    :func:`torch.func.jvp` and Jᵀw from :func:`torch.func.vjp`, in the flattened token space (``x`` is
    one sample ``(1, N, D)``). Stops when both Ritz vectors have a residual
    ``‖JᵀJ q − λ q‖ ≤ tol · λ1``.
    """
    from torch.func import jvp, vjp

    x = x.detach()
    _, pullback = vjp(f, x)

    def jtj(v: torch.Tensor) -> torch.Tensor:
        _, jv = jvp(f, (x,), (v.view_as(x),))
        return pullback(jv)[0].detach().reshape(-1)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(x.numel(), 2, generator=gen, dtype=x.dtype).to(x.device)
    q, _ = torch.linalg.qr(start)  # (P, 2) orthonormal columns
    done = 0
    for _ in range(iters):
        done += 1
        w = torch.stack([jtj(q[:, 0]), jtj(q[:, 1])], dim=1)  # (P, 2) = JᵀJ Q
        h = q.T @ w  # (2, 2) Rayleigh quotient
        lam, s = torch.linalg.eigh((h + h.T) / 2)  # ascending
        lam, s = lam.flip(0), s.flip(1)
        q, w = q @ s, w @ s  # Ritz vectors and their images
        residual = (w - q * lam).norm(dim=0)  # (2,)
        if float(residual.max()) <= tol * max(float(lam[0]), 1e-30):
            break
        if float(lam[1]) <= 1e-12 * max(float(lam[0]), 1e-30):
            # JᵀJ has rank < 2 here: the second direction is any unit vector orthogonal to the first.
            break
        q, _ = torch.linalg.qr(w)
    else:
        # Typical when several singular values nearly coincide (e.g. the same map on every token): the
        # singular values are then accurate, the directions are some vectors of the near-degenerate space.
        logger.warning(
            "power iteration stopped after %d iterations at relative residual %.1e > tol %.1e "
            "(singular values %.4g, %.4g nearly equal to the next ones?)",
            iters,
            float(residual.max()) / max(float(lam[0]), 1e-30),
            tol,
            float(lam[0]) ** 0.5,
            float(lam[1]) ** 0.5,
        )
    u, v = q[:, 0].view_as(x), q[:, 1].view_as(x)
    sigma1 = float(jvp(f, (x,), (u,))[1].detach().norm())
    sigma2 = float(jvp(f, (x,), (v,))[1].detach().norm())
    return SensitiveDirections(u=u.detach(), v=v.detach(), sigma1=sigma1, sigma2=sigma2, iterations=done)


@torch.no_grad()
def rate_surface(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    a_values: np.ndarray,
    b_values: np.ndarray,
    *,
    relative: bool = True,
    chunk: int = 64,
) -> np.ndarray:
    """Rate of change ``‖f(x + δ) − f(x)‖_F / ‖δ‖_F`` with ``δ = s (a u + b v)`` over a grid of (a, b).

    Parameters
    ----------
    x
        One input ``(1, N, D)``.
    u, v
        Orthonormal directions of the shape of ``x``.
    relative
        ``s = ‖x‖_F`` (a and b are fractions of the input's norm) if true, else ``s = 1``.
    chunk
        Grid points evaluated per forward pass.

    Returns
    -------
    np.ndarray
        ``(len(a_values), len(b_values))``; NaN where δ = 0 (the ratio is undefined there).
    """
    scale = float(x.norm()) if relative else 1.0
    fx = f(x)  # (1, N, D_out)
    pairs = [(float(a), float(b)) for a in a_values for b in b_values]
    rates = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        coef = torch.tensor(part, dtype=x.dtype, device=x.device) * scale  # (C, 2)
        delta = coef[:, 0, None, None] * u + coef[:, 1, None, None] * v  # (C, N, D)
        diff = (f(x + delta) - fx).flatten(1).norm(dim=1)  # (C,)
        dn = delta.flatten(1).norm(dim=1)
        r = torch.where(dn > 0, diff / dn.clamp_min(torch.finfo(x.dtype).tiny), torch.nan)
        rates[start : start + len(part)] = r.double().cpu().numpy()
    return rates.reshape(len(a_values), len(b_values))


def grid(size: int, half_width: float) -> np.ndarray:
    """``size`` evenly spaced values in ``[−half_width, half_width]`` (0 is included when size is odd)."""
    values = np.linspace(-half_width, half_width, size)
    if size % 2 == 1:
        values[size // 2] = 0.0  # exactly, so the centre of an odd grid is the origin itself
    return values
