"""Sweeps: a grid (or a union of grids) over any config keys of an app, run idempotently.

The study of arXiv 2602.06883 is ~1,200 finetuning runs (11 datasets x 7 configurations x 4 learning
rates x 3 seeds, plus the AdamW and model-size ablations) and one plasticity analysis per model and
dataset. A sweep file names the app, its base config file(s), fixed overrides and one or more grids;
every grid point becomes one run with a deterministic ``log_dir``, so relaunching the same sweep maps
to the same run directories:

- a run whose ``status.json`` says ``"completed"`` is skipped;
- any other run (never started, ``running`` when its job was killed, ``failed``) is launched again:
  the training app resumes from its last checkpoint;
- a run whose saved config differs from the sweep's (``steps`` changed in the sweep file, say) is
  *stale*, finished or not: it is listed with the differing keys and left alone, unless
  ``rerun_stale=true`` runs it again from scratch (``overwrite=true`` where the app has that key).
  The saved config is the run's ``config.yaml`` for apps that keep a run directory, else the sweep's
  record ``<root>/sweeps/<log_dir>.yaml``. ``root`` and the app's ``RESUME_FREE_KEYS`` (device,
  workers, ...) do not count: a moved output root still resumes;
- a run that another process works on (it holds the run directory's ``run.lock``,
  :mod:`vitef.monitor.lock`) is skipped and listed as running elsewhere, and nothing of it is touched;
- a failed run does not stop the others; failures are collected with their run dir and message. The
  sweep writes a run's status only for an attempt it made itself, never over another process's.

Backends
--------
``local``
    in sequence, in this process (the app module's ``main(cfg)`` is called directly: no interpreter
    start-up per run), or ``local.max_parallel`` runs at once as subprocesses, each pinned to one GPU
    of ``local.gpus`` through ``CUDA_VISIBLE_DEVICES``. Each subprocess gets its own process group;
    when the sweep is stopped (Ctrl-C, SIGTERM, SIGHUP, an exception) it ends them (SIGTERM, then
    SIGKILL after a few seconds) before it exits. A SIGKILL of the sweep, which it cannot catch, ends
    them too on Linux: each child asks the kernel for a SIGTERM when the sweep dies (``PR_SET_PDEATHSIG``);
    elsewhere they run on, and their run locks keep a relaunch off those runs until they end. With ``local.fork``
    the runs are forked children of the sweep instead (CPU only; refused with ``local.gpus``): each
    inherits the imports (a subprocess spends seconds importing torch before a run of a few seconds)
    and what the first run, made in the sweep's process, set up; it calls ``main(cfg)`` as the
    in-process backend does, on one CPU thread (results equal an in-process run's on one thread: float
    sums depend on the thread count), with its stderr in ``<root>/sweeps/<log_dir>.log``, and is
    ended like a subprocess when the sweep stops. Where fork is missing (Windows), or
    once this process has initialised CUDA, the runs go in sequence in this process instead.
``slurm``
    one submitit job array, each task running the same command as a local subprocess run. A task warned of its
    time limit by submitit's signal (also sent on preemption where the cluster is set up so) stops its app, which
    saves a checkpoint on SIGTERM, and is requeued; the requeued task resumes the run (:class:`_ArrayTask`). A
    preemption that only sends SIGTERM reaches the app as well: it checkpoints and stops, and the next launch of
    the sweep resumes it.

App convention: an app module defines ``main(cfg)`` and ``CONFIG`` (its config dataclass; without it,
the one dataclass named ``*Config`` defined in the module). A run's directory is
``<root>/runs/<log_dir>`` and its status the ``status.json`` there (the training app's run-directory
contract), unless the caller (or the module, as ``run_dir(cfg)``) gives another output directory: then
the app is not expected to write ``status.json`` and the sweep keeps the run's status in
``<root>/sweeps/<log_dir>.status.json`` (so probing a finetuned run never touches that run's status).
When ``main`` returns the sweep records ``completed`` where the app did not.

Locks: an app that keeps its own ``status.json`` holds its run directory's lock itself (the training
app does); for the other apps the sweep holds the lock of their output directory while they run.

Sweep file layout (YAML; dotted keys and the app's ``ALIASES`` such as ``lr`` are accepted)::

    name: main
    app: train
    base: [apps/vit/configs/defaults.yaml]     # optional, merged first
    overrides: {model.name: vit_base_patch16_224.orig_in21k}
    grids:                                     # union of grids (``grid:`` for a single one)
      - config: [apps/vit/configs/cifar10.yaml, apps/vit/configs/cifar100.yaml]   # per-point YAML layer
        trainable: [[all], [mha], [fc1]]
        lr: [1.0e-3, 3.0e-3]
        seed: [0, 42, 3407]
    run_name: "{dataset_name}/{trainable}/lr{lr}_seed{seed}"

Layers, later wins: app defaults < ``base`` files < the point's ``config`` file < ``overrides`` <
the point's other keys. A config file that starts from others (``base: paper.yaml`` inside it, relative
to it: :func:`vitef.config.config_layers`) brings them along, under itself. ``run_name`` placeholders
are grid keys or any (dotted or aliased) key of the resolved config; each run's ``log_dir`` is
``<name>/<rendered run_name>`` made filesystem-safe.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import gc
import importlib
import importlib.util
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from vitef.config import (
    aliases_of,
    build_config,
    canonical_saved,
    config_layers,
    flatten,
    option,
    save_config,
    to_yaml,
    validate,
)
from vitef.errors import ConfigError, VitefError
from vitef.monitor.lock import LOCKED_MARK, RunLock, RunLockedError, describe_holder, holder
from vitef.utils import atomic_write_json

logger = logging.getLogger(__name__)

BACKENDS = ("local", "slurm")
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")
CONFIG_KEY = "config"  # grid key whose values are YAML files layered under the other keys
COMPLETED = "completed"
# Config keys that never make a run stale: where the outputs live, and whether to start afresh.
ALWAYS_FREE_KEYS = ("root", "overwrite")
# How long stopped subprocesses get between SIGTERM and SIGKILL: a training run finishes its update and saves a
# step checkpoint first (vitef.monitor.stop), seconds for ViT-B, more for a ViT-H with its optimiser state.
STOP_GRACE_S = 30.0
# The same for a job array task that submitit requeues: under its warning signal's lead (90 s by default).
REQUEUE_GRACE_S = 60.0
_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]+)\}")


class SweepError(VitefError):
    """A malformed sweep file, an app that does not follow the sweep convention, or failed runs."""


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LocalBackendConfig:
    """Runs on this machine."""

    max_parallel: int = option(1, "runs at once; > 1 runs each in a subprocess (or a forked child, see fork)")
    gpus: list[int] = option([], "GPU ids; each concurrent run gets CUDA_VISIBLE_DEVICES=<one id> (round robin)")
    in_process: bool = option(True, "with max_parallel=1 call the app's main() in this process (no start-up cost)")
    fork: bool = option(
        False,
        "with max_parallel > 1 run each run in a forked child of this process, on one CPU thread: it inherits "
        "the imports and what the first run (in this process) set up, so no start-up cost (for many small CPU "
        "runs); CPU only, not with gpus (CUDA cannot be used in a forked child once the parent has initialised "
        "it); where fork is missing (Windows) runs go in sequence",
    )

    def validate(self) -> None:
        if self.max_parallel < 1:
            raise ConfigError(f"local.max_parallel={self.max_parallel} must be >= 1")
        if self.fork and self.gpus:
            raise ConfigError(
                f"local.fork=true cannot be used with local.gpus={self.gpus}: CUDA cannot be used in a forked "
                "child once the parent has initialised it; drop local.fork for GPU runs (subprocesses)"
            )


@dataclasses.dataclass
class SlurmBackendConfig:
    """One submitit job array on a SLURM cluster (one task per run, same command as a local subprocess)."""

    cluster: str = option("slurm", "submitit cluster: slurm; local or debug run the array on this machine")
    partition: str | None = option(None, "SLURM partition")
    account: str | None = option(None, "SLURM account")
    qos: str | None = option(None, "SLURM QOS")
    constraint: str | None = option(None, "SLURM constraint (e.g. a100)")
    time_min: int = option(24 * 60, "time limit per run in minutes")
    gpus_per_job: int = option(1, "GPUs per run")
    cpus_per_job: int = option(8, "CPU cores per run")
    mem_gb: int | None = option(None, "memory per run in GB (null: the partition's default)")
    array_parallelism: int = option(64, "at most this many tasks of the array at once")
    additional: dict[str, Any] = option({}, "extra sbatch parameters, e.g. {exclude: node12}")
    folder: str = option("", "submitit logs folder (default: <root>/sweeps/<name>/submitit)")
    wait: bool = option(False, "wait for the array and list failures (default: submit and return)")

    def validate(self) -> None:
        if self.cluster not in SUBMITIT_CLUSTERS:
            raise ConfigError(
                f"slurm.cluster='{self.cluster}' is unknown: choose one of {', '.join(SUBMITIT_CLUSTERS)}"
            )
        for key in ("time_min", "cpus_per_job", "array_parallelism"):
            if getattr(self, key) < 1:
                raise ConfigError(f"slurm.{key}={getattr(self, key)} must be >= 1")
        if self.gpus_per_job < 0:
            raise ConfigError(f"slurm.gpus_per_job={self.gpus_per_job} must be >= 0")


@dataclasses.dataclass
class SweepConfig:
    """A grid of runs of one app, launched idempotently (finished runs are skipped, unfinished resumed)."""

    name: str = option("", "sweep name: the first part of every run's log_dir")
    app: str = option("train", "app to run: train, eval, analysis, linear_probing (or a module of the apps package)")
    base: list[str] = option([], "YAML config files of the app, merged in order under everything else")
    overrides: dict[str, Any] = option({}, "fixed config keys for every run (nested or dotted keys)")
    grid: dict[str, Any] = option({}, "one grid: key -> list of values (the key 'config' lists YAML files)")
    grids: list[dict[str, Any]] = option([], "several grids whose runs are united (e.g. per-dataset lr grids)")
    run_name: str = option("", "log_dir template under <name>/, e.g. '{dataset_name}/{trainable}/lr{lr}_seed{seed}'")
    root: str = option("outputs", "output root passed to every run (runs live in <root>/runs/<log_dir>)")
    backend: str = option("local", "local or slurm")
    local: LocalBackendConfig = option(LocalBackendConfig(), "local backend")
    slurm: SlurmBackendConfig = option(SlurmBackendConfig(), "slurm backend (submitit)")
    dry_run: bool = option(False, "print the runs and their status, run nothing")
    limit: int | None = option(None, "launch at most this many pending runs (after skipping completed ones)")
    rerun_stale: bool = option(
        False, "rerun runs whose saved config differs from the sweep's, from scratch (default: list them, run nothing)"
    )

    def validate(self) -> None:
        if not self.name or _SAFE.sub("_", self.name) != self.name:
            raise ConfigError(
                f"sweep name={self.name!r} must be a non-empty filesystem-safe word (letters, digits, . _ + = -)"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend='{self.backend}' is unknown: choose one of {', '.join(BACKENDS)}")
        if self.grid and self.grids:
            raise ConfigError("give either grid: (one grid) or grids: (a list of grids), not both")
        for i, g in enumerate(self.all_grids()):
            for key, values in g.items():
                if not isinstance(values, list) or not values:
                    raise ConfigError(
                        f"grids[{i}].{key} must be a non-empty list of values, got {values!r} "
                        f"(put a single fixed value under overrides:)"
                    )
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit={self.limit} must be >= 0")
        if self.backend == "slurm" and not self.dry_run and importlib.util.find_spec("submitit") is None:
            raise ConfigError(
                "backend=slurm needs the submitit package: pip install submitit (or pip install -e '.[cluster]'), "
                "or use backend=local"
            )

    def all_grids(self) -> list[dict[str, Any]]:
        """The grids to unite (a sweep without a grid is a single run)."""
        if self.grids:
            return list(self.grids)
        return [self.grid]


# ---------------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One point of the sweep, with its resolved app config and run directory."""

    index: int
    point: dict[str, Any]
    cfg: Any
    log_dir: str
    run_dir: Path
    status_path: Path  # <run_dir>/status.json, or the sweep's own record for apps that do not write one
    own_status: bool = True  # the app writes status.json in run_dir and holds the run's lock itself

    @property
    def status(self) -> str:
        return read_status(self.status_path)


