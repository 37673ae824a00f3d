"""Choose what to finetune: score every unit of a pretrained ViT on the target data, pick within a budget.

Units. The candidates are the finest per-block units of the component registry
(:func:`vitef.models.components.units_of`): ``ln1.i``, ``mha.i``, ``ln2.i``, ``fc1.i``, ``fc2.i`` for every
block ``i``. As in the paper's component-wise finetuning (arXiv 2602.06883, §4), the embedding stays frozen
and the head (final norm + a fresh linear layer) always trains, so neither is a candidate. The *backbone* is
every parameter outside the head, embedding included: a fractional budget is measured on it.

Criteria (a higher score trains first; every one is deterministic under ``seed``):

``plasticity``
    The mean plasticity of the unit's (block, component), :func:`vitef.plasticity.measure` in ``embedding``
    (the paper's estimator) or ``hidden`` mode, over pairs of source (pretraining proxy) and target images.
``rgn``, ``grad_norm``
    Gradient criteria at the pretrained weights: a fresh linear head (PyTorch's default initialisation,
    drawn from a generator seeded with ``seed``) replaces the model's, the model is in eval mode and every
    parameter takes gradients. ``g`` is the gradient of the mean cross-entropy over all ``N`` images of the
    ``batches`` labelled target batches (each batch's mean-loss gradient weighted by its share of the images,
    so unequal last batches count per image). For a unit ``u`` with parameters ``θ_u``,
    ``grad_norm = ||g_u||_2`` and ``rgn = ||g_u||_2 / ||θ_u||_2``, both L2 norms over all of the unit's
    parameters taken together: Auto-RGN's relative gradient norm (Lee et al., ICLR 2023), scored per unit
    instead of per tensor. A unit whose parameters are all zero has ``rgn = inf`` (0 when its gradient is 0).
``bound``
    The theoretical plasticity bound of the unit (:func:`vitef.bounds.bounds_table`: LayerNorm
    ``||γ||_∞/σ``, FC spectral norm, per-head MHA bound with the token radius r estimated on the target
    batches).
``random``
    Control: a uniform draw per unit from ``numpy.random.default_rng(seed)``, in unit order.
``paper``
    Control: the paper's theoretical component order MHA > FC1 > FC2 > LN2 > LN1 (score 5 … 1), the same
    score in every block.

Pick. Units are ranked by score, highest first; equal scores keep the unit order (block 0 first, then
LN1, MHA, LN2, FC1, FC2 within a block), and NaN scores rank last. A count budget (``budget >= 1``, a whole
number) takes the first ``budget`` units of the ranking. A fractional budget (``0 < budget < 1``) may spend
``floor(budget × backbone parameters)``: the ranking is walked once and each unit that still fits is taken;
a unit larger than what remains is skipped (listed in ``skipped``) and the walk goes on, so smaller,
lower-ranked units may fill the rest (``fill=false`` stops at the first unit that does not fit instead). The
pick never exceeds the budget; a budget smaller than every unit is a :class:`~vitef.errors.ConfigError` saying
the smallest budget that picks one.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from vitef.bounds import bounds_table, estimate_radius
from vitef.config import option
from vitef.data import build_loader, canonical_name
from vitef.errors import ConfigError, VitefError
from vitef.models.components import (
    BLOCK_COMPONENTS,
    THEORETICAL_RANK,
    component_of,
    count_units,
    num_blocks,
    unit_name,
    unit_of,
    units_of,
)
from vitef.plasticity import MODES, batch_images, measure
from vitef.utils import PRECISIONS, atomic_write_json, autocast_context, check_precision

logger = logging.getLogger(__name__)

CRITERIA: tuple[str, ...] = ("plasticity", "rgn", "grad_norm", "bound", "random", "paper")
# Other spellings users reach for.
CRITERION_ALIASES: dict[str, str] = {
    "auto_rgn": "rgn",
    "auto-rgn": "rgn",
    "relative_grad_norm": "rgn",
    "grad": "grad_norm",
    "gradient": "grad_norm",
    "bounds": "bound",
    "theory": "paper",
}
# What each criterion reads: source images (plasticity pairs), target images, target labels.
NEEDS_SOURCE = frozenset({"plasticity"})
NEEDS_TARGET = frozenset({"plasticity", "rgn", "grad_norm", "bound"})
NEEDS_LABELS = frozenset({"rgn", "grad_norm"})

SELECTION_FILE = "selection.json"  # written last: a folder holding it is complete
TABLE_FILE = "selection.csv"
MARKDOWN_FILE = "selection.md"


def canonical_criterion(name: str) -> str:
    """The registry name of a criterion (case-insensitive, aliases accepted); raises :class:`ConfigError`."""
    key = str(name).strip().lower()
    key = CRITERION_ALIASES.get(key, key)
    if key not in CRITERIA:
        raise ConfigError(f"criterion={name!r} is unknown: choose one of {', '.join(CRITERIA)}")
    return key


@dataclasses.dataclass
class SelectConfig:
    """Which units to finetune: a criterion scores every unit of the pretrained model, a budget caps the pick."""

    criterion: str = option("", f"{', '.join(CRITERIA)}; empty: no selection")
    budget: float = option(0.1, "a fraction of the backbone's parameters (0 < budget < 1) or a number of units (>= 1)")
    fill: bool = option(True, "a fractional budget skips units too large for what remains and goes on (false: stops)")
    mode: str = option("embedding", f"plasticity mode: {', '.join(MODES)}")
    batches: int = option(4, "target batches the criterion reads (and source batches for plasticity)")
    batch_size: int = option(32, "images per batch")
    split: str = option("train", "target split read (train: the pick never sees the evaluation data)")
    source: str = option("imagenet", "pretraining-proxy dataset of the plasticity pairs (plasticity only)")
    source_split: str = option("val", "split of the source dataset")
    seed: int = option(0, "seed of the image order, the fresh head (gradient criteria) and random")
    sigma: float = option(1.0, "lower bound on the per-token std of LayerNorm inputs (bound criterion)")
    mha_bias: bool = option(False, "bound criterion: MHA bound valid with query/key biases (vitef.bounds.mha_bound)")
    precision: str = option("fp32", f"numeric precision of the forward passes: {', '.join(PRECISIONS)}")

    def validate(self) -> None:
        if self.criterion:
            self.criterion = canonical_criterion(self.criterion)
        budget_limit(self.budget, 1)  # the value's form; the limit itself needs the model
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not a plasticity mode: choose one of {', '.join(MODES)}")
        for key in ("batches", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if not self.sigma > 0:
            raise ConfigError(f"sigma={self.sigma} must be positive (a lower bound on a standard deviation)")
        check_precision(self.precision)
        if self.criterion in NEEDS_SOURCE and not self.source:
            raise ConfigError(f"criterion={self.criterion} needs source= (the pretraining proxy, e.g. imagenet)")
        if self.source:
            try:  # stored canonical, like every dataset name
                self.source = canonical_name(self.source)
            except VitefError as e:
                raise ConfigError(f"source: {e}") from e

    @property
    def enabled(self) -> bool:
        """Whether a criterion is set (a training run then trains the pick)."""
        return bool(self.criterion)

    def label(self) -> str:
        """The criterion as folder names and tables show it: ``plasticity``, ``plasticity-hidden``, ``rgn``."""
        if self.criterion == "plasticity" and self.mode != "embedding":
            return f"plasticity-{self.mode}"
        return self.criterion


# ---------------------------------------------------------------------------------------------------
# Units and budgets
# ---------------------------------------------------------------------------------------------------


def candidate_units(model: nn.Module) -> list[str]:
    """The units a criterion scores: every (block, component), in unit order (``ln1.0, mha.0, …``)."""
    return [u for u in units_of(model) if u not in ("emb", "head")]


def backbone_parameters(model: nn.Module) -> int:
    """Parameters outside the head (embedding included): what a fractional budget is a fraction of."""
    return sum(p.numel() for n, p in model.named_parameters() if component_of(n).component != "head")


def budget_limit(budget: float, backbone: int) -> tuple[str, int]:
    """``("units", k)`` for a count budget, ``("params", floor(budget × backbone))`` for a fraction.

    Raises
    ------
    ConfigError
        A budget that is not positive, or >= 1 and not a whole number.
    """
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ConfigError(
            f"budget={budget!r} must be a fraction of the backbone's parameters (0 < budget < 1, e.g. 0.1) or "
            "a number of units (a whole number >= 1, e.g. 3)"
        )
    if budget >= 1:
        if budget != int(budget):
            raise ConfigError(
                f"budget={budget} is neither a fraction (< 1, e.g. 0.1 for 10 %) nor a whole number of units: write "
                f"budget={int(budget)} units or budget={budget / 100:g} for {budget:g} %"
            )
        return "units", int(budget)
    return "params", int(math.floor(budget * backbone))


def budget_label(budget: float) -> str:
    """``0.1`` → ``10%``, ``3`` → ``3 units``, ``1`` → ``1 unit``: the budget in tables and figures."""
    kind, value = budget_limit(budget, 1)
    if kind == "units":
        return f"{value} unit" + ("s" if value > 1 else "")
    return f"{budget * 100:g}%"


def ranking(scores: dict[str, float], units: list[str]) -> list[str]:
    """``units`` by score, highest first; ties keep the order of ``units``; NaN scores last."""
    position = {u: i for i, u in enumerate(units)}

    def key(u: str) -> tuple[bool, float, int]:
        s = float(scores[u])
        return (math.isnan(s), -s if not math.isnan(s) else 0.0, position[u])

    return sorted(units, key=key)


@dataclasses.dataclass
class Pick:
    """The chosen units (in rank order), those skipped for size, and the budget in parameters or units."""

    units: list[str]
    skipped: list[str]
    kind: str  # "params" or "units"
    limit: int
    params: int


def pick_units(
    scores: dict[str, float], sizes: dict[str, int], budget: float, backbone: int, *, fill: bool = True
) -> Pick:
    """The highest-scoring units within ``budget`` (the rules are in the module docstring).

    Parameters
    ----------
    scores, sizes
        Score and parameter count of every candidate unit; the order of ``sizes`` breaks ties.
    budget
        A fraction of ``backbone`` (``0 < budget < 1``) or a number of units (a whole number ``>= 1``).
    backbone
        Parameters of the backbone (:func:`backbone_parameters`).
    fill
        With a fractional budget, skip a unit too large for what remains and go on down the ranking (false:
        stop there).
    """
    units = list(sizes)
    kind, limit = budget_limit(budget, backbone)
    order = ranking(scores, units)
    if kind == "units":
        if limit > len(units):
            raise ConfigError(f"budget={limit} units, but the model has {len(units)}: lower budget")
        chosen = order[:limit]
        return Pick(chosen, [], kind, limit, sum(sizes[u] for u in chosen))
    chosen, skipped, left = [], [], limit
    for u in order:
        if sizes[u] <= left:
            chosen.append(u)
            left -= sizes[u]
        else:
            skipped.append(u)
            if not fill:
                break
    if not chosen and not fill:
        first = order[0]
        raise ConfigError(
            f"budget={budget} allows {limit:,} parameters, fewer than the first-ranked unit {first} "
            f"({sizes[first]:,}): raise budget to at least {sizes[first] / backbone:.3g}, or set fill=true"
        )
    if not chosen:
        smallest = min(sizes.values())
        raise ConfigError(
            f"budget={budget} allows {limit:,} parameters, fewer than the smallest unit ({smallest:,}): raise budget "
            f"to at least {smallest / backbone:.3g}, or pick a number of units (budget=1)"
        )
    if fill:  # passed over for their size: the units ranked above the last pick that did not fit
        last = order.index(chosen[-1])
        skipped = [u for u in skipped if order.index(u) < last]
    return Pick(chosen, skipped, kind, limit, limit - left)


def check_budget(model: nn.Module, budget: float) -> None:
    """Raise the :func:`pick_units` error for a budget that can pick no unit of ``model``, before any scoring."""
    sizes = {u: n for u, n in count_units(model).items() if u not in ("emb", "head")}
    backbone = backbone_parameters(model)
    kind, limit = budget_limit(budget, backbone)
    if (kind == "units" and limit > len(sizes)) or (kind == "params" and limit < min(sizes.values())):
        pick_units(dict.fromkeys(sizes, 0.0), sizes, budget, backbone)


def compact_units(units: Iterable[str], depth: int) -> list[str]:
    """The same units in the fewest names: consecutive blocks of a component become a range (``mha.3-5``),
    every block the component (``mha``); components in forward order."""
    blocks: dict[str, set[int]] = {}
    for u in units:
        comp, _, layer = u.partition(".")
        blocks.setdefault(comp, set()).add(int(layer))
    out = []
    for comp in BLOCK_COMPONENTS:
        layers = sorted(blocks.get(comp, ()))
        if len(layers) == depth:
            out.append(comp)
            continue
        for _, run in itertools.groupby(enumerate(layers), key=lambda t: t[1] - t[0]):
            run_layers = [layer for _, layer in run]
            first, last = run_layers[0], run_layers[-1]
            out.append(f"{comp}.{first}" if first == last else f"{comp}.{first}-{last}")
    return out


# ---------------------------------------------------------------------------------------------------
# Criteria
# ---------------------------------------------------------------------------------------------------


def plasticity_scores(
    model: nn.Module,
    source: Iterable,
    target: Iterable,
    *,
    mode: str = "embedding",
    precision: str = "fp32",
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean plasticity of every (block, component) over the pairs of ``source`` and ``target``."""
    df = measure(model, source, target, mode=mode, precision=precision, device=device)
    return {unit_name(c, int(layer)): float(m) for layer, c, m in zip(df["layer"], df["component"], df["mean"])}


