"""Measured training rates and what a sweep costs in GPU-hours (images seen / images per second).

The study's real cost is GPU time, so its estimate comes from rates measured on real GPUs, kept in a CSV
table (the repository's is ``benchmarks/rates.csv``), one row per measurement:

========================  ===========================================================================
column                    meaning
========================  ===========================================================================
``model``                 timm architecture without its weights tag (``vit_base_patch16_224``): the
                          rate depends on the architecture, not on the weights
``img_size``              input side in pixels
``precision``             a precision of :data:`vitef.utils.PRECISIONS` (``fp32``, ``bf16``, ...), or
                          ``tf32`` (fp32 with TF32 matmuls)
``compile``               ``true`` / ``false``: ``torch.compile``
``trainable``             ``all``, or the trained components joined by ``+`` (``ln1``, ``fc1+fc2``)
``batch``                 images per step of the measurement (empty: not reported)
``gpu``                   the device name as torch reports it (``NVIDIA H200``)
``what``                  ``app``: ``apps.vit.train`` end to end (data loading included);
                          ``step``: the app's training step alone (``python -m benchmarks.train``);
                          ``plain``: a plain PyTorch + timm loop, a reference never used for estimates
``images_per_s``          the measured rate
``date``, ``commit``      when and at which vitef commit it was measured (empty: not reported)
``torch``, ``timm``       library versions of the measurement
``source``, ``notes``     who measured it and how (free text)
========================  ===========================================================================

A training run costs ``steps x batch_size`` images (evaluation is not counted). Its rate on a GPU is the
row of that GPU with the run's model, image size, precision, compile and trainable components, an ``app``
rate before a ``step`` one, the latest date (then the last row) among equals. Freezing components makes
the backward pass cheaper (no weight gradients for frozen parameters), so a run whose trainable
components have no row of their own uses the ``all`` row of its model: its GPU-hours are then an upper
bound, and the estimate says so. A run with no matching row at all is reported as unmeasured.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vitef.errors import ConfigError, VitefError
from vitef.models.build import SHORT_NAMES
from vitef.models.components import COMPONENTS, canonical_list
from vitef.utils import PRECISIONS

logger = logging.getLogger(__name__)

COLUMNS = (
    "model",
    "img_size",
    "precision",
    "compile",
    "trainable",
    "batch",
    "gpu",
    "what",
    "images_per_s",
    "date",
    "commit",
    "torch",
    "timm",
    "source",
    "notes",
)
# What a rate measured, and the order in which estimates prefer them; ``plain`` rates are references only.
WHATS = {
    "app": "app rate: apps.vit.train end to end",
    "step": "step rate: benchmarks.train, without data loading or evaluation",
    "plain": "plain PyTorch + timm loop: a reference, not used for estimates",
}
USED_WHATS = ("app", "step")
# The apps' precisions, and tf32 (fp32 with TF32 matmuls) in any case: the plain reference loop's setting.
KNOWN_PRECISIONS = tuple(dict.fromkeys((*PRECISIONS, "tf32")))
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_BOOLS = {"true": True, "false": False}


@dataclasses.dataclass(frozen=True)
class Rate:
    """One measured rate: a row of the rates table (``line``: its line in the file, for messages)."""

    model: str
    img_size: int
    precision: str
    compile: bool
    trainable: str
    gpu: str
    what: str
    images_per_s: float
    batch: int | None = None
    date: str = ""
    commit: str = ""
    torch: str = ""
    timm: str = ""
    source: str = ""
    notes: str = ""
    line: int = 0

    def describe(self) -> str:
        """``413 images/s (step rate: ...; batch 256; issue 13 report, torch 2.11, timm 1.0.29)``."""
        how = WHATS[self.what] + (f"; batch {self.batch}" if self.batch else "")
        where = [self.source or "source not given"]
        where += [f"{k} {v}" for k, v in (("on", self.date), ("commit", self.commit)) if v]
        where += [f"{k} {v}" for k, v in (("torch", self.torch), ("timm", self.timm)) if v]
        return f"{_number(self.images_per_s)} images/s ({how}; {', '.join(where)})"


def trainable_key(trainable: Iterable[str] | str) -> str:
    """The table's spelling of a trainable set: ``all``, else its components in registry order joined by ``+``.

    Raises :class:`~vitef.errors.ComponentError` for an unknown component name.
    """
    names = canonical_list(trainable.split("+") if isinstance(trainable, str) else list(trainable))
    if "all" in names:
        return "all"
    order = {c: i for i, c in enumerate(COMPONENTS)}
    return "+".join(sorted(names, key=lambda n: order.get(n, len(order))))


def read_rates(path: str | os.PathLike) -> list[Rate]:
    """The rows of a rates table (CSV with exactly :data:`COLUMNS`, any order).

    Raises
    ------
    ConfigError
        A missing or unreadable file, other columns than :data:`COLUMNS`, or a bad value (the message names
        the file, the line and the column, and what to write).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"rates table {path} cannot be read ({e}): give a CSV file with columns {', '.join(COLUMNS)}"
        ) from e
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    if missing or unknown or len(set(header)) != len(header):
        what = "; ".join(
            p
            for p in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(unknown)}" if unknown else "",
                "a column twice" if len(set(header)) != len(header) else "",
            )
            if p
        )
        raise ConfigError(f"rates table {path}, line 1: the header has {what}: write exactly {','.join(COLUMNS)}")
    rates = []
    for row in reader:
        rates.append(_parse_row(row, path, reader.line_num))
    return rates


