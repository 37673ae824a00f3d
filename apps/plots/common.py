"""Shared figure style and saving for the plotting apps (arXiv 2602.06883 figures): PNG and PDF, atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window (headless machines, clusters)

import matplotlib.pyplot as plt  # noqa: E402

from vitef.utils import atomic_path  # noqa: E402

# One colour per component, the same in every figure; ordered by theoretical plasticity rank.
COMPONENT_COLORS = {
    "mha": "#d62728",
    "fc1": "#ff7f0e",
    "fc2": "#bcbd22",
    "ln2": "#1f77b4",
    "ln1": "#17becf",
    "all": "#7f7f7f",
    "emb": "#9467bd",
}

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def component_color(name: str) -> str:
    return COMPONENT_COLORS.get(name, "#8c564b")


def save_figure(fig: plt.Figure, path: str | Path) -> list[Path]:
    """Save ``fig`` as ``<path>.png`` and ``<path>.pdf`` (any suffix of ``path`` is replaced) and close it."""
    path = Path(path)
    out = []
    for ext in ("png", "pdf"):
        target = path.with_suffix(f".{ext}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight")
        out.append(target)
    plt.close(fig)
    return out


def grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, cols) of a subplot grid holding ``n`` panels."""
    cols = max(1, min(max_cols, n))
    return (n + cols - 1) // cols, cols