def bound_scores(
    model: nn.Module,
    target: Iterable,
    *,
    sigma: float = 1.0,
    mha_bias: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """The theoretical bound of every (block, component), the MHA token radius r estimated on ``target``."""
    radius = estimate_radius(model, target, device=device)
    df = bounds_table(model, r=radius, sigma=sigma, mha_bias=mha_bias)
    return {unit_name(c, int(layer)): float(b) for layer, c, b in zip(df["layer"], df["component"], df["bound"])}


def fresh_head(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    """A linear head with PyTorch's default initialisation, drawn from a generator seeded with ``seed`` (the
    global random state is left alone)."""
    head = nn.Linear(in_features, num_classes, device="meta").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=√5) on a weight, and the bias rule: both U(±1/√fan_in)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.uniform_(-bound, bound, generator=gen)
    return head


def gradient_norms(
    model: nn.Module,
    batches: Iterable,
    *,
    num_classes: int,
    seed: int = 0,
    precision: str = "fp32",
    device: torch.device | str | None = None,
) -> pd.DataFrame:
    """``||g_u||`` and ``||θ_u||`` of every candidate unit at the model's weights, with a fresh seeded head.

    The model's own head, train/eval mode and ``requires_grad`` flags are restored afterwards; its ``.grad``
    fields are not touched. ``g`` is the gradient of the mean cross-entropy over every image of ``batches``
    (``(images, labels)`` pairs), see the module docstring.

    Returns
    -------
    pandas.DataFrame
        ``unit, grad_norm, param_norm``, one row per candidate unit in unit order.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    old_head, was_training = model.head, model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    in_features = old_head.in_features if isinstance(old_head, nn.Linear) else int(model.num_features)
    model.head = fresh_head(in_features, num_classes, seed).to(dev)
    try:
        model.eval()
        named = list(model.named_parameters())
        for _, p in named:
            p.requires_grad_(True)
        params = [p for _, p in named]
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        count = 0
        for batch in batches:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ConfigError("the gradient criteria need labelled batches: (images, labels) pairs")
            images, labels = batch_images(batch).to(dev), batch[1].to(dev)
            with autocast_context(dev, precision):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g.double(), alpha=len(labels))  # batch mean × its images: a sum over images
            count += len(labels)
        if count == 0:
            raise ConfigError("the gradient criteria read no target images: the loader yielded no batch")
        squares: dict[str, list[float]] = {u: [0.0, 0.0] for u in candidate_units(model)}
        for (name, p), acc in zip(named, total):
            unit = unit_of(name)
            if unit in squares:
                squares[unit][0] += float((acc / count).pow(2).sum())
                squares[unit][1] += float(p.detach().double().pow(2).sum())
    finally:
        model.head = old_head
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return pd.DataFrame(
        [(u, math.sqrt(g2), math.sqrt(t2)) for u, (g2, t2) in squares.items()],
        columns=["unit", "grad_norm", "param_norm"],
    )


def relative_gradient_norm(grad_norm: float, param_norm: float) -> float:
    """``||g|| / ||θ||``; a unit of all-zero parameters gets ``inf`` (``0`` when its gradient is 0 too)."""
    if param_norm == 0:
        return math.inf if grad_norm > 0 else 0.0
    return grad_norm / param_norm


def random_scores(units: list[str], seed: int) -> dict[str, float]:
    """Uniform draws in ``[0, 1)``, one per unit in the order given, from ``numpy.random.default_rng(seed)``."""
    draws = np.random.default_rng(seed).random(len(units))
    return {u: float(x) for u, x in zip(units, draws)}


def paper_scores(units: list[str]) -> dict[str, float]:
    """The paper's theoretical order MHA > FC1 > FC2 > LN2 > LN1 as scores 5 … 1, the same in every block."""
    top = max(THEORETICAL_RANK.values()) + 1
    return {u: float(top - THEORETICAL_RANK[u.partition(".")[0]]) for u in units}


# ---------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Selection:
    """Scores of every candidate unit and the pick within the budget: what ``selection.json`` holds."""

    criterion: str
    mode: str | None
    budget: float
    seed: int
    units: list[str]  # candidate units, unit order
    params: dict[str, int]  # per candidate unit
    scores: dict[str, float]
    picked: list[str]  # rank order
    skipped: list[str]  # ranked above the last pick but larger than what remained (fill=false: the stopping unit)
    budget_kind: str  # "params" or "units"
    budget_limit: int  # parameters (fraction) or units (count)
    backbone_params: int
    depth: int
    fill: bool = True
    details: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # extra columns per unit
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # what was scored (model, dataset, …)

    @property
    def picked_params(self) -> int:
        return sum(self.params[u] for u in self.picked)

    @property
    def picked_fraction(self) -> float:
        return self.picked_params / self.backbone_params

    @property
    def trainable(self) -> list[str]:
        """The pick as a ``trainable`` list, compacted (``mha.3-5``); the head trains besides."""
        return compact_units(self.picked, self.depth)

    def table(self) -> pd.DataFrame:
        """One row per unit: ``unit, layer, component, params, score, rank (1 = first), picked`` and details."""
        rank = {u: i + 1 for i, u in enumerate(ranking(self.scores, self.units))}
        chosen = set(self.picked)
        rows = []
        for u in self.units:
            comp, _, layer = u.partition(".")
            row = {
                "unit": u,
                "layer": int(layer),
                "component": comp,
                "params": self.params[u],
                "score": self.scores[u],
                "rank": rank[u],
                "picked": u in chosen,
            }
            row.update({k: v[u] for k, v in self.details.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        """The ``selection.json`` content (non-finite scores as strings ``"nan"``, ``"inf"``)."""
        return {
            **self.meta,
            "criterion": self.criterion,
            "mode": self.mode,
            "budget": self.budget,
            "budget_kind": self.budget_kind,
            "budget_limit": self.budget_limit,
            "seed": self.seed,
            "depth": self.depth,
            "fill": self.fill,
            "backbone_params": self.backbone_params,
            "picked": self.picked,
            "picked_params": self.picked_params,
            "picked_fraction": self.picked_fraction,
            "trainable": self.trainable,
            "skipped": self.skipped,
            "units": [{k: _json_number(v) for k, v in row.items()} for row in self.table().to_dict("records")],
        }

    @classmethod
    def from_json(cls, data: dict) -> Selection:
        """The selection of a ``selection.json`` mapping (:meth:`to_json`)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"details", "meta", "units", "params", "scores"}
        rows = data["units"]
        fixed = {"unit", "layer", "component", "params", "score", "rank", "picked"}
        extra = [k for k in rows[0] if k not in fixed] if rows else []
        units = [r["unit"] for r in rows]
        derived = {"picked_params", "picked_fraction", "trainable"}
        return cls(
            **{k: data[k] for k in fields},
            units=units,
            params={r["unit"]: int(r["params"]) for r in rows},
            scores={r["unit"]: float(r["score"]) for r in rows},
            details={k: {r["unit"]: float(r[k]) for r in rows} for k in extra},
            meta={k: v for k, v in data.items() if k not in fields | derived | {"units"}},
        )


def _json_number(value: Any) -> Any:
    """NumPy scalars as Python numbers; NaN and infinities as the strings ``float()`` reads back."""
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else str(float(value))
    return value


def score_units(
    model: nn.Module,
    cfg: SelectConfig,
    *,
    target: Iterable | None = None,
    source: Iterable | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Scores of every candidate unit under ``cfg.criterion``, and the criterion's extra columns per unit.

    ``target`` (``(images, labels)`` batches of the target data) and ``source`` (source images, plasticity
    only) are read for at most ``cfg.batches`` batches each; ``num_classes`` (the gradient criteria's head)
    defaults to ``target.num_classes``.
    """
    crit = canonical_criterion(cfg.criterion)
    units = candidate_units(model)
    if crit in NEEDS_TARGET and target is None:
        raise ConfigError(f"criterion={crit} reads target batches: pass target=")
    if crit in NEEDS_SOURCE and source is None:
        raise ConfigError(f"criterion={crit} reads source images (the pretraining proxy): pass source=")
    tgt = list(itertools.islice(target, cfg.batches)) if target is not None else []
    details: dict[str, dict[str, float]] = {}
    if crit == "plasticity":
        src = itertools.islice(source, cfg.batches)  # type: ignore[arg-type]
        scores = plasticity_scores(model, src, tgt, mode=cfg.mode, precision=cfg.precision, device=device)
    elif crit == "bound":
        scores = bound_scores(model, tgt, sigma=cfg.sigma, mha_bias=cfg.mha_bias, device=device)
    elif crit in ("rgn", "grad_norm"):
        classes = num_classes if num_classes is not None else getattr(target, "num_classes", None)
        if classes is None:
            raise ConfigError(f"criterion={crit} needs the number of target classes: pass num_classes=")
        df = gradient_norms(model, tgt, num_classes=int(classes), seed=cfg.seed, precision=cfg.precision, device=device)
        g = dict(zip(df["unit"], df["grad_norm"]))
        t = dict(zip(df["unit"], df["param_norm"]))
        details = {"grad_norm": g, "param_norm": t}
        scores = {u: relative_gradient_norm(g[u], t[u]) for u in units} if crit == "rgn" else g
    elif crit == "random":
        scores = random_scores(units, cfg.seed)
    else:
        scores = paper_scores(units)
    missing = [u for u in units if u not in scores]
    if missing:
        raise VitefError(f"criterion={crit} scored no value for units {', '.join(missing)}")
    return {u: scores[u] for u in units}, details


def select(
    model: nn.Module,
    cfg: SelectConfig,
    *,
    target: Iterable | None = None,
    source: Iterable | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> Selection:
    """Score every candidate unit of ``model`` under ``cfg.criterion`` and pick within ``cfg.budget``.

    ``model`` is the pretrained ViT (its head is not used: the gradient criteria put a fresh one in its place
    for the time of the computation); its weights are left unchanged. See :func:`score_units` for the data.
    """
    check_budget(model, cfg.budget)  # before minutes of scoring
    scores, details = score_units(model, cfg, target=target, source=source, num_classes=num_classes, device=device)
    sizes = {u: n for u, n in count_units(model).items() if u in scores}
    backbone = backbone_parameters(model)
    pick = pick_units(scores, sizes, cfg.budget, backbone, fill=cfg.fill)
    sel = Selection(
        criterion=cfg.criterion,
        mode=cfg.mode if cfg.criterion == "plasticity" else None,
        budget=cfg.budget,
        seed=cfg.seed,
        units=list(sizes),
        params=sizes,
        scores=scores,
        picked=pick.units,
        skipped=pick.skipped,
        budget_kind=pick.kind,
        budget_limit=pick.limit,
        backbone_params=backbone,
        depth=num_blocks(model),
        fill=cfg.fill,
        details=details,
    )
    logger.info(
        "%s, budget %s: %d units, %s parameters (%.2f%% of the backbone): %s",
        cfg.label(),
        budget_label(cfg.budget),
        len(sel.picked),
        f"{sel.picked_params:,}",
        100 * sel.picked_fraction,
        " ".join(sel.trainable),
    )
    return sel


def build_streams(
    cfg: SelectConfig, dataset_name: str, model: nn.Module, **loader_kwargs: Any
) -> tuple[Any | None, Any | None]:
    """The loaders ``cfg.criterion`` reads: ``(target, source)``, each ``None`` when not needed.

    Eval transform, at the model's input size, in an order seeded by ``cfg.seed`` (which also seeds the
    train/val split of datasets that draw one: give the training run's seed to score its training data);
    ``loader_kwargs`` go to :func:`vitef.data.build_loader` (``DataConfig.loader_kwargs()``).
    """
    size = int(model.patch_embed.img_size[0])

    def loader(name: str, split: str):
        return build_loader(
            name,
            split,
            batch_size=cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            size=size,
            augment=False,
            model=model,
            **loader_kwargs,
        )

    crit = canonical_criterion(cfg.criterion)
    target = loader(dataset_name, cfg.split) if crit in NEEDS_TARGET else None
    source = loader(cfg.source, cfg.source_split) if crit in NEEDS_SOURCE else None
    return target, source


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def write_selection(folder: str | Path, selection: Selection) -> Path:
    """``selection.json`` into ``folder`` atomically (the app writes its table files first); returns its path."""
    path = Path(folder) / SELECTION_FILE
    atomic_write_json(path, selection.to_json())
    return path


def read_selection(folder: str | Path) -> Selection:
    """The :class:`Selection` of a folder written by ``apps.vit.select`` (or the ``selection.json`` path itself).

    Raises
    ------
    ConfigError
        No ``selection.json`` there, or one that is not a selection (the message says to run the selection).
    """
    path = Path(folder)
    path = path if path.suffix == ".json" else path / SELECTION_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: write it with `python -m apps.vit.select` (its folder is printed)")
    try:
        return Selection.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{path} is not a selection ({type(e).__name__}: {e}): run apps.vit.select again") from None


def find_selections(patterns: Iterable[str | Path]) -> list[Path]:
    """Complete selection folders (holding ``selection.json``) matching glob ``patterns`` or naming folders:
    pattern by pattern, each sorted, no duplicates."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) or [str(pattern)]
        for m in matches:
            folder = Path(m)
            if (folder / SELECTION_FILE).is_file():
                found.setdefault(folder, None)
    return list(found)