def _parse_row(row: dict[str, Any], path: Path, line: int) -> Rate:
    if None in row or any(v is None for v in row.values()):
        raise ConfigError(
            f"rates table {path}, line {line}: {len(COLUMNS)} fields expected (a comma inside a field must be "
            "quoted): fix the row"
        )
    v = {k: str(x).strip() for k, x in row.items()}

    def bad(column: str, expected: str) -> ConfigError:
        return ConfigError(f"rates table {path}, line {line}: {column}={v[column]!r} must be {expected}: fix the row")

    for column in ("model", "gpu", "source"):
        if not v[column]:
            raise bad(column, "given")
    if v["precision"] not in KNOWN_PRECISIONS:
        raise bad("precision", f"one of {', '.join(KNOWN_PRECISIONS)}")
    if v["compile"].lower() not in _BOOLS:
        raise bad("compile", "true or false")
    if v["what"] not in WHATS:
        raise bad("what", f"one of {', '.join(WHATS)}")
    if v["date"] and not _DATE.match(v["date"]):
        raise bad("date", "YYYY-MM-DD or empty")
    try:
        trainable = trainable_key(v["trainable"]) if v["trainable"] else ""
    except VitefError:
        trainable = ""
    if not trainable:
        raise bad("trainable", f"all or components joined by + ({', '.join(COMPONENTS)})")
    img_size = _positive(v["img_size"], int)
    if img_size is None:
        raise bad("img_size", "a positive integer")
    batch = _positive(v["batch"], int) if v["batch"] else None
    if v["batch"] and batch is None:
        raise bad("batch", "a positive integer or empty")
    rate = _positive(v["images_per_s"], float)
    if rate is None:
        raise bad("images_per_s", "a positive number")
    return Rate(
        model=v["model"],
        img_size=img_size,
        precision=v["precision"],
        compile=_BOOLS[v["compile"].lower()],
        trainable=trainable,
        gpu=v["gpu"],
        what=v["what"],
        images_per_s=rate,
        batch=batch,
        date=v["date"],
        commit=v["commit"],
        torch=v["torch"],
        timm=v["timm"],
        source=v["source"],
        notes=v["notes"],
        line=line,
    )


