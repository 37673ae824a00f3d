"""Component-wise finetuning of a ViT (Odonnat et al., arXiv 2602.06883, §4).

    python -m apps.vit.train config=apps/vit/configs/cifar10.yaml trainable=[mha] lr=1e-2 seed=0
    torchrun --nproc_per_node=4 -m apps.vit.train config=apps/vit/configs/cifar10.yaml trainable=[mha]

Only the chosen components (in every block) train, plus a fresh linear head and the final LayerNorm.
The run lives in ``<root>/runs/<log_dir>/`` (docs/ARCHITECTURE.md): the resolved config, one metrics row
per step (loss, lr, pre-clipping gradient norm in total and per component, images/s), validation rows
every ``eval_period`` steps, checkpoints, and ``eval.json`` with the test metrics of the checkpoint
with the best validation accuracy. Relaunching the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vitef import distributed
from vitef.adapters import (
    ADAPTER_METHODS,
    LoraConfig,
    adapter_state,
    add_lora,
    base_fingerprint,
    fit_probe_head,
    load_adapter_state,
    load_merged,
    merged_model,
    merged_state_dict,
    train_biases,
    trainable_counts,
)
from vitef.config import canonical_saved, cli_main, flatten, option, save_config, to_dict
from vitef.data import DataConfig, DevicePrefetcher, build_loader, canonical_name, make_iterable, num_classes
from vitef.distributed import DistInfo
from vitef.errors import ConfigError, RunStopped, TrainingError, VitefError
from vitef.evaluation import EvalResult, evaluate
from vitef.models import (
    ModelConfig,
    build_model_from_config,
    canonical_list,
    component_of,
    count_parameters,
    model_label,
    set_trainable,
)
from vitef.monitor import MetricsLogger, RunDir, read_metrics
from vitef.monitor import checkpoint as ckpt
from vitef.monitor.lock import run_lock
from vitef.monitor.metrics import require_tensorboard
from vitef.monitor.stop import StopSignals
from vitef.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    grad_norms,
    load_scheduler_state,
    peak_lr,
    scheduler_state,
)
from vitef.selection import (
    SELECTION_FILE,
    SelectConfig,
    Selection,
    budget_label,
    build_streams,
    read_selection,
    write_selection,
)
from vitef.selection import select as select_units
from vitef.utils import (
    PRECISIONS,
    ScheduledGC,
    atomic_write_json,
    autocast_context,
    check_precision,
    check_writable,
    compile_cache_dir,
    compile_cache_scope,
    precision_scope,
    resolve_device,
    runtime_info,
    set_seed,
    setup_logging,
)

logger = logging.getLogger("apps.vit.train")

# Under fp16 an overflowing gradient is routine: GradScaler skips that update and halves its loss scale.
# That only helps while the scale still magnifies the loss: once it is at or below this, the gradients
# overflow on their own and halving further cannot recover, so a non-finite gradient norm fails the run.
MIN_LOSS_SCALE = 1.0
# A mean cross-entropy this large needs logit gaps of about this size: no run that is still learning gets there,
# while a diverging one can stay finite (e.g. loss 1e13 with finite gradient norms) and end "completed" at chance.
MAX_LOSS = 1e4
# Steps between two collections of Python's garbage collector, which is off inside the loop (ScheduledGC).
GC_PERIOD = 50
# With a fused optimiser (CUDA) the checks of an update are read by the host one update late, while the device runs
# the next one, instead of stalling the queue once per update; False keeps one host wait per update everywhere.
DEFERRED_CHECKS = True
# What trains (method=): full finetuning of `trainable` (the paper's), BitFit, LoRA, DoRA, LP-FT: method → what.
METHODS: dict[str, str] = {
    "full": "every parameter of `trainable` (+ head)",
    "bitfit": "the biases of `trainable` (+ head)",
    "lora": "LoRA adapters (lora.*) on the Linear modules of `trainable`, merged into the checkpoints (+ head)",
    "dora": "DoRA: as lora, plus a trained magnitude per output row of each adapted module (+ head)",
    "lp_ft": "as full, from a head set to a linear probe of the pretrained model on the train split (LP-FT)",
}
# method=lp_ft: the linear probe that initialised the head (train accuracy, ...), written when a new run starts.
PROBE_HEAD_FILE = "lp_ft.json"
# Keys that may change between a run and its resumption (they do not change the result).
RESUME_FREE_KEYS = (
    "root",  # the output root: a run folder moved under another root still resumes
    "overwrite",
    "device",
    "compile",
    "compile_cache",
    "data.num_workers",
    "data.download",
    "data.root",
    "log_every",
)


@dataclasses.dataclass
class TrainConfig:
    """Finetune chosen components of a ViT on one dataset (arXiv 2602.06883)."""

    # The keys a resumed or finished run may change (RESUME_FREE_KEYS; an app built on this one may add its own).
    resume_free_keys: ClassVar[tuple[str, ...]] = RESUME_FREE_KEYS
    ALIASES: ClassVar[dict[str, str]] = {
        "lr": "optim.lr",
        "model_name": "model.name",
        "num_workers": "data.num_workers",
        "data_root": "data.root",
    }

    dataset_name: str = option("cifar10", "dataset of the registry (vitef.data), e.g. cifar10, digits_subset-56789")
    model: ModelConfig = option(ModelConfig(name="base"), "the pretrained ViT")
    data: DataConfig = option(DataConfig(), "dataset root, normalisation, loader workers")
    optim: OptimConfig = option(OptimConfig(), "optimiser, schedule, clipping, accumulation")
    trainable: list[str] = option(["all"], "components to train: all, or a list of emb/ln1/mha/ln2/fc1/fc2")
    method: str = option("full", "how `trainable` trains: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    lora: LoraConfig = option(LoraConfig(), "adapters of method=lora and method=dora: rank, alpha, dropout, modules")
    steps: int = option(10_000, "optimiser updates")
    batch_size: int = option(512, "images per update, over all processes and accumulation micro-batches")
    eval_batch_size: int = option(256, "images per evaluation batch and process")
    eval_period: int = option(500, "validate every this many updates (and at the end)")
    checkpoint_period: int = option(0, "checkpoint every this many updates (0: every eval_period) and at the end")
    keep_last: int = option(1, "step checkpoints kept (the best one is kept besides)")
    keep_steps: list[int] = option([], "steps checkpointed and kept for good besides keep_last (e.g. log-spaced)")
    seed: int = option(0, "seed of the head initialisation, the data order/split and augmentation")
    precision: str = option(
        "fp32", f"numeric precision: {', '.join(PRECISIONS)} (fp32: the paper's, strict; tf32: fp32 on tensor cores)"
    )
    compile: bool = option(False, "torch.compile the model (compiled once, at the first step)")
    compile_cache: str = option(
        "",
        "folder of torch.compile's caches, shared by runs: on a cluster put it on shared storage so that a study "
        "compiles each graph once (empty: torch's default, a folder in each machine's /tmp)",
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    root: str = option("outputs", "output root; the run goes to <root>/runs/<log_dir>")
    log_dir: str = option("", "run name (default: <dataset>_<trainable>_lr<lr>_seed<seed>) or a run directory")
    overwrite: bool = option(False, "delete an existing run directory and start afresh")
    log_every: int = option(50, "write a progress line to the log every this many updates")
    tensorboard: bool = option(True, "also write metrics.jsonl's numbers as TensorBoard scalars (<run>/tensorboard)")
    select: SelectConfig = option(
        SelectConfig(seed=-1),
        "choose the trainable units at start (select.criterion=plasticity select.budget=0.1; criterion empty: off); "
        "select.seed=-1 is the run's seed",
    )

    def validate(self) -> None:
        try:
            # Stored canonical (e.g. cifar10_c-snow-5 -> cifar10_c-corruption-snow-severity-5), like trainable.
            self.dataset_name = canonical_name(self.dataset_name)
        except VitefError as e:
            raise ConfigError(f"dataset_name: {e}") from e
        try:
            # Stored canonical: config.yaml, the run name and eval.json all say `mha` for trainable=[attn], and
            # relaunching with either spelling resumes the same run.
            self.trainable = canonical_list(self.trainable)
        except VitefError as e:
            raise ConfigError(f"trainable: {e}") from e
        if not self.trainable:
            raise ConfigError("trainable=[] trains nothing: use trainable=[all] or e.g. trainable=[mha]")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown: choose one of {', '.join(METHODS)}")
        if self.method in ADAPTER_METHODS and self.select.enabled:
            raise ConfigError(
                f"method={self.method} with select.criterion: a selection picks whole units to train in full; use "
                f"method=full (or bitfit) with select, or method={self.method} with trainable=[...]"
            )
        if self.select.enabled and self.trainable != ["all"]:
            raise ConfigError(
                f"trainable={self.trainable} and select.criterion={self.select.criterion} both choose what trains: "
                "leave trainable at its default ([all]) to train the selected units, or drop select.criterion"
            )
        if self.compile_cache and not self.compile:
            raise ConfigError(
                f"compile_cache={self.compile_cache!r} is set but compile=false: set compile=true, or drop "
                "compile_cache (it only holds torch.compile's kernels)"
            )
        positive = ("steps", "batch_size", "eval_batch_size", "eval_period", "keep_last", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.eval_period > self.steps:
            raise ConfigError(f"eval_period={self.eval_period} exceeds steps={self.steps}: lower eval_period")
        bad = [s for s in self.keep_steps if not 1 <= s <= self.steps]
        if bad:
            raise ConfigError(f"keep_steps={self.keep_steps}: steps {bad} are not in [1, steps={self.steps}]")
        if not 0 <= self.checkpoint_period <= self.steps:
            raise ConfigError(f"checkpoint_period={self.checkpoint_period} must be in [0, steps={self.steps}]")
        if self.optim.warmup_steps > self.steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}: lower it")
        if self.batch_size % self.optim.grad_accumulation:
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by optim.grad_accumulation="
                f"{self.optim.grad_accumulation}"
            )
        check_precision(self.precision)
        if not self.root:
            raise ConfigError("root is empty: give an output folder, e.g. root=outputs")
        if ".." in Path(self.log_dir).parts:
            raise ConfigError(f"log_dir={self.log_dir!r} must not contain '..': give a run name or a run directory")
        resolve_device(self.device)  # raises ConfigError for cuda on a machine without GPU
        if self.tensorboard:
            require_tensorboard()  # raises ConfigError when the package is missing: say so before anything runs

    @property
    def run_name(self) -> str:
        """``log_dir``, or a name derived from what distinguishes runs of a sweep."""
        if self.log_dir:
            return self.log_dir
        parts = [self.dataset_name]
        if self.model.name != "base":
            parts.append(model_label(self.model.name))
        if self.optim.name != "sgd":
            parts.append(self.optim.name)
        if self.method in ADAPTER_METHODS:
            parts.append(f"{self.method}-r{self.lora.rank}")
        elif self.method != "full":
            parts.append(self.method)
        if self.optim.layer_decay < 1:
            parts.append(f"ld{self.optim.layer_decay:g}")
        if self.select.enabled:  # the pick is only known at start: name the criterion and budget
            budget = budget_label(self.select.budget).replace("%", "pct").replace(" ", "")
            parts.append(f"select-{self.select.label()}-{budget}")
        else:
            parts.append("-".join(self.trainable))
        parts += [f"lr{self.optim.lr:g}", f"seed{self.seed}"]
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", "_".join(parts))


# ---------------------------------------------------------------------------------------------------
# The training step (shared with benchmarks/train.py)
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stepper:
    """Everything one optimiser update needs: the forward module, the trainable parameters, the optimiser.

    ``model`` may be wrapped (DDP, torch.compile); ``named_params`` are the trainable parameters of the
    plain model with their timm names, ``groups`` maps each name to its component.
    """

    model: nn.Module
    named_params: list[tuple[str, nn.Parameter]]
    groups: dict[str, str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    precision: str = "fp32"
    clip_grad: float | None = 1.0
    grad_accumulation: int = 1
    # Checks read one update late (:func:`launch_step`); only with a fused optimiser, which can skip an update on
    # the device, and without fp16 loss scaling (GradScaler drives that skip itself).
    deferred: bool = False
    # Device flag, once any update failed its checks: every later update is skipped on the device too, so that the
    # weights are still those before the failed update when the host reads its numbers and stops.
    refused: torch.Tensor | None = None
    # Set by a scheduler's signal (vitef.monitor.stop): each update's row says whether any process has it, so that
    # every process of a distributed run stops after the same update.
    stop: StopSignals | None = None

    @classmethod
    def build(
        cls, model: nn.Module, plain: nn.Module, cfg: OptimConfig, steps: int, device: torch.device, precision: str
    ) -> Stepper:
        named = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]
        optimizer = build_optimizer([p for _, p in named], cfg, model=plain)
        return cls(
            model=model,
            named_params=named,
            groups={n: component_of(n).component for n, _ in named},
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg, steps),
            # Loss scaling only matters for fp16; disabled it is a pass-through.
            scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
            device=device,
            precision=precision,
            clip_grad=cfg.clip_grad,
            grad_accumulation=cfg.grad_accumulation,
            deferred=DEFERRED_CHECKS and bool(optimizer.defaults.get("fused")) and precision != "fp16",
        )


def train_step(s: Stepper, batches: Iterator, step: int | None = None) -> dict[str, Any]:
    """One optimiser update over ``grad_accumulation`` micro-batches drawn from ``batches``; its metrics row.

    Returns the metrics row (without ``step``): mean loss over the full batch (averaged over processes),
    the learning rate of this update, the pre-clipping global gradient norm and its per-component norms, the host's
    milliseconds getting batches. Raises :class:`TrainingError`, with the weights as they were before this update,
    when the loss is above ``MAX_LOSS`` or the loss or the gradient norm is NaN or infinite (under fp16, a
    non-finite norm only once the loss scale is down to ``MIN_LOSS_SCALE``: before that GradScaler skips the update
    and lowers its scale). ``step`` (the number of this update) is named in that message.

    The same update as :func:`launch_step`, waiting for its numbers at once (the training loop reads them one update
    later).
    """
    return launch_step(s, batches, step).result()


@dataclasses.dataclass
class PendingRow:
    """The metrics row of an update launched by :func:`launch_step`, its numbers possibly still on the device.

    :meth:`result` waits for them (if not already read), runs the divergence checks and returns the row.
    """

    stepper: Stepper
    values: torch.Tensor  # (2 + C,) loss, global gradient norm, one norm per component
    components: list[str]
    lr: float
    waited: float
    where: str
    ready: torch.cuda.Event | None = None  # recorded after the copy of ``values`` to the host
    row: dict[str, Any] | None = None
    # Whether a stop was requested when the update was launched: the host's flag, or (distributed) the last entry of
    # ``values``, the flag averaged over the processes with the loss, > 0 when any process has it.
    stop: bool = False
    stop_in_values: bool = False

    @property
    def done(self) -> bool:
        return self.row is not None

    def result(self) -> dict[str, Any]:
        if self.row is None:
            if self.ready is not None:
                self.ready.synchronize()  # the copy of this update's numbers, not the work queued after it
            loss_value, norm, *component_norms = self.values.tolist()
            if self.stop_in_values:
                self.stop = component_norms.pop() > 0
            _check_update(self.stepper, loss_value, norm, self.lr, self.where)
            self.row = {"loss": loss_value, "lr": self.lr, "grad_norm": norm}
            self.row.update({f"grad_norm/{c}": v for c, v in zip(self.components, component_norms)})
            self.row["data_wait_ms"] = 1000 * self.waited
        return self.row


def launch_step(s: Stepper, batches: Iterator, step: int | None = None) -> PendingRow:
    """Queue one optimiser update; its metrics row comes from the returned :class:`PendingRow`.

    The whole update runs under :func:`vitef.utils.precision_scope` of ``s.precision`` (backward pass included),
    autocast covers the forward only. Every number of the row comes back to the host in one copy (a ``.item()``
    per value would each stall the queue of device work).

    Without ``s.deferred`` the host waits for that copy before the update, checks it and updates (or raises): the
    row is ready on return. With ``s.deferred`` (a fused optimiser) the checks also run on the device and an update
    that fails them is skipped there (the fused kernels' ``found_inf``, as GradScaler uses them), as is every later
    one; the host reads the numbers when :meth:`PendingRow.result` is called, typically after queueing the next
    update, and raises then. Either way a failing update never reaches the weights, and the error names its step.
    """
    with precision_scope(s.precision):
        return _launch_step(s, batches, f"step {step}: " if step is not None else "")


def _launch_step(s: Stepper, batches: Iterator, where: str) -> PendingRow:
    s.model.train()
    s.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=s.device)
    waited = 0.0  # host seconds getting batches: a slow step with a long wait waited for data
    prefetch = getattr(batches, "prefetch", None)  # a DevicePrefetcher fetches the next batch ahead
    for micro in range(s.grad_accumulation):
        t0 = time.perf_counter()
        images, labels = next(batches)
        waited += time.perf_counter() - t0
        images = images.to(s.device, non_blocking=True)
        labels = labels.to(s.device, non_blocking=True)
        # DDP all-reduces gradients on the last micro-batch only.
        with distributed.maybe_no_sync(s.model, skip=micro < s.grad_accumulation - 1):
            with autocast_context(s.device, s.precision):
                logits = s.model(images)  # (B, num_classes)
            loss = F.cross_entropy(logits.float(), labels) / s.grad_accumulation
            s.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        if prefetch is not None:
            # The device works through this micro-batch's queued kernels while the host fetches the next batch:
            # the fetch's host time (and its jitter) is not spent with the device idle.
            t0 = time.perf_counter()
            prefetch()
            waited += time.perf_counter() - t0
    stop = s.stop is not None and s.stop.requested
    shared_stop = None
    if distributed.world_size() > 1:  # the stop flag travels with the loss: one all-reduce, read with the row
        both = distributed.all_reduce_mean(torch.stack([loss_sum, torch.full_like(loss_sum, float(stop))]))
        loss_sum, shared_stop = both[0], both[1:]
    # Unscaling and the norms only read the gradients: the weights are still untouched when a check fails.
    s.scaler.unscale_(s.optimizer)
    total, per_component = grad_norms(s.named_params, s.groups)
    numbers = [loss_sum.float(), *(v.to(loss_sum.device) for v in (total, *per_component.values()))]
    values = torch.stack(numbers if shared_stop is None else [*numbers, shared_stop[0]])  # (2 + C [+ 1],)
    lr = peak_lr(s.optimizer)  # with layer decay, the head's (the schedule's lr)
    pending = PendingRow(
        s, values, list(per_component), lr, waited, where, stop=stop, stop_in_values=shared_stop is not None
    )
    if s.deferred:
        _update_unless_refused(s, values)
        if values.is_cuda:
            pending.values = values.to("cpu", non_blocking=True)  # into pinned memory, read after `ready`
            pending.ready = torch.cuda.Event()
            pending.ready.record()
        return pending
    pending.result()  # waits for the numbers; raises before the update
    clip_gradients([p for _, p in s.named_params], s.clip_grad, total)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    return pending


def _update_unless_refused(s: Stepper, values: torch.Tensor) -> None:
    """Clip and update with the fused optimiser, skipped on the device if this or an earlier update failed the
    checks of :func:`_check_update` (the host raises when it reads them)."""
    loss, norm = values[0], values[1]
    ok = torch.isfinite(values[:2]).all() & (loss <= MAX_LOSS)
    s.refused = ~ok if s.refused is None else s.refused | ~ok
    clip_gradients([p for _, p in s.named_params], s.clip_grad, norm)
    # The fused kernels skip the whole update (weights, moments, step count) when found_inf is non-zero.
    s.optimizer.found_inf = s.refused.float()
    s.optimizer.grad_scale = None
    try:
        s.optimizer.step()
    finally:
        del s.optimizer.found_inf, s.optimizer.grad_scale
    s.scheduler.step()


def _check_update(s: Stepper, loss_value: float, norm: float, lr: float, where: str) -> None:
    """Raise :class:`TrainingError` when an update's loss or gradient norm says that training diverged."""
    if not math.isfinite(loss_value) or loss_value > MAX_LOSS:
        raise TrainingError(
            f"{where}the training loss is {loss_value:.4g}: training diverged. Lower the learning rate (lr=...), "
            "keep gradient clipping on (optim.clip_grad=1.0) or use precision=fp32"
        )
    # Clipping by an infinite norm zeroes every update (and NaN spreads into the weights): a run that goes
    # on after this only looks finished, so it fails as a NaN loss does.
    if not math.isfinite(norm) and not (s.scaler.is_enabled() and s.scaler.get_scale() > MIN_LOSS_SCALE):
        clip = "" if s.clip_grad else ", enable gradient clipping (optim.clip_grad=1.0)"
        fp16 = f" even at loss scale {s.scaler.get_scale():g}" if s.scaler.is_enabled() else ""
        raise TrainingError(
            f"{where}the gradient norm is {norm}{fp16} (loss {loss_value:.4g}): training diverged. "
            f"Lower the learning rate (lr={lr:g} now){clip}"
            + (" or use precision=bf16 or fp32" if s.scaler.is_enabled() else "")
        )


# ---------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------


def main(cfg: TrainConfig) -> None:
    info, device = distributed.init_distributed(cfg.device)
    try:
        # One process per run for its whole life (docs/ARCHITECTURE.md, run.lock); the main process holds it.
        run_path = RunDir.from_log_dir(cfg.root, cfg.run_name).path
        # The float32 flags of cfg.precision for the whole run (steps, validation, test), restored on return so
        # that a sweep running apps in-process does not leak them into the next run.
        with (
            compile_cache_scope(cfg.compile_cache),  # first: an unwritable folder fails before the run is touched
            run_lock(run_path, "apps.vit.train", enabled=info.is_main),
            precision_scope(cfg.precision),
        ):
            train(cfg, info, device)
    finally:
        distributed.destroy_distributed()


def train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> None:
    run = RunDir.from_log_dir(cfg.root, cfg.run_name)
    if not cfg.overwrite and _already_complete(cfg, run, info):
        return
    # Before any compute: a read-only root (or a file in the way) would otherwise only fail at the first write.
    check_writable(run.path, "root" if run.path == Path(cfg.root) / "runs" / cfg.run_name else "log_dir")
    micro_batch = _micro_batch(cfg, info)

    # Build everything that can fail on user input before the run directory is touched.
    set_seed(cfg.seed)
    classes = num_classes(cfg.dataset_name, cfg.data.root)
    model = build_model_from_config(cfg.model, num_classes=classes)
    model.to(device)
    selection = _selection(cfg, run, model, classes, device) if cfg.select.enabled else None
    trainable = selection.trainable if selection is not None else list(cfg.trainable)
    counts = set_trainable(model, trainable)
    lora = None  # the PEFT wrapper of method=lora / dora (model is its inner timm model, which trains)
    if cfg.method == "bitfit":
        counts = train_biases(model)
    elif cfg.method in ADAPTER_METHODS:
        lora = Lora(add_lora(model, cfg.lora, trainable, dora=cfg.method == "dora"), model)
        counts = trainable_counts(model)
    size = model.patch_embed.img_size[0]
    train_loader, val_loader, test_loader = _loaders(cfg, info, model, size, micro_batch, device)
    resume = _prepare_run_dir(cfg, run, info)
    if info.is_main:
        setup_logging(log_file=run.log_path)
    else:
        logging.getLogger().setLevel(logging.WARNING)
    probe = _probe_head(cfg, model, classes, device) if cfg.method == "lp_ft" and resume is None else None
    forward_model = _wrap(model, cfg, info, device)
    stepper = Stepper.build(forward_model, model, cfg.optim, cfg.steps, device, cfg.precision)
    # On CUDA the next batch is copied to the device on a side stream while the current step runs.
    normalize = train_loader.dataset.transform.normalizer
    batches = DevicePrefetcher(make_iterable(train_loader, seed=cfg.seed), device, normalize=normalize)
    metrics = MetricsLogger(run.metrics_path, run.tensorboard_dir if cfg.tensorboard else None, enabled=info.is_main)
    progress = {"step": 0, "best_val_acc": -1.0, "best_step": 0, "best_val_loss": math.inf}
    if resume is not None:
        progress = _resume(resume, model, stepper, batches, info, lora)
        metrics.truncate_after(progress["step"])
        if info.is_main:
            run.write_status("running", progress["step"], f"resumed from step {progress['step']}")
        logger.info("resumed %s from step %d", run.path, progress["step"])
    else:
        _write_run_header(cfg, run, model, counts, info, selection, probe)
    _write_runtime(cfg, run, device, info, progress["step"])
    logger.info(
        "training %s on %s: trainable %s (%s parameters), %d steps of %d images (%d per process and micro-batch)",
        cfg.model.name, cfg.dataset_name, ",".join(counts), f"{sum(counts.values()):,}", cfg.steps, cfg.batch_size,
        micro_batch,
    )  # fmt: skip
    bar = tqdm(total=cfg.steps, initial=progress["step"], disable=not info.is_main, desc="train", mininterval=2)
    step = progress["step"]  # the last update whose row is read, checked and logged
    queued: tuple[int, PendingRow] | None = None  # the update launched after it, not read yet (deferred checks)
    since = time.perf_counter()  # when the time of the next logged update starts (its images/s)
    stopping = False  # a read row says a stop was requested (the same row on every process)
    try:
        with ScheduledGC(GC_PERIOD) as collect, StopSignals() as stepper.stop:
            for n in range(step + 1, cfg.steps + 1):
                pending = launch_step(stepper, batches, step=n)
                bar.update(1)
                if queued is not None:  # the update before: read while the device runs this one
                    since = _log_update(cfg, metrics, *queued, since)
                    stopping |= queued[1].stop
                    step, queued = queued[0], None
                queued = (n, pending)
                stopping |= not info.is_distributed and stepper.stop.requested  # alone: at once, no need to agree
                boundary = _evaluates(cfg, n) or _checkpoints(cfg, n) or stopping
                if pending.done or boundary:  # validation and checkpoints only follow checked updates
                    since = _log_update(cfg, metrics, *queued, since)
                    stopping |= pending.stop
                    step, queued = n, None
                if _evaluates(cfg, n):
                    _validate(cfg, run, model, val_loader, device, n, progress, metrics, info, lora)
                if _checkpoints(cfg, n) or stopping:
                    progress["step"] = n
                    _checkpoint(cfg, run, model, stepper, batches, progress, info, lora)
                if stopping:
                    raise RunStopped(_stopped_message(stepper.stop, n), stepper.stop.signum or signal.SIGTERM)
                if boundary:
                    since = time.perf_counter()  # validation and checkpoint time is no update's
                collect(n)  # the garbage collector between steps, never inside one
    except RunStopped as e:
        _fail(run, info, step, str(e), metrics, stopped=True)
        raise
    except TrainingError as e:
        _fail(run, info, step, str(e), metrics)
        raise
    except BaseException as e:
        _fail(run, info, step, f"{type(e).__name__}: {e}", metrics)
        raise
    finally:
        bar.close()
    metrics.close()
    _test_best(cfg, run, model, test_loader, device, progress, info, trainable, selection, lora)


def _evaluates(cfg: TrainConfig, step: int) -> bool:
    return step % cfg.eval_period == 0 or step == cfg.steps


def _checkpoints(cfg: TrainConfig, step: int) -> bool:
    return step % (cfg.checkpoint_period or cfg.eval_period) == 0 or step == cfg.steps or step in cfg.keep_steps


def _log_update(cfg: TrainConfig, metrics: MetricsLogger, step: int, pending: PendingRow, since: float) -> float:
    """Read, check (:class:`TrainingError` for a diverged update) and log the row of update ``step``; returns the
    time it was logged. Its images/s count the time since ``since``: with deferred checks, about one update of the
    device."""
    row = pending.result()
    now = time.perf_counter()
    metrics.log({"step": step, **row, "images_per_s": cfg.batch_size / (now - since)})
    if step % cfg.log_every == 0:
        logger.info("step %d loss %.4f lr %.3g grad_norm %.3g", step, row["loss"], row["lr"], row["grad_norm"])
    return now


def _already_complete(cfg: TrainConfig, run: RunDir, info: DistInfo) -> bool:
    """True when the run directory holds this run, completed: nothing to do (its config is checked: a finished run
    of another config is not this one)."""
    status = run.read_status()
    if status is None or status.get("status") != "completed":
        return False
    _check_same_config(cfg, run)  # on every rank (the same file): under torchrun all of them fail, not rank 0 alone
    if info.is_main:
        print(
            f"run {run.path} is already complete (step {status.get('step')}); results in {run.eval_path}. "
            "Pass overwrite=true to train it again."
        )
    return True


def _micro_batch(cfg: TrainConfig, info: DistInfo) -> int:
    per_update = cfg.optim.grad_accumulation * info.world_size
    if cfg.batch_size % per_update:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is not divisible by optim.grad_accumulation ({cfg.optim.grad_accumulation})"
            f" x processes ({info.world_size}): choose a batch size that splits evenly"
        )
    return cfg.batch_size // per_update


