"""Finetuning methods on a timm ViT beyond full finetuning: BitFit, LoRA, DoRA and LP-FT (issue 12's baselines).

BitFit (Ben Zaken et al., 2022) trains only the biases: :func:`train_biases` keeps, of the parameters that
:func:`vitef.models.set_trainable` made trainable, the bias vectors (:data:`BIAS_SUFFIXES`: linear, patch-projection
and LayerNorm ``.bias``, and the query/value biases ``q_bias`` / ``v_bias`` that BEiT and EVA-02 keep beside their
fused ``qkv`` weight), plus the head, which always trains. BEiT's relative position bias tables are position
tables, not bias vectors of a layer: BitFit leaves them frozen.

LoRA (Hu et al., 2022) through HF PEFT: :func:`add_lora` wraps Linear modules of the chosen blocks with PEFT's
``lora.Linear`` (``W x + (alpha / r) B A x``, ``B`` initialised to zero so the wrapped model starts as the
pretrained one). The Linear modules of a block (:data:`LORA_MODULES`) are ``qkv`` and ``proj`` (component ``mha``:
the query/key/value projection, fused ``attn.qkv`` or, in EVA-02 CLIP, the three ``attn.q_proj`` / ``k_proj`` /
``v_proj``, whichever the block has; and the output projection), ``fc1`` (``mlp.fc1``, or a SwiGLU's
``mlp.fc1_g`` and ``mlp.fc1_x``) and ``fc2``; :class:`LoraConfig` says which of them, ``trainable`` (components or
units, as for full finetuning) in which blocks. The wrapped model keeps the timm class and names
(``blocks.0.attn.qkv.base_layer.weight``, ``blocks.0.attn.qkv.lora_A.default.weight``), so the component registry
still assigns every parameter. :func:`merged_model` merges the adapters into a copy with PEFT's
``merge_and_unload``: a plain timm model whose state dict is the timm layout every reader loads.
:func:`merged_state_dict` gives that state dict without the copy (new tensors for the adapted weights only), for
saving checkpoints.

DoRA (Liu et al., ICML 2024, weight-decomposed low-rank adaptation) through PEFT's ``use_dora``: :func:`add_lora` with
``dora=True`` wraps the same modules with the same ``A`` / ``B`` and adds to each a magnitude vector ``m`` (one entry
per output row, ``blocks.0.attn.qkv.lora_magnitude_vector.default.weight``, initialised to the row norms of the
pretrained weight, so the wrapped model starts as the pretrained one); the adapted layer computes with
``m * (W + s B A) / ||W + s B A||``, the norm taken over each output row and treated as a constant in backward.
The magnitudes train with the adapters, are saved and restored with them, and lie in the adapted module's component
for the registry. Merging gives that weight: a plain timm model again.

BEiT and EVA-02 attention with ``q_bias`` / ``v_bias`` compute the fused projection as
``F.linear(x, qkv.weight, bias)``, which reads the weight and would skip an adapter wrapped around ``qkv``.
:func:`add_lora` therefore sets timm's own ``qkv_bias_separate`` switch on those modules (``qkv(x)`` then
``+ bias``: the same function, through the wrapped module); :func:`merged_model` sets it back on the merged copy.

LP-FT (Kumar et al., 2022) first fits a linear probe on the frozen pretrained features, then finetunes from it:
:func:`fit_probe_head` sets the head to the multinomial logistic regression of :mod:`vitef.probe.solver` fitted on
what the head sees (the final norm and pooling of the eval-mode model).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from vitef.config import option
from vitef.errors import CheckpointError, ConfigError
from vitef.models.components import component_of, num_blocks, parse_unit

logger = logging.getLogger(__name__)

# The Linear modules LoRA may adapt: name → (component, the layouts of its paths inside a block). A block has one
# layout: the first whose paths are all Linear modules of the block.
LORA_MODULES: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "qkv": ("mha", (("attn.qkv",), ("attn.q_proj", "attn.k_proj", "attn.v_proj"))),
    "proj": ("mha", (("attn.proj",),)),
    "fc1": ("fc1", (("mlp.fc1",), ("mlp.fc1_g", "mlp.fc1_x"))),
    "fc2": ("fc2", (("mlp.fc2",),)),
}
ADAPTER_NAME = "default"  # PEFT's name of the one adapter
# The finetuning methods (apps.vit.train's method=) that wrap Linear modules with these adapters (lora.* options).
ADAPTER_METHODS = ("lora", "dora")
# The parameter names BitFit trains: bias vectors, incl. BEiT / EVA-02's q/v biases beside a fused qkv.
BIAS_SUFFIXES: tuple[str, ...] = (".bias", ".q_bias", ".v_bias")
# The parameter names of an adapter's trained tensors: LoRA's factors and DoRA's magnitude vector.
ADAPTER_MARKERS: tuple[str, ...] = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")
# Marks an attention whose qkv_bias_separate add_lora switched on (merged_model switches it back off).
_SEPARATED = "_vitef_lora_separated_bias"


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters (method=lora): rank, scale, dropout and which Linear modules of the trainable blocks."""

    rank: int = option(8, "rank r of the adapters")
    alpha: float = option(16.0, "scale numerator: the update is (alpha / rank) B A")
    dropout: float = option(0.0, "dropout on the adapters' input")
    modules: list[str] = option(
        ["qkv", "proj", "fc1", "fc2"],
        f"Linear modules adapted in the blocks of `trainable`: {', '.join(LORA_MODULES)} (qkv, proj: mha; qkv is "
        "attn.qkv or attn.q_proj/k_proj/v_proj, fc1 is mlp.fc1 or a SwiGLU's mlp.fc1_g/fc1_x)",
    )

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank} must be >= 1 (e.g. 8)")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be positive (e.g. 16)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        bad = [m for m in self.modules if m not in LORA_MODULES]
        if bad or not self.modules:
            raise ConfigError(
                f"lora.modules={list(self.modules)}: choose among {', '.join(LORA_MODULES)} (e.g. [qkv,proj] for mha)"
            )
        self.modules = list(dict.fromkeys(self.modules))


