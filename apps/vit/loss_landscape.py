"""Loss landscape of one component type and its rate-of-change surface: the numbers (arXiv 2602.06883, §6).

    python -m apps.vit.loss_landscape component=mha
    python -m apps.vit.loss_landscape component=ln1 steps=40 lr=0.01 grid_size=20 range=0.5
    python -m apps.plots.loss_landscape component=mha        # then draw them (PNG + PDF)

Recipe (see :mod:`vitef.landscape` for the definitions and the documented choices):

1. finetune only ``component`` (every block; the head trains too, as in component-wise finetuning) with
   SGD for ``steps`` steps on the training split, recording the component's flattened parameters;
2. take the first two PCA directions of that trajectory, centred at its final point θ*;
3. evaluate the loss on a fixed set of ``eval_images`` images over a ``grid_size`` × ``grid_size`` grid
   θ* + unit·(α d1 + β d2), α, β ∈ [−range, range] (head and other components stay at θ*'s values);
4. around one embedded image e(x), apply the component of block ``layer`` as the paper's plasticity
   estimator does and map its rate of change along the top two right-singular directions of its
   Jacobian;
5. write ``landscape.npz`` (every array), ``landscape.json`` (config and summary numbers) and
   ``config.yaml`` into ``out_dir`` (default ``<root>/landscapes/<component>``), atomically.

:mod:`apps.plots.loss_landscape` draws the figure from that folder; ``apps.study`` runs both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from vitef.config import cli_main, option, save_config, to_dict
from vitef.data import SPLITS, DataConfig, build_loader, make_iterable, num_classes
from vitef.errors import ConfigError
from vitef.landscape import (
    ARRAYS_FILE,
    CENTERS,
    SCALES,
    SUMMARY_FILE,
    component_function,
    default_dir,
    grid,
    landscape_component,
    loss_grid,
    mean_loss,
    pca_plane,
    rate_surface,
    sgd_trajectory,
    top_directions,
)
from vitef.models import BLOCK_COMPONENTS, ModelConfig, build_model_from_config, embed, num_blocks
from vitef.models.components import DISPLAY_NAMES
from vitef.optim import OptimConfig
from vitef.utils import atomic_path, atomic_write_json, check_writable, resolve_device, set_seed

logger = logging.getLogger("apps.vit.loss_landscape")

# The bundled "pretrained" digits ViT (issue 6): 6 blocks of width 96 at 32 px, patches of 8.
# The bundled offline model; its architecture comes from the card beside it (vit_digits.json).
BUNDLED_MODEL = ModelConfig(name="apps/vit/pretrained/vit_digits.safetensors")
# A short constant-rate SGD run with the paper's momentum and clipping (no warmup: it is only a few steps).
SHORT_SGD = OptimConfig(name="sgd", lr=0.02, momentum=0.9, warmup_steps=0, scheduler="constant", clip_grad=1.0)


@dataclasses.dataclass
class LandscapeConfig:
    """Loss landscape (PCA plane of a short SGD trajectory) and rate-of-change surface of one component."""

    ALIASES: ClassVar[dict[str, str]] = {"lr": "optim.lr", "range": "grid_range"}
    command: str = option("run", "run (the only one: drawing is python -m apps.plots.loss_landscape)")
    component: str = option("mha", f"component type: {', '.join(BLOCK_COMPONENTS)}")
    model: ModelConfig = option(BUNDLED_MODEL, "the model (default: the bundled digits ViT)")
    dataset: str = option("digits_subset-56789", "dataset of the trajectory and the loss (a fresh head is fitted)")
    data: DataConfig = option(DataConfig(num_workers=0), "data loading")
    optim: OptimConfig = option(SHORT_SGD, "optimiser of the trajectory")
    steps: int = option(30, "SGD steps of the trajectory (>= 2)")
    batch_size: int = option(32, "training batch size")
    eval_split: str = option("val", "split of the fixed evaluation set of the loss surface")
    eval_images: int = option(128, "images in the fixed evaluation set (the first ones of eval_split)")
    grid_size: int = option(20, "loss grid points per axis")
    grid_range: float = option(0.5, "loss grid half-width: alpha, beta in [-range, range]")
    scale: str = option("trajectory", "grid unit: trajectory (the trajectory fills 80%) or unit (parameter distance)")
    center: str = option("final", "PCA centre: final (displacements from the end point) or mean")
    layer: int | None = option(None, "block of the rate-of-change surface (default: the middle block)")
    image_index: int = option(0, "index in eval_split of the image x whose embedding e(x) is perturbed")
    rate_grid_size: int = option(20, "rate-of-change grid points per axis")
    rate_range: float = option(0.5, "rate grid half-width, as a fraction of ||e(x)||_F")
    power_iters: int = option(300, "maximum power iterations for the Jacobian's singular directions")
    power_tol: float = option(1e-4, "power iteration stops at residual ||J^T J q - lambda q|| <= tol * sigma1^2")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    seed: int = option(0, "seed of data order and power iteration")
    root: str = option("outputs", "output root")
    out_dir: str | None = option(None, "output directory (default: <root>/landscapes/<component>)")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        if self.command != "run":
            # Before issue 11 one app computed and drew (run) or redrew (plot); `plot` is the plotting app's now.
            raise ConfigError(
                f"command={self.command}: this app only computes (command=run); draw with "
                f"python -m apps.plots.loss_landscape landscape_dir={self.output_dir()}"
            )
        self.component = landscape_component(self.component)
        for key in ("steps", "grid_size", "rate_grid_size"):
            if getattr(self, key) < 2:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 2")
        for key in ("batch_size", "eval_images", "power_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        for key in ("grid_range", "rate_range", "power_tol"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be > 0")
        if self.scale not in SCALES:
            raise ConfigError(f"scale={self.scale!r} is unknown: use one of {', '.join(SCALES)}")
        if self.center not in CENTERS:
            raise ConfigError(f"center={self.center!r} is unknown: use one of {', '.join(CENTERS)}")
        if self.eval_split not in SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r} is unknown: use one of {', '.join(SPLITS)}")
        if self.image_index < 0:
            raise ConfigError(f"image_index={self.image_index} must be >= 0")

    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else default_dir(self.root, self.component)


def run_dir(cfg: LandscapeConfig) -> Path:
    """Where the app writes (``out_dir``); a sweep keeps the status of these runs, the app writes none."""
    return cfg.output_dir()


def main(cfg: LandscapeConfig) -> Path:
    """Compute the landscape of ``cfg.component`` and write it; returns the output folder."""
    out = check_writable(cfg.output_dir(), "out_dir" if cfg.out_dir else "root")
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    started = time.time()
    n_classes = num_classes(cfg.dataset, cfg.data.root)
    model = build_model_from_config(cfg.model, num_classes=n_classes).to(device)
    layer = num_blocks(model) // 2 if cfg.layer is None else cfg.layer
    if not -num_blocks(model) <= layer < num_blocks(model):
        raise ConfigError(f"layer={cfg.layer} is out of range: the model has {num_blocks(model)} blocks")
    layer %= num_blocks(model)
    size = model.patch_embed.img_size[0]
    loader_kw = {"size": size, "seed": cfg.seed, "model": model, "device": device, **cfg.data.loader_kwargs()}
    train = build_loader(cfg.dataset, "train", batch_size=cfg.batch_size, **loader_kw)
    evaluation = fixed_eval_set(cfg, loader_kw, device)

    # 1. Trajectory of the component's parameters (the head trains along, as in component finetuning).
    traj = sgd_trajectory(
        model, cfg.component, make_iterable(train, cfg.seed), cfg.steps, cfg.optim, device=device, progress=cfg.progress
    )
    # 2. PCA plane through the final point θ*.
    plane = pca_plane(traj.points, center=cfg.center)
    unit = plane.unit(cfg.scale, cfg.grid_range)
    # 3. Loss surface over the plane; every parameter outside the component stays at θ*.
    loss_center = mean_loss(model, evaluation)
    alphas = betas = grid(cfg.grid_size, cfg.grid_range)
    loss = loss_grid(model, cfg.component, plane, alphas, betas, evaluation, unit=unit, progress=cfg.progress)
    # 4. Rate-of-change surface of the component of one block around e(x), at θ*.
    rate = rate_of_change(cfg, model, layer, evaluation)

    arrays = {
        "alphas": alphas,
        "betas": betas,
        "loss": loss,
        "trajectory": plane.coords / unit,  # (steps + 1, 2) in grid units
        "trajectory_train_loss": traj.losses,
        "explained_variance": plane.explained,
        "singular_values": plane.singular_values,
        **rate,
    }
    meta = {
        "component": cfg.component,
        "display_name": DISPLAY_NAMES[cfg.component],
        "model": cfg.model.name,
        "checkpoint": cfg.model.checkpoint,
        "dataset": cfg.dataset,
        "num_parameters": int(plane.origin.size),
        "steps": cfg.steps,
        "lr": cfg.optim.lr,
        "scale": cfg.scale,
        "center": cfg.center,
        "unit": unit,
        "trajectory_extent": plane.extent(),
        "explained_variance": [float(x) for x in plane.explained],
        "loss_at_theta_star": loss_center,
        "loss_min": float(loss.min()),
        "loss_max": float(loss.max()),
        "train_loss_first": float(traj.losses[0]),
        "train_loss_last": float(traj.losses[-1]),
        "layer": layer,
        "image_index": cfg.image_index,
        "sigma1": float(rate["sigma"][0]),
        "sigma2": float(rate["sigma"][1]),
        "power_iterations": int(rate["power_iterations"]),
        "input_norm": float(rate["input_norm"]),
        "seconds": round(time.time() - started, 1),
    }
    write_results(out, cfg, arrays, meta)
    print_summary(meta, out)
    return out


def fixed_eval_set(cfg: LandscapeConfig, loader_kw: dict, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """The first ``eval_images`` images of ``eval_split`` (no shuffling, no augmentation), on ``device``."""
    loader = build_loader(
        cfg.dataset, cfg.eval_split, batch_size=min(cfg.eval_images, 256), shuffle=False, augment=False, **loader_kw
    )
    batches, count = [], 0
    for images, labels in loader:
        take = min(cfg.eval_images - count, len(labels))
        batches.append((images[:take].to(device), labels[:take].to(device)))
        count += take
        if count >= cfg.eval_images:
            break
    if count <= cfg.image_index:
        raise ConfigError(f"image_index={cfg.image_index} but the evaluation set has {count} images")
    if count < cfg.eval_images:
        logger.warning("%s/%s has only %d images (eval_images=%d)", cfg.dataset, cfg.eval_split, count, cfg.eval_images)
    return batches


def rate_of_change(cfg: LandscapeConfig, model: torch.nn.Module, layer: int, evaluation: list) -> dict:
    """Rate-of-change surface and 1-D profiles of the component of ``layer`` around e(x)."""
    images = torch.cat([b[0] for b in evaluation])
    with torch.no_grad():
        e = embed(model, images[cfg.image_index : cfg.image_index + 1])  # (1, N, D)
    f = component_function(model, layer, cfg.component)
    dirs = top_directions(f, e, iters=cfg.power_iters, tol=cfg.power_tol, seed=cfg.seed)
    ab = grid(cfg.rate_grid_size, cfg.rate_range)
    # Odd-length lines include 0, where the ratio is undefined (stored as NaN).
    line = grid(8 * cfg.rate_grid_size + 1, cfg.rate_range)
    zero = np.zeros(1)
    return {
        "rate_a": ab,
        "rate_b": ab,
        "rate": rate_surface(f, e, dirs.u, dirs.v, ab, ab),
        "rate_line": line,
        "rate_along_u": rate_surface(f, e, dirs.u, dirs.v, line, zero)[:, 0],
        "rate_along_v": rate_surface(f, e, dirs.u, dirs.v, zero, line)[0],
        "sigma": np.array([dirs.sigma1, dirs.sigma2]),
        "power_iterations": np.array(dirs.iterations),
        "input_norm": np.array(float(e.norm())),
    }


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def write_results(out: Path, cfg: LandscapeConfig, arrays: dict, meta: dict) -> None:
    """``landscape.npz`` (arrays only, no pickle), ``landscape.json`` and ``config.yaml``, atomically."""
    with atomic_path(out / ARRAYS_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_json(out / SUMMARY_FILE, {"summary": meta, "config": to_dict(cfg)})
    save_config(cfg, out / "config.yaml")


def print_summary(meta: dict, out: Path) -> None:
    ev = meta["explained_variance"]
    print(
        f"{meta['display_name']}: {meta['num_parameters']:,} parameters, {meta['steps']} SGD steps "
        f"(train loss {meta['train_loss_first']:.3f} -> {meta['train_loss_last']:.3f})\n"
        f"  PCA plane: {100 * ev[0]:.1f}% + {100 * ev[1]:.1f}% of the trajectory's variance, "
        f"extent {meta['trajectory_extent']:.3g} (grid unit {meta['unit']:.3g})\n"
        f"  loss at theta*: {meta['loss_at_theta_star']:.4f}, "
        f"on the grid {meta['loss_min']:.4f}..{meta['loss_max']:.4f}\n"
        f"  rate of change (block {meta['layer']}): sigma1 {meta['sigma1']:.4g}, sigma2 {meta['sigma2']:.4g}\n"
        f"wrote {out / ARRAYS_FILE} and {SUMMARY_FILE} in {meta['seconds']}s\n"
        f"draw it: python -m apps.plots.loss_landscape landscape_dir={out}"
    )


CONFIG = LandscapeConfig

if __name__ == "__main__":
    cli_main(LandscapeConfig, main, prog="apps.vit.loss_landscape")