def _loaders(cfg: TrainConfig, info: DistInfo, model: nn.Module, size: int, micro_batch: int, device: torch.device):
    """Train (shuffled, augmented, full micro-batches only), val and test loaders, sharded by rank."""
    common = dict(size=size, seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=device, model=model)
    common.update(cfg.data.loader_kwargs())
    # Rank 0 first, so that a dataset download happens once.
    if not info.is_main:
        distributed.barrier()
    # uint8 train batches, normalised on the device by the training loop's DevicePrefetcher.
    train = build_loader(cfg.dataset_name, "train", batch_size=micro_batch, drop_last=True, output="uint8", **common)
    val = build_loader(cfg.dataset_name, "val", batch_size=cfg.eval_batch_size, shuffle=False, **common)
    test = build_loader(cfg.dataset_name, "test", batch_size=cfg.eval_batch_size, shuffle=False, **common)
    if info.is_main:
        distributed.barrier()
    # With drop_last a split smaller than one micro-batch yields nothing: say so before the run directory
    # exists (the same answer on every process: each holds at least len // world_size images).
    if len(train.dataset) // info.world_size < micro_batch:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the train split of {cfg.dataset_name} "
            f"({len(train.dataset)} images, {micro_batch} needed per process and micro-batch): lower batch_size"
        )
    return train, val, test


