"""Figure of a component's loss landscape and rate-of-change surface (arXiv 2602.06883, §6 figures).

    python -m apps.vit.loss_landscape component=mha          # compute: <root>/landscapes/mha/landscape.npz
    python -m apps.plots.loss_landscape component=mha        # draw: <root>/figures/loss_landscape/mha/landscape.png
    python -m apps.plots.loss_landscape landscape_dir=outputs/landscapes/mha out_dir=figs

Reads ``landscape.npz`` and ``landscape.json`` written by :mod:`apps.vit.loss_landscape` and draws three
panels (loss over the PCA plane with the SGD trajectory, rate-of-change surface around e(x), rate along
the two top singular directions) as ``landscape.png`` and ``landscape.pdf``. It computes nothing: the
plotting apps only read what the computing apps wrote (``apps.study`` runs both in turn).

The folder read is ``landscape_dir``; without it ``<root>/landscapes/<component>``, or the figure folder
itself where it holds a ``landscape.npz`` (folders written before the compute and the figure were split,
when this app did both: ``plot out_dir=<folder>`` still redraws them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np

from apps.plots.common import save_figure
from vitef.config import cli_main, option
from vitef.errors import ConfigError
from vitef.landscape import ARRAYS_FILE, SUMMARY_FILE, default_dir, landscape_component
from vitef.models import BLOCK_COMPONENTS
from vitef.utils import check_writable

logger = logging.getLogger("apps.plots.loss_landscape")

COMPUTE = "python -m apps.vit.loss_landscape"
# Keys of the compute app (apps.vit.loss_landscape.LandscapeConfig and its aliases) that this app took when it
# computed too (before issue 11); tests/apps/test_loss_landscape.py checks that the list is complete.
COMPUTE_KEYS = (
    "model", "dataset", "data", "optim", "lr", "steps", "batch_size", "eval_split", "eval_images", "grid_size",
    "grid_range", "range", "scale", "center", "layer", "image_index", "rate_grid_size", "rate_range", "power_iters",
    "power_tol", "device", "seed", "progress",
)  # fmt: skip


@dataclasses.dataclass
class LandscapePlotConfig:
    """Draw the loss landscape and rate-of-change figure of one component from its computed folder."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        key: f"this app only draws since the compute moved out of it: compute with `{COMPUTE} {key}=...` "
        f"(it takes every key this app took), then draw with `python -m apps.plots.loss_landscape`"
        for key in COMPUTE_KEYS
    }

    command: str = option("plot", "plot: draw the figure (computing is `python -m apps.vit.loss_landscape`)")
    component: str = option("mha", f"component type, to find the default folders: {', '.join(BLOCK_COMPONENTS)}")
    root: str = option("outputs", "output root")
    landscape_dir: str | None = option(None, "folder written by apps.vit.loss_landscape (default: see the module doc)")
    out_dir: str | None = option(None, "figure folder (default: <root>/figures/loss_landscape/<component>)")

    def validate(self) -> None:
        if self.command == "run":
            raise ConfigError(
                f"command=run: this app only draws; compute first with `{COMPUTE} component={self.component}` (same "
                f"keys as before), then draw with `python -m apps.plots.loss_landscape component={self.component}`"
            )
        if self.command != "plot":
            raise ConfigError(f"unknown command '{self.command}': use plot (computing is `{COMPUTE}`)")
        self.component = landscape_component(self.component)

    def figure_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.root) / "figures" / "loss_landscape" / self.component

    def data_dir(self) -> Path:
        """The folder read: ``landscape_dir``, else the first of the default folder and the figure folder holding
        a landscape (the default folder when neither does, for the error message)."""
        if self.landscape_dir:
            return Path(self.landscape_dir)
        default = default_dir(self.root, self.component)
        for folder in (default, self.figure_dir()):
            if (folder / ARRAYS_FILE).is_file():
                return folder
        return default


def main(cfg: LandscapePlotConfig) -> list[Path]:
    """Draw the figure; returns the written files (PNG, PDF)."""
    arrays, meta = read_results(cfg.data_dir(), cfg.component)
    out = check_writable(cfg.figure_dir(), "out_dir" if cfg.out_dir else "root")
    paths = save_figure(draw(arrays, meta), out / "landscape")
    print(f"figure: {paths[0]} (+ .pdf)")
    return paths


