"""The single registry of ViT components (Odonnat et al., arXiv 2602.06883, §3).

The paper studies five components per transformer block — LN1 (first LayerNorm), MHA (multi-head
attention), LN2 (second LayerNorm), FC1 and FC2 (the two feed-forward linear layers) — plus the
embedding (``emb``: patch projection, CLS/register tokens, position embedding) and the classifier
(``head``: final norm + linear layer), which always trains when finetuning.

Components are anchored regular expressions over timm ``VisionTransformer`` parameter names. Freezing
(:func:`set_trainable`), plasticity, bounds and probing all go through this module, and every parameter
of a supported model belongs to exactly one component (:func:`assign_components` raises otherwise).

Units (issue 12, choosing what to finetune). A *unit* is one component in some blocks, written
``<component>.<blocks>``: ``mha.3`` (block 3), ``fc1.0-5`` (blocks 0 to 5, both included), ``ln2.*``
(every block: the same as ``ln2``). ``emb`` and ``head`` are units without a block. ``trainable`` takes
units next to component names (:func:`canonical_list`, :func:`set_trainable`). The finest units,
:func:`units_of` (``emb``, ``ln1.0``, ``mha.0``, …, ``fc2.<L-1>``, ``head``), split the parameters of a
model exactly: every parameter is in exactly one of them (:func:`unit_of`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vitef.errors import ComponentError

# Per-block components, in forward order. LayerScale gains belong to the branch they scale.
BLOCK_COMPONENTS: tuple[str, ...] = ("ln1", "mha", "ln2", "fc1", "fc2")
# Every component name, in model order.
COMPONENTS: tuple[str, ...] = ("emb", *BLOCK_COMPONENTS, "head")

# The paper's theoretical plasticity ranking (1 = most plastic), PROTOCOL.md §1.
THEORETICAL_RANK: dict[str, int] = {"mha": 1, "fc1": 2, "fc2": 3, "ln2": 4, "ln1": 5}
# The per-block components by theoretical rank: MHA, FC1, FC2, LN2, LN1 (the order of the paper's figures).
RANK_ORDER: tuple[str, ...] = tuple(sorted(THEORETICAL_RANK, key=THEORETICAL_RANK.__getitem__))
# The order of every table and figure: the ranked components, then full finetuning (``all``, a trainable
# choice rather than a component), the embedding and the head. Other names (``fc1+fc2``) come after.
DISPLAY_ORDER: tuple[str, ...] = (*RANK_ORDER, "all", "emb", "head")

# The one label of each name in tables, figures and logs: acronyms in capitals, the words (the embedding,
# the head, full finetuning) in lower case as the finetuning tables have always printed them.
DISPLAY_NAMES: dict[str, str] = {
    "emb": "emb",
    "ln1": "LN1",
    "mha": "MHA",
    "ln2": "LN2",
    "fc1": "FC1",
    "fc2": "FC2",
    "head": "head",
    "all": "all",
}

# The authors' code names (attn_norm, ffn_norm, ffn_fc1, ffn_fc2) and a few obvious spellings.
ALIASES: dict[str, str] = {
    "attn_norm": "ln1",
    "norm1": "ln1",
    "attn": "mha",
    "attention": "mha",
    "ffn_norm": "ln2",
    "norm2": "ln2",
    "ffn_fc1": "fc1",
    "ffn_fc2": "fc2",
    "embedding": "emb",
    "embed": "emb",
}

_BLOCK = r"blocks\.(?P<layer>\d+)\."
PATTERNS: dict[str, re.Pattern[str]] = {
    "emb": re.compile(r"^(cls_token|reg_token|dist_token|pos_embed|patch_embed\..+|norm_pre\..+)$"),
    "ln1": re.compile(rf"^{_BLOCK}norm1\..+$"),
    "mha": re.compile(rf"^{_BLOCK}(attn\..+|ls1\..+)$"),
    "ln2": re.compile(rf"^{_BLOCK}norm2\..+$"),
    "fc1": re.compile(rf"^{_BLOCK}mlp\.fc1\..+$"),
    # `mlp.norm` (scale_mlp_norm variants) sits between the activation and fc2, so it goes with fc2.
    "fc2": re.compile(rf"^{_BLOCK}(mlp\.fc2\..+|mlp\.norm\..+|ls2\..+)$"),
    "head": re.compile(r"^(norm|fc_norm|head|head_dist|attn_pool)\..+$"),
}


def canonical(name: str) -> str:
    """The registry name for ``name`` (case-insensitive; authors' aliases accepted).

    ``"all"`` is returned unchanged. Raises :class:`ComponentError` listing the valid names otherwise.
    """
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key in COMPONENTS or key == "all":
        return key
    valid = ", ".join((*COMPONENTS, "all"))
    aliases = ", ".join(f"{a}->{c}" for a, c in ALIASES.items())
    raise ComponentError(f"unknown component '{name}'. Valid components: {valid} (aliases: {aliases})")


def canonical_list(names: Iterable[str] | str) -> list[str]:
    """Canonical names for a list (or one name) of components and units, duplicates removed, order kept.

    A component is its registry name (``attn`` → ``mha``); a unit its :func:`canonical_unit` (``attn.03`` →
    ``mha.3``, ``ln2.*`` → ``ln2``). Raises :class:`ComponentError` naming the valid forms otherwise.
    """
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        c = canonical_unit(n)
        if c not in out:
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------
# Units: one component in some blocks
# ---------------------------------------------------------------------------------------------------

# How a unit is written, for error messages.
UNIT_FORMS = "<component>.<blocks>: mha.3 (block 3), fc1.0-5 (blocks 0 to 5), ln2.* (every block)"
_BLOCKS = re.compile(r"^(?:(?P<all>\*)|(?P<first>\d+)(?:-(?P<last>\d+))?)$")


@dataclass(frozen=True)
class Unit:
    """One component in the blocks ``first`` … ``last`` (both included; ``None``: every block, or no blocks)."""

    component: str
    first: int | None = None
    last: int | None = None

    @property
    def name(self) -> str:
        """The canonical spelling: ``mha``, ``mha.3`` or ``mha.0-5``."""
        if self.first is None:
            return self.component
        if self.first == self.last:
            return f"{self.component}.{self.first}"
        return f"{self.component}.{self.first}-{self.last}"

    def covers(self, info: ParamInfo) -> bool:
        """Whether a parameter (its :func:`component_of`) is in this unit."""
        if self.component == "all":
            return True
        if info.component != self.component:
            return False
        if self.first is None or info.layer is None:
            return True
        return self.first <= info.layer <= int(self.last)  # type: ignore[arg-type]

    def check_depth(self, depth: int) -> None:
        """Raise :class:`ComponentError` when the unit names a block a model of ``depth`` blocks lacks."""
        if self.last is not None and self.last >= depth:
            c = self.component
            raise ComponentError(
                f"unit '{self.name}' names block {self.last}, but this model has blocks 0-{depth - 1}: write "
                f"{c}.0 … {c}.{depth - 1}, a range such as {c}.0-{depth - 1}, or {c}.* (every block)"
            )


def parse_unit(name: str) -> Unit:
    """The :class:`Unit` written ``name``: a component (every block) or ``<component>.<blocks>``.

    Raises
    ------
    ComponentError
        An unknown component, bad syntax, a reversed range, or blocks on ``emb`` / ``head`` / ``all``; the
        message names the valid forms (:data:`UNIT_FORMS`).
    """
    text = str(name).strip()
    comp_part, dot, blocks = text.partition(".")
    try:
        comp = canonical(comp_part)
    except ComponentError as e:
        where = f" in unit '{name}'" if dot else ""
        raise ComponentError(f"{e}{where}; a unit is written {UNIT_FORMS}") from None
    if not dot:
        return Unit(comp)
    m = _BLOCKS.match(blocks.strip())
    if m is None:
        raise ComponentError(f"unit '{name}': '{blocks}' is not a block, a range or *; write {UNIT_FORMS}")
    if comp not in BLOCK_COMPONENTS:
        raise ComponentError(
            f"unit '{name}': {comp} has no blocks, write {comp} (units with blocks: {', '.join(BLOCK_COMPONENTS)})"
        )
    if m["all"]:
        return Unit(comp)  # ln2.* is the component ln2
    first = int(m["first"])
    last = int(m["last"]) if m["last"] is not None else first
    if last < first:
        raise ComponentError(f"unit '{name}': the range {first}-{last} is reversed, write {comp}.{last}-{first}")
    return Unit(comp, first, last)


def canonical_unit(name: str) -> str:
    """The canonical spelling of a component or unit: ``ATTN`` → ``mha``, ``attn.03`` → ``mha.3``,
    ``fc1.2-2`` → ``fc1.2``, ``ln2.*`` → ``ln2``. Raises :class:`ComponentError` naming the valid forms."""
    return parse_unit(name).name


def unit_name(component: str, layer: int | None) -> str:
    """The finest unit of a parameter: ``mha.3`` in a block, the component (``emb``, ``head``) outside."""
    return component if layer is None else f"{component}.{layer}"


def unit_of(param_name: str) -> str:
    """The finest unit a timm ViT parameter belongs to (``blocks.3.attn.qkv.weight`` → ``mha.3``)."""
    info = component_of(param_name)
    return unit_name(info.component, info.layer)


def units_of(model: nn.Module) -> list[str]:
    """Every finest unit of ``model`` in model order: ``emb``, then per block ``ln1.i, mha.i, ln2.i, fc1.i,
    fc2.i``, then ``head``. Each parameter is in exactly one (:func:`unit_of`)."""
    blocks = [unit_name(c, layer) for layer in range(num_blocks(model)) for c in BLOCK_COMPONENTS]
    return ["emb", *blocks, "head"]


def count_units(model: nn.Module) -> dict[str, int]:
    """Number of parameters per finest unit (:func:`units_of` order), trainable or not.

    Raises :class:`ComponentError` if a parameter falls outside the model's units (a layout the registry
    does not know), so the counts always add up to the model's parameter count.
    """
    counts = dict.fromkeys(units_of(model), 0)
    for name, p in model.named_parameters():
        unit = unit_of(name)
        if unit not in counts:
            raise ComponentError(f"parameter '{name}' is in unit '{unit}', which this model's blocks do not have")
        counts[unit] += p.numel()
    return counts


def display_name(name: str) -> str:
    """The label of a component or trainable choice: ``mha`` → ``MHA``, ``fc1+fc2`` → ``FC1+FC2``.

    Names outside the registry are returned unchanged.
    """
    return "+".join(DISPLAY_NAMES.get(part, part) for part in str(name).split("+"))


def display_order(names: Iterable[str]) -> list[str]:
    """The distinct ``names`` in :data:`DISPLAY_ORDER`, then any others (combinations) alphabetically."""
    rank = {name: i for i, name in enumerate(DISPLAY_ORDER)}
    return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))


@dataclass(frozen=True)
class ParamInfo:
    """Where a parameter belongs: its component and block index (``None`` outside blocks)."""

    component: str
    layer: int | None


def component_of(param_name: str) -> ParamInfo:
    """The component a timm ViT parameter name belongs to; raises if none or several match."""
    hits = [(c, m) for c, p in PATTERNS.items() if (m := p.match(param_name))]
    if len(hits) != 1:
        what = "no component" if not hits else f"several components ({', '.join(c for c, _ in hits)})"
        raise ComponentError(
            f"parameter '{param_name}' matches {what}; vitef supports timm VisionTransformer layouts "
            "(blocks.N.norm1/attn/norm2/mlp.fc1/mlp.fc2)"
        )
    comp, m = hits[0]
    layer = m.groupdict().get("layer")
    return ParamInfo(comp, int(layer) if layer is not None else None)


def assign_components(model: nn.Module) -> dict[str, ParamInfo]:
    """Map every parameter name of ``model`` to its component (raises on any unassigned parameter)."""
    return {name: component_of(name) for name, _ in model.named_parameters()}


def parameters_of(model: nn.Module, component: str) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of one component across all blocks."""
    comp = canonical(component)
    return [(n, p) for n, p in model.named_parameters() if comp == "all" or component_of(n).component == comp]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Number of parameters per component (all of them, trainable or not)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[component_of(name).component] += p.numel()
    return counts


