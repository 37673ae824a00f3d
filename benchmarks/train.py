"""Training-step throughput of apps.vit.train's loop vs a minimal PyTorch + timm loop (arXiv 2602.06883, §4).

    python -m benchmarks.train                          # ViT-B/16, batch 16, 224 px, random init, CPU
    python -m benchmarks.train steps=5 warmup=2         # longer, steadier run
    python -m benchmarks.train model=vit_tiny_patch16_224 img_size=64 steps=3   # quick smoke run
    python -m benchmarks.train device=cuda batch_size=256 steps=20 warmup=3     # every GPU variant
    python -m benchmarks.train variants=[ours-tf32,plain-tf32]                  # chosen variants

Variants (same model, same freezing through the component registry, same fixed batch, SGD momentum 0.9,
cosine schedule, clipping at 1.0) are named ``<loop>-<precision>[-compile][-<component>]``:

- loop ``ours``: the app's own :func:`apps.vit.train.train_step` plus its ``metrics.jsonl`` row (total and
  per-component gradient norms, lr, loss), i.e. what one step of the app costs (fused SGD on CUDA); each step
  waits for its own numbers, as the timing needs (the app's loop reads them one update late, while the next one
  runs: ``benchmarks.pipeline`` times that loop);
- loop ``plain``: zero_grad / forward / cross-entropy / backward / ``clip_grad_norm_`` / step / loss.item(), with
  torch's default SGD (the hand-written loop, like timm's train.py);
- precision: a name of ``vitef.utils.PRECISIONS`` (``fp32`` strict, ``tf32``, ``bf16``, ``fp16``), under
  ``vitef.utils.precision_scope`` (both loops) and autocast;
- ``compile``: the model under ``torch.compile`` (compiled in the warm-up steps; keep ``warmup`` >= 1);
- component: train only that one (+ head), e.g. ``ours-fp32-ln1`` (``ours-ln1`` is its short name) as in the
  paper's LN1 configuration; default all.

``variants=[]`` (the default) runs :data:`CPU_VARIANTS` on CPU (``tf32`` is ``fp32`` there and compiling takes
minutes) and :data:`CUDA_VARIANTS` on CUDA.

All variants share one model and run round-robin, one step each in turn (each step first applies its
variant's freezing), so load from other processes on a shared machine hits them alike; each time is the
median over ``steps`` timed steps after ``warmup`` untimed ones. Peak memory is the process's peak resident
set (CPU: one figure for the whole run) or ``torch.cuda.max_memory_allocated`` over the run (CUDA). The
machine may be shared: report the numbers with that caveat.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from apps.vit.train import Stepper, train_step
from vitef.config import cli_main, option
from vitef.errors import ConfigError, VitefError
from vitef.models import BLOCK_COMPONENTS, build_model, canonical_list, component_of, set_trainable
from vitef.monitor import MetricsLogger
from vitef.optim import OptimConfig, clip_gradients, grad_norms
from vitef.rates import measured_rate, write_rates
from vitef.utils import PRECISIONS, autocast_context, precision_scope, resolve_device, set_seed

CPU_VARIANTS = ("ours-fp32", "plain-fp32", "ours-bf16", "ours-ln1")
CUDA_VARIANTS = (
    "ours-fp32",
    "plain-fp32",
    "ours-tf32",
    "plain-tf32",
    "ours-bf16",
    "plain-bf16",
    "ours-bf16-compile",
    "plain-bf16-compile",
    "ours-ln1",
)


@dataclasses.dataclass
class BenchConfig:
    """Images/s of the finetuning app's training step vs a plain PyTorch loop, bf16 and LN1-only."""

    model: str = option("vit_base_patch16_224", "timm ViT architecture (random init)")
    img_size: int = option(224, "image side in pixels")
    batch_size: int = option(16, "images per step")
    num_classes: int = option(10, "classes of the fresh head")
    steps: int = option(3, "timed steps per variant")
    warmup: int = option(1, "untimed warm-up steps per variant")
    device: str = option("cpu", "cpu or cuda")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    variants: list[str] = option(
        [], "<ours|plain>-<precision>[-compile][-<component>], e.g. [ours-tf32,plain-bf16-compile]; []: the device's"
    )
    rates_out: str = option(
        "", "also write the measured rates to this CSV (columns of vitef.rates; appended if it exists), to merge "
        "into benchmarks/rates.csv"
    )  # fmt: skip

    def validate(self) -> None:
        for key in ("img_size", "batch_size", "num_classes", "steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.warmup < 0 or self.threads < 0:
            raise ConfigError("warmup and threads must be >= 0")
        for name in self.variants:
            parse_variant(name)
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"variants={self.variants} names a variant twice: list each once")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One benchmarked loop: whose step, in which precision, compiled or not, training what."""

    loop: str
    precision: str
    compile: bool
    trainable: tuple[str, ...]


def parse_variant(name: str) -> Variant:
    """``ours-bf16-compile`` -> Variant("ours", "bf16", True, ("all",)); a :class:`ConfigError` naming the fix."""
    hint = (
        f"variants: {name!r} is not <ours|plain>-<precision>[-compile][-<component>] "
        f"(precision one of {', '.join(PRECISIONS)}, component one of {', '.join(BLOCK_COMPONENTS)}), "
        "e.g. ours-tf32 or plain-bf16-compile"
    )
    loop, *rest = name.split("-")
    if loop not in ("ours", "plain"):
        raise ConfigError(hint)
    precision = rest.pop(0) if rest and rest[0] in PRECISIONS else "fp32"
    compiled = bool(rest) and rest[0] == "compile"
    rest = rest[1:] if compiled else rest
    if len(rest) > 1:
        raise ConfigError(hint)
    try:
        trainable = tuple(canonical_list(rest)) if rest else ("all",)
    except VitefError:
        raise ConfigError(hint) from None
    return Variant(loop, precision, compiled, trainable)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float:
    """Peak memory in MiB: the process's resident set on CPU, ``torch.cuda.max_memory_allocated`` on CUDA
    (shared with benchmarks.methods)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ours(model, cfg: BenchConfig, device, variant: Variant, log_dir: Path) -> Callable[[], None]:
    """One step of the app: its step function and its metrics row."""
    trainable = list(variant.trainable)
    set_trainable(model, trainable)
    optim = OptimConfig(lr=1e-3, warmup_steps=0)
    forward = torch.compile(model) if variant.compile else model
    stepper = Stepper.build(forward, model, optim, 1000, device, variant.precision)
    batch = fixed_batch(cfg, device)
    batches = itertools.repeat(batch)
    metrics = MetricsLogger(log_dir / f"{'-'.join(trainable)}-{variant.precision}-{variant.compile}.jsonl")
    counter = itertools.count(1)

    def step() -> None:
        set_trainable(model, trainable)  # the variants share the model
        t0 = time.perf_counter()
        row = train_step(stepper, batches)
        metrics.log({"step": next(counter), **row, "images_per_s": cfg.batch_size / (time.perf_counter() - t0)})

    return step


