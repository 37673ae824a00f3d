"""Heat maps of unit selections: the score of every block × component, the picked units outlined (issue 12).

    python -m apps.vit.select config=apps/vit/configs/select_digits.yaml criterion=rgn    # compute
    python -m apps.plots.selection dirs='[outputs/selection/*]'                          # draw

Reads only folders written by ``apps.vit.select`` (their ``selection.json``, through
:func:`vitef.selection.read_selection`) and writes, as PNG and PDF, one ``<folder name>`` figure per folder and,
for several folders, ``overview`` with one panel each (each panel has its own colour scale: scores of
different criteria are not comparable, their rankings are).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from apps.plots.common import grid_shape, save_figure  # noqa: E402
from vitef.config import cli_main, option  # noqa: E402
from vitef.errors import ConfigError  # noqa: E402
from vitef.models.components import BLOCK_COMPONENTS, display_name  # noqa: E402
from vitef.selection import Selection, budget_label, find_selections, read_selection  # noqa: E402
from vitef.utils import check_writable, safe_name  # noqa: E402

logger = logging.getLogger("apps.plots.selection")

COMPUTE = "python -m apps.vit.select"
# What each criterion's score is, for the colour bar.
SCORE_LABELS = {
    "plasticity": "plasticity (mean rate of change)",
    "rgn": "relative gradient norm ‖g‖/‖θ‖",
    "grad_norm": "gradient norm ‖g‖",
    "bound": "theoretical plasticity bound",
    "random": "random draw",
    "paper": "theoretical order (5 = MHA … 1 = LN1)",
}
LINEAR_CRITERIA = ("random", "paper")  # never on a log scale under log_scale=auto
ANNOTATE_MAX_BLOCKS = 16  # write the scores in the cells up to this depth (ViT-B/L); beyond, the colours alone


@dataclasses.dataclass
class SelectionPlotConfig:
    """Heat maps (block × component scores, picked units outlined) from folders written by apps.vit.select."""

    dirs: list[str] = option(["outputs/selection/*"], "selection folders or glob patterns")
    out: str = option("outputs/figures/selection", "folder for the figures")
    formats: list[str] = option(["png", "pdf"], "file formats")
    log_scale: str = option("auto", "colour scale: auto (log when positive scores span > 100x), log or linear")

    def validate(self) -> None:
        if not self.dirs:
            raise ConfigError("dirs is empty: give selection folders, e.g. dirs='[outputs/selection/*]'")
        bad = [f for f in self.formats if f not in ("png", "pdf", "svg")]
        if bad or not self.formats:
            raise ConfigError(f"formats={self.formats}: choose from png, pdf, svg")
        if self.log_scale not in ("auto", "log", "linear"):
            raise ConfigError(f"log_scale={self.log_scale!r}: choose auto, log or linear")


def main(cfg: SelectionPlotConfig) -> list[Path]:
    """Draw every folder's heat map (and the overview for several); returns the written files."""
    folders = find_selections(cfg.dirs)
    if not folders:
        raise ConfigError(
            f"no selection folder (holding selection.json) matches dirs={cfg.dirs}: compute one first with "
            f"`{COMPUTE} ...` (it prints the command that draws it)"
        )
    selections = [(folder, read_selection(folder)) for folder in folders]
    out = check_writable(Path(cfg.out), "out")
    written: list[Path] = []
    stems: set[str] = set()
    for folder, sel in selections:
        fig, ax = plt.subplots(figsize=(4.6, 1.2 + 0.36 * sel.depth))
        draw(ax, sel, cfg.log_scale, colorbar=True)
        # Folders of the same name under several roots: number the later ones rather than overwrite.
        stem = base = safe_name(folder.name)
        number = 0
        while stem in stems:
            number += 1
            stem = f"{base}_{number}"
        stems.add(stem)
        written += save_figure(fig, out / stem, cfg.formats)
    if len(selections) > 1:
        rows, cols = grid_shape(len(selections), max_cols=3)
        depth = max(sel.depth for _, sel in selections)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, (1.2 + 0.36 * depth) * rows), squeeze=False)
        for ax, (_, sel) in zip(axes.flat, selections):
            draw(ax, sel, cfg.log_scale, colorbar=True)
        for ax in list(axes.flat)[len(selections) :]:
            ax.axis("off")
        fig.tight_layout()
        written += save_figure(fig, out / "overview", cfg.formats)
    print(f"{len(selections)} selection(s) drawn in {out}: {', '.join(p.name for p in written[:: len(cfg.formats)])}")
    return written