# ---------------------------------------------------------------------------------------------------
# BitFit
# ---------------------------------------------------------------------------------------------------


def train_biases(model: nn.Module) -> dict[str, int]:
    """BitFit: freeze every trainable parameter that is not a bias, except the head's; returns the trainable
    parameter count per component.

    Raises
    ------
    ConfigError
        When no bias outside the head is trainable (e.g. components without biases).
    """
    kept = 0
    for name, p in model.named_parameters():
        if not p.requires_grad or component_of(name).component == "head":
            continue
        if name.endswith(BIAS_SUFFIXES):
            kept += p.numel()
        else:
            p.requires_grad_(False)
    if not kept:
        raise ConfigError(
            "method=bitfit: the components of `trainable` have no biases; choose others (trainable=[all])"
        )
    return trainable_counts(model)


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per component (components with none omitted), in registry order."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            comp = component_of(name).component
            counts[comp] = counts.get(comp, 0) + p.numel()
    return counts


# ---------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------


def lora_paths(block: nn.Module, module: str) -> tuple[str, ...]:
    """The paths inside ``block`` of the Linear layers :data:`LORA_MODULES` names ``module``: ``("attn.qkv",)`` or
    ``("attn.q_proj", "attn.k_proj", "attn.v_proj")`` for ``qkv``, ``("mlp.fc1",)`` or ``("mlp.fc1_g", "mlp.fc1_x")``
    for ``fc1``.

    Raises
    ------
    ConfigError
        When the block has none of the layouts (the message names them).
    """
    _, layouts = LORA_MODULES[module]
    for paths in layouts:
        if all(_linear_at(block, p) is not None for p in paths):
            return paths
    known = " or ".join("+".join(paths) for paths in layouts)
    raise ConfigError(
        f"lora.modules: {type(block).__name__} has no Linear {known} for '{module}'; leave {module} out of lora.modules"
    )