def set_trainable(model: nn.Module, components: Iterable[str] | str) -> dict[str, int]:
    """Make exactly ``components`` (in every block) or units (in their blocks) plus ``head`` trainable; freeze
    everything else.

    Parameters
    ----------
    model
        A timm ``VisionTransformer``.
    components
        Component names from :data:`COMPONENTS` or aliases, units (``mha.3``, ``fc1.0-5``, ``ln2.*``), or
        ``["all"]`` for full finetuning.

    Returns
    -------
    dict
        Trainable parameter count per component (components with none are omitted).

    Raises
    ------
    ComponentError
        An unknown name, or a unit naming a block the model lacks (before anything is changed).
    """
    names = canonical_list(components)
    if not names:
        raise ComponentError(f"no component given to train; choose from {', '.join((*COMPONENTS, 'all'))}")
    units = [parse_unit(n) for n in names]
    depth = num_blocks(model)
    for unit in units:
        unit.check_depth(depth)
    units.append(Unit("head"))  # the head always trains
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        info = component_of(name)
        comp = info.component
        trainable = any(unit.covers(info) for unit in units)
        p.requires_grad_(trainable)
        if trainable:
            counts[comp] = counts.get(comp, 0) + p.numel()
    return {c: counts[c] for c in COMPONENTS if c in counts}


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(model.blocks)  # type: ignore[arg-type]