def score_grid(sel: Selection) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, picked)``: ``(depth, 5)`` arrays, components in forward order (LN1, MHA, LN2, FC1, FC2)."""
    scores = np.full((sel.depth, len(BLOCK_COMPONENTS)), np.nan)
    picked = np.zeros(scores.shape, dtype=bool)
    chosen = set(sel.picked)
    for j, comp in enumerate(BLOCK_COMPONENTS):
        for layer in range(sel.depth):
            unit = f"{comp}.{layer}"
            scores[layer, j] = sel.scores.get(unit, math.nan)
            picked[layer, j] = unit in chosen
    return scores, picked


def _norm(values: np.ndarray, log_scale: str, criterion: str = "") -> Normalize:
    """Linear or log colour scale over the finite scores (infinite ones take the top colour); ``auto`` keeps the
    controls (random, paper) linear: their values are draws and ranks, not magnitudes."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Normalize(0, 1)
    lo, hi = float(finite.min()), float(finite.max())
    positive = lo > 0
    magnitudes = criterion not in LINEAR_CRITERIA
    use_log = log_scale == "log" or (log_scale == "auto" and magnitudes and positive and hi / lo > 100)
    if use_log and positive:
        return LogNorm(lo, hi)
    if use_log:
        logger.warning("log_scale=log needs positive scores; drawing a linear scale")
    return Normalize(lo, hi if hi > lo else lo + 1)


def draw(ax: plt.Axes, sel: Selection, log_scale: str = "auto", colorbar: bool = True) -> None:
    """The heat map of one selection on ``ax``: blocks down, components across, picked cells outlined."""
    scores, picked = score_grid(sel)
    norm = _norm(scores, log_scale, sel.criterion)
    shown = np.where(np.isposinf(scores), norm.vmax, np.where(np.isneginf(scores), norm.vmin, scores))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # NaN scores in grey
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto")
    ax.grid(False)
    ax.set_xticks(range(len(BLOCK_COMPONENTS)), [display_name(c) for c in BLOCK_COMPONENTS])
    ax.set_yticks(range(sel.depth))
    ax.set_ylabel("block")
    for layer, j in zip(*np.nonzero(picked)):
        ax.add_patch(Rectangle((j - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=2.2))
    if sel.depth <= ANNOTATE_MAX_BLOCKS:
        for layer in range(sel.depth):
            for j in range(len(BLOCK_COMPONENTS)):
                value = scores[layer, j]
                dark = np.isfinite(value) and norm(min(max(value, norm.vmin), norm.vmax)) < 0.6  # viridis: low is dark
                ax.text(j, layer, f"{value:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")  # fmt: skip
    if colorbar:
        plt.colorbar(image, ax=ax, label=SCORE_LABELS.get(sel.criterion, "score"), fraction=0.05, pad=0.03)
    meta = sel.meta
    title = f"{meta.get('tag', '')} on {meta.get('dataset', '')}\n{meta.get('label', sel.criterion)}, budget "
    title += f"{budget_label(sel.budget)}: {len(sel.picked)} units, {100 * sel.picked_fraction:.1f} % of the backbone"
    ax.set_title(title, fontsize=8)


CONFIG = SelectionPlotConfig

if __name__ == "__main__":
    cli_main(SelectionPlotConfig, main, prog="apps.plots.selection")