@dataclasses.dataclass
class Failure:
    run_dir: Path
    message: str


@dataclasses.dataclass
class Stale:
    """A run whose saved config differs from the sweep's: ``differences`` are (key, saved, now)."""

    run: Run
    status: str
    differences: list[tuple[str, Any, Any]]

    def describe(self, limit: int = 8) -> str:
        shown = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in self.differences[:limit])
        more = len(self.differences) - limit
        return shown + (f"; and {more} more" if more > 0 else "")


@dataclasses.dataclass
class Busy:
    """A run another process works on (it holds the run directory's lock)."""

    run: Run
    holder: str


@dataclasses.dataclass
class SweepResult:
    """What a launch did: runs skipped as completed, launched, failed (with messages), or submitted.

    ``stale`` runs (config changed since they ran) and ``busy`` ones (running elsewhere) were left alone.
    """

    total: int
    skipped: list[Run]
    launched: list[Run]
    failures: list[Failure]
    submitted: list[str] = dataclasses.field(default_factory=list)  # job ids (slurm, no wait)
    stale: list[Stale] = dataclasses.field(default_factory=list)
    busy: list[Busy] = dataclasses.field(default_factory=list)


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def load_app(module: str) -> Any:
    """Import an app module and check it follows the sweep convention (``CONFIG`` dataclass, ``main``)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise SweepError(f"app module '{module}' cannot be imported ({e}): check the sweep's app: key") from e
    if app_config_class(mod) is None or not callable(getattr(mod, "main", None)):
        raise SweepError(f"app module '{module}' must define main(cfg) and CONFIG = <its config dataclass> to be swept")
    return mod


def app_config_class(mod: Any) -> type | None:
    """``mod.CONFIG``, else the only dataclass named ``*Config`` defined in ``mod`` (None if not exactly one)."""
    cls = getattr(mod, "CONFIG", None)
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return cls
    found = [
        v
        for k, v in vars(mod).items()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and k.endswith("Config") and v.__module__ == mod.__name__
    ]
    return found[0] if len(found) == 1 else None


def expand_dotted(data: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1e-2, "model": {"name": x}}`` → nested dicts (``{"optim": {"lr": 1e-2}, ...}``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise SweepError(f"key '{key}' conflicts with the value already given for '{part}'")
            node = nxt
        if isinstance(value, dict):
            value = expand_dotted(value)
            if isinstance(node.get(parts[-1]), dict):
                node[parts[-1]] = _deep_merge(node[parts[-1]], value)
                continue
        node[parts[-1]] = value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def grid_points(grids: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points of each grid (cartesian product, last key fastest), grids in order."""
    points: list[dict[str, Any]] = []
    for g in grids:
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            points.append(dict(zip(keys, values, strict=True)))
    return points


