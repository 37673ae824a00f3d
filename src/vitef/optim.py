"""Optimisers, learning-rate schedules and gradient clipping for finetuning (arXiv 2602.06883, §4).

The paper finetunes with SGD (momentum 0.9, no weight decay), a linear warmup of 2,000 steps followed
by a cosine decay to 0, and gradient clipping at global norm 1.0; its ablation swaps in AdamW with
betas (0.9, 0.999). :class:`OptimConfig` is the ``optim:`` sub-config of the training app.

Schedules are a multiplicative factor of ``lr`` as a function of the optimiser step ``s`` (0-based,
the factor applies to update ``s + 1``):

- warmup (``s < warmup_steps``): ``(s + 1) / warmup_steps`` — the first update already moves;
- then, with ``p = (s - warmup_steps) / (total - warmup_steps)`` in ``[0, 1)``:
  ``constant`` → 1, ``linear`` → ``m + (1 - m)(1 - p)``, ``cosine`` → ``m + (1 - m)(1 + cos(pi p)) / 2``,
  where ``m`` is ``min_factor`` (0: decay to 0 as in the paper).

Layer-wise learning-rate decay (BEiT; timm's ``--layer-decay``), ``layer_decay`` below 1: the trainable
parameters are grouped by depth with timm's ``param_groups_layer_decay`` (the model's ``group_matcher``: the
embedding is layer 0, block ``i`` layer ``i + 1``, the head the last layer ``depth + 1``; timm puts the final norm
with the last block), and each group's peak learning rate is ``lr × layer_decay^(depth + 1 − layer)``: the head
trains at ``lr``, block ``i`` at ``lr × layer_decay^(depth − i)``, the embedding at ``lr × layer_decay^(depth + 1)``.
The schedule multiplies every group alike. Weight decay stays as configured on every parameter (timm's exemption
of 1-D parameters is undone), so ``layer_decay`` changes the learning rates and nothing else;
``layer_decay=1`` (the default) is one group, today's optimiser.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from vitef.config import option
from vitef.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("constant", "linear", "cosine")


@dataclasses.dataclass
class OptimConfig:
    """Optimiser, learning-rate schedule, clipping and gradient accumulation."""

    name: str = option("sgd", "optimiser: sgd or adamw")
    lr: float = option(1e-2, "peak learning rate (after warmup)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "SGD Nesterov momentum")
    weight_decay: float = option(0.0, "weight decay (decoupled for adamw)")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    scheduler: str = option("cosine", "schedule after warmup: constant, linear or cosine")
    warmup_steps: int = option(2000, "linear warmup steps")
    min_factor: float = option(0.0, "final learning rate as a fraction of lr (linear/cosine)")
    clip_grad: float | None = option(1.0, "clip the global gradient norm to this value (null or 0: off)")
    grad_accumulation: int = option(1, "micro-batches accumulated per update (batch_size is the full batch)")
    layer_decay: float = option(1.0, "layer-wise lr decay in (0, 1]: block i trains at lr × decay^(depth − i) (1: off)")

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name='{self.name}' is unknown: choose one of {', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"optim.scheduler='{self.scheduler}' is unknown: choose one of {', '.join(SCHEDULERS)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be a positive number (e.g. lr=1e-2)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum={self.momentum} must be in [0, 1)")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ConfigError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9,0.999]")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps={self.eps} must be positive")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_factor <= 1:
            raise ConfigError(f"optim.min_factor={self.min_factor} must be in [0, 1]")
        if self.clip_grad is not None and (not math.isfinite(self.clip_grad) or self.clip_grad < 0):
            raise ConfigError(f"optim.clip_grad={self.clip_grad} must be >= 0 (0 or null turns clipping off)")
        if self.grad_accumulation < 1:
            raise ConfigError(f"optim.grad_accumulation={self.grad_accumulation} must be >= 1")
        if not (math.isfinite(self.layer_decay) and 0 < self.layer_decay <= 1):
            raise ConfigError(
                f"optim.layer_decay={self.layer_decay} must be in (0, 1]: e.g. 0.75 (BEiT's), or 1.0 to turn it off"
            )


def build_optimizer(
    params: Iterable[nn.Parameter], cfg: OptimConfig, model: nn.Module | None = None
) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over ``params`` (pass only the trainable ones).

    With ``cfg.layer_decay < 1``, ``model`` (a timm ViT, the owner of ``params``) gives the layer of each trainable
    parameter, and the optimiser holds one group per layer (:func:`layer_decay_groups`).

    Raises
    ------
    ConfigError
        When ``params`` is empty (nothing would train), or layer decay without ``model``.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check `trainable` (e.g. trainable=[mha] or trainable=[all])")
    fast = implementation(params)
    groups: list[nn.Parameter] | list[dict] = params
    if cfg.layer_decay < 1:
        if model is None:
            raise ConfigError("optim.layer_decay < 1 needs the model to group parameters by layer")
        groups = layer_decay_groups(model, cfg, params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay, **fast
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay, **fast
        )
    raise ConfigError(f"optim.name='{cfg.name}' is unknown: choose one of {', '.join(OPTIMIZERS)}")


def layer_decay_groups(model: nn.Module, cfg: OptimConfig, params: Sequence[nn.Parameter]) -> list[dict]:
    """Parameter groups of the trainable parameters of ``model`` by layer, from timm's ``param_groups_layer_decay``.

    Each group holds ``lr = cfg.lr × lr_scale`` (its peak learning rate, which the schedule then scales) and keeps
    timm's ``lr_scale``; ``weight_decay`` is ``cfg.weight_decay`` for all. ``params`` must be exactly the trainable
    parameters of ``model`` (checked: a parameter in neither would silently not train).
    """
    from timm.optim import param_groups_layer_decay  # timm's grouping (model.group_matcher), not a copy of it

    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    grouped = {id(p) for g in groups for p in g["params"]}
    if grouped != {id(p) for p in params}:
        raise ConfigError("optim.layer_decay: the parameters to train are not the model's trainable parameters")
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
        g["weight_decay"] = cfg.weight_decay  # timm exempts 1-D parameters; vitef decays all alike, as without groups
    return groups


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the schedule: the largest of the groups' (all alike without layer decay)."""
    return max(g["lr"] for g in optimizer.param_groups)


