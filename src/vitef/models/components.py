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

Families (issue 14). Three timm model classes are supported, all pre-norm blocks
``x + s1(attn(norm1(x)))`` then ``x + s2(mlp(norm2(x)))``:

``vit``  ``VisionTransformer`` (supervised, MAE, DINO/DINOv2, CLIP, SigLIP, DeiT…): LayerScale ``ls1``/``ls2`` modules.
``eva``  ``Eva`` (EVA-02, DINOv3, …): rotary position embeddings (RoPE) applied to the patch tokens' queries and
         keys inside the attention, fused ``qkv`` + ``q_bias``/``v_bias`` or separate ``q_proj``/``k_proj``/``v_proj``,
         optional per-head q/k norms and a scale norm ``attn.norm`` before the output projection, SwiGLU MLPs (fused
         ``GluMlp.fc1`` or split ``SwiGLU.fc1_g``/``fc1_x``), LayerScale as ``gamma_1``/``gamma_2`` parameters.
``beit`` ``Beit``: a relative position bias added to the attention logits, per block
         (``attn.relative_position_bias_table``) and/or shared by all blocks (``rel_pos_bias``), LayerScale as
         ``gamma_1``/``gamma_2``.

Where the extra pieces go. Everything inside the attention (projections, biases, q/k norms, the scale norm, a
block's own relative position bias table; the RoPE rotation has no parameters) is MHA, and so is ``gamma_1``, the
LayerScale of the attention branch (as ``ls1`` always was). A gated MLP's two input projections (``fc1_g`` and
``fc1_x``, or the fused ``fc1`` holding both) are FC1: FC1's output is their concatenation, ``(B, N, 2H)``, before
the gate; the gate ``act(g) * x`` maps it to the FC2 input width ``H`` (:func:`mlp_activation`). The MLP norm
(between the gate and ``fc2``) and ``gamma_2`` go with FC2. The shared relative position bias of BEiT is computed
before the blocks from no input, like the position embedding, so it is part of ``emb``; so are learnable RoPE
frequencies (``rope.*``, mixed RoPE only) for the same reason. Eva post-norm blocks (``use_post_norm=True``) are
refused: their LayerNorms follow the branches, which the components' definitions do not cover.

What blocks need besides the tokens (the RoPE embedding, the shared relative position bias) is a
:class:`BlockContext`, from :func:`embed_context`; :func:`run_block`, :func:`run_attention` and
:func:`block_trace` take it and reproduce timm's own forward.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from timm.layers import GluMlp, SwiGLU
from timm.models.beit import Beit
from timm.models.eva import Eva, EvaBlockPostNorm
from timm.models.vision_transformer import VisionTransformer
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
    # rel_pos_bias: BEiT's shared relative position bias; rope: learnable RoPE frequencies (mixed RoPE). Both are
    # position information computed before the blocks from no input, like pos_embed.
    "emb": re.compile(
        r"^(cls_token|reg_token|dist_token|pos_embed|patch_embed\..+|norm_pre\..+|rel_pos_bias\..+|rope\..+)$"
    ),
    "ln1": re.compile(rf"^{_BLOCK}norm1\..+$"),
    # attn.* covers qkv, q_bias/v_bias, q_proj/k_proj/v_proj, q_norm/k_norm, the scale norm attn.norm and a block's
    # own relative_position_bias_table; gamma_1 is Eva/BEiT's LayerScale of the attention branch (ls1 in ViT).
    "mha": re.compile(rf"^{_BLOCK}(attn\..+|ls1\..+|gamma_1)$"),
    "ln2": re.compile(rf"^{_BLOCK}norm2\..+$"),
    # fc1_g / fc1_x: SwiGLU's gate and value projections (GluMlp fuses both into fc1).
    "fc1": re.compile(rf"^{_BLOCK}mlp\.(fc1|fc1_g|fc1_x)\..+$"),
    # `mlp.norm` (scale_mlp_norm variants) sits between the activation and fc2, so it goes with fc2.
    "fc2": re.compile(rf"^{_BLOCK}(mlp\.fc2\..+|mlp\.norm\..+|ls2\..+|gamma_2)$"),
    "head": re.compile(r"^(norm|fc_norm|head|head_dist|attn_pool)\..+$"),
}