def block_module(model: nn.Module, layer: int, component: str) -> nn.Module:
    """The module computing ``component`` in block ``layer``.

    ``ln1`` → ``norm1``, ``mha`` → ``attn`` (attention alone: no norm before it, no residual, no
    LayerScale), ``ln2`` → ``norm2``, ``fc1`` → ``mlp.fc1`` (before the activation), ``fc2`` →
    ``mlp.fc2``.
    """
    comp = canonical(component)
    block = model.blocks[layer]  # type: ignore[index]
    if comp == "ln1":
        return block.norm1
    if comp == "mha":
        return block.attn
    if comp == "ln2":
        return block.norm2
    if comp == "fc1":
        return block.mlp.fc1
    if comp == "fc2":
        return block.mlp.fc2
    raise ComponentError(f"'{component}' is not a per-block component; choose from {', '.join(BLOCK_COMPONENTS)}")


def mlp_activation(model: nn.Module, layer: int) -> nn.Module:
    """The MLP activation of block ``layer`` (between FC1 and FC2)."""
    return model.blocks[layer].mlp.act  # type: ignore[index]


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The embedding e(x): patch projection, CLS (and register) tokens, position embedding.

    Parameters
    ----------
    images
        ``(B, C, H, W)`` normalised images.

    Returns
    -------
    torch.Tensor
        ``(B, N, D)`` tokens, as fed to the first block (``norm_pre`` included when the model has one).
    """
    x = model.patch_embed(images)  # (B, N_patches, D)
    x = model._pos_embed(x)  # (B, N, D): prefix tokens + position embedding (timm's own code path)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def component_table(model: nn.Module) -> list[dict]:
    """One row per component: parameter count, trainable count, and one example parameter name."""
    rows = []
    info = assign_components(model)
    params = dict(model.named_parameters())
    for comp in COMPONENTS:
        names = [n for n, i in info.items() if i.component == comp]
        rows.append(
            {
                "component": comp,
                "params": sum(params[n].numel() for n in names),
                "trainable": sum(params[n].numel() for n in names if params[n].requires_grad),
                "tensors": len(names),
                "example": names[0] if names else "",
            }
        )
    return rows