def read_results(folder: Path, component: str) -> tuple[dict, dict]:
    """The arrays and summary written by ``apps.vit.loss_landscape`` in ``folder``.

    Raises
    ------
    ConfigError
        A file is missing (the message gives the command that computes it).
    """
    for name in (ARRAYS_FILE, SUMMARY_FILE):
        if not (folder / name).is_file():
            raise ConfigError(
                f"{folder / name} does not exist: compute the landscape first with "
                f"`{COMPUTE} component={component} out_dir={folder}` (or give landscape_dir=<its folder>)"
            )
    with np.load(folder / ARRAYS_FILE, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    try:
        meta = json.loads((folder / SUMMARY_FILE).read_text())["summary"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder / SUMMARY_FILE} is not a landscape summary ({e}): compute it again") from None
    return arrays, meta


def draw(arrays: dict, meta: dict):
    """Three panels: loss contour + trajectory, rate-of-change surface, rate along u and v."""
    from matplotlib import colors
    from matplotlib.figure import Figure

    name = meta["display_name"]
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)

    # Panel 1: loss over the PCA plane, trajectory on top.
    loss = arrays["loss"]
    norm = colors.LogNorm(vmin=loss.min(), vmax=loss.max()) if loss.max() / loss.min() > 20 else None
    cs = ax1.contourf(arrays["alphas"], arrays["betas"], loss.T, levels=30, cmap="viridis", norm=norm)
    ax1.contour(arrays["alphas"], arrays["betas"], loss.T, levels=12, colors="white", linewidths=0.4, alpha=0.6)
    fig.colorbar(cs, ax=ax1, label="loss (eval set)")
    t = arrays["trajectory"]
    ax1.plot(t[:, 0], t[:, 1], "-o", color="tab:red", ms=2.5, lw=1.2, label=f"SGD trajectory ({meta['steps']} steps)")
    ax1.plot(*t[0], "o", color="white", mec="tab:red", ms=7, label="start")
    ax1.plot(0, 0, "*", color="tab:red", mec="white", ms=13, label=r"end $\theta^*$")
    ev = meta["explained_variance"]
    unit = "" if meta["scale"] == "unit" else f" (×{meta['unit']:.3g})"
    ax1.set_xlabel(f"α along PC1{unit}, {100 * ev[0]:.1f}% var.")
    ax1.set_ylabel(f"β along PC2{unit}, {100 * ev[1]:.1f}% var.")
    ax1.set_title(f"{name}: loss on the PCA plane ({meta['num_parameters']:,} params)")
    ax1.legend(loc="upper right", fontsize=8, framealpha=0.8)
    ax1.set_aspect("equal")

    # Panel 2: rate of change around e(x) along the two most sensitive directions.
    rate = np.ma.masked_invalid(arrays["rate"])
    cs2 = ax2.contourf(arrays["rate_a"], arrays["rate_b"], rate.T, levels=30, cmap="magma")
    fig.colorbar(cs2, ax=ax2, label=r"$\|f(e+\delta)-f(e)\|_F \,/\, \|\delta\|_F$")
    ax2.plot(0, 0, "+", color="cyan", ms=12, mew=2)
    ax2.set_xlabel(r"a: top singular direction $u$ (× $\|e\|_F$)")
    ax2.set_ylabel(r"b: second singular direction $v$ (× $\|e\|_F$)")
    ax2.set_title(f"{name} rate of change around e(x), block {meta['layer']}")
    ax2.set_aspect("equal")

    # Panel 3: 1-D profiles with the Jacobian's singular values (the limits at δ → 0).
    line = arrays["rate_line"]
    ax3.plot(line, arrays["rate_along_u"], color="tab:purple", label="along u (b = 0)")
    ax3.plot(line, arrays["rate_along_v"], color="tab:orange", label="along v (a = 0)")
    ax3.axhline(meta["sigma1"], color="tab:purple", ls="--", lw=0.8, label=f"σ1 = {meta['sigma1']:.3g}")
    ax3.axhline(meta["sigma2"], color="tab:orange", ls="--", lw=0.8, label=f"σ2 = {meta['sigma2']:.3g}")
    ax3.set_xlabel(r"perturbation size (× $\|e\|_F$)")
    ax3.set_ylabel("rate of change")
    ax3.set_title(f"{name}: rate along u and v")
    ax3.legend(fontsize=8)

    fig.suptitle(
        f"Loss landscape and rate of change of {name} — {meta['model']} on {meta['dataset']} "
        f"(lr {meta['lr']:g}, {meta['center']}-centred PCA)",
        fontsize=11,
    )
    return fig


CONFIG = LandscapePlotConfig

if __name__ == "__main__":
    cli_main(LandscapePlotConfig, main, prog="apps.plots.loss_landscape")
