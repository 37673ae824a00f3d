"""Plasticity through pretraining: how the component ranking of arXiv 2602.06883 emerges (not in the paper).

    python -m apps.plots.pretraining dirs='[outputs/pretraining_dynamics/analysis/*]' \
        out=outputs/pretraining_dynamics/figures/pretraining

Reads analysis folders (``apps.vit.analysis``) of the snapshots that ``apps.vit.pretrain`` exports at the
steps of ``keep_steps``: each folder's ``plasticity.json`` names the analysed weights, whose card (the
``.json`` beside them) gives the pretraining ``step``. Writes, as PNG and PDF:

    plasticity_vs_step   mean over blocks of each component's plasticity against the step (log x),
                         one panel per (target, mode)
    tau_radius_vs_step   Kendall's tau of the measured vs theoretical ranking against the step, per
                         (target, mode), and the token radius r of the target data against the step

and ``pretraining_dynamics.csv`` (step, target, mode, component, plasticity, tau, radius), the numbers
behind both figures.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
from pathlib import Path

import pandas as pd

from apps.plots.common import STYLE, component_color, save_figure
from vitef.config import cli_main, option
from vitef.errors import ConfigError
from vitef.models import THEORETICAL_RANK
from vitef.models.components import DISPLAY_NAMES
from vitef.monitor.analysis_dir import find_analyses
from vitef.utils import atomic_path

logger = logging.getLogger("apps.plots.pretraining")

COLUMNS = ["step", "target", "mode", "component", "plasticity", "tau", "radius", "folder"]


@dataclasses.dataclass
class PretrainingPlotsConfig:
    """Plasticity, Kendall's tau and token radius against the pretraining step, from snapshot analyses."""

    dirs: list[str] = option(
        ["outputs/pretraining_dynamics/analysis/*"], "analysis folders of pretraining snapshots (globs)"
    )
    out: str = option("outputs/pretraining_dynamics/figures/pretraining", "folder for the figures and the CSV")

    def validate(self) -> None:
        if not self.dirs:
            raise ConfigError("dirs is empty: give analysis folders of snapshots, e.g. dirs='[outputs/analysis/*]'")


CONFIG = PretrainingPlotsConfig


def main(cfg: PretrainingPlotsConfig) -> list[Path]:
    table = collect(cfg.dirs)
    out = Path(cfg.out)
    import matplotlib.pyplot as plt

    written = []
    with plt.rc_context(STYLE):
        written += save_figure(plot_plasticity(table), out / "plasticity_vs_step")
        written += save_figure(plot_tau_radius(table), out / "tau_radius_vs_step")
    with atomic_path(out / "pretraining_dynamics.csv") as tmp:
        table.to_csv(tmp, index=False)
    written.append(out / "pretraining_dynamics.csv")
    for path in written:
        print(path)
    return written


def collect(patterns: list[str]) -> pd.DataFrame:
    """One row per (snapshot analysis, component), sorted by target, mode, step.

    Folders whose weights have no card with a ``step`` (not a pretraining snapshot) are listed in a
    warning and left out; none left is an error.
    """
    rows, skipped = [], []
    for folder in find_analyses(sorted({p for pattern in patterns for p in glob.glob(pattern)})):
        meta = folder.read_meta()
        if folder.step is None:
            skipped.append(folder.path.name)
            continue
        for s in folder.summary():
            rows.append({
                "step": folder.step,
                "target": folder.target,
                "mode": folder.mode,
                "component": s["component"],
                "plasticity": s["mean_over_layers"],
                "tau": _num(meta.get("kendall_tau")),
                "radius": _num(meta.get("radius")),
                "folder": str(folder.path),
            })  # fmt: skip
    if skipped:
        logger.warning("not pretraining snapshots (no card with a step), left out: %s", ", ".join(skipped))
    if not rows:
        raise ConfigError(
            f"no analysis folder of a pretraining snapshot matches {patterns}: export snapshots with "
            "`apps.vit.pretrain keep_steps=[...]` and analyse them (apps/vit/sweeps/digits_pretraining_dynamics.yaml)"
        )
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["target", "mode", "step"], ignore_index=True)


def _num(value) -> float:
    return float(value) if value is not None else math.nan


def _panels(table: pd.DataFrame) -> list[tuple[str, str]]:
    modes = [m for m in ("embedding", "hidden") if m in set(table["mode"])]
    return [(t, m) for m in modes for t in dict.fromkeys(table["target"])]


def plot_plasticity(table: pd.DataFrame):
    """Per-component plasticity (mean over blocks) against the pretraining step, one panel per (target, mode)."""
    import matplotlib.pyplot as plt

    panels = _panels(table)
    targets = list(dict.fromkeys(table["target"]))
    rows, cols = len(panels) // len(targets), len(targets)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    comps = sorted(set(table["component"]), key=lambda c: THEORETICAL_RANK.get(c, 99))
    for ax, (target, mode) in zip(axes.flat, panels, strict=True):
        d = table[(table["target"] == target) & (table["mode"] == mode)]
        for comp in comps:
            c = d[d["component"] == comp]
            ax.plot(c["step"], c["plasticity"], "o-", ms=3, color=component_color(comp),
                    label=f"{DISPLAY_NAMES.get(comp, comp)} ({THEORETICAL_RANK.get(comp, '?')})")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("plasticity (mean over blocks)")
        ax.set_title(f"{target}, {mode} mode", fontsize=8)
    axes.flat[0].legend(fontsize=7, frameon=False, title="component (theoretical rank)", title_fontsize=7)
    fig.suptitle("Plasticity of each component through pretraining")
    fig.tight_layout()
    return fig


def plot_tau_radius(table: pd.DataFrame):
    """Kendall's tau (measured vs theoretical ranking) and the token radius r against the pretraining step."""
    import matplotlib.pyplot as plt

    per = table.drop_duplicates(["target", "mode", "step"])
    fig, (ax_tau, ax_r) = plt.subplots(1, 2, figsize=(9, 3.2))
    styles = {"embedding": "-", "hidden": "--"}
    targets = list(dict.fromkeys(per["target"]))
    markers = "osD^v"
    for (target, mode), d in per.groupby(["target", "mode"], sort=False):
        k = targets.index(target)
        # Tasks often share a tau: a small shift along the (log) step axis keeps every line visible.
        ax_tau.plot(d["step"] * (1 + 0.06 * k), d["tau"], styles.get(mode, ":"), marker=markers[k % len(markers)],
                    ms=4, label=f"{target}, {mode}")  # fmt: skip
    for target, d in per[per["mode"] == per["mode"].iloc[0]].groupby("target", sort=False):
        ax_r.plot(d["step"], d["radius"], "o-", ms=3, label=target)
    ax_tau.axhline(0, color="k", lw=0.6)
    ax_tau.set_ylim(-1.05, 1.05)
    ax_tau.set_ylabel("Kendall's tau vs theory (tasks shifted slightly in x)")
    ax_tau.set_title("measured vs theoretical ranking")
    ax_r.set_ylabel("token radius r")
    ax_r.set_title("token radius of the target data")
    for ax, where in ((ax_tau, "lower right"), (ax_r, "upper left")):
        ax.set_xscale("log")
        ax.set_xlabel("pretraining step")
        ax.legend(fontsize=6, frameon=False, loc=where)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    cli_main(PretrainingPlotsConfig, main, prog="apps.plots.pretraining")