def _positive(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if value > 0 and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------
# The cost of runs
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CostKey:
    """What a rate depends on besides the trainable components: architecture, input size, numerics."""

    model: str
    img_size: int | None
    precision: str
    compile: bool

    def describe(self) -> str:
        size = f"{self.img_size} px" if self.img_size else "its default size"
        return f"{self.model} at {size}, {self.precision}, compile={str(self.compile).lower()}"


@dataclasses.dataclass(frozen=True)
class RunCost:
    """The images one training run sees and what its rate depends on."""

    key: CostKey
    trainable: str
    images: int


def architecture(name: str) -> str:
    """The timm architecture of a model name (``base`` → ``vit_base_patch16_224``); other names unchanged.

    Weight files, directories and hub ids have no architecture in their name: they are returned as given,
    so no rate matches them (their runs are reported as unmeasured).
    """
    name = SHORT_NAMES.get(name, name)
    if "/" in name or os.sep in name or name.endswith(".safetensors"):
        return name
    return name.split(".")[0]  # the weights tag (.orig_in21k) does not change the cost


def train_run_cost(cfg: Any) -> RunCost:
    """The cost of a run of the training app (or any config with its keys): ``steps x batch_size`` images.

    ``cfg`` needs ``model`` (a :class:`~vitef.models.build.ModelConfig`), ``precision``, ``compile``,
    ``trainable``, ``steps`` and ``batch_size``. ``model.overrides`` change the architecture: they are part
    of the model's name here, so only a row measured with them would match.
    """
    model = architecture(cfg.model.name)
    size = cfg.model.img_size
    if size is None:
        found = re.search(r"_(\d+)$", model)
        size = int(found.group(1)) if found else None
    if cfg.model.overrides:
        model += "+" + json.dumps(cfg.model.overrides, sort_keys=True, separators=(",", ":"))
    key = CostKey(model=model, img_size=size, precision=str(cfg.precision), compile=bool(cfg.compile))
    return RunCost(key=key, trainable=trainable_key(cfg.trainable), images=int(cfg.steps) * int(cfg.batch_size))


def find_rate(rates: Sequence[Rate], gpu: str, key: CostKey, trainable: str) -> tuple[Rate | None, bool]:
    """The rate of ``key`` with ``trainable`` on ``gpu`` and whether it is the ``all`` row standing in for it.

    Preference: an exact trainable match, else ``all`` (an upper bound on the cost); ``app`` before ``step``;
    the latest date, then the last row. ``plain`` rows are never used.
    """

    def best(wanted: str) -> Rate | None:
        rows = [
            r
            for r in rates
            if r.gpu == gpu
            and r.what in USED_WHATS
            and r.trainable == wanted
            and (r.model, r.img_size, r.precision, r.compile) == (key.model, key.img_size, key.precision, key.compile)
        ]
        if not rows:
            return None
        return max(rows, key=lambda r: (-USED_WHATS.index(r.what), r.date, r.line))

    exact = best(trainable)
    if exact is not None or trainable == "all":
        return exact, False
    fallback = best("all")
    return fallback, fallback is not None


@dataclasses.dataclass
class Part:
    """The runs of one :class:`CostKey` on one GPU: their images, the rates used, the GPU-hours."""

    key: CostKey
    runs: int = 0
    images: int = 0
    hours: float = 0.0  # of the runs with a rate
    missing: int = 0  # runs without a rate on this GPU
    used: dict[int, Rate] = dataclasses.field(default_factory=dict)  # by row line, in first-use order
    fallback: dict[str, int] = dataclasses.field(default_factory=dict)  # trainable -> runs at the all rate

    def describe(self, counts: bool = True) -> str:
        """``<hours> GPU-hours for <key>[: <runs>, <images>] at <rates>``, then what is an upper bound or missing."""
        head = self.key.describe() + (f": {self.runs} runs, {format_images(self.images)} images" if counts else "")
        if self.missing == self.runs:
            return f"rate unmeasured for {head}"
        rates = "; ".join(r.describe() for r in self.used.values())
        text = f"{format_hours(self.hours)} GPU-hours for {head} at {rates}"
        if self.fallback:
            n = sum(self.fallback.values())
            text += (
                f"; {n} runs train part of the model ({', '.join(self.fallback)}) at trainable=all's rate: "
                "an upper bound"
            )
        if self.missing:
            text += f"; {self.missing} runs: rate unmeasured (not counted)"
        return text


@dataclasses.dataclass
class GpuEstimate:
    """Every part of the runs on one GPU; ``hours`` sums the runs that have a rate."""

    gpu: str
    parts: list[Part]

    @property
    def hours(self) -> float:
        return sum(p.hours for p in self.parts)

    @property
    def complete(self) -> bool:
        """Every run has a rate on this GPU."""
        return not any(p.missing for p in self.parts)

    def lines(self) -> list[str]:
        """One line, or a total line and one line per part when the runs differ in what their rate depends on."""
        at_least = "" if self.complete else ">= "
        if all(p.missing == p.runs for p in self.parts):
            keys = "; ".join(p.key.describe() for p in self.parts)
            return [f"{self.gpu}: rate unmeasured for {keys} ({sum(p.runs for p in self.parts)} runs)"]
        if len(self.parts) == 1:
            part = self.parts[0]
            return [f"{self.gpu}: {at_least}{part.describe(counts=False)}"]
        total = f"{at_least}{format_hours(self.hours)} GPU-hours"
        if at_least:
            total += " (the runs with a measured rate only)"
        return [f"{self.gpu}: {total}", *(f"  {p.describe()}" for p in self.parts)]


@dataclasses.dataclass
class Estimate:
    """The cost of a list of runs: images, and GPU-hours per GPU of the rates table."""

    runs: int
    images: int
    not_estimated: int  # runs with no cost model (not training runs)
    gpus: list[GpuEstimate]
    source: str = ""  # the rates table, named in the summary

    def lines(self, app: str = "") -> list[str]:
        """The summary printed after a dry run's list of runs."""
        table = self.source or "the rates table"
        if not self.runs:
            what = f"app {app}" if app else "these runs"
            return [
                f"cost: not estimated for {what} ({self.not_estimated} runs): only training runs have a cost model "
                "(steps x batch_size images at a measured rate)"
            ]
        lines = [
            f"cost: {self.runs} training runs, {format_images(self.images)} images (steps x batch_size each); "
            f"GPU-hours = images / the images/s measured in {table}"
        ]
        if self.not_estimated:
            lines.append(f"  {self.not_estimated} runs of other apps: not estimated")
        if not self.gpus:
            lines.append(f"  no rate measured in {table}: GPU-hours not estimated")
        for g in self.gpus:
            lines.extend(f"  {line}" for line in g.lines())
        if not all(g.complete for g in self.gpus):
            lines.append(
                "  to estimate the unmeasured runs, measure their rate (python -m benchmarks.train "
                "model=<architecture> img_size=<px> device=cuda, or a timed apps.vit.train run) and add a row to "
                + table
            )
        return lines


def estimate(costs: Sequence[RunCost | None], rates: Sequence[Rate], source: str = "") -> Estimate:
    """The cost of runs (None: a run without a cost model) on every GPU of ``rates``, one estimate per GPU.

    A GPU's GPU-hours are ``sum(images / rate)`` over the runs, each at the rate :func:`find_rate` picks.
    """
    known = [c for c in costs if c is not None]
    gpus = list(dict.fromkeys(r.gpu for r in rates if r.what in USED_WHATS))
    per_gpu = []
    for gpu in gpus:
        parts: dict[CostKey, Part] = {}
        for cost in known:
            part = parts.setdefault(cost.key, Part(cost.key))
            part.runs += 1
            part.images += cost.images
            rate, fallback = find_rate(rates, gpu, cost.key, cost.trainable)
            if rate is None:
                part.missing += 1
                continue
            part.hours += cost.images / rate.images_per_s / 3600
            part.used.setdefault(rate.line, rate)
            if fallback:
                part.fallback[cost.trainable] = part.fallback.get(cost.trainable, 0) + 1
        per_gpu.append(GpuEstimate(gpu, list(parts.values())))
    return Estimate(
        runs=len(known),
        images=sum(c.images for c in known),
        not_estimated=len(costs) - len(known),
        gpus=per_gpu,
        source=source,
    )


def format_images(n: float) -> str:
    """``5.12 G``, ``61.4 M``, ``12.8 k``, ``640``: three significant figures."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def format_hours(h: float) -> str:
    """``3,442``; one decimal under 10 h, two under 0.1 h (a tiny sweep is not ``0``)."""
    if h >= 10:
        return f"{h:,.0f}"
    if h >= 0.1:
        return f"{h:.1f}"
    return f"{h:.2g}"


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------------
# Writing measured rates (the benchmarks' ``rates_out=``)
# ---------------------------------------------------------------------------------------------------


def _commit() -> str:
    """The commit being measured: ``$VITEF_COMMIT`` (set it where the copy has no ``.git``), else ``git``'s."""
    commit = os.environ.get("VITEF_COMMIT", "").strip()
    if commit:
        return commit[:12]
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def measured_rate(
    *,
    model: str,
    img_size: int,
    precision: str,
    compile: bool,
    trainable: str,
    batch: int,
    what: str,
    images_per_s: float,
    source: str,
    notes: str = "",
    gpu: str | None = None,
) -> Rate:
    """A :class:`Rate` measured now on this machine: the GPU's name (``torch.cuda.get_device_name``), today's
    UTC date, the commit (:func:`_commit`) and the torch / timm versions filled in."""
    import datetime

    import timm
    import torch

    if gpu is None:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if what not in WHATS:
        raise ValueError(f"what={what!r} is not one of {', '.join(WHATS)}")
    return Rate(
        model=model,
        img_size=int(img_size),
        precision=precision,
        compile=bool(compile),
        trainable=trainable_key(trainable),
        gpu=gpu,
        what=what,
        images_per_s=float(images_per_s),
        batch=int(batch),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        commit=_commit(),
        torch=torch.__version__.split("+")[0],
        timm=timm.__version__,
        source=source,
        notes=notes,
    )


def write_rates(path: str | os.PathLike, rates: Sequence[Rate]) -> Path:
    """Write ``rates`` as a rates table (:data:`COLUMNS`; :func:`read_rates` reads it back), atomically.

    An existing table at ``path`` keeps its rows: the new ones are appended after them (so several benchmark
    runs can collect into one file, to merge into ``benchmarks/rates.csv``).
    """
    import io

    from vitef.utils import atomic_write_text

    path = Path(path)
    rows = read_rates(path) if path.exists() else []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rate in (*rows, *rates):
        row = {c: getattr(rate, c) for c in COLUMNS}
        row["compile"] = "true" if rate.compile else "false"
        row["batch"] = "" if rate.batch is None else rate.batch
        row["images_per_s"] = f"{rate.images_per_s:.0f}" if rate.images_per_s >= 100 else f"{rate.images_per_s:.4g}"
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())
    return path