def _linear_at(block: nn.Module, path: str) -> nn.Linear | None:
    """The Linear module at ``path`` in ``block`` (None when there is none: EVA-02 CLIP's ``attn.qkv`` is None)."""
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def lora_targets(model: nn.Module, trainable: Iterable[str], modules: Iterable[str], method: str = "lora") -> list[str]:
    """The module names LoRA wraps: each of ``modules`` whose component ``trainable`` covers, in each block it covers
    (``qkv`` is one fused Linear or three, ``fc1`` one or two: :func:`lora_paths`).

    ``trainable`` holds components or units (``all``, ``mha``, ``fc1.0-5``); ``emb``, ``ln1``, ``ln2`` and
    ``head`` have no Linear module to adapt (the head trains in full anyway) and are refused, except within
    ``all``. ``method`` (``lora`` or ``dora``) is the name the error messages give.

    Raises
    ------
    ConfigError
        A component without Linear modules, or a choice that adapts nothing.
    """
    depth = num_blocks(model)
    units = [parse_unit(u) for u in trainable]
    for unit in units:
        unit.check_depth(depth)
        if unit.component not in ("all", "mha", "fc1", "fc2"):
            raise ConfigError(
                f"method={method} adapts Linear modules; trainable={unit.name} has none: choose among all, mha, fc1, "
                "fc2 (or their units, e.g. mha.6-11), or method=full to train it"
            )
    targets = []
    for layer in range(depth):
        for module in modules:
            comp, _ = LORA_MODULES[module]
            if any(u.component in ("all", comp) and (u.first is None or u.first <= layer <= u.last) for u in units):
                targets.extend(f"blocks.{layer}.{path}" for path in lora_paths(model.blocks[layer], module))
    if not targets:
        raise ConfigError(
            f"method={method}: lora.modules={list(modules)} has no module in trainable={list(trainable)}; e.g. "
            "trainable=[mha] with lora.modules=[qkv,proj]"
        )
    return targets


def add_lora(model: nn.Module, cfg: LoraConfig, trainable: Iterable[str], dora: bool = False):
    """Wrap the Linear modules of ``trainable`` × ``cfg.modules`` with LoRA adapters (HF PEFT), in place.

    ``dora=True`` makes them DoRA adapters (PEFT's ``use_dora``): the same ``A`` and ``B`` (the same draws) plus a
    magnitude vector per adapted module, set to the row norms of its pretrained weight. Only the adapters (and
    magnitudes) and the head train afterwards. Returns PEFT's ``PeftModel``: ``peft_model.base_model.model``
    is ``model`` itself (the timm class, its names with ``base_layer`` / ``lora_A`` / ``lora_B`` inside the adapted
    modules), what the training loop runs; the ``PeftModel`` is what :func:`merged_model` merges. The adapters'
    ``A`` is drawn from torch's global generator (seed it first), ``B`` is zero.
    """
    import peft

    targets = lora_targets(model, trainable, cfg.modules, method="dora" if dora else "lora")
    for target in targets:
        if target.endswith(".attn.qkv"):
            _route_bias_through_qkv(model.get_submodule(target.removesuffix(".qkv")))
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        use_dora=dora,
    )
    wrapped = peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    adapters = {id(p) for n, p in model.named_parameters() if _is_adapter(n)}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in adapters or component_of(name).component == "head")
    logger.info(
        "%s rank %d alpha %g on %d modules: %s",
        "DoRA" if dora else "LoRA", cfg.rank, cfg.alpha, len(targets), ", ".join(targets),
    )  # fmt: skip
    return wrapped


def _route_bias_through_qkv(attn: nn.Module) -> None:
    """Make a BEiT / EVA-02 attention call its ``qkv`` module (then add ``q_bias``/``v_bias``) instead of
    ``F.linear(x, qkv.weight, bias)``, which would bypass an adapter on ``qkv``; marked for :func:`merged_model`."""
    if getattr(attn, "q_bias", None) is not None and getattr(attn, "qkv_bias_separate", True) is False:
        attn.qkv_bias_separate = True
        setattr(attn, _SEPARATED, True)


