"""The step cost of each finetuning method in one harness: full, BitFit, LoRA, DoRA, LN-only, MHA-only, a 10 % pick.

    python -m benchmarks.methods                                  # ViT-S/16, batch 8, 224 px, random init, CPU
    python -m benchmarks.methods steps=10 warmup=2                # longer, steadier run
    python -m benchmarks.methods variants=[lora,dora]             # chosen variants (full always runs: the baseline)
    python -m benchmarks.methods model=vit_tiny_patch16_224 img_size=64 steps=2   # quick smoke run
    python -m benchmarks.methods device=cuda batch_size=128 precision=bf16 steps=20 warmup=3

"Which parameters should I train under my budget, and does it beat LoRA / DoRA / BitFit?": the budget is also
compute. Each variant is what ``apps.vit.train`` trains for one method, applied in the app's order
(:func:`apply_method`: ``set_trainable(trainable)``, then ``train_biases`` for ``bitfit`` or ``add_lora`` for
``lora`` / ``dora``):

- ``full``: ``trainable=[all]`` (the baseline of the ratios; it always runs, first);
- ``bitfit``: ``method=bitfit``, the biases of every block (+ head);
- ``lora``, ``dora``: ``method=lora`` / ``method=dora`` with :class:`vitef.adapters.LoraConfig`'s defaults (rank 8,
  alpha 16 on qkv, proj, fc1, fc2 of every block);
- ``ln``: ``trainable=[ln1,ln2]``; ``mha``: ``trainable=[mha]``;
- ``select10``: ``select.criterion=random select.budget=0.1`` (seeded by ``seed``, as the app seeds it): the units
  a 10 % budget picks under the plasticity-independent ``random`` criterion (:func:`vitef.selection.select`, no
  data read), trained in full. Which units does not matter much here: the point is the cost of training ~10 % of
  the backbone in whole units.

Each variant has its own model (the methods wrap or freeze models in place, so they cannot share one), built
like the app builds it: ``set_seed(seed)`` and the same random-init architecture, so every copy starts from the
same weights (and LoRA and DoRA from the same adapter draws); every variant reads the same fixed batch and steps
through :func:`apps.vit.train.train_step` with SGD momentum 0.9 (or ``optimizer=adamw``), cosine schedule,
clipping at 1.0 (the app's step; without the metrics row written by ``benchmarks.train``'s ``ours`` loop).

Timing, as ``benchmarks.train`` does (its helpers): the variants run round-robin, one step each in turn, so that
load from other processes on a shared machine hits them alike; each time is the median over ``steps`` timed steps
after ``warmup`` untimed ones. ``vs full`` is the time per step over ``full``'s, measured in the same run.

Memory. Per variant, exactly from its tensors: ``weights`` (parameters and buffers of its model, adapters
included), ``grads`` (one gradient per trainable parameter, its size) and ``optim`` (the optimiser's state
tensors after the run: SGD's momentum buffers, AdamW's two moments). The whole run's peak is the process's peak
resident set on CPU (one figure: the variants' models live side by side, so a per-variant RSS does not exist), and
``torch.cuda.max_memory_allocated`` on CUDA. Round-robin also leaves every variant's model resident during each
step, so a per-variant CUDA peak is taken relative to what was allocated when its step began: ``step peak`` is,
over its timed steps, ``max_memory_allocated`` during the step (its peak stats reset at the step's start) minus
``memory_allocated`` at the start: activations and temporaries of that step above what was resident (its own
weights, optimiser state and last gradients among them). A variant alone would need about weights + optim +
``step peak``, plus its gradients when they outlive the step's start. The machine may be shared: report the
numbers with that caveat.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

from apps.vit.train import Stepper, train_step
from benchmarks.train import fixed_batch, peak_mb, run
from vitef.adapters import ADAPTER_METHODS, LoraConfig, add_lora, train_biases
from vitef.config import cli_main, option
from vitef.errors import ConfigError
from vitef.models import build_model, component_of, set_trainable
from vitef.optim import OptimConfig
from vitef.selection import SelectConfig, backbone_parameters, select
from vitef.utils import check_precision, resolve_device, set_seed


@dataclasses.dataclass(frozen=True)
class Method:
    """One variant as the app's options: ``method=``, ``trainable=`` and, for a selection, its budget."""

    method: str  # full, bitfit, lora, dora (apps.vit.train.METHODS)
    trainable: tuple[str, ...]
    select_budget: float = 0.0  # > 0: select.criterion=random select.budget=this (trainable stays [all])
    about: str = ""