def plain(model, cfg: BenchConfig, device, variant: Variant) -> Callable[[], None]:
    """The minimal loop one writes by hand with the same freezing, optimiser, schedule and clipping."""
    trainable = list(variant.trainable)
    set_trainable(model, trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / 1000, 1))))
    forward = torch.compile(model) if variant.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "fp16")
    images, labels = fixed_batch(cfg, device)

    def step() -> None:
        set_trainable(model, trainable)
        # A hand-written loop sets its flags once; the scope costs microseconds and keeps the variants apart.
        with precision_scope(variant.precision):
            forward.train()
            opt.zero_grad(set_to_none=True)
            with autocast_context(device, variant.precision):
                logits = forward(images)
            loss = F.cross_entropy(logits.float(), labels)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss.item()

    return step


def bookkeeping(model, device, repeats: int = 10) -> tuple[float, float]:
    """Milliseconds of the gradient work between backward and the optimiser step: the app's total and
    per-component norms + clipping vs ``clip_grad_norm_``, on the same (present) gradients of all parameters.

    Timed apart from the forward/backward pass, these are small deterministic ops, so their difference is
    measurable on a noisy machine where whole steps are not."""
    set_trainable(model, ["all"])
    named = [(n, p) for n, p in model.named_parameters()]
    for _, p in named:
        p.grad = torch.randn_like(p) if p.grad is None else p.grad
    groups = {n: component_of(n).component for n, _ in named}
    params = [p for _, p in named]

    def app() -> None:
        total, per = grad_norms(named, groups)
        clip_gradients(params, 1.0, total)
        total.item(), [v.item() for v in per.values()]

    def ref() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0).item()

    out = []
    for fn in (app, ref):
        fn()
        ts = [_time(fn, device) for _ in range(repeats)]
        out.append(1000 * statistics.median(ts))
    return out[0], out[1]


def fixed_batch(cfg: BenchConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded batch of ``cfg.batch_size`` random images and labels on ``device``, the same for every variant
    (any config with ``batch_size``, ``img_size`` and ``num_classes``: benchmarks.methods uses it too)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=g)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g)
    return images.to(device), labels.to(device)


