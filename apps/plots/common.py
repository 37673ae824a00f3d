"""Shared figure style and saving for the plotting apps (arXiv 2602.06883 figures): PNG and PDF, atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window (headless machines, clusters)

import matplotlib.pyplot as plt  # noqa: E402

from vitef.utils import atomic_path  # noqa: E402

# One colour per component (and per trainable choice), the same in every figure; in the registry's display
# order (vitef.models.components.DISPLAY_ORDER), which owns the names, labels and order.
COMPONENT_COLORS = {
    "mha": "#d62728",
    "fc1": "#ff7f0e",
    "fc2": "#bcbd22",
    "ln2": "#1f77b4",
    "ln1": "#17becf",
    "all": "#7f7f7f",
    "emb": "#9467bd",
    "head": "#e377c2",
}
OTHER_COLOR = "#8c564b"  # combinations (fc1+fc2) and names outside the registry
# What every figure saves unless its app lets the user choose.
FORMATS = ("png", "pdf")

SAVE_DPI = 150  # resolution of the PNGs, with or without STYLE in effect

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": SAVE_DPI,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def component_color(name: str) -> str:
    """The colour of a component or trainable choice in every figure."""
    return COMPONENT_COLORS.get(name, OTHER_COLOR)


def save_figure(fig: plt.Figure, path: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Save ``fig`` as ``<path>.<format>`` for each of ``formats`` (any suffix of ``path`` is replaced), then close it.

    Each file is written atomically (temporary file + rename): a killed job never leaves a half-written
    figure that a report would embed. Returns the written paths.
    """
    path = Path(path)
    out = []
    try:
        for ext in formats:
            target = path.with_suffix(f".{ext}")
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format=ext, bbox_inches="tight", dpi=SAVE_DPI)
            out.append(target)
    finally:
        plt.close(fig)
    return out


def grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, cols) of a subplot grid holding ``n`` panels."""
    cols = max(1, min(max_cols, n))
    return (n + cols - 1) // cols, cols