def _prepare_run_dir(cfg: TrainConfig, run: RunDir, info: DistInfo) -> Path | None:
    """Start afresh or find the checkpoint to resume from; returns that checkpoint directory or None."""
    resume = None
    if info.is_main:
        if cfg.overwrite:
            run.remove()
        elif run.config_path.is_file():
            _check_same_config(cfg, run)
            # Temporaries and half-pruned step folders of a killed process are never read: free their space.
            ckpt.remove_leftovers(run.path)
            resume = run.latest_checkpoint()
        if resume is None and run.exists():
            # Killed before its first checkpoint: nothing to keep.
            run.remove()
        run.path.mkdir(parents=True, exist_ok=True)
    return distributed.broadcast_object(resume)


def _check_same_config(cfg: TrainConfig, run: RunDir) -> None:
    try:
        saved = run.read_config()
    except ConfigError as e:
        raise ConfigError(f"{e}; use overwrite=true to start afresh") from e
    diffs = _diff(flatten(canonical_saved(type(cfg), saved)), flatten(to_dict(cfg)))
    free = type(cfg).resume_free_keys
    diffs = [d for d in diffs if not any(d[0] == k or d[0].startswith(k + ".") for k in free)]
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:5])
        raise ConfigError(
            f"run directory {run.path} exists with a different config ({shown}). "
            "Use overwrite=true to replace it, or another log_dir"
        )


