"""Launch a sweep of the study (arXiv 2602.06883, §4-5): a grid of train / eval / analysis / probing runs.

    python -m apps.vit.sweep config=apps/vit/sweeps/main.yaml --dry-run     # list the 924 runs and their cost
    python -m apps.vit.sweep config=apps/vit/sweeps/main.yaml local.max_parallel=8 local.gpus=[0,1,2,3,4,5,6,7]
    python -m apps.vit.sweep config=apps/vit/sweeps/main.yaml backend=slurm slurm.partition=gpu

Relaunching the same command skips completed runs and resumes the others; failures are listed at
the end and make the exit status non-zero. Runs whose config changed since they ran (stale) are
listed with the changed keys and not run (``rerun_stale=true`` reruns them from scratch); runs that
another process works on are listed and skipped. See :mod:`vitef.sweep` for the sweep file format.

A dry run ends with the cost of the grid's training runs: their images (steps x batch_size) and
GPU-hours at the rates measured in ``benchmarks/rates.csv`` (:mod:`vitef.rates`), per GPU of that
table, or which rates are unmeasured.

A sweep file's ``app:`` is one of :data:`APPS` or a module of the ``apps`` package. The test suite adds
its fake app through the ``VITEF_SWEEP_TEST_APPS`` environment variable (comma-separated module
names); it is a test hook, not a way to run arbitrary modules.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from tqdm import tqdm

from vitef.config import cli_main
from vitef.errors import ConfigError
from vitef.rates import estimate, read_rates, train_run_cost
from vitef.sweep import SweepConfig, SweepError, expand, format_value, launch, plan_runs
from vitef.utils import check_writable

# The apps a sweep file may name by their short name; otherwise it names a module of the apps package.
APPS = {
    "train": "apps.vit.train",
    "eval": "apps.vit.eval",
    "analysis": "apps.vit.analysis",
    "linear_probing": "apps.vit.linear_probing",
}


CONFIG = SweepConfig
# The measured training rates the dry run's GPU-hours come from (the repository's table).
RATES_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "rates.csv"
TEST_APPS_ENV = "VITEF_SWEEP_TEST_APPS"  # test hook: extra app modules (the test suite's fake app)
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def app_module(app: str) -> str:
    """The module of ``app``: a short name of :data:`APPS`, or a module of the ``apps`` package.

    A sweep file must not make the sweep import (and so run) an arbitrary module of the path.

    Raises
    ------
    ConfigError
        Any other name (the message lists the valid ones).
    """
    if app in APPS:
        return APPS[app]
    extra = {m.strip() for m in os.environ.get(TEST_APPS_ENV, "").split(",") if m.strip()}
    if app in extra:
        return app
    if app.startswith("apps.") and _MODULE.match(app):
        try:
            found = importlib.util.find_spec(app) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return app
    raise ConfigError(
        f"app='{app}' is unknown: choose one of {', '.join(APPS)} or a module of the apps package "
        f"(e.g. apps.vit.pretrain)"
    )


def main(cfg: SweepConfig) -> None:
    module = app_module(cfg.app)
    runs = expand(cfg, module)
    if cfg.dry_run:
        print_runs(cfg, runs)
        return
    check_writable(cfg.root, "root")  # before the first run: not one failure per run
    result = launch(cfg, module, runs, progress=lambda it, total: tqdm(it, total=total, desc=f"sweep {cfg.name}"))
    extra = "".join(
        f", {n} {what}"
        for n, what in ((len(result.stale), "stale (not run)"), (len(result.busy), "running elsewhere (skipped)"))
        if n
    )
    print(
        f"sweep {cfg.name}: {result.total} runs, {len(result.skipped)} already completed (skipped), "
        f"{len(result.launched)} launched, {len(result.failures)} failed{extra}"
    )
    if result.submitted:
        print(f"submitted job array {result.submitted[0].split('_')[0]} ({len(result.submitted)} tasks)")
    for b in result.busy:
        print(f"RUNNING ELSEWHERE {b.run.run_dir}: {b.holder}")
    for st in result.stale:
        print(f"STALE ({st.status}) {st.run.run_dir}: {st.describe()}")
    for f in result.failures:
        print(f"FAILED {f.run_dir}: {f.message}")
    problems = []
    if result.failures:
        problems.append(f"{len(result.failures)} of {len(result.launched)} launched runs failed")
    if result.stale:
        problems.append(
            f"{len(result.stale)} runs are stale: their saved config differs from this sweep's (keys listed above); "
            "rerun them from scratch with rerun_stale=true, or restore the sweep file"
        )
    if problems:
        raise SweepError("; ".join(problems) + " (listed above)")


def print_runs(cfg: SweepConfig, runs: list) -> None:
    """The dry-run listing: state, run directory and grid values of every run, then the counts.

    States: new, completed, running, failed, stale (config changed since it ran), running elsewhere.
    """
    module = app_module(cfg.app)
    plan = plan_runs(cfg, module, runs)
    notes = {st.run.index: st.describe(limit=3) for st in plan.stale}
    notes.update({b.run.index: b.holder for b in plan.busy})
    counts: dict[str, int] = {}
    for run in runs:
        status = plan.state[run.index]
        status = "new" if status == "missing" else status
        counts[status] = counts.get(status, 0) + 1
        values = " ".join(f"{k}={format_value(v)}" for k, v in run.point.items())
        note = f"  ({notes[run.index]})" if run.index in notes else ""
        print(f"{status:<10} {run.run_dir}  {values}{note}")
    todo = len(plan.todo)
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{len(runs)} runs in sweep {cfg.name} ({detail}): {todo} to launch on backend {cfg.backend}")
    for line in cost_lines(cfg, runs):
        print(line)


def cost_lines(cfg: SweepConfig, runs: list, rates_file: str | os.PathLike = RATES_FILE) -> list[str]:
    """The grid's cost: images of its training runs and GPU-hours per GPU of the rates table.

    Runs of the training app (and of apps whose config extends its, such as pretrain) cost
    ``steps x batch_size`` images; other apps' runs are not estimated.
    """
    from apps.vit.train import TrainConfig  # the app the sweep runs is imported already

    rates_file = Path(rates_file)
    shown = _shown_path(rates_file)
    rates = read_rates(rates_file) if rates_file.is_file() else []
    if not rates_file.is_file():
        shown += " (not found)"
    costs = [train_run_cost(run.cfg) if isinstance(run.cfg, TrainConfig) else None for run in runs]
    return estimate(costs, rates, source=shown).lines(app=cfg.app)


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    cli_main(SweepConfig, main, prog="apps.vit.sweep")