VARIANTS: dict[str, Method] = {
    "full": Method("full", ("all",), about="every parameter"),
    "bitfit": Method("bitfit", ("all",), about="biases (+ head)"),
    "lora": Method("lora", ("all",), about="LoRA r8 on qkv, proj, fc1, fc2 (+ head)"),
    "dora": Method("dora", ("all",), about="DoRA r8 on qkv, proj, fc1, fc2 (+ head)"),
    "ln": Method("full", ("ln1", "ln2"), about="ln1, ln2 (+ head)"),
    "mha": Method("full", ("mha",), about="mha (+ head)"),
    "select10": Method("full", ("all",), select_budget=0.1, about="random units within 10 % (+ head)"),
}
BASELINE = "full"


@dataclasses.dataclass
class MethodsBenchConfig:
    """Time per training step, trainable parameters and memory of each finetuning method, in one harness."""

    model: str = option("vit_small_patch16_224", "timm ViT architecture (random init)")
    overrides: dict = option({}, "timm constructor arguments over the architecture's, e.g. {depth: 6}")
    img_size: int = option(224, "image side in pixels")
    batch_size: int = option(8, "images per step")
    num_classes: int = option(10, "classes of the fresh head")
    steps: int = option(5, "timed steps per variant")
    warmup: int = option(1, "untimed warm-up steps per variant")
    device: str = option("cpu", "cpu or cuda")
    precision: str = option("fp32", "fp32, tf32, bf16 or fp16 (the app's precision=)")
    optimizer: str = option("sgd", "sgd (momentum 0.9, the app's default) or adamw (two moments per parameter)")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    variants: list[str] = option(
        list(VARIANTS), f"of {', '.join(VARIANTS)}; {BASELINE} always runs (the baseline of the ratios)"
    )
    seed: int = option(0, "seed of the models' initialisation, the LoRA/DoRA draws and select10's random pick")

    def validate(self) -> None:
        for key in ("img_size", "batch_size", "num_classes", "steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.warmup < 0 or self.threads < 0:
            raise ConfigError("warmup and threads must be >= 0")
        check_precision(self.precision)
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer={self.optimizer!r} is unknown: choose sgd or adamw")
        self.variants = parse_variants(self.variants)


def parse_variants(names: list[str]) -> list[str]:
    """The variants to run, :data:`BASELINE` first (added when missing); a :class:`ConfigError` naming the fix."""
    if not names:
        raise ConfigError(f"variants=[] runs nothing: list some of {', '.join(VARIANTS)} (default: all of them)")
    wanted = [str(n).strip().lower() for n in names]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"variants: {', '.join(map(repr, unknown))} unknown: choose among {', '.join(VARIANTS)}")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"variants={list(names)} names a variant twice: list each once")
    return [BASELINE, *(n for n in wanted if n != BASELINE)]


def build(cfg: MethodsBenchConfig, device: torch.device) -> nn.Module:
    """The random-init model every variant starts from, seeded as the app seeds before building."""
    set_seed(cfg.seed)
    model = build_model(
        cfg.model, pretrained=False, num_classes=cfg.num_classes, img_size=cfg.img_size, **dict(cfg.overrides)
    )
    return model.to(device)


def apply_method(model: nn.Module, spec: Method, seed: int, device: torch.device) -> list[str]:
    """Make ``model`` train what ``apps.vit.train`` trains for ``spec``, in the app's order; the trainable list.

    The app (``train()``): the selection, scored with the global RNG states forked (``random`` reads
    ``numpy.random.default_rng(seed)`` only), then ``set_trainable(model, trainable)``, then ``train_biases`` for
    bitfit or ``add_lora(model, lora, trainable, dora=...)`` for lora and dora (its ``A`` drawn from torch's
    global generator right after the build, as in the app).
    """
    trainable = list(spec.trainable)
    if spec.select_budget:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            picked = select(model, SelectConfig(criterion="random", budget=spec.select_budget, seed=seed))
        trainable = picked.trainable
    set_trainable(model, trainable)
    if spec.method == "bitfit":
        train_biases(model)
    elif spec.method in ADAPTER_METHODS:
        add_lora(model, LoraConfig(), trainable, dora=spec.method == "dora")
    return trainable


@dataclasses.dataclass
class Prepared:
    """One variant ready to step: its model, the app's stepper over it and what it trains."""

    name: str
    model: nn.Module
    stepper: Stepper
    trainable: list[str]  # the trainable list the app would be given (select10: its pick)
    backbone: int  # parameters outside the head of the unwrapped model


def prepare(name: str, cfg: MethodsBenchConfig, device: torch.device) -> Prepared:
    """Build the variant's own model, apply its method and build the app's stepper (optimiser, schedule)."""
    model = build(cfg, device)
    backbone = backbone_parameters(model)
    trainable = apply_method(model, VARIANTS[name], cfg.seed, device)
    optim = OptimConfig(name=cfg.optimizer, lr=1e-3, warmup_steps=0)
    stepper = Stepper.build(model, model, optim, 1000, device, cfg.precision)
    return Prepared(name, model, stepper, trainable, backbone)