def _diff(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _wrap(model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device) -> nn.Module:
    out: nn.Module = model
    if info.is_distributed:
        ids = [device.index] if device.type == "cuda" else None
        out = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        out = torch.compile(out)
    return out


def _selection(cfg: TrainConfig, run: RunDir, model: nn.Module, classes: int, device: torch.device) -> Selection:
    """The units to train: the run's saved ``selection.json`` when it resumes, else scored now (vitef.selection).

    Scored as ``apps.vit.select`` does, on the train split of the run's dataset (the pick never sees the
    evaluation data), with the run's seed unless ``select.seed`` is given. Every process computes the same pick
    (seeded), so none waits on another's errors. The global RNG states are left as they were, so the head and
    the training draws do not depend on the criterion.
    """
    saved = run.path / SELECTION_FILE
    if not cfg.overwrite and saved.is_file() and run.config_path.is_file() and run.latest_checkpoint() is not None:
        selection = read_selection(saved)
        logger.info("resuming with the saved selection %s: %s", saved, " ".join(selection.trainable))
        return selection
    sel_cfg = dataclasses.replace(cfg.select, seed=cfg.seed if cfg.select.seed < 0 else cfg.select.seed)
    start = time.perf_counter()
    target, source = build_streams(sel_cfg, cfg.dataset_name, model, **cfg.data.loader_kwargs())
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        selection = select_units(model, sel_cfg, target=target, source=source, num_classes=classes, device=device)
    selection.meta = {
        "model": cfg.model.name,
        "dataset": cfg.dataset_name,
        "split": sel_cfg.split if target is not None else None,
        "source": f"{sel_cfg.source}/{sel_cfg.source_split}" if source is not None else None,
        "label": sel_cfg.label(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return selection


def _probe_head(cfg: TrainConfig, model: nn.Module, classes: int, device: torch.device) -> dict:
    """method=lp_ft on a new run: set the head to a linear probe of the pretrained model (vitef.adapters).

    Fitted on the whole train split of the run's dataset (the split the training draws from) with the eval
    transform, in a fixed order; every process fits the same probe (DDP also starts every rank from rank 0's
    weights). The global RNG states are left as they were, so the training draws are those of method=full.
    """
    loader = build_loader(
        cfg.dataset_name, "train", batch_size=cfg.eval_batch_size, shuffle=False, augment=False, seed=cfg.seed,
        size=model.patch_embed.img_size[0], model=model, device=device, **cfg.data.loader_kwargs(),
    )  # fmt: skip
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return fit_probe_head(model, loader, classes, device=device, precision=cfg.precision)


def _write_run_header(
    cfg: TrainConfig,
    run: RunDir,
    model: nn.Module,
    counts: dict,
    info: DistInfo,
    selection: Selection | None,
    probe: dict | None = None,
) -> None:
    """config.yaml, selection.json (scores and pick, when selecting), lp_ft.json (the probe of method=lp_ft),
    params.json (parameters per component) and status.json of a new run."""
    if not info.is_main:
        return
    save_config(cfg, run.config_path)
    if selection is not None:
        write_selection(run.path, selection)
    if probe is not None:
        atomic_write_json(run.path / PROBE_HEAD_FILE, probe)
    atomic_write_json(run.params_path, {"trainable": counts, "total": count_parameters(model)})
    for comp, n in counts.items():
        logger.info("trainable %-5s %14s parameters", comp, f"{n:,}")
    run.write_status("running", 0, "started")


def _write_runtime(cfg: TrainConfig, run: RunDir, device: torch.device, info: DistInfo, step: int) -> None:
    """runtime.json: what this process computes with (precision, effective TF32 flags, device, versions).

    Written at every start; a resumed run keeps the records of its earlier processes under ``earlier`` (oldest
    first), since a run may be resumed on another machine (``device`` may change between them).
    """
    if not info.is_main:
        return
    record = runtime_info(device, cfg.precision)
    record.update(
        compile=cfg.compile,
        compile_cache=compile_cache_dir() if cfg.compile else None,
        world_size=info.world_size,
        num_workers=cfg.data.num_workers,
        start_step=step,
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    earlier: list[dict[str, Any]] = []
    try:
        previous = run.read_runtime() if step > 0 else None
    except VitefError as e:  # a damaged record must not stop the run: it is information, not state
        logger.warning("%s: starting a new runtime record", e)
        previous = None
    if previous is not None:
        earlier = [*previous.pop("earlier", []), previous]
    if earlier:
        record["earlier"] = earlier
    atomic_write_json(run.runtime_path, record)
    logger.info(
        "precision %s (float32 matmul precision %s, TF32 matmul %s, cuDNN %s) on %s (%s)",
        cfg.precision, record["float32_matmul_precision"], record["cuda_matmul_allow_tf32"],
        record["cudnn_allow_tf32"], record["device"], record["device_name"],
    )  # fmt: skip


class Lora:
    """method=lora and dora: PEFT's wrapper, and the fingerprint of the frozen weights under the adapters at start.

    The step and best checkpoints hold the merged model (timm layout: what eval, probing and build_model read);
    a step checkpoint's ``state.pt`` holds the adapters besides and the fingerprint of the frozen weights under
    them when saved, so that a resumed run continues from the same factors on the same base (merging is not
    invertible bit for bit) or says that the base changed.
    """

    def __init__(self, wrapped: nn.Module, model: nn.Module):
        self.wrapped = wrapped
        self.fingerprint = base_fingerprint(model)


def _plain(model: nn.Module, lora: Lora | None) -> nn.Module:
    """The model to evaluate as saved: itself, or for LoRA a merged copy (timm layout)."""
    return model if lora is None else merged_model(lora.wrapped)


def _weights(model: nn.Module, lora: Lora | None) -> nn.Module | dict[str, torch.Tensor]:
    """What a checkpoint saves: the model, or for LoRA its merged state dict (timm layout), built one adapted
    module at a time straight to host memory (no copy of the whole model on the device)."""
    return model if lora is None else merged_state_dict(lora.wrapped, device="cpu")


def _resume(step_dir: Path, model: nn.Module, stepper: Stepper, batches, info: DistInfo, lora: Lora | None) -> dict:
    state = ckpt.load_state(step_dir)
    if lora is None:
        ckpt.load_weights(model, step_dir / "model.safetensors")
    else:
        saved = state.get("lora") or {}
        if saved.get("base_sha256") != lora.fingerprint:
            raise ConfigError(
                f"{step_dir}: the pretrained weights under the LoRA adapters differ from those the run started from "
                "(model file changed?); restore them or use overwrite=true"
            )
        load_merged(model, step_dir / "model.safetensors")
        load_adapter_state(model, saved["adapters"])
    stepper.optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(stepper.scheduler, state["scheduler"])
    if state.get("scaler"):
        stepper.scaler.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    rngs = state["rng"]
    if len(rngs) == info.world_size:
        ckpt.restore_rng(rngs[info.rank])
    else:
        logger.warning("checkpoint of %d processes resumed on %d: RNG states not restored", len(rngs), info.world_size)
    return dict(state["progress"])


def _validate(cfg, run, model, val_loader, device, step, progress, metrics, info, lora=None) -> None:
    result = evaluate(model, val_loader, device, precision=cfg.precision)
    metrics.log({"step": step, "val_loss": result.loss, "val_acc": result.acc})
    improved = result.acc > progress["best_val_acc"]
    logger.info("step %d val_loss %.4f val_acc %.2f%%%s", step, result.loss, 100 * result.acc, " (best)" * improved)
    if improved:
        progress.update(best_val_acc=result.acc, best_val_loss=result.loss, best_step=step)
        if info.is_main:
            info_best = {"step": step, "val_acc": result.acc, "val_loss": result.loss}
            ckpt.save_best(run.best_dir, _weights(model, lora), info_best)


def _checkpoint(cfg, run, model, stepper: Stepper, batches, progress, info, lora=None) -> None:
    rngs = distributed.all_gather_object(ckpt.capture_rng())
    if info.is_main:
        state = {
            "progress": dict(progress),
            "optimizer": stepper.optimizer.state_dict(),
            "scheduler": scheduler_state(stepper.scheduler),
            "scaler": stepper.scaler.state_dict() if stepper.scaler.is_enabled() else {},
            "data": batches.state_dict(),
            "rng": rngs,
        }
        if lora is not None:
            state["lora"] = {"adapters": adapter_state(model), "base_sha256": base_fingerprint(model)}
        ckpt.save_checkpoint(run.step_dir(progress["step"]), _weights(model, lora), state)
        run.prune_checkpoints(cfg.keep_last, keep=cfg.keep_steps)
        run.write_status("running", progress["step"], "checkpointed")
    distributed.barrier()


def _fail(run: RunDir, info: DistInfo, step: int, message: str, metrics: MetricsLogger, stopped: bool = False) -> None:
    metrics.close()
    if info.is_main:
        if stopped:
            logger.warning("run stopped at step %d: %s", step, message)
        else:
            logger.error("run failed at step %d: %s", step, message)
        run.write_status("failed", step, message)


def _stopped_message(stop: StopSignals | None, step: int) -> str:
    """Why a run stopped early; on a process the signal did not reach, the flag came from another one."""
    why = f"{stop.name} received" if stop is not None and stop.requested else "another process was signalled"
    return f"{why}: stopped after step {step}, checkpoint saved; launch the same run again to resume it"


def _test_best(cfg, run, model, test_loader, device, progress, info, trainable, selection, lora=None) -> None:
    """Evaluate the best-validation checkpoint on the test split; write eval.json; mark the run complete."""
    distributed.barrier()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if lora is not None:  # the best checkpoint is the merged plain model
        model = _plain(model, lora)
    ckpt.load_weights(model, run.best_model_path)
    result: EvalResult = evaluate(model, test_loader, device, precision=cfg.precision)
    best = ckpt.read_best(run.best_dir)
    if info.is_main:
        payload = {
            "dataset": cfg.dataset_name,
            "split": "test",
            "acc": result.acc,
            "loss": result.loss,
            "n": result.n,
            "best_step": best["step"],
            "best_val_acc": best["val_acc"],
            "trainable": list(trainable),
            "method": cfg.method,
            "trainable_params": trained,
            "lr": cfg.optim.lr,
            "seed": cfg.seed,
            "model": cfg.model.name,
            # What the method costs to train, measured (the median resists compilation and warm-up steps): the
            # methods table sets it beside accuracy and parameters. Timing, unlike everything else here.
            "images_per_s": _median_images_per_s(run),
        }
        probe_file = run.path / PROBE_HEAD_FILE
        if cfg.method == "lp_ft" and probe_file.is_file():
            payload["probe"] = json.loads(probe_file.read_text())
        if selection is not None:
            payload["select"] = {
                "criterion": selection.meta.get("label", selection.criterion),
                "budget": selection.budget,
                "picked_params": selection.picked_params,
                "picked_fraction": selection.picked_fraction,
            }
        atomic_write_json(run.eval_path, payload)
        run.write_status("completed", cfg.steps, f"test acc {result.acc:.4f} at best step {best['step']}")
        logger.info("best step %d (val %.2f%%): test acc %.2f%%", best["step"], 100 * best["val_acc"], 100 * result.acc)
        print(f"{run.path}: test acc {100 * result.acc:.2f}% (best step {best['step']}, n={result.n})")


def _median_images_per_s(run: RunDir) -> float | None:
    """The median training images/s over the run's logged updates (resumed attempts included); None without any."""
    rates = [r["images_per_s"] for r in read_metrics(run.metrics_path) if "loss" in r and "images_per_s" in r]
    return float(statistics.median(rates)) if rates else None


CONFIG = TrainConfig  # the sweep convention (vitef.sweep): CONFIG + main(cfg)

if __name__ == "__main__":
    cli_main(TrainConfig, main, argv=sys.argv[1:], prog="apps.vit.train")