# The supported model families: name -> timm class (see the module docstring).
FAMILIES: dict[str, type[nn.Module]] = {"vit": VisionTransformer, "eva": Eva, "beit": Beit}
# How the supported layouts are described in error messages.
SUPPORTED = (
    "timm VisionTransformer (blocks.N.norm1/attn/norm2/mlp.fc1/mlp.fc2, ls1/ls2), Eva (EVA-02, DINOv3: "
    "gamma_1/gamma_2, q_proj/k_proj/v_proj, mlp.fc1_g/fc1_x) and Beit (relative position bias, rel_pos_bias)"
)


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
        raise ComponentError(f"parameter '{param_name}' matches {what}; vitef supports {SUPPORTED}")
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


# ---------------------------------------------------------------------------------------------------
# Families: running a block of each supported model class
# ---------------------------------------------------------------------------------------------------


def model_family(model: nn.Module) -> str:
    """The family of ``model``: ``vit`` (timm ``VisionTransformer``), ``eva`` (``Eva``) or ``beit`` (``Beit``).

    A model of another class whose blocks have the timm ViT layout (``norm1``, ``attn``, ``norm2``, ``mlp``) is
    treated as ``vit``.

    Raises
    ------
    ComponentError
        Any other model, or an Eva with post-norm blocks; the message names the supported families.
    """
    for name, cls in FAMILIES.items():
        if isinstance(model, cls):
            family = name
            break
    else:
        blocks = getattr(model, "blocks", None)
        first = blocks[0] if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) else None
        if first is None or not all(hasattr(first, a) for a in ("norm1", "attn", "norm2", "mlp")):
            raise ComponentError(f"{type(model).__name__} is not a supported model; vitef supports {SUPPORTED}")
        family = "vit"
    if family == "eva" and any(isinstance(b, EvaBlockPostNorm) for b in model.blocks):  # type: ignore[union-attr]
        raise ComponentError(
            "this Eva has post-norm blocks (use_post_norm=True), whose LayerNorms follow the attention and MLP "
            "instead of preceding them; vitef supports pre-norm blocks only (build it with use_post_norm=False)"
        )
    return family


@dataclass(frozen=True)
class BlockContext:
    """What a model's blocks need besides the tokens, from :func:`embed_context`.

    Attributes
    ----------
    family
        :func:`model_family` of the model.
    rope
        Eva: the rotary position embedding ``model._pos_embed`` returns (``None`` without RoPE); mixed RoPE has
        one per block along the first axis (``per_block``).
    per_block
        Whether ``rope[layer]`` is block ``layer``'s embedding (timm's ``rope_mixed``).
    rel_pos_bias
        Beit: the shared relative position bias ``(heads, N, N)`` added to every block's attention logits
        (``None`` without ``use_shared_rel_pos_bias``).
    """

    family: str = "vit"
    rope: torch.Tensor | None = None
    per_block: bool = False
    rel_pos_bias: torch.Tensor | None = None

    def kwargs(self, layer: int) -> dict:
        """Keyword arguments of block ``layer``'s forward and of its attention's (the same for both in timm)."""
        if self.family == "eva":
            rope = self.rope[layer] if self.per_block and self.rope is not None else self.rope
            return {"rope": rope}
        if self.family == "beit":
            return {"shared_rel_pos_bias": self.rel_pos_bias}
        return {}


def _context_for(model: nn.Module, ctx: BlockContext | None) -> BlockContext:
    """``ctx``, or the empty context of a model whose blocks need none (refused for Eva/Beit: it depends on them)."""
    if ctx is not None:
        return ctx
    family = model_family(model)
    if family != "vit":
        raise ComponentError(
            f"a {type(model).__name__} block needs its context (rotary embedding / shared relative position bias): "
            "pass the BlockContext that embed_context(model, images) returns"
        )
    return BlockContext(family)


