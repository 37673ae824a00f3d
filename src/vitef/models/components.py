"""The single registry of ViT components (Odonnat et al., arXiv 2602.06883, §3).

The paper studies five components per transformer block — LN1 (first LayerNorm), MHA (multi-head
attention), LN2 (second LayerNorm), FC1 and FC2 (the two feed-forward linear layers) — plus the
embedding (``emb``: patch projection, CLS/register tokens, position embedding) and the classifier
(``head``: final norm + linear layer), which always trains when finetuning.

Components are anchored regular expressions over timm ``VisionTransformer`` parameter names. Freezing
(:func:`set_trainable`), plasticity, bounds and probing all go through this module, and every parameter
of a supported model belongs to exactly one component (:func:`assign_components` raises otherwise).
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
    """Canonical names for a list (or one name), duplicates removed, order kept."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for n in names:
        c = canonical(n)
        if c not in out:
            out.append(c)
    return out


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
    """Make exactly ``components`` (in every block) plus ``head`` trainable; freeze everything else.

    Parameters
    ----------
    model
        A timm ``VisionTransformer``.
    components
        Component names from :data:`COMPONENTS` or aliases, or ``["all"]`` for full finetuning.

    Returns
    -------
    dict
        Trainable parameter count per component (components with none are omitted).
    """
    names = canonical_list(components)
    if not names:
        raise ComponentError(f"no component given to train; choose from {', '.join((*COMPONENTS, 'all'))}")
    train_all = "all" in names
    chosen = set(names) | {"head"}
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        comp = component_of(name).component
        trainable = train_all or comp in chosen
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
