"""Run a whole study end to end: its sweeps, the loss landscapes, then the result tables, the figures and a report.

    python -m apps.study config=apps/studies/quickstart.yaml      # the README's main command

A study is a config of the general tools, not a code path of its own: each entry of ``sweeps`` is a
sweep file run by ``apps.vit.sweep`` (in order, with ``root`` set to the study's root), then
``apps.vit.loss_landscape`` computes the landscapes of ``landscapes``, ``apps.plots.finetuning``
aggregates the runs (csv, table, stat, figures, predictors; ``methods`` when LoRA, BitFit, selection or
layer-decay runs are there: ``apps/studies/selection.yaml``), ``apps.plots.analysis`` draws the plasticity figures,
``apps.plots.loss_landscape`` the landscapes, and ``apps.plots.report`` writes ``report.md`` and
``report.html`` (arXiv 2602.06883 in miniature for the quickstart). Relaunching skips finished runs, like
every sweep. The study runs apps of both ``apps/vit`` (computing) and ``apps/plots`` (drawing), so it
lives above both; it is the only module that imports both.

The whole study is checked before anything runs or is written: every sweep file parses and expands
into runs whose configs validate, and every landscape component exists. A mistake in the last
sweep file or in ``landscapes`` is one error at once, not after hours of runs.

``python -m apps.vit.study`` (the name before issue 11) still runs it, with a warning; so do the files of
before that move (:data:`MOVED_FILES`), where the old file is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import torch

from apps.plots import analysis as analysis_plots
from apps.plots import finetuning, report
from apps.plots import loss_landscape as landscape_plots
from apps.plots import pretraining as pretraining_plots
from apps.vit import loss_landscape
from apps.vit import sweep as sweep_app
from vitef.config import build_config, cli_main, load_config, option, save_config
from vitef.errors import ConfigError, VitefError
from vitef.landscape import default_dir
from vitef.monitor.analysis_dir import find_analyses
from vitef.sweep import SweepConfig, expand
from vitef.utils import check_writable, set_console_level, setup_logging

logger = logging.getLogger("apps.study")

# Files that moved in issue 11 (old path part -> new one): an old path that no longer exists is read from its
# new place, with a warning, so old study files and commands keep working.
MOVED_FILES = {
    "apps/vit/studies/": "apps/studies/",
    "apps/plots/configs/loss_landscape": "apps/vit/configs/loss_landscape",
}


@dataclasses.dataclass
class StudyConfig:
    """Run sweeps in order, then write result tables, figures and a report (markdown + HTML)."""

    name: str = option("study", "title of the report")
    root: str = option("outputs/study", "output root of every run, table, figure and the report")
    sweeps: list[str] = option([], "sweep files (apps/vit/sweeps/*.yaml), run in order with root=<root>")
    landscapes: list[str] = option([], "components whose loss landscape is drawn (e.g. [mha, ln1]); [] for none")
    landscape_config: str = option("", "config file of apps.vit.loss_landscape (the compute) for those components")
    select_on: str = option("val", "choose each cell's learning rate on val (sound) or test (the authors')")
    threads: int = option(0, "torch CPU threads (0: torch's default); 1-2 are fastest for tiny models")
    offline: bool = option(True, "forbid hub downloads (HF_HUB_OFFLINE=1): the study must run on local files")
    verbose: bool = option(False, "log every run's progress (default: warnings, one line per run, progress bars)")

    def validate(self) -> None:
        for path in self.sweeps:
            if not Path(path).is_file():
                raise ConfigError(
                    f"sweeps: '{path}' does not exist (give sweep files, e.g. apps/vit/sweeps/digits.yaml)"
                )
        if self.landscapes and self.landscape_config and not Path(self.landscape_config).is_file():
            moved = moved_file(self.landscape_config)
            if moved is None:
                raise ConfigError(f"landscape_config='{self.landscape_config}' does not exist")
            logger.warning(
                "landscape_config: %s moved to %s: reading that (write the new path)", self.landscape_config, moved
            )
            self.landscape_config = moved
        if self.select_on not in ("val", "test"):
            raise ConfigError(f"select_on={self.select_on!r} must be val or test")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 0")


CONFIG = StudyConfig


def main(cfg: StudyConfig) -> None:
    start = time.perf_counter()
    check_writable(cfg.root, "root")
    if cfg.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    check_study(cfg)  # the whole study, before anything runs or is written
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.verbose:
        # Dozens of in-process runs: keep their per-step logs off the console; each run's log file keeps them.
        set_console_level(logging.WARNING)
    root = Path(cfg.root)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "study.yaml")

    failures = run_sweeps(cfg)
    compute_landscapes(cfg)
    write_results(cfg)
    draw_figures(cfg)
    out = report.main(
        build_config(report.ReportConfig, {"root": cfg.root, "title": cfg.name, "select_on": cfg.select_on})
    )
    print(f"study {cfg.name} done in {time.perf_counter() - start:.0f} s")
    print(f"report: {out}")
    if failures:
        raise VitefError(f"{len(failures)} sweep(s) did not finish cleanly: {'; '.join(failures)} (see the report)")


def check_study(cfg: StudyConfig) -> None:
    """Validate everything the study will run, before it runs anything.

    Raises
    ------
    ConfigError
        A sweep file that does not parse, names an unknown app, or expands into an invalid run config
        (the file is named), or a landscape component that does not exist.
    """
    for path in cfg.sweeps:
        try:
            sweep_cfg = load_config(SweepConfig, [f"config={path}", f"root={cfg.root}"])
            module = sweep_app.app_module(sweep_cfg.app)
            expand(sweep_cfg, module)
        except VitefError as e:
            raise ConfigError(f"sweeps: '{path}': {e}") from None
    for component in cfg.landscapes:
        try:
            landscape_config(cfg, component)
        except VitefError as e:
            raise ConfigError(f"landscapes: {e}") from None


def landscape_config(cfg: StudyConfig, component: str) -> loss_landscape.LandscapeConfig:
    """The config of apps.vit.loss_landscape for one component of ``landscapes`` (output: <root>/landscapes/)."""
    argv = [f"config={cfg.landscape_config}"] if cfg.landscape_config else []
    out_dir = default_dir(cfg.root, component)
    argv += [f"component={component}", f"root={cfg.root}", f"out_dir={out_dir}"]
    return load_config(loss_landscape.LandscapeConfig, argv)


def run_sweeps(cfg: StudyConfig) -> list[str]:
    """Each sweep in order; a sweep with failed runs does not stop the study (its failures are returned)."""
    failures = []
    for path in cfg.sweeps:
        sweep_cfg = load_config(SweepConfig, [f"config={path}", f"root={cfg.root}"])
        logger.info("sweep %s (%s)", sweep_cfg.name, path)
        try:
            sweep_app.main(sweep_cfg)
        except VitefError as e:
            logger.error("sweep %s: %s", sweep_cfg.name, e)
            failures.append(f"{sweep_cfg.name}: {e}")
    return failures


def compute_landscapes(cfg: StudyConfig) -> None:
    """The loss landscape of each component of ``landscapes`` (apps.vit.loss_landscape); draw_figures draws them."""
    for component in cfg.landscapes:
        loss_landscape.main(landscape_config(cfg, component))


def write_results(cfg: StudyConfig) -> None:
    """CSVs, then the accuracy table, the significance tests, figures and predictors of the component-wise runs
    (when they hold the paper's grid: MHA among others), and the methods comparison when other methods ran."""
    if not any((Path(cfg.root) / "runs").glob("**/eval.json")):
        logger.info("no finetuning runs under %s: no result tables", cfg.root)
        return
    results_dir = str(Path(cfg.root) / "results")

    def run(command: str) -> None:
        finetuning.main(
            build_config(
                finetuning.FinetuningPlotsConfig,
                {"command": command, "root": cfg.root, "results_dir": results_dir, "select_on": cfg.select_on},
            )
        )

    run("csv")
    if finetuning.has_paper_grid(results_dir):
        for command in ("table", "stat", "figures", "predictors"):
            run(command)
    if finetuning.has_method_runs(results_dir):  # LoRA, BitFit, selections, layer decay (issue 12)
        run("methods")


def draw_figures(cfg: StudyConfig) -> None:
    """Plasticity figures of the analysis folders, plasticity through pretraining, and the computed loss landscapes.

    Analyses of pretraining snapshots (weights whose card has a ``step``) go to the pretraining figures only.
    """
    figures = Path(cfg.root) / "figures"
    folders = find_analyses([Path(cfg.root) / "analysis" / "*"], complete=False)
    snapshots = [f.path for f in folders if f.step is not None]
    models = [str(f.path) for f in folders if f.step is None]
    if models:
        analysis_plots.main(build_config(analysis_plots.PlotConfig, {"dirs": models, "out": str(figures / "analysis")}))
    if snapshots:
        pretraining_plots.main(
            build_config(
                pretraining_plots.PretrainingPlotsConfig,
                {"dirs": [str(f) for f in snapshots], "out": str(figures / "pretraining")},
            )
        )
    for component in cfg.landscapes:
        computed = landscape_config(cfg, component).output_dir()
        landscape_plots.main(
            build_config(
                landscape_plots.LandscapePlotConfig,
                {
                    "component": component,
                    "landscape_dir": str(computed),
                    "out_dir": str(figures / "loss_landscape" / component),
                },
            )
        )


def moved_file(path: str) -> str | None:
    """The new place of ``path`` when it is an old path of :data:`MOVED_FILES` that no longer exists, else None."""
    text = Path(path).as_posix()
    if Path(path).exists():
        return None
    for old, new in MOVED_FILES.items():
        at = text.find(old)
        if at == 0 or (at > 0 and text[at - 1] == "/"):
            candidate = text[:at] + new + text[at + len(old) :]
            if Path(candidate).exists():
                return candidate
    return None


def run_cli(argv: list[str], prog: str = "apps.study") -> None:
    """The command line: ``cli_main`` after reading a moved study file (``config=``) from its new place.

    ``prog`` other than ``apps.study`` is an old name of this app: it runs, with a warning naming the new one.
    """
    setup_logging()  # the warnings below come before cli_main sets logging up
    if prog != "apps.study":
        logger.warning("%s is now apps.study: run `python -m apps.study %s`", prog, " ".join(argv))
    argv = list(argv)
    for i, arg in enumerate(argv):
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("-") == "config" and not value.lstrip().startswith("["):
            moved = moved_file(value)
            if moved is not None:
                logger.warning("%s moved to %s: reading that (write config=%s)", value, moved, moved)
                argv[i] = f"{key}={moved}"
    cli_main(StudyConfig, main, argv=argv, prog=prog)


if __name__ == "__main__":
    run_cli(sys.argv[1:])
