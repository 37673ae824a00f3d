"""The README's table of the paper's sweeps and their GPU-hours, computed from the measured rates.

    python -m benchmarks.rates                       # markdown, pasted into README.md "Reproduce the paper"
    python -m benchmarks.rates rates=my_rates.csv    # another rates table (same columns)

Run it from the repository root (the sweep files name their config files relative to it).

Each sweep file is expanded as ``python -m apps.vit.sweep config=<file> --dry-run`` does (no run is
started, nothing is written) and its training runs are costed by :func:`vitef.rates.estimate`: images =
steps x batch_size per run, GPU-hours = images / the matching measured rate, one column per GPU of the
table and per numeric setting (as the sweep files configure it, and bf16 autocast + ``torch.compile``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from apps.vit.sweep import app_module
from apps.vit.train import TrainConfig
from vitef.config import cli_main, load_config, option
from vitef.rates import USED_WHATS, Estimate, GpuEstimate, estimate, format_images, read_rates, train_run_cost
from vitef.sweep import SweepConfig, expand

RATES = "benchmarks/rates.csv"

# The paper's sweeps, in the README's order: (experiment, sweep file).
SWEEPS = (
    ("main grid: 11 datasets × 7 configurations × 4 lrs × 3 seeds (ViT-B/16)", "apps/vit/sweeps/main.yaml"),
    ("AdamW ablation (4 datasets)", "apps/vit/sweeps/adamw.yaml"),
    ("model size: ViT-L/16 and ViT-H/14 on DomainNet clipart", "apps/vit/sweeps/model_size.yaml"),
    ("plasticity: ViT-B/L/H × 11 datasets", "apps/vit/sweeps/plasticity.yaml"),
    ("linear probing (11 datasets)", "apps/vit/sweeps/linear_probing.yaml"),
    ("which parameters: 31 methods × 11 datasets × 4 lrs × 3 seeds (issue 12)", "apps/vit/sweeps/methods.yaml"),
    ("low data: 10 images per class, 9 tasks × 7 configurations × 3 seeds", "apps/vit/sweeps/lowdata.yaml"),
    ("plasticity across backbone families: 7 ViT-B × 11 datasets × 2 modes", "apps/vit/sweeps/families.yaml"),
)
# Numeric settings costed: (column label, training config keys replaced in every run; none: as configured).
SETTINGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("as configured (fp32)", {}),
    ("bf16 + compile", {"precision": "bf16", "compile": True}),
)


@dataclasses.dataclass
class RatesTableConfig:
    """The README's GPU-hour table of the paper's sweeps, from a rates table."""

    rates: str = option(RATES, "rates table (CSV, columns of vitef.rates.COLUMNS)")


def sweep_runs(path: str) -> tuple[SweepConfig, list]:
    """The runs of a sweep file, as its dry run lists them (run from the repository root: sweep files name
    config files relative to it)."""
    cfg = load_config(SweepConfig, [f"config={path}", "dry_run=true"])
    return cfg, expand(cfg, app_module(cfg.app))


def cost(runs: list, rates: list, changes: dict[str, Any], source: str) -> Estimate:
    """The estimate of ``runs`` with ``changes`` applied to every training run's config."""
    costs = [
        train_run_cost(dataclasses.replace(r.cfg, **changes)) if isinstance(r.cfg, TrainConfig) else None for r in runs
    ]
    return estimate(costs, rates, source=source)


def cell(est: Estimate, gpu: str) -> str:
    """GPU-hours of one sweep on one GPU, marked: † some runs at the all-components rate, (step)/(app) rate."""
    if not est.runs:
        return "not estimated (no training)"
    g: GpuEstimate = next(x for x in est.gpus if x.gpu == gpu)
    if all(p.missing == p.runs for p in g.parts):
        return "unmeasured"
    whats = sorted({r.what for p in g.parts for r in p.used.values()}, key=USED_WHATS.index)
    text = f"{'≥ ' if not g.complete else ''}{g.hours:,.0f}"
    if any(p.fallback for p in g.parts):
        text += " †"
    return f"{text} ({', '.join(whats)})"


def table(rates_file: str | Path) -> str:
    """The markdown table and the list of the rates it used."""
    path = Path(rates_file)
    rates = read_rates(path)
    gpus = list(dict.fromkeys(r.gpu for r in rates if r.what in USED_WHATS))
    headers = ["experiment", "command", "runs", "images"]
    headers += [f"{gpu.removeprefix('NVIDIA ')} GPU-hours, {label}" for gpu in gpus for label, _ in SETTINGS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    used: dict[int, Any] = {}
    for i, (experiment, sweep_file) in enumerate(SWEEPS):
        cfg, runs = sweep_runs(sweep_file)
        command = f"`python -m apps.vit.sweep config={sweep_file}`" if i == 0 else f"`… config={sweep_file}`"
        estimates = [cost(runs, rates, changes, str(path)) for _, changes in SETTINGS]
        images = format_images(estimates[0].images) if estimates[0].runs else "—"
        cells = [cell(est, gpu) for gpu in gpus for est in estimates]
        lines.append(f"| {experiment} | {command} | {len(runs):,} | {images} | " + " | ".join(cells) + " |")
        for est in estimates:
            for g in est.gpus:
                for p in g.parts:
                    used.update(p.used)
    lines += ["", f"Rates used (from `{path}`):", ""]
    lines += [f"- line {line}: {r.gpu}, {r.model}, {r.precision}, compile={str(r.compile).lower()}, "
              f"trainable={r.trainable}: {r.describe()}" for line, r in sorted(used.items())]  # fmt: skip
    return "\n".join(lines)


def main(cfg: RatesTableConfig) -> None:
    print(table(cfg.rates))


if __name__ == "__main__":
    cli_main(RatesTableConfig, main, prog="benchmarks.rates")