def stepper_fn(p: Prepared, cfg: MethodsBenchConfig, device: torch.device, peaks: dict[str, float]):
    """One training step of ``p`` on the fixed batch; on CUDA, ``peaks[p.name]`` keeps its largest peak above the
    memory resident at its start and ``peaks[""]`` the run's largest allocated peak."""
    batches = itertools.repeat(fixed_batch(cfg, device))

    def step() -> None:
        if device.type != "cuda":
            train_step(p.stepper, batches)
            return
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(p.stepper, batches)
        peak = torch.cuda.max_memory_allocated(device)
        peaks[p.name] = max(peaks.get(p.name, 0.0), (peak - resident) / 2**20)
        peaks[""] = max(peaks.get("", 0.0), peak / 2**20)

    return step


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclasses.dataclass
class Row:
    """What the table prints for one variant."""

    name: str
    seconds: float  # median time per step
    trainable: int  # parameters, head included
    backbone_share: float  # trainable parameters outside the head / backbone parameters
    weights: int  # bytes
    grads: int
    optim: int
    step_peak_mb: float | None = None  # CUDA only


def measure_row(p: Prepared, seconds: float, step_peak_mb: float | None = None) -> Row:
    """The variant's figures: exact counts and bytes from its tensors (optimiser state as it is now)."""
    named = [(n, q) for n, q in p.model.named_parameters() if q.requires_grad]
    outside_head = sum(q.numel() for n, q in named if component_of(n).component != "head")
    state = [t for s in p.stepper.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return Row(
        name=p.name,
        seconds=seconds,
        trainable=sum(q.numel() for _, q in named),
        backbone_share=outside_head / p.backbone,
        weights=_bytes(itertools.chain(p.model.parameters(), p.model.buffers())),
        grads=_bytes(q for _, q in named),
        optim=_bytes(state),
        step_peak_mb=step_peak_mb,
    )


def table(rows: list[Row], batch_size: int) -> list[str]:
    """The results table, one line per variant (``vs full``: time per step over the baseline's, first row)."""
    base = next(r.seconds for r in rows if r.name == BASELINE)
    cuda = any(r.step_peak_mb is not None for r in rows)
    width = max(10, *(len(r.name) + 2 for r in rows))
    head = (
        f"{'variant':<{width}}{'ms/step':>9}{'images/s':>10}{'vs full':>9}{'trainable':>12}{'backbone %':>12}"
        f"{'weights MiB':>13}{'grads MiB':>11}{'optim MiB':>11}"
    )
    lines = [head + (f"{'step peak MiB':>15}" if cuda else "")]
    for r in rows:
        line = (
            f"{r.name:<{width}}{1000 * r.seconds:>9.1f}{batch_size / r.seconds:>10.2f}{r.seconds / base:>9.2f}"
            f"{r.trainable:>12,}{100 * r.backbone_share:>12.2f}{r.weights / 2**20:>13.1f}{r.grads / 2**20:>11.2f}"
            f"{r.optim / 2**20:>11.2f}"
        )
        lines.append(line + (f"{r.step_peak_mb:>15.1f}" if cuda else ""))
    return lines


def main(cfg: MethodsBenchConfig) -> list[Row]:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    names = parse_variants(cfg.variants)
    prepared = {name: prepare(name, cfg, device) for name in names}
    print(
        f"{cfg.model}, batch {cfg.batch_size}, {cfg.img_size} px, {device}, {cfg.precision}, {cfg.optimizer}, "
        f"{torch.get_num_threads()} threads, median of {cfg.steps} steps after {cfg.warmup} warm-up, round-robin"
    )
    for name, p in prepared.items():
        print(f"  {name:<10} {VARIANTS[name].about}: trainable={','.join(p.trainable)}")
    peaks: dict[str, float] = {}
    steps: dict[str, Callable[[], None]] = {n: stepper_fn(p, cfg, device, peaks) for n, p in prepared.items()}
    times = run(steps, cfg, device)
    cuda = device.type == "cuda"
    rows = [measure_row(p, statistics.median(times[n]), peaks.get(n) if cuda else None) for n, p in prepared.items()]
    for line in table(rows, cfg.batch_size):
        print(line)
    if cuda:  # the steps reset the peak stats: the largest of the steps' peaks is the run's
        print(f"peak memory: {peaks['']:.0f} MiB (CUDA allocated, whole run: every variant's model is resident)")
    else:
        print(f"peak memory: {peak_mb(device):.0f} MB (process RSS, whole run: every variant's model is resident)")
    by_name = {r.name: r for r in rows}
    if "lora" in by_name and "dora" in by_name:
        ratio = by_name["dora"].seconds / by_name["lora"].seconds
        print(f"dora vs lora: {ratio:.2f}x the time per step")
    return rows


CONFIG = MethodsBenchConfig  # what tests/inprocess.py runs as ``python -m benchmarks.methods``

if __name__ == "__main__":
    cli_main(MethodsBenchConfig, main, argv=sys.argv[1:], prog="benchmarks.methods")