def implementation(params: Sequence[torch.Tensor]) -> dict[str, bool]:
    """The optimiser implementation for ``params``: ``{"fused": True}`` when they all live on CUDA, else ``{}``.

    The fused kernels update every parameter in one launch and take GradScaler's scale and overflow flag on the
    device (no host sync under fp16); torch's default on CUDA is the multi-tensor ``foreach`` path, a few
    launches per update. On other devices torch's default is kept, so CPU results are what they always were.
    """
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The schedule's multiplier of ``cfg.lr`` for 0-based optimiser step ``step`` (see module doc)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    decay = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max((step - cfg.warmup_steps) / decay, 0.0), 1.0)
    m = cfg.min_factor
    if cfg.scheduler == "linear":
        return m + (1.0 - m) * (1.0 - progress)
    if cfg.scheduler == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.scheduler='{cfg.scheduler}' is unknown: choose one of {', '.join(SCHEDULERS)}")


class _Schedule:
    """Picklable-free callable for ``LambdaLR`` (its state is the config, not a closure)."""

    def __init__(self, total_steps: int, cfg: OptimConfig):
        self.total_steps = total_steps
        self.cfg = cfg

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor` over ``total_steps`` optimiser updates.

    Call ``scheduler.step()`` once after each ``optimizer.step()``.
    """
    if total_steps < 1:
        raise ConfigError(f"the schedule needs at least one step, got steps={total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(total_steps, cfg))


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """The scheduler's state without its schedule object (weights-only loadable: numbers only)."""
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Restore :func:`scheduler_state` (the schedule itself comes from the config)."""
    full = scheduler.state_dict()
    full.update(state)
    scheduler.load_state_dict(full)


def grad_norms(
    named_params: Sequence[tuple[str, nn.Parameter]], groups: dict[str, str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total L2 norm of the gradients and the norm of each group (e.g. each component).

    Parameters
    ----------
    named_params
        ``(name, parameter)`` pairs; parameters without a gradient are skipped.
    groups
        Parameter name → group name (``vitef.models.component_of(name).component``).

    Returns
    -------
    total, per_group
        Float32 tensors on the gradients' device (no host sync here; call ``.item()`` when logging).
    """
    named = [(n, p.grad) for n, p in named_params if p.grad is not None]
    if not named:
        return torch.zeros(()), {}
    # A handful of kernels whatever the number of tensors: one fused norm over every gradient, the squares of the
    # norms ordered by group, one sum per group: 16 operations on a ViT-B's 152 tensors. Squared one tensor at a
    # time they were 184, launches queued on the host before the step's one sync.
    order: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(named):
        order.setdefault(groups[name], []).append(i)
    norms = torch._foreach_norm([g for _, g in named], 2.0)  # one fused kernel over every tensor
    squares = torch.stack([norms[i].float() for idx in order.values() for i in idx]).square()  # (P,)
    sums = torch.stack([s.sum() for s in squares.split([len(idx) for idx in order.values()])])  # (G,)
    total = sums.sum().sqrt()
    per_group = dict(zip(order, sums.sqrt().unbind(0)))
    return total, per_group


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float | None, total_norm: torch.Tensor) -> None:
    """Scale gradients in place so their global norm is at most ``max_norm`` (no-op when off).

    ``total_norm`` is the pre-clipping norm from :func:`grad_norms`, so the norm is computed once.
    """
    if not max_norm:
        return
    grads = [p for p in params if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total_norm)