def _time(step: Callable[[], None], device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def run(steps: dict[str, Callable[[], None]], cfg: BenchConfig, device) -> dict[str, list[float]]:
    """Alternate the variants step by step (warm-up untimed); the seconds of each timed step."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    width = max(11, *map(len, steps))
    for i in range(cfg.warmup + cfg.steps):
        for name, step in steps.items():
            t = _time(step, device)
            if i >= cfg.warmup:
                times[name].append(t)
            note = "" if i >= cfg.warmup else " (warm-up)"
            line = f"  {name:<{width}} step {i + 1}/{cfg.warmup + cfg.steps}: {t:.3f}s{note}"
            print(line, file=sys.stderr, flush=True)
    return times


def main(cfg: BenchConfig) -> None:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(0)
    model = build_model(cfg.model, pretrained=False, num_classes=cfg.num_classes, img_size=cfg.img_size).to(device)
    print(
        f"{cfg.model}, batch {cfg.batch_size}, {cfg.img_size} px, {device}, {torch.get_num_threads()} threads, "
        f"median of {cfg.steps} steps after {cfg.warmup} warm-up"
    )
    names = list(cfg.variants) or list(CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        variants = {}
        for name in names:
            variant = parse_variant(name)
            if variant.loop == "ours":
                variants[name] = ours(model, cfg, device, variant, log_dir)
            else:
                variants[name] = plain(model, cfg, device, variant)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = run(variants, cfg, device)
        ours_ms, plain_ms = bookkeeping(model, device)
    peak = peak_mb(device)
    results = {name: statistics.median(ts) for name, ts in times.items()}
    width = max(12, *(len(name) + 2 for name in results))
    print(f"{'variant':<{width}}{'s/step':>9}{'images/s':>10}")
    for name, sec in results.items():
        print(f"{name:<{width}}{sec:>9.3f}{cfg.batch_size / sec:>10.2f}")
    print(f"peak memory: {peak:.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    for summary in summaries(results, ours_ms, plain_ms):
        print(summary)
    if cfg.rates_out:
        print(f"rates written to {write_measured(cfg, results, device)}")


def write_measured(cfg: BenchConfig, results: dict[str, float], device: torch.device) -> Path:
    """Append one row per variant to ``cfg.rates_out`` (``ours``: a step rate, ``plain``: a reference)."""
    rows = []
    for name, sec in results.items():
        v = parse_variant(name)
        rows.append(
            measured_rate(
                model=cfg.model, img_size=cfg.img_size, precision=v.precision, compile=v.compile,
                trainable="+".join(v.trainable), batch=cfg.batch_size, what="step" if v.loop == "ours" else "plain",
                images_per_s=cfg.batch_size / sec, gpu=None if device.type == "cuda" else "cpu",
                source="python -m benchmarks.train",
                notes=f"{name}: median of {cfg.steps} steps after {cfg.warmup} warm-up, random init, fixed batch",
            )
        )  # fmt: skip
    return write_rates(cfg.rates_out, rows)


def summaries(results: dict[str, float], ours_ms: float, plain_ms: float) -> list[str]:
    """The comparison lines whose variants were run (seconds per step in ``results``)."""
    lines = []
    for precision in PRECISIONS:
        for suffix in ("", "-compile"):
            a, b = f"ours-{precision}{suffix}", f"plain-{precision}{suffix}"
            if a in results and b in results:
                overhead = results[a] / results[b] - 1
                lines.append(f"overhead of the app's step vs plain loop, {precision}{suffix}: {100 * overhead:+.1f}%")
    if "plain-fp32" in results:
        extra = (ours_ms - plain_ms) / 1000 / results["plain-fp32"]
        lines.append(
            f"gradient bookkeeping per step: ours {ours_ms:.1f} ms (total + per-component norms, clipping), plain "
            f"{plain_ms:.1f} ms (clip_grad_norm_): {100 * extra:+.2f}% of a plain step (noise-free part of the "
            "overhead)"
        )
    ratios = [
        ("ours-fp32", "ours-tf32", "tf32 speed-up over fp32 (ours)"),
        ("plain-fp32", "plain-tf32", "tf32 speed-up over fp32 (plain)"),
        ("ours-fp32", "ours-bf16", "bf16 autocast speed-up over fp32"),
        ("ours-bf16", "ours-bf16-compile", "torch.compile speed-up, bf16 (ours)"),
        ("plain-bf16", "plain-bf16-compile", "torch.compile speed-up, bf16 (plain)"),
        ("ours-fp32", "ours-ln1", "LN1-only speed-up over all"),
    ]
    for slow, fast, label in ratios:
        if slow in results and fast in results:
            lines.append(f"{label + ':':<40} {results[slow] / results[fast]:.2f}x")
    return lines


if __name__ == "__main__":
    cli_main(BenchConfig, main, argv=sys.argv[1:], prog="benchmarks.train")
