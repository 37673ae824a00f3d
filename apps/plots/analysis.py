"""Figures of the plasticity analysis (Odonnat et al., arXiv 2602.06883, §3 and PROTOCOL.md §6).

    python -m apps.plots.analysis dirs='[outputs/analysis/*]' out=outputs/figures/analysis

Reads only analysis folders written by ``apps.vit.analysis`` (``plasticity.csv``, ``bounds.csv``,
``plasticity.json``) and writes, as PNG and PDF:

    plasticity_by_rank   boxplot of the per-block means of each component, ordered by theoretical rank
    plasticity_by_depth  per-block mean vs layer depth (%) with 95% bands, one panel per folder
    bounds_by_depth      theoretical bound per block vs depth, log scale, one panel per folder
    measured_vs_bound    measured plasticity against its bound, log-log, every block of every folder
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from apps.plots.common import component_color, save_figure  # noqa: E402
from vitef.config import cli_main, option  # noqa: E402
from vitef.errors import ConfigError  # noqa: E402
from vitef.models.components import DISPLAY_NAMES, RANK_ORDER, THEORETICAL_RANK  # noqa: E402
from vitef.monitor.analysis_dir import AnalysisDir, find_analyses  # noqa: E402
from vitef.utils import check_writable  # noqa: E402

logger = logging.getLogger("apps.plots.analysis")

# Components in theoretical order (1 = most plastic); their colours are apps.plots.common's, as in every figure.
ORDER = list(RANK_ORDER)


@dataclasses.dataclass
class PlotConfig:
    """Figures from analysis folders written by apps.vit.analysis."""

    dirs: list[str] = option(["outputs/analysis/*"], "analysis folders or glob patterns (several: side by side)")
    out: str = option("outputs/figures/analysis", "folder for the figures")
    formats: list[str] = option(["png", "pdf"], "file formats")

    def validate(self) -> None:
        if not self.dirs:
            raise ConfigError("dirs is empty: give analysis folders, e.g. dirs='[outputs/analysis/*]'")
        bad = [f for f in self.formats if f not in ("png", "pdf", "svg")]
        if bad or not self.formats:
            raise ConfigError(f"formats={self.formats}: choose from png, pdf, svg")


@dataclasses.dataclass
class Analysis:
    """One analysis folder: its rows, bounds and metadata."""

    path: Path
    plasticity: pd.DataFrame
    bounds: pd.DataFrame | None
    meta: dict

    @property
    def label(self) -> str:
        m = self.meta
        target = str(m.get("target", "")).split("/")[0]
        return f"{m.get('tag', self.path.name)}\n{target}, {m.get('mode', '')}"

    @property
    def depth(self) -> pd.Series:
        """Layer depth in percent: block l of L sits at 100·(l+1)/L."""
        n_layers = int(self.plasticity["layer"].max()) + 1
        return 100 * (self.plasticity["layer"] + 1) / n_layers


def find_dirs(patterns: list[str]) -> list[Path]:
    """Analysis folders (those holding plasticity.csv) matching ``patterns``, pattern by pattern, without duplicates."""
    found = find_analyses(patterns, complete=False)
    if not found:
        raise ConfigError(
            f"no analysis folder (with plasticity.csv) matches {patterns}; run `python -m apps.vit.analysis` first"
        )
    return [f.path for f in found]


def load(path: Path) -> Analysis:
    folder = AnalysisDir(path)
    meta = folder.read_meta() if folder.is_complete() else {}
    return Analysis(path, folder.read_plasticity(), folder.read_bounds(), meta)


def main(cfg: PlotConfig) -> list[Path]:
    check_writable(cfg.out, "out")
    analyses = [load(p) for p in find_dirs(cfg.dirs)]
    out = Path(cfg.out)
    written = []
    for name, draw in (
        ("plasticity_by_rank", plot_by_rank),
        ("plasticity_by_depth", plot_by_depth),
        ("bounds_by_depth", plot_bounds_by_depth),
        ("measured_vs_bound", plot_measured_vs_bound),
    ):
        fig = draw(analyses)
        if fig is None:
            logger.warning("%s skipped: no bounds.csv in the folders", name)
            continue
        written += save_figure(fig, out / name, cfg.formats)
    for path in written:
        print(path)
    return written


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _components(a: Analysis) -> list[str]:
    present = set(a.plasticity["component"])
    return [c for c in ORDER if c in present]


def plot_by_rank(analyses: list[Analysis]) -> plt.Figure:
    """Per-block means of each component as a box, components ordered by theoretical rank."""
    fig, axes = _panels(len(analyses))
    for ax, a in zip(axes, analyses):
        comps = _components(a)
        data = [a.plasticity.loc[a.plasticity["component"] == c, "mean"].to_numpy() for c in comps]
        box = ax.boxplot(data, patch_artist=True, widths=0.6)
        for patch, c in zip(box["boxes"], comps):
            patch.set_facecolor(component_color(c))
            patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(comps) + 1))
        ax.set_xticklabels([f"{DISPLAY_NAMES[c]}\n({THEORETICAL_RANK[c]})" for c in comps])
        ax.set_xlabel("component (theoretical rank)")
        ax.set_title(a.label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("plasticity (per-block mean)")
    fig.tight_layout()
    return fig


def plot_by_depth(analyses: list[Analysis]) -> plt.Figure:
    """Per-block mean vs depth with mean ± ci95 bands."""
    fig, axes = _panels(len(analyses))
    for ax, a in zip(axes, analyses):
        df = a.plasticity.assign(depth=a.depth)
        for c in _components(a):
            d = df[df["component"] == c].sort_values("depth")
            color = component_color(c)
            ax.plot(d["depth"], d["mean"], marker="o", ms=3, color=color, label=DISPLAY_NAMES[c])
            ax.fill_between(d["depth"], d["mean"] - d["ci95"], d["mean"] + d["ci95"], color=color, alpha=0.25)
        ax.set_xlabel("layer depth (%)")
        ax.set_title(a.label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("plasticity (mean, 95% CI)")
    axes[-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_bounds_by_depth(analyses: list[Analysis]) -> plt.Figure | None:
    """Theoretical bound per block vs depth, log scale."""
    with_bounds = [a for a in analyses if a.bounds is not None]
    if not with_bounds:
        return None
    fig, axes = _panels(len(with_bounds))
    for ax, a in zip(axes, with_bounds):
        b = a.bounds
        n_layers = int(b["layer"].max()) + 1
        for c in [c for c in ORDER if c in set(b["component"])]:
            d = b[b["component"] == c].sort_values("layer")
            ax.plot(100 * (d["layer"] + 1) / n_layers, d["bound"], marker="o", ms=3, color=component_color(c))
            ax.lines[-1].set_label(DISPLAY_NAMES[c])
        ax.set_yscale("log")
        ax.set_xlabel("layer depth (%)")
        ax.set_title(a.label, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("theoretical bound (log)")
    axes[-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_measured_vs_bound(analyses: list[Analysis]) -> plt.Figure | None:
    """Every block's measured plasticity against its bound; the diagonal is measured = bound."""
    with_bounds = [a for a in analyses if a.bounds is not None and "measured" in a.bounds.columns]
    if not with_bounds:
        return None
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    markers = "os^vDP*X"
    lo, hi = float("inf"), 0.0
    for i, a in enumerate(with_bounds):
        b = a.bounds.dropna(subset=["measured", "bound"])
        b = b[(b["measured"] > 0) & (b["bound"] > 0)]
        for c in [c for c in ORDER if c in set(b["component"])]:
            d = b[b["component"] == c]
            label = DISPLAY_NAMES[c] if i == 0 else None
            ax.scatter(d["bound"], d["measured"], s=16, color=component_color(c), marker=markers[i % 8], label=label)
        if len(b):
            lo = min(lo, b["bound"].min(), b["measured"].min())
            hi = max(hi, b["bound"].max(), b["measured"].max())
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("theoretical bound")
    ax.set_ylabel("measured plasticity")
    if len(with_bounds) > 1:
        names = ", ".join(f"{markers[i % 8]}: {a.path.name}" for i, a in enumerate(with_bounds))
        ax.set_title(names, fontsize=6)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


CONFIG = PlotConfig

if __name__ == "__main__":
    cli_main(PlotConfig, main, prog="apps.plots.analysis")