def _is_adapter(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (``lora_A`` / ``lora_B``, and DoRA's ``lora_magnitude_vector``) of a wrapped model, by
    name, detached on the CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if _is_adapter(n)}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy :func:`adapter_state` back into a model wrapped the same way (bit-exact)."""
    params = {n: p for n, p in model.named_parameters() if _is_adapter(n)}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ConfigError(
            f"the checkpoint's LoRA adapters do not fit the model (missing {missing[:3]}, unexpected {extra[:3]}): "
            "did lora.* or trainable change? use overwrite=true"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def load_merged(model: nn.Module, path: str | Path) -> None:
    """Load a merged checkpoint (timm layout) into a wrapped model, except the adapted modules' weights.

    Every tensor outside the adapted modules (head, frozen components) is copied bit for bit; the adapted modules
    keep the frozen pretrained weights the model was built with (``base_layer``), since a merged weight is the base
    plus the adapters' product and cannot be split back exactly: load the adapters with :func:`load_adapter_state`.

    Raises
    ------
    CheckpointError
        An unreadable file, or one whose names or shapes do not fit the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    own = model.state_dict()
    plain = {n: t for n, t in own.items() if ".base_layer." not in n and not _is_adapter(n)}
    merged = {n.replace(".base_layer.", "."): t for n, t in own.items() if ".base_layer." in n}
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"'{path}' is not a readable safetensors file ({e}); use overwrite=true") from e
    expected = {n: t.shape for n, t in {**plain, **merged}.items()}
    found = {n: t.shape for n, t in state.items()}
    if expected != found:
        wrong = sorted(n for n in set(expected) | set(found) if expected.get(n) != found.get(n))
        raise CheckpointError(f"'{path}' does not fit the LoRA model ({', '.join(wrong[:3])}); use overwrite=true")
    with torch.no_grad():
        for name, tensor in plain.items():
            tensor.copy_(state[name])


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the frozen weights the adapters sit on (``base_layer``), to check a resume rebuilt the same ones."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if ".base_layer." in name:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def merged_model(wrapped) -> nn.Module:
    """A plain timm model with the adapters merged into the weights (PEFT's ``merge_and_unload`` on a copy).

    ``wrapped`` (the ``PeftModel`` of :func:`add_lora`) is left as it is; the copy has the timm layout and names, and
    its attention modules compute as a freshly built timm model does (``qkv_bias_separate`` as it was).
    """
    with torch.no_grad():
        merged = copy.deepcopy(wrapped).merge_and_unload()
    for module in merged.modules():
        if getattr(module, _SEPARATED, False):
            module.qkv_bias_separate = False
            delattr(module, _SEPARATED)
    return merged


