"""Launch a sweep of the study (arXiv 2602.06883, §4-5): a grid of train / eval / analysis / probing runs.

    python -m apps.vit.sweep config=apps/vit/sweeps/main.yaml --dry-run     # list the 924 runs
    python -m apps.vit.sweep config=apps/vit/sweeps/main.yaml local.max_parallel=8 local.gpus=[0,1,2,3,4,5,6,7]
    python -m apps.vit.sweep config=apps/vit/sweeps/main.yaml backend=slurm slurm.partition=gpu

Relaunching the same command skips completed runs and resumes the others; failures are listed at
the end and make the exit status non-zero. See :mod:`vitef.sweep` for the sweep file format.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tqdm import tqdm

from vitef.config import cli_main
from vitef.errors import ConfigError
from vitef.sweep import SweepConfig, SweepError, expand, format_value, launch

# The apps a sweep file may name by their short name; any other importable module is used as is.
APPS = {
    "train": "apps.vit.train",
    "eval": "apps.vit.eval",
    "analysis": "apps.vit.analysis",
    "linear_probing": "apps.vit.linear_probing",
}


def analysis_dir(cfg) -> Path:
    """Where apps.vit.analysis writes (docs/ARCHITECTURE.md, analysis directory)."""
    from apps.vit import analysis

    return Path(cfg.root) / "analysis" / analysis.output_name(cfg)


def probes_dir(cfg) -> Path:
    """Where apps.vit.linear_probing writes: the finetuned run probed, or <root>/probes/<model>_<dataset>_<pool>."""
    from apps.vit import linear_probing

    return linear_probing.probes_dir(cfg)


def eval_dir(cfg) -> Path:
    """The training run apps.vit.eval evaluates (its status.json belongs to training, so the sweep keeps its own)."""
    if getattr(cfg, "run_dir", None):
        return Path(cfg.run_dir)
    return Path(cfg.root) / "runs" / cfg.log_dir


# Output directories of the apps that do not write <root>/runs/<log_dir>/status.json themselves; the
# sweep records their status in <root>/sweeps/<log_dir>.status.json.
RUN_DIRS = {"analysis": analysis_dir, "linear_probing": probes_dir, "eval": eval_dir}

CONFIG = SweepConfig


def app_module(app: str) -> str:
    """The module of ``app`` (a short name of :data:`APPS` or a dotted module path)."""
    if app in APPS:
        return APPS[app]
    try:
        found = importlib.util.find_spec(app) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return app
    raise ConfigError(f"app='{app}' is unknown: choose one of {', '.join(APPS)} (or give a module path)")


def main(cfg: SweepConfig) -> None:
    module = app_module(cfg.app)
    runs = expand(cfg, module, RUN_DIRS.get(cfg.app))
    if cfg.dry_run:
        print_runs(cfg, runs)
        return
    result = launch(cfg, module, runs, progress=lambda it, total: tqdm(it, total=total, desc=f"sweep {cfg.name}"))
    print(
        f"sweep {cfg.name}: {result.total} runs, {len(result.skipped)} already completed (skipped), "
        f"{len(result.launched)} launched, {len(result.failures)} failed"
    )
    if result.submitted:
        print(f"submitted job array {result.submitted[0].split('_')[0]} ({len(result.submitted)} tasks)")
    for f in result.failures:
        print(f"FAILED {f.run_dir}: {f.message}")
    if result.failures:
        raise SweepError(f"{len(result.failures)} of {len(result.launched)} launched runs failed (listed above)")


def print_runs(cfg: SweepConfig, runs: list) -> None:
    """The dry-run listing: status, run directory and grid values of every run, then the counts."""
    counts: dict[str, int] = {}
    for run in runs:
        status = "new" if run.status == "missing" else run.status
        counts[status] = counts.get(status, 0) + 1
        values = " ".join(f"{k}={format_value(v)}" for k, v in run.point.items())
        print(f"{status:<10} {run.run_dir}  {values}")
    done = counts.get("completed", 0)
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{len(runs)} runs in sweep {cfg.name} ({detail}): {len(runs) - done} to launch on backend {cfg.backend}")


if __name__ == "__main__":
    cli_main(SweepConfig, main, prog="apps.vit.sweep")