def embed_context(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
    """The embedding e(x) and the :class:`BlockContext` the blocks need, as timm's ``forward_features`` computes them.

    Parameters
    ----------
    images
        ``(B, C, H, W)`` normalised images.

    Returns
    -------
    tokens : torch.Tensor
        ``(B, N, D)``: patch projection, prefix tokens (CLS, registers), absolute position embedding when the
        model has one, ``norm_pre`` when it has one: the input of the first block.
    ctx : BlockContext
        Eva: the rotary embedding; Beit: the shared relative position bias (or ``None``); ViT: nothing.
    """
    family = model_family(model)
    x = model.patch_embed(images)  # (B, N_patches, D)
    if family == "vit":
        x = model._pos_embed(x)  # (B, N, D): prefix tokens + position embedding (timm's own code path)
        x = model.patch_drop(x)
        return model.norm_pre(x), BlockContext(family)
    if family == "eva":
        # Eva's _pos_embed adds the prefix tokens and the position embedding, applies patch dropout, and returns
        # the rotary embedding of the (kept) patch tokens.
        x, rope = model._pos_embed(x)  # (B, N, D)
        per_block = bool(getattr(model, "rope_mixed", False)) and rope is not None
        return model.norm_pre(x), BlockContext(family, rope=rope, per_block=per_block)
    # Beit: written out in its forward_features (no _pos_embed method).
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, N, D)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    x = model.pos_drop(x)
    bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None  # (heads, N, N)
    return x, BlockContext(family, rel_pos_bias=bias)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The embedding e(x): patch projection, CLS (and register) tokens, position embedding.

    Parameters
    ----------
    images
        ``(B, C, H, W)`` normalised images.

    Returns
    -------
    torch.Tensor
        ``(B, N, D)`` tokens, as fed to the first block (``norm_pre`` included when the model has one). Eva and
        Beit blocks also need the context :func:`embed_context` returns with them.
    """
    return embed_context(model, images)[0]


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(model.blocks)  # type: ignore[arg-type]


def run_block(model: nn.Module, layer: int, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
    """Block ``layer`` of ``model`` on tokens ``x`` ``(B, N, D)``: timm's own block forward, with its context.

    ``ctx`` may be left out for a ``vit`` (its blocks need none).
    """
    ctx = _context_for(model, ctx)
    return model.blocks[layer](x, **ctx.kwargs(layer))  # type: ignore[index]


def run_attention(model: nn.Module, layer: int, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
    """The attention of block ``layer`` alone on ``x`` ``(B, N, D)``: no norm before it, no residual, no LayerScale.

    The rotary embedding (Eva) and the relative position biases (Beit: the block's own and the shared one) are
    part of the attention and are applied inside, as in the model's forward.
    """
    ctx = _context_for(model, ctx)
    return model.blocks[layer].attn(x, **ctx.kwargs(layer))  # type: ignore[index]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _scale(gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return gamma * x


def layer_scales(model: nn.Module, layer: int) -> tuple[Callable, Callable]:
    """The LayerScales of block ``layer``'s attention and MLP branches, as callables on ``(B, N, D)`` tokens.

    ViT: the ``ls1``/``ls2`` modules (``Identity`` without LayerScale); Eva/Beit: multiplication by
    ``gamma_1``/``gamma_2`` (the identity when the parameter is absent). They belong to MHA and FC2.
    """
    block = model.blocks[layer]  # type: ignore[index]
    if model_family(model) == "vit":
        return getattr(block, "ls1", _identity), getattr(block, "ls2", _identity)
    scales = []
    for name in ("gamma_1", "gamma_2"):
        gamma = getattr(block, name, None)
        scales.append(_identity if gamma is None else functools.partial(_scale, gamma))
    return scales[0], scales[1]


class ConcatLinear(nn.Module):
    """Several linear layers on the same input as one: the concatenation of their outputs.

    It stands for a SwiGLU MLP's FC1 (``fc1_g`` and ``fc1_x``): ``weight`` is ``(2H, D)``, the stacked weights,
    so FC1 is analysed as the one linear map ``x -> [W_g x + b_g, W_x x + b_x]`` it is. It only wraps the
    model's layers (no parameter of its own, nothing registered on the model): hooks on it do not see the
    model's forward, which calls the parts.
    """

    def __init__(self, *parts: nn.Linear):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([p.weight for p in self.parts], dim=0)  # (out, in)

    @property
    def bias(self) -> torch.Tensor | None:
        if all(p.bias is None for p in self.parts):
            return None
        return torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)  # (B, N, out)


class GatedActivation(nn.Module):
    """A gated MLP's activation: ``(B, N, 2H)`` pre-gate FC1 output → ``(B, N, H)``, ``act(gate) * value``.

    ``gate_first``: the gate is the first half (SwiGLU's ``[fc1_g, fc1_x]``; GluMlp with ``gate_last=False``).
    """

    def __init__(self, act: nn.Module, gate_first: bool):
        super().__init__()
        self.act = act
        self.gate_first = gate_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)  # (B, N, H) each
        return self.act(a) * b if self.gate_first else a * self.act(b)


def block_module(model: nn.Module, layer: int, component: str) -> nn.Module:
    """The module computing ``component`` in block ``layer``.

    ``ln1`` → ``norm1``, ``mha`` → ``attn`` (attention alone: no norm before it, no residual, no
    LayerScale; Eva/Beit attention also takes the context, see :func:`run_attention`), ``ln2`` → ``norm2``,
    ``fc1`` → ``mlp.fc1`` (before the activation; a gated MLP's concatenated pre-gate projections, ``(B, N,
    2H)``: the fused ``fc1`` of GluMlp, a :class:`ConcatLinear` of SwiGLU's ``fc1_g`` and ``fc1_x``), ``fc2`` →
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
        if isinstance(block.mlp, SwiGLU):
            return ConcatLinear(block.mlp.fc1_g, block.mlp.fc1_x)
        return block.mlp.fc1
    if comp == "fc2":
        return block.mlp.fc2
    raise ComponentError(f"'{component}' is not a per-block component; choose from {', '.join(BLOCK_COMPONENTS)}")


def mlp_activation(model: nn.Module, layer: int) -> nn.Module:
    """The MLP activation of block ``layer``: FC1's output → FC2's input width (before the MLP norm).

    ``mlp.act`` for a plain MLP; a :class:`GatedActivation` (gate and product) for GluMlp and SwiGLU.
    """
    mlp = model.blocks[layer].mlp  # type: ignore[index]
    if isinstance(mlp, SwiGLU):
        return GatedActivation(mlp.act, gate_first=True)
    if isinstance(mlp, GluMlp):
        return GatedActivation(mlp.act, gate_first=not mlp.gate_last)
    return mlp.act


def mlp_width(model: nn.Module, layer: int = 0) -> int:
    """The MLP hidden width H of block ``layer``: FC2's input width (FC1's output is 2H in a gated MLP)."""
    return int(model.blocks[layer].mlp.fc2.in_features)  # type: ignore[index]


# The tensors of :func:`block_trace`, in forward order.
TRACE_POINTS: tuple[str, ...] = (
    "x",
    "ln1",
    "attn",
    "mha",
    "res1",
    "ln2",
    "fc1",
    "act",
    "fc2_in",
    "fc2_out",
    "fc2",
    "res2",
)
# Each component's (input, output) in a :func:`block_trace`: what it really receives and computes in the forward.
COMPONENT_IO: dict[str, tuple[str, str]] = {
    "ln1": ("x", "ln1"),
    "mha": ("ln1", "attn"),
    "ln2": ("res1", "ln2"),
    "fc1": ("ln2", "fc1"),
    "fc2": ("fc2_in", "fc2_out"),
}


def block_trace(
    model: nn.Module, layer: int, x: torch.Tensor, ctx: BlockContext | None = None
) -> dict[str, torch.Tensor]:
    """Block ``layer`` piece by piece on tokens ``x`` ``(B, N, D)``, every intermediate kept.

    Keys (:data:`TRACE_POINTS`): ``x`` (the block input), ``ln1``, ``attn`` (the attention output, before
    LayerScale), ``mha`` (the attention branch, LayerScale included), ``res1 = x + mha``, ``ln2``, ``fc1`` (FC1
    output before the activation; ``(B, N, 2H)`` pre-gate for gated MLPs), ``act`` (after the activation / gate,
    ``(B, N, H)``), ``fc2_in`` (FC2's real input: ``act`` through the MLP norm when there is one), ``fc2_out``
    (FC2's output), ``fc2`` (the MLP branch, LayerScale included), ``res2 = res1 + fc2`` (the block output,
    equal to :func:`run_block`). :data:`COMPONENT_IO` names each component's input and output among them.

    Dropout and stochastic depth are skipped: the model is assumed in eval mode. ``ctx`` may be left out for a
    ``vit``.
    """
    ctx = _context_for(model, ctx)
    block = model.blocks[layer]  # type: ignore[index]
    ls1, ls2 = layer_scales(model, layer)
    ln1 = block.norm1(x)
    attn = block.attn(ln1, **ctx.kwargs(layer))  # (B, N, D)
    mha = ls1(attn)
    res1 = x + mha
    ln2 = block.norm2(res1)
    fc1 = block_module(model, layer, "fc1")(ln2)  # (B, N, H) or (B, N, 2H) pre-gate
    act = mlp_activation(model, layer)(fc1)  # (B, N, H)
    fc2_in = block.mlp.norm(act) if hasattr(block.mlp, "norm") else act
    fc2_out = block.mlp.fc2(fc2_in)  # (B, N, D)
    fc2 = ls2(fc2_out)
    res2 = res1 + fc2
    return {
        "x": x,
        "ln1": ln1,
        "attn": attn,
        "mha": mha,
        "res1": res1,
        "ln2": ln2,
        "fc1": fc1,
        "act": act,
        "fc2_in": fc2_in,
        "fc2_out": fc2_out,
        "fc2": fc2,
        "res2": res2,
    }


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