def merged_state_dict(wrapped, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of :func:`merged_model`, computed one adapted module at a time, without copying the model.

    Same keys in the same order (timm names: ``blocks.0.attn.qkv.weight``, no ``base_layer`` / ``lora_*``), shapes,
    dtypes and values bit for bit as ``merged_model(wrapped).state_dict()``: each adapted Linear's weight is its
    base weight plus PEFT's own ``get_delta_weight`` (``(B @ A) * alpha / r``, ``fan_in_fan_out`` and the
    half-precision-on-CPU cast included), added in place to a copy as ``merge`` adds it to the weight. A DoRA
    adapter's weight is ``m / ||W + delta|| * (W + delta)`` as PEFT's merge computes it: the norm is PEFT's
    ``get_weight_norm`` of the base weight plus the delta (over each output row, in the dtype of that sum), the
    quotient ``m / norm`` scales each row, and the product is cast to the base weight's dtype. Adapters that
    are inactive or already merged into the base weight are skipped, as ``merge`` skips them. The attention
    attributes :func:`merged_model` resets (``qkv_bias_separate``, the marker of :func:`add_lora`) and the
    adapters' dropout are not state and do not enter.

    Only the adapted weights are new tensors (on ``device``, by default the weight's own). Every other entry is the
    live tensor of the wrapped model (detached, sharing its storage): save the dict right away and do not modify its
    tensors, or the model (and the dict, after a training step) changes with them.

    Parameters
    ----------
    wrapped
        The ``PeftModel`` of :func:`add_lora`; left as it is.
    device
        Where the merged weights go. Each is computed on its module's device (the same arithmetic as
        ``merge_and_unload``) and then moved: ``"cpu"`` for a model on an accelerator bounds the accelerator's
        extra memory to one adapted module (its delta and merged weight; DoRA's norm adds a few weight-sized
        temporaries) instead of all merged weights.

    Raises
    ------
    NotImplementedError
        For adapted modules :func:`add_lora` does not make (another PEFT layer type, LoRA variants other than DoRA,
        ``lora_bias``, nested adapters, a DoRA adapter beside other adapters), whose merge this function does not
        reproduce: use :func:`merged_model`.
    """
    model = wrapped.get_base_model()
    layers = {name: m for name, m in model.named_modules() if _is_tuner_layer(m)}  # the adapted modules
    for name, module in layers.items():
        _check_mergeable(name, module)
    state: dict[str, torch.Tensor] = {}
    # state_dict() lists an adapter layer's base_layer entries first (its first child), then lora_A / lora_B /
    # ...: dropping those and the ".base_layer" segment gives the merged model's keys in its order.
    for key, tensor in model.state_dict().items():
        prefix = _owner(key, layers)
        if prefix is None:
            state[key] = tensor
            continue
        inner = key[len(prefix) + 1 :]
        if not inner.startswith("base_layer."):
            continue  # lora_A, lora_B, ...: merged away
        inner = inner.removeprefix("base_layer.")
        state[f"{prefix}.{inner}"] = _merged_weight(layers[prefix], device) if inner == "weight" else tensor
    return state


def _owner(key: str, layers: dict[str, nn.Module]) -> str | None:
    """The adapter layer (a key of ``layers``) that state-dict entry ``key`` lies in, or None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _pending(layer: nn.Module) -> list[str]:
    """The adapters of ``layer`` that ``merge_and_unload`` merges: active, with LoRA factors, not merged yet."""
    return [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]


def _is_dora(layer: nn.Module, adapter: str) -> bool:
    from peft.tuners.lora.variants import DoraLinearVariant

    return isinstance(getattr(layer, "lora_variant", {}).get(adapter), DoraLinearVariant)