def format_value(value: Any) -> str:
    """A config value as a filesystem-safe path part (``1e-3`` → ``0.001``, ``[mha, fc1]`` → ``mha+fc1``)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(format_value(v) for v in value)
    elif value is None:
        text = "none"
    else:
        text = str(value)
    return _SAFE.sub("_", text) or "_"


def _lookup(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) and not isinstance(obj, dict):
            raise KeyError(dotted)
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def render_run_name(template: str, point: dict[str, Any], cfg: Any) -> str:
    """Fill ``{key}`` placeholders from the grid point, else from the resolved config (dots, aliases)."""
    aliases = aliases_of(type(cfg))

    def value_of(match: re.Match) -> str:
        key = match.group(1)
        if key in point:
            value = point[key]
            if key == CONFIG_KEY:
                return format_value(Path(str(value)).stem)
            return format_value(value)
        for candidate in (key, aliases.get(key, key)):
            try:
                return format_value(_lookup(cfg, candidate))
            except (KeyError, AttributeError):
                continue
        raise SweepError(
            f"run_name placeholder '{{{key}}}' is neither a grid key ({', '.join(point) or 'none'}) "
            f"nor a key of {type(cfg).__name__}"
        )

    parts = [_PLACEHOLDER.sub(value_of, p) for p in template.split("/") if p]
    return "/".join(_SAFE.sub("_", p) for p in parts)


def default_run_name(point: dict[str, Any]) -> str:
    """``config`` → its file stem, every other grid key → ``<last key part>-<value>``, one path part each."""
    parts = []
    for key in point:
        parts.append(f"{{{key}}}" if key == CONFIG_KEY else f"{key.split('.')[-1]}-{{{key}}}")
    return "/".join(parts) or "run"


def expand(sweep: SweepConfig, module: str, run_dir: Callable[[Any], Path] | None = None) -> list[Run]:
    """All runs of ``sweep`` for the app ``module``, configs built and validated, in grid order.

    ``run_dir(cfg)`` gives the output directory of apps that do not follow the run-directory contract
    (default: the module's own ``run_dir``, else ``<root>/runs/<log_dir>``).

    Raises
    ------
    SweepError
        Two points map to the same run directory with different configs, or an unknown placeholder.
    ConfigError
        A grid or override key that the app does not have, or an invalid value (named with its run).
    """
    mod = load_app(module)
    cls = app_config_class(mod)
    fields = {f.name for f in dataclasses.fields(cls)}
    yaml_cache: dict[str, list[tuple[str, dict]]] = {}

    def file_layers(path: str) -> list[tuple[str, dict]]:
        if path not in yaml_cache:
            # One clear error for missing, binary or invalid YAML files; a file's `base:` files come under it.
            what = f"config file named by sweep '{sweep.name}'"
            yaml_cache[path] = config_layers([path], cls, what=what, fix="fix its path")
        return yaml_cache[path]

    base_layers = [layer for p in sweep.base for layer in file_layers(p)]
    fixed = ("sweep overrides", expand_dotted(dict(sweep.overrides)))
    builder = _PointBuilder(cls)
    runs: list[Run] = []
    by_dir: dict[Path, Run] = {}
    for point in grid_points(sweep.all_grids()):
        layers = list(base_layers)
        if CONFIG_KEY in point:
            layers.extend(file_layers(str(point[CONFIG_KEY])))
        layers.append(fixed)
        rest = {k: v for k, v in point.items() if k != CONFIG_KEY}
        cfg = builder.build(layers, rest)
        name = render_run_name(sweep.run_name or default_run_name(point), point, cfg)
        log_dir = f"{sweep.name}/{name}"
        changes = {k: v for k, v in (("log_dir", log_dir), ("root", sweep.root)) if k in fields}
        cfg = dataclasses.replace(cfg, **changes)
        out_dir, own_status = _run_dir(mod, cfg, run_dir)
        status_path = out_dir / "status.json" if own_status else _sweep_file(sweep, log_dir, ".status.json")
        run = Run(
            index=len(runs),
            point=point,
            cfg=cfg,
            log_dir=log_dir,
            run_dir=out_dir,
            status_path=status_path,
            own_status=own_status,
        )
        if out_dir in by_dir:
            other = by_dir[out_dir]
            if other.cfg == cfg:
                continue  # the grids overlap on this point: it is one run
            raise SweepError(
                f"grid points {other.point} and {point} both map to run directory {out_dir}: "
                f"add the key that tells them apart to run_name ('{sweep.run_name}')"
            )
        by_dir[out_dir] = run
        runs.append(run)
    return runs


class _PointBuilder:
    """Build the config of each grid point as ``build_config(cls, *layers, point)`` would, but fast.

    A full OmegaConf build costs tens of milliseconds, so a 924-run grid would take most of a minute to
    list. Instead the layers under the point are built once, each distinct (key, value) of the grid is
    built (type-checked and converted) once on top of them, and a point's config is the base with those
    converted values set (``dataclasses.replace``), then validated as a whole. When a key cannot be set
    that way (a key inside an open dict, or keys nested in one another) the point is built in full.
    """

    def __init__(self, cls: type):
        self.cls = cls
        self.aliases = aliases_of(cls)
        self.bases: dict[str, Any] = {}
        self.values: dict[tuple[str, str, str], Any] = {}
        self.settable: dict[tuple[str, ...], bool] = {}

    def build(self, layers: list[tuple[str, dict]], point: dict[str, Any]) -> Any:
        layer_key = repr([src for src, _ in layers])
        paths = {k: self.aliases.get(k, k) for k in point}
        signature = tuple(paths.values())
        if signature not in self.settable:
            self.settable[signature] = self._settable(signature)
        if not self.settable[signature]:
            return build_config(self.cls, *layers, (f"sweep grid point {point}", expand_dotted(point)))
        if layer_key not in self.bases:
            self.bases[layer_key] = build_config(self.cls, *layers)
        cfg = self.bases[layer_key]
        for key, value in point.items():
            vkey = (layer_key, key, repr(value))
            if vkey not in self.values:
                one = build_config(
                    self.cls, *layers, (f"sweep grid value {key}={value!r}", expand_dotted({key: value}))
                )
                self.values[vkey] = _lookup(one, paths[key])
            cfg = _set_path(cfg, paths[key].split("."), copy.deepcopy(self.values[vkey]))
        validate(cfg)
        return cfg

    def _settable(self, paths: Iterable[str]) -> bool:
        paths = list(paths)
        for a in paths:
            if any(b != a and b.startswith(a + ".") for b in paths):
                return False
            tp: Any = self.cls
            for part in a.split("."):
                if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
                    return False
                hints = typing.get_type_hints(tp)
                if part not in hints:
                    return False  # build_config names the unknown key
                tp = hints[part]
                args = [t for t in typing.get_args(tp) if t is not type(None)]
                if typing.get_origin(tp) is not None and len(args) == 1 and dataclasses.is_dataclass(args[0]):
                    tp = args[0]  # Optional[SubConfig]
        return True


def _set_path(obj: Any, parts: list[str], value: Any) -> Any:
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    return dataclasses.replace(obj, **{parts[0]: _set_path(getattr(obj, parts[0]), parts[1:], value)})


def _sweep_file(sweep: SweepConfig, log_dir: str, suffix: str) -> Path:
    base = Path(sweep.root) / "sweeps" / log_dir
    return base.with_name(base.name + suffix)


def _run_dir(mod: Any, cfg: Any, fn: Callable[[Any], Path] | None) -> tuple[Path, bool]:
    """(output directory, whether the app writes its status.json there itself)."""
    fn = fn or getattr(mod, "run_dir", None)
    if callable(fn):
        return Path(fn(cfg)), False
    if not (hasattr(cfg, "root") and hasattr(cfg, "log_dir")):
        raise SweepError(
            f"app module '{mod.__name__}' has no root/log_dir config keys: define run_dir(cfg) so the sweep "
            f"knows where each run writes status.json"
        )
    return Path(cfg.root) / "runs" / cfg.log_dir, True


# ---------------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------------


def read_status(path: str | os.PathLike) -> str:
    """``status`` of a status.json file: completed, running, failed; ``missing`` or ``unreadable``."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        data = json.loads(path.read_text())
        return str(data["status"])
    except (ValueError, KeyError, TypeError):
        return "unreadable"


def _status_message(path: Path) -> str:
    try:
        return str(json.loads(path.read_text()).get("message", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _snapshot(path: Path) -> tuple | None:
    """What identifies the current version of a status file (None: no file): did an attempt write it?"""
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size, path.read_bytes()
    except OSError:
        return None


def _record_outcome(
    status_path: Path, error: str | None, before: tuple | None = None, lock_dir: Path | None = None
) -> str | None:
    """After an attempt: write ``status.json`` where the app did not, and return the failure message (or None).

    A run that returned normally is completed unless the app itself recorded something else; a run
    that raised is failed (the app's own ``failed`` message is kept when it wrote one). ``before`` is
    the status file's :func:`_snapshot` from before the attempt: a failed attempt that never wrote it
    (the app refused the run before starting it: another process holds it, or its config changed)
    leaves the status of whoever ran the run last. ``lock_dir``: the run directory of an app that
    keeps its own status (it has released its lock by now); the status is written only while holding
    that lock, and only into a directory that exists (an app that failed on bad input left none).
    """
    if lock_dir is None:
        return _write_outcome(status_path, error, before, own_record=True)
    if not Path(lock_dir).is_dir():
        return error
    try:
        lock = RunLock(lock_dir, "vitef.sweep: recording a run's outcome").acquire()
    except RunLockedError:
        logger.warning("%s: another process took the run over; its status is left to that process", lock_dir)
        return error
    except VitefError as e:  # e.g. the run directory became read-only: its status cannot be written either
        logger.warning("%s: cannot record the run's outcome: %s", lock_dir, e)
        return error
    try:
        return _write_outcome(status_path, error, before, own_record=False)
    finally:
        lock.release()


def _write_outcome(status_path: Path, error: str | None, before: tuple | None, own_record: bool) -> str | None:
    status = read_status(status_path)
    if error is None:
        if status == "missing" or (own_record and status != COMPLETED):
            atomic_write_json(status_path, {"status": COMPLETED, "step": None, "message": "sweep: done"})
            return None
        if status == COMPLETED:
            return None
        return f"the app returned but {status_path} says '{status}': {_status_message(status_path)}".rstrip(": ")
    touched = _snapshot(status_path) != before
    if own_record or (touched and status != "failed") or status == "missing":
        atomic_write_json(status_path, {"status": "failed", "step": None, "message": error})
    return error


# ---------------------------------------------------------------------------------------------------
# Staleness and locks
# ---------------------------------------------------------------------------------------------------


def free_keys(module: str) -> tuple[str, ...]:
    """Config keys whose change does not make a run stale: :data:`ALWAYS_FREE_KEYS` + the app's ``RESUME_FREE_KEYS``."""
    return (*ALWAYS_FREE_KEYS, *getattr(load_app(module), "RESUME_FREE_KEYS", ()))


def saved_config_path(sweep: SweepConfig, run: Run) -> Path | None:
    """The config a run ran with: its ``config.yaml`` (apps that keep a run directory), else the sweep's record."""
    if run.own_status and (run.run_dir / "config.yaml").is_file():
        return run.run_dir / "config.yaml"
    record = launch_files(sweep, run)[0]
    return record if record.is_file() else None


def config_differences(saved: Any, cfg: Any, free: Sequence[str] = ALWAYS_FREE_KEYS) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, value now) for every key that differs, ignoring ``free`` keys (and their sub-keys).

    A key present on one side only differs too (its absent side is shown as ``(absent)``), except across
    code versions: a config field added since the run was saved counts as its default, and a saved
    field that the config class no longer has is ignored (no sweep file can set it).
    """
    now = flatten(yaml.safe_load(to_yaml(cfg)) or {})  # through YAML, as the saved side went
    # The saved side as the loader stores it today (`trainable: [attn]` saved by an older run is `[mha]`).
    old = flatten(canonical_saved(type(cfg), saved)) if isinstance(saved, dict) else {}
    try:
        defaults = flatten(yaml.safe_load(to_yaml(type(cfg))) or {})
    except Exception:  # a class whose defaults cannot be listed: compare strictly
        defaults = {}
    out = []
    for key in sorted(set(old) | set(now)):
        if any(key == k or key.startswith(k + ".") for k in free):
            continue
        a, b = old.get(key, _ABSENT), now.get(key, _ABSENT)
        if a is _ABSENT and key in defaults:
            a = defaults[key]
        if b is _ABSENT and _removed_field(type(cfg), key):
            continue
        if a != b:
            out.append((key, a, b))
    return out


def _removed_field(cls: type, dotted: str) -> bool:
    """True when ``dotted`` names no field of the dataclass tree ``cls`` (a key inside a dict field is a value)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return True
        tp = hints[part]
        args = [t for t in typing.get_args(tp) if t is not type(None)]
        if typing.get_origin(tp) is not None and len(args) == 1 and dataclasses.is_dataclass(args[0]):
            tp = args[0]  # Optional[SubConfig]
    return False


def stale_differences(sweep: SweepConfig, run: Run, free: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """How the config a started run ran with differs from the sweep's now ([] when it does not, or never ran)."""
    if run.status == "missing":
        return []  # never ran (or the app left nothing): nothing stale to reuse
    path = saved_config_path(sweep, run)
    if path is None:
        return []
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return [(str(path), f"unreadable ({type(e).__name__})", "the sweep's config")]
    return config_differences(saved, run.cfg, free)


@dataclasses.dataclass
class Plan:
    """Runs sorted before a launch: ``done`` (completed), ``todo`` (to launch), ``stale``, ``busy``."""

    done: list[Run]
    todo: list[Run]
    stale: list[Stale]
    busy: list[Busy]
    state: dict[int, str]  # run index -> completed, stale, running elsewhere, or its status (missing, failed...)


def plan_runs(sweep: SweepConfig, module: str, runs: Iterable[Run]) -> Plan:
    """Sort runs: running elsewhere (locked) first, then stale (config changed), completed, and the rest to launch.

    Stale runs go to ``todo`` (with ``overwrite=true`` where the app has that key) when ``sweep.rerun_stale``.
    Creates nothing (the locks are probed without creating a lock file).
    """
    free = free_keys(module)
    plan = Plan([], [], [], [], {})
    for run in runs:
        who = holder(run.run_dir)
        if who is not None:
            plan.busy.append(Busy(run, describe_holder(who)))
            plan.state[run.index] = "running elsewhere"
            continue
        status = run.status
        diffs = stale_differences(sweep, run, free)
        if diffs and not sweep.rerun_stale:
            plan.stale.append(Stale(run, status, diffs))
            plan.state[run.index] = "stale"
        elif diffs:
            if any(f.name == "overwrite" for f in dataclasses.fields(run.cfg)):
                run.cfg = dataclasses.replace(run.cfg, overwrite=True)
            plan.todo.append(run)
            plan.state[run.index] = "stale"
        elif status == COMPLETED:
            plan.done.append(run)
            plan.state[run.index] = COMPLETED
        else:
            plan.todo.append(run)
            plan.state[run.index] = status
    return plan


# ---------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------


def run_in_process(
    module: str,
    cfg: Any,
    status_path: Path,
    run_dir: Path | None = None,
    own_status: bool = True,
    record: Path | None = None,
) -> str | None:
    """Call the app's ``main(cfg)`` here; return None on success or the failure message.

    With ``run_dir``, the run's lock is respected: an app that keeps its own status holds it itself
    (``own_status``), for the others the sweep holds it around the call. ``record``: where to save the
    config that ran (the sweep's record, compared on relaunch to find stale runs).

    Log handlers the app adds (its run's log file) are removed afterwards so that runs do not log
    into each other's files; CUDA memory is released between runs.

    Raises
    ------
    RunLockedError
        Another process works on the run; nothing of it was touched.
    """
    mod = load_app(module)
    held = None
    try:
        if run_dir is not None and not own_status:
            held = RunLock(run_dir, f"vitef.sweep: {module}").acquire()
        if record is not None:
            save_config(cfg, record)
    except RunLockedError:
        raise
    except (VitefError, OSError) as e:  # e.g. an output folder that cannot be written: this run's failure only
        if held is not None:
            held.release()
        return f"{type(e).__name__}: {e}"
    try:
        before = _snapshot(status_path)
        root_logger = logging.getLogger()
        handlers = list(root_logger.handlers)
        level = root_logger.level
        error: str | None = None
        try:
            mod.main(cfg)
        except RunLockedError:
            raise  # the run belongs to another process: record nothing
        except VitefError as e:
            error = f"{type(e).__name__}: {e}"
        except Exception as e:  # a bug in one run must not stop the others; the traceback goes to the log
            logger.exception("run %s crashed", status_path.parent)
            error = f"{type(e).__name__}: {e}"
        finally:
            for h in root_logger.handlers[:]:
                if h not in handlers:
                    root_logger.removeHandler(h)
                    h.close()
            root_logger.setLevel(level)
            _release_memory()
        return _record_outcome(status_path, error, before, run_dir if own_status else None)
    finally:
        if held is not None:
            held.release()


def _release_memory() -> None:
    # Only GPU memory needs an explicit release between runs (a full gc pass costs ~0.1 s on CPU).
    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


class _Stopped(Exception):
    """The sweep is stopping: no new subprocess is started."""


class _Children:
    """The subprocesses of a parallel sweep, each in its own process group, so that stopping ends them all."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._guard = threading.Lock()
        self.stopping = False

    def start(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        with self._guard:  # no child may start after stop() took the list
            if self.stopping:
                raise _Stopped()
            # Its own process group: the whole tree (e.g. data-loader workers) can be signalled at once,
            # and a Ctrl-C in the terminal reaches the sweep, which then ends it.
            proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_ends_with_us(), **kwargs)
            self._procs.add(proc)
        return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self._guard:
            self._procs.discard(proc)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM every running child's process group, then SIGKILL what is left after ``grace_s``."""
        with self._guard:
            self.stopping = True
            procs = list(self._procs)
        if procs:
            logger.warning("stopping %d run(s): up to %.0f s for each to save a checkpoint", len(procs), grace_s)
        for proc in procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            _wait_ended(proc, max(deadline - time.monotonic(), 0.01))
            _signal_group(proc.pid, signal.SIGKILL)  # the group may hold more than the child itself
        if procs:
            logger.warning("stopped %d running subprocess(es)", len(procs))


def _wait_ended(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``proc`` to end, without reaping it; whether it ended.

    ``proc.wait`` cannot serve here: :meth:`_ArrayTask.checkpoint` runs in a signal handler that interrupted a
    ``proc.wait()`` of the same thread, which holds the Popen's wait lock until the handler returns. Leaving the
    ended child unreaped (``WNOWAIT``) lets that wait, or the parallel backend's thread, collect its status.
    """
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        if not hasattr(os, "waitid"):  # no waitid (not Linux nor macOS): the waiting thread is another one
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            break
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped meanwhile by the thread that waits for it
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return proc.returncode is not None


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (Linux only), looked up once in the sweep process: a child calls it between fork and exec,
    where nothing that takes a lock (an import, a library lookup) may run."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _end_with(parent: int) -> None:
    """In a child of the sweep, before it runs anything: have the kernel SIGTERM it when ``parent`` (the sweep)
    dies, whatever kills the sweep. A ``kill -9`` of the sweep cannot run :meth:`_Children.stop`, and the children
    sit in their own process groups, so without this they would train on, unsupervised, holding their runs' locks.
    A data-loader worker of the child notices its parent gone and ends too."""
    prctl = _prctl()
    if prctl is None:  # other systems: a killed sweep leaves its children to finish their runs
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the sweep died before the request took effect: nobody would signal us
        os.kill(os.getpid(), signal.SIGTERM)


def _ends_with_us() -> Callable[[], None] | None:
    """``preexec_fn`` of a subprocess that must not outlive this process (Linux; None elsewhere).

    The kernel signals the child when the *thread* that started it ends: the parallel backend starts each child
    from a thread that then waits for it, the sequential one from the main thread, so that is when the sweep ends.
    """
    return functools.partial(_end_with, os.getpid()) if _prctl() is not None else None


def _signal_group(pid: int, sig: int, or_child: bool = False) -> None:
    """Signal the process group led by ``pid`` (a child started in its own group).

    ``or_child``: when there is no such group (a forked child stopped before it or the sweep made its
    group), signal the child itself; only for a child not reaped yet, whose pid cannot have been reused.
    """
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        if or_child:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
    except PermissionError:
        pass


def run_command(
    cmd: Sequence[str],
    status_path: str,
    log_path: str,
    env: dict[str, str] | None = None,
    run_dir: str | None = None,
    own_status: bool = True,
    children: _Children | None = None,
) -> str | None:
    """Run one app as a subprocess (the local parallel and slurm backends); None on success, else why not.

    stdout and stderr go to ``log_path``. The message of a failure is the app's ``error: ...`` line
    (or the last line of its output) and how it ended. ``run_dir`` and ``own_status``: the run's lock,
    as in :func:`run_in_process`. ``children``: the parallel backend's registry, which starts the
    subprocess in its own process group and ends it when the sweep is stopped.

    Raises
    ------
    RunLockedError
        Another process works on the run (found by the sweep, or by the app: its error line says so).
    """
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    cwd = os.getcwd()
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, full_env.get("PYTHONPATH", "")) if p)
    lock_dir = Path(run_dir) if run_dir is not None else None
    held = RunLock(lock_dir, f"vitef.sweep: {' '.join(cmd[2:3])}").acquire() if lock_dir and not own_status else None
    try:
        status = Path(status_path)
        before = _snapshot(status)
        with open(log, "w") as fh:
            kwargs = dict(stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
            if children is None:
                rc = subprocess.call(list(cmd), preexec_fn=_ends_with_us(), **kwargs)
            else:
                proc = children.start(cmd, **kwargs)
                try:
                    rc = proc.wait()
                finally:
                    children.done(proc)
        error = None
        if rc != 0:
            how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            line = _last_error_line(log)
            if LOCKED_MARK in line and _snapshot(status) == before:
                raise RunLockedError(line.removeprefix("error:").strip())
            error = f"{line} ({how}; log: {log})".lstrip()
        return _record_outcome(status, error, before, lock_dir if own_status else None)
    finally:
        if held is not None:
            held.release()


def _last_error_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    return lines[-1] if lines else ""


def launch_files(sweep: SweepConfig, run: Run) -> tuple[Path, Path]:
    """Where a run's config (the sweep's record of it) and console log live: ``<root>/sweeps/<log_dir>.{yaml,log}``."""
    return _sweep_file(sweep, run.log_dir, ".yaml"), _sweep_file(sweep, run.log_dir, ".log")


def command_for(sweep: SweepConfig, run: Run, module: str) -> list[str]:
    """Write the run's resolved config and return the command that runs it (``python -m <app> config=…``)."""
    cfg_path, _ = launch_files(sweep, run)
    save_config(run.cfg, cfg_path)
    return [sys.executable, "-m", module, f"config={cfg_path}"]


def pending_runs(runs: Iterable[Run]) -> tuple[list[Run], list[Run]]:
    """Split runs into (completed: skipped, pending: to launch) by status alone (see :func:`plan_runs`)."""
    done, todo = [], []
    for run in runs:
        (done if run.status == COMPLETED else todo).append(run)
    return done, todo


def launch(
    sweep: SweepConfig,
    module: str,
    runs: Sequence[Run] | None = None,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
) -> SweepResult:
    """Launch every run of ``sweep`` that is not completed, on its backend; never stops at a failure.

    Runs that are stale (config changed; unless ``sweep.rerun_stale``) or running elsewhere are left
    alone and returned in ``stale`` and ``busy``. ``progress(iterable, total)`` wraps the loop over runs
    (e.g. tqdm); identity by default.
    """
    runs = list(runs) if runs is not None else expand(sweep, module)
    plan = plan_runs(sweep, module, runs)
    todo = plan.todo
    if sweep.limit is not None:
        todo = todo[: sweep.limit]
    wrap = progress or (lambda it, total: it)
    logger.info(
        "sweep %s: %d runs, %d completed (skipped), %d stale, %d running elsewhere, %d to launch",
        sweep.name, len(runs), len(plan.done), len(plan.stale), len(plan.busy), len(todo),
    )  # fmt: skip
    for st in plan.stale:
        logger.warning("run %s is stale (%s): %s", st.run.run_dir, st.status, st.describe())
    failures: list[Failure] = []
    busy = list(plan.busy)
    submitted: list[str] = []
    local = sweep.local
    fork = sweep.backend == "local" and local.max_parallel > 1 and local.fork
    forked = fork and bool(todo) and _can_fork()
    if sweep.backend == "local" and ((local.max_parallel == 1 and local.in_process) or (fork and not forked)):
        failures, found_busy = _launch_sequential(sweep, module, todo, wrap)
        busy += found_busy
    elif forked:
        failures, found_busy = _launch_forked(sweep, module, todo, wrap)
        busy += found_busy
    elif sweep.backend == "local":
        failures, found_busy = _launch_parallel(sweep, module, todo, wrap)
        busy += found_busy
    else:
        failures, submitted, found_busy = _launch_submitit(sweep, module, todo, wrap)
        busy += found_busy
    found = {b.run.index for b in busy}
    return SweepResult(
        total=len(runs),
        skipped=plan.done,
        launched=[r for r in todo if r.index not in found],
        failures=failures,
        submitted=submitted,
        stale=plan.stale,
        busy=busy,
    )


def _launch_sequential(
    sweep: SweepConfig, module: str, todo: list[Run], wrap: Callable
) -> tuple[list[Failure], list[Busy]]:
    failures: list[Failure] = []
    busy: list[Busy] = []
    for run in wrap(todo, len(todo)):
        _run_here(sweep, module, run, failures, busy)
    return failures, busy


def _run_here(sweep: SweepConfig, module: str, run: Run, failures: list[Failure], busy: list[Busy]) -> None:
    """One run in this process; its failure or its being held elsewhere is appended to ``failures`` / ``busy``."""
    logger.info("sweep %s: run %s", sweep.name, run.run_dir)
    try:
        err = run_in_process(module, run.cfg, run.status_path, run.run_dir, run.own_status, launch_files(sweep, run)[0])
    except RunLockedError as e:
        logger.warning("run %s is running elsewhere: %s", run.run_dir, e)
        busy.append(Busy(run, str(e)))
        return
    if err is not None:
        logger.error("run %s failed: %s", run.run_dir, err)
        failures.append(Failure(run.run_dir, err))


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` in the main thread while the block runs, so the
    sweep can end its subprocesses before it exits (SIGINT raises KeyboardInterrupt already). A signal that
    is ignored (``nohup``) or handled by someone else keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {
        sig: signal.signal(sig, stop)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) == signal.SIG_DFL
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _launch_parallel(
    sweep: SweepConfig, module: str, todo: list[Run], wrap: Callable
) -> tuple[list[Failure], list[Busy]]:
    slots: queue.Queue[int] = queue.Queue()
    for i in range(sweep.local.max_parallel):
        slots.put(i)
    failures: list[Failure] = []
    busy: list[Busy] = []
    lock = threading.Lock()
    finished: queue.Queue[Run] = queue.Queue()
    children = _Children()

    def work(run: Run) -> None:
        slot = slots.get()
        try:
            if children.stopping:
                return
            env = {}
            if sweep.local.gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(sweep.local.gpus[slot % len(sweep.local.gpus)])
            _, log_path = launch_files(sweep, run)
            try:
                cmd = command_for(sweep, run, module)
                err = run_command(
                    cmd, str(run.status_path), str(log_path), env, str(run.run_dir), run.own_status, children
                )
            except _Stopped:
                return
            except RunLockedError as e:
                logger.warning("run %s is running elsewhere: %s", run.run_dir, e)
                with lock:
                    busy.append(Busy(run, str(e)))
                return
            except Exception as e:  # e.g. the log file cannot be written: still this run's failure only
                err = f"{type(e).__name__}: {e}"
            if err is not None:
                logger.error("run %s failed: %s", run.run_dir, err)
                with lock:
                    failures.append(Failure(run.run_dir, err))
        finally:
            slots.put(slot)
            finished.put(run)

    threads = [threading.Thread(target=work, args=(run,), daemon=True) for run in todo]
    try:
        with _stop_on_signals():
            for t in threads:
                t.start()
            for _ in wrap(range(len(todo)), len(todo)):
                finished.get()
    except BaseException:
        # Stopped (Ctrl-C, SIGTERM, an error in the progress display...): end every child, let the threads
        # record those runs as failed (killed), then go on stopping.
        children.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        for t in threads:
            if t.is_alive():
                t.join(timeout=max(deadline - time.monotonic(), 0.01))
        raise
    for t in threads:
        t.join()
    order = {r.run_dir: r.index for r in todo}
    return sorted(failures, key=lambda f: order[f.run_dir]), busy


def _can_fork() -> bool:
    """Whether runs can go to forked children here; if not, the reason is logged (they then run in sequence)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        logger.warning("local.fork=true: this platform cannot fork processes; the runs go in sequence in this process")
        return False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        logger.warning(
            "local.fork=true: this process has initialised CUDA, which a forked child cannot use; "
            "the runs go in sequence in this process"
        )
        return False
    return True


@dataclasses.dataclass
class _Forked:
    """A run in a forked child: the process, the read end of its reply pipe, its status file before the attempt."""

    run: Run
    proc: Any  # multiprocessing.Process
    conn: Any  # multiprocessing.connection.Connection
    before: tuple | None
    log: Path
    reply: dict[str, Any] | None = None
    open: bool = True

    def read(self) -> None:
        """Take the child's one reply (JSON, not pickle); a pipe that ends without one leaves ``reply`` None."""
        try:
            data = json.loads(self.conn.recv_bytes().decode())
            self.reply = data if isinstance(data, dict) else None
        except (EOFError, OSError, ValueError):
            pass
        self.conn.close()
        self.open = False


def _forked_child(module: str, run: Run, record: Path, log: Path, conn: Any, parent: int) -> None:
    """The body of a forked child: one run through :func:`run_in_process`, its outcome sent back as JSON."""
    _end_with(parent)  # a killed sweep (pid ``parent``) takes its children with it
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its own process group (the parent sets it too: whoever comes first)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        # Not the sweep's handlers (they raise SystemExit to stop the sweep): a signal ends the child as it
        # would end a subprocess, and the parent records the run as killed.
        if signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    import torch

    # Each child is one of several runs sharing the cores: one intra-op thread each (a forked child
    # must not reuse the parent's OpenMP pool anyway).
    torch.set_num_threads(1)
    try:
        _redirect_stderr(log)
        err = run_in_process(module, run.cfg, run.status_path, run.run_dir, run.own_status, record)
        reply: dict[str, Any] = {"outcome": "done", "error": err}
    except RunLockedError as e:
        reply = {"outcome": "busy", "error": str(e)}
    except BaseException as e:  # e.g. sys.exit() in the app: this run's failure, recorded by the parent
        reply = {"outcome": "crashed", "error": f"{type(e).__name__}: {e}"}
    conn.send_bytes(json.dumps(reply).encode())
    conn.close()


def _redirect_stderr(log: Path) -> None:
    """Send a forked child's stderr (progress bars, console log lines, native warnings) to its console log,
    as the subprocess backend does: several runs at once would scramble the terminal. stdout (the app's
    one result line) stays the sweep's."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "w", buffering=1, errors="backslashreplace")  # noqa: SIM115 (open until the child exits)
    old = sys.stderr
    with contextlib.suppress(Exception):
        old.flush()
    os.dup2(fh.fileno(), 2)
    sys.stderr = fh
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.stream = fh


def _record_lost(run: Run, error: str, before: tuple | None) -> str | None:
    """Record a run whose forked child ended without recording it (killed, crashed), as run_command does."""
    if run.own_status:
        return _record_outcome(run.status_path, error, before, run.run_dir)
    try:  # the sweep's own record: written while holding the run's lock, as the child would have
        lock = RunLock(run.run_dir, "vitef.sweep: recording a run's outcome").acquire()
    except VitefError as e:
        logger.warning("%s: cannot record the run's outcome: %s", run.run_dir, e)
        return error
    try:
        return _record_outcome(run.status_path, error, before, None)
    finally:
        lock.release()


def _launch_forked(
    sweep: SweepConfig, module: str, todo: list[Run], wrap: Callable
) -> tuple[list[Failure], list[Busy]]:
    """Each run in a fresh forked child (at most ``local.max_parallel`` at once) calling :func:`run_in_process`.

    The first run goes in this process, on one thread as the children: what a run loads or sets up once
    per process (lazy imports such as scikit-learn, the rendered bundled digits, oneDNN's compiled
    kernels: together about half of a run of the offline study) is then inherited by every child
    instead of being done again in each.
    """
    import torch

    load_app(module)
    ctx = multiprocessing.get_context("fork")
    pending = list(reversed(todo))
    running: list[_Forked] = []
    failures: list[Failure] = []
    busy: list[Busy] = []

    def start(run: Run) -> bool:
        logger.info("sweep %s: run %s", sweep.name, run.run_dir)
        record, log = launch_files(sweep, run)
        try:
            reader, writer = ctx.Pipe(duplex=False)
            child = _Forked(run, None, reader, _snapshot(run.status_path), log)
            args = (module, run, record, log, writer, os.getpid())
            child.proc = ctx.Process(target=_forked_child, args=args, name=run.log_dir)
            try:
                child.proc.start()
                running.append(child)
            finally:
                writer.close()  # the child holds its own copy: the pipe ends when the child does
        except OSError as e:  # e.g. no memory left to fork: this run's failure only
            err = f"cannot fork a process for the run: {type(e).__name__}: {e}"
            logger.error("run %s failed: %s", run.run_dir, err)
            failures.append(Failure(run.run_dir, err))
            return False
        with contextlib.suppress(OSError):
            os.setpgid(child.proc.pid, child.proc.pid)
        return True

    def next_finished() -> _Forked:
        while True:
            ready = multiprocessing.connection.wait(
                [c.proc.sentinel for c in running] + [c.conn for c in running if c.open]
            )
            for c in running:
                if c.open and c.conn in ready:
                    c.read()
            for c in running:
                if c.proc.sentinel in ready:
                    if c.open and c.conn.poll():  # not blocking on a pipe that a grandchild keeps open
                        c.read()
                    c.proc.join()
                    running.remove(c)
                    return c

    def finish(child: _Forked) -> None:
        run, reply = child.run, child.reply or {}
        if reply.get("outcome") == "busy":
            logger.warning("run %s is running elsewhere: %s", run.run_dir, reply.get("error"))
            busy.append(Busy(run, str(reply.get("error"))))
            return
        if reply.get("outcome") == "done":
            err = reply.get("error")
        else:
            if reply.get("outcome") == "crashed":
                error = str(reply.get("error"))
            else:
                code = child.proc.exitcode
                how = f"exit status {code}"
                if code is None:
                    how = "still running after SIGKILL"
                elif code < 0:
                    how = f"killed by signal {-code}"
                error = f"{_last_error_line(child.log)} ({how}; log: {child.log})".lstrip()
            try:
                err = _record_lost(run, error, child.before)
            except Exception as e:  # e.g. the status file cannot be written: still this run's failure only
                logger.warning("%s: cannot record the run's outcome: %s", run.run_dir, e)
                err = error
        if err is not None:
            logger.error("run %s failed: %s", run.run_dir, err)
            failures.append(Failure(run.run_dir, str(err)))

    try:
        with _stop_on_signals():
            for i in wrap(range(len(todo)), len(todo)):
                if i == 0:
                    threads = torch.get_num_threads()
                    torch.set_num_threads(1)
                    try:
                        _run_here(sweep, module, pending.pop(), failures, busy)
                    finally:
                        torch.set_num_threads(threads)
                    continue
                while pending and len(running) < sweep.local.max_parallel:
                    if not start(pending.pop()):
                        break  # that run is over (it could not start): it is this turn's finished run
                else:
                    finish(next_finished())
    except BaseException:
        # Stopped (Ctrl-C, SIGTERM, an error...): end every child and its process group, record those runs
        # as killed, then go on stopping.
        stopping = list(running)
        for c in stopping:
            _signal_group(c.proc.pid, signal.SIGTERM, or_child=True)
        deadline = time.monotonic() + STOP_GRACE_S
        for c in stopping:
            c.proc.join(timeout=max(deadline - time.monotonic(), 0.01))
            # SIGKILL the group even when the child is gone: it may hold more than the child itself.
            _signal_group(c.proc.pid, signal.SIGKILL, or_child=c.proc.exitcode is None)
            c.proc.join(timeout=STOP_GRACE_S)
            if c.open and c.conn.poll():
                c.read()
            finish(c)
        if stopping:
            logger.warning("sweep stopped: ended %d running forked run(s)", len(stopping))
        raise
    order = {r.run_dir: r.index for r in todo}
    return sorted(failures, key=lambda f: order[f.run_dir]), busy


class _ArrayTask:
    """One task of the slurm backend's job array: :func:`run_command`, requeued by submitit before a time limit (and
    on a preemption the cluster announces with the same signal).

    submitit calls :meth:`checkpoint` on its warning signal (SIGUSR2, ``signal_delay_s`` = 90 s before the time
    limit by default): the app gets SIGTERM, finishes its update and saves a step checkpoint
    (:mod:`vitef.monitor.stop`), and the task is requeued with the same arguments; the app then resumes the run
    from that checkpoint. submitit recognises a requeueable callable by its ``checkpoint`` method.
    """

    def __init__(self) -> None:
        self._children: _Children | None = None

    def __call__(self, *args: Any) -> str | None:
        self._children = _Children()
        return run_command(*args, children=self._children)

    def checkpoint(self, *args: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        if self._children is not None:
            self._children.stop(REQUEUE_GRACE_S)
        return DelayedSubmission(_ArrayTask(), *args)  # a fresh task: this one holds live processes

    def __getstate__(self) -> dict[str, Any]:
        return {"_children": None}  # submitit stores the task; processes and locks are not part of it


def _launch_submitit(
    sweep: SweepConfig, module: str, todo: list[Run], wrap: Callable
) -> tuple[list[Failure], list[str], list[Busy]]:
    import submitit

    s = sweep.slurm
    folder = Path(s.folder or Path(sweep.root) / "sweeps" / sweep.name / "submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    params: dict[str, Any] = {
        "name": f"vitef-{sweep.name}",
        "timeout_min": s.time_min,
        "gpus_per_node": s.gpus_per_job,
        "cpus_per_task": s.cpus_per_job,
        "mem_gb": s.mem_gb,
        "slurm_partition": s.partition,
        "slurm_account": s.account,
        "slurm_qos": s.qos,
        "slurm_constraint": s.constraint,
        "slurm_array_parallelism": s.array_parallelism,
    }
    if s.additional:
        params["slurm_additional_parameters"] = dict(s.additional)
    executor.update_parameters(**params)
    if not todo:
        return [], [], []
    jobs = []
    with executor.batch():
        for run in todo:
            _, log_path = launch_files(sweep, run)
            cmd = command_for(sweep, run, module)
            args = (cmd, str(run.status_path), str(log_path), None, str(run.run_dir), run.own_status)
            jobs.append(executor.submit(_ArrayTask(), *args))
    ids = [str(j.job_id) for j in jobs]
    logger.info("sweep %s: submitted %d runs as job array %s (logs: %s)", sweep.name, len(jobs), ids[0], folder)
    if not (s.wait or s.cluster == "debug"):
        return [], ids, []
    failures, busy = [], []
    for run, job in wrap(list(zip(todo, jobs, strict=True)), len(jobs)):
        try:
            err = job.result()
        except Exception as e:  # the job itself died (timeout, preemption, node failure), or found the run locked
            text = str(e).strip()
            if LOCKED_MARK in text:
                busy.append(Busy(run, next(ln for ln in text.splitlines() if LOCKED_MARK in ln).strip()))
                continue
            err = f"job {job.job_id} failed: {text.splitlines()[-1] if text else repr(e)}"
            _record_outcome(run.status_path, err, None, run.run_dir if run.own_status else None)
        if err is not None:
            failures.append(Failure(run.run_dir, err))
    return failures, ids, busy