def _check_mergeable(name: str, module: nn.Module) -> None:
    """Refuse the adapter layers whose merge :func:`_merged_weight` would not reproduce."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    why = None
    if type(module) is not LoraLinear:
        why = f"a {type(module).__name__}, not a LoRA Linear"
    elif _is_tuner_layer(module.base_layer):
        why = "nested adapter layers"
    elif any(a in getattr(module, "lora_variant", {}) and not _is_dora(module, a) for a in module.lora_A):
        why = "a LoRA variant other than DoRA"
    elif any(getattr(module, "lora_bias", {}).get(a, False) for a in module.lora_A):
        why = "lora_bias"
    elif any(_is_dora(module, a) for a in _pending(module)) and (len(_pending(module)) > 1 or module.merged_adapters):
        # PEFT's DoRA merge takes the norm of the weight with the other adapters unmerged and merged back again
        # (round trips that change low-precision bits): not reproduced; add_lora makes one adapter.
        why = "a DoRA adapter beside other adapters"
    if why:
        raise NotImplementedError(f"merged_state_dict: {name} has {why}, which add_lora never makes; use merged_model")


def _merged_weight(layer: nn.Module, device: torch.device | str | None) -> torch.Tensor:
    """``layer``'s base weight with its active, not yet merged adapters merged, as PEFT's ``merge`` (not safe_merge,
    as ``merge_and_unload`` calls it) merges them."""
    weight = layer.get_base_layer().weight.detach()
    adapters = _pending(layer)
    if not adapters:  # merge_and_unload leaves the weight as it is
        return weight if device is None else weight.to(device)
    with torch.no_grad():
        if _is_dora(layer, adapters[0]):  # then the only pending adapter (_check_mergeable)
            merged = _dora_merged(layer, adapters[0], weight)
        else:
            merged = weight.clone()
            for adapter in adapters:
                # merge does ``weight.data += delta``: the same in-place add on a copy gives the same bits.
                merged += layer.get_delta_weight(adapter)
    return merged if device is None else merged.to(device)


def _dora_merged(layer: nn.Module, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """The DoRA-merged weight ``m / ||W + delta|| * (W + delta)``: the operations of PEFT's ``merge_unsafe`` on the
    base weight ``W``, in its order and dtypes (the norm over each output row by PEFT's ``get_weight_norm``)."""
    from peft.utils.other import transpose

    delta = layer.get_delta_weight(adapter)  # (B @ A) * alpha / r, in the adapters' dtype
    magnitude = layer.lora_magnitude_vector[adapter]
    norm = magnitude.get_weight_norm(weight, transpose(delta, layer.fan_in_fan_out), scaling=1).detach()
    scale = transpose((magnitude.weight / norm).view(-1, 1), layer.fan_in_fan_out)
    return (scale * (weight + delta)).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------
# LP-FT
# ---------------------------------------------------------------------------------------------------


def head_features(
    model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head of a timm ViT sees on every image of ``loader``: ``(features (n, d) float32, labels (n,))``.

    ``model.forward_head(model.forward_features(x), pre_logits=True)`` in eval mode (final norm, pooling, the
    optional ``fc_norm``), without gradients, under ``precision``'s autocast; the model's train/eval mode is
    restored afterwards.
    """
    from vitef.utils import autocast_context, precision_scope

    device = torch.device(device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        with torch.inference_mode(), precision_scope(precision):
            for images, targets in loader:
                with autocast_context(device, precision):
                    x = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
                feats.append(x.float().cpu())
                labels.append(torch.as_tensor(targets).long().cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ConfigError("method=lp_ft: the train split yielded no image to fit the linear probe on")
    return torch.cat(feats), torch.cat(labels)


def fit_probe_head(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    solver=None,
) -> dict:
    """LP-FT's first stage (Kumar et al., ICLR 2022): set ``model.head`` to a linear probe of the frozen model.

    The head's input features of ``loader`` (:func:`head_features`, eval mode) are fitted with
    :func:`vitef.probe.fit_logreg` (scikit-learn's default multinomial ``LogisticRegression`` objective: L2 with
    ``C=1``, unpenalised intercept; deterministic L-BFGS from zero) on the raw features, with no preprocessing,
    so the solution is exactly the head's weight and bias: the head's logits are the probe's decision values.
    ``solver`` is a :class:`vitef.probe.SolverConfig` (default: its defaults, on ``device``).

    Returns the probe's record: ``train_acc`` (the head's accuracy on those features, in [0, 1]), ``n``, ``dim``,
    ``iterations``, ``converged``, ``loss`` (the solver's mean-scaled objective).

    Raises
    ------
    ConfigError
        When the model's head is not a Linear layer of ``num_classes`` outputs.
    """
    from vitef.probe import SolverConfig, fit_logreg

    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        raise ConfigError(
            f"method=lp_ft needs a Linear head of {num_classes} classes (model.head is {type(head).__name__}): "
            "use method=full with this model"
        )
    X, y = head_features(model, loader, device, precision)
    cfg = solver or SolverConfig(device=str(device))
    fit = fit_logreg(X.unsqueeze(0), y, num_classes, cfg)
    with torch.no_grad():
        head.weight.copy_(fit.weight[0].to(head.weight))
        head.bias.copy_(fit.bias[0].to(head.bias))
        logits = X.to(head.weight) @ head.weight.T + head.bias
    record = {
        "train_acc": float((logits.argmax(-1).cpu() == y).double().mean()),
        "n": int(y.numel()),
        "dim": int(X.shape[1]),
        "iterations": int(fit.n_iter[0]),
        "converged": bool(fit.converged[0]),
        "loss": float(fit.loss[0]),
    }
    logger.info(
        "LP-FT: linear probe head fitted on %d images (%d features): train acc %.2f%%, %d L-BFGS iterations%s",
        record["n"], record["dim"], 100 * record["train_acc"], record["iterations"],
        "" if record["converged"] else " (not converged)",
    )  # fmt: skip
    return record
