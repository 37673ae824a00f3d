"""Plasticity of every ViT component and its theoretical bound (Odonnat et al., arXiv 2602.06883, §3).

    python -m apps.vit.analysis run --dataset_name cifar10                    # the seed's command
    python -m apps.vit.analysis config=apps/vit/configs/analysis/digits.yaml  # offline, small model
    python -m apps.vit.analysis dataset_name=cifar100 mode=hidden precision=bf16

Pairs (x_i, y_i) are the i-th images of the source (pretraining proxy, ImageNet-1k validation by
default) and target (downstream test split) streams; ``steps`` batches of ``batch_size`` pairs (the
paper: 64 × 200 for ViT-B). Writes ``<root>/analysis/<model>_<source>_<target>_<mode>/``:

    config.yaml       the resolved AnalysisConfig
    plasticity.csv    layer, component, mean, std, ci95, n
    plasticity.json   the same rows plus the summary, Kendall's tau, radius r and pair count
    bounds.csv        layer, component, bound, ..., measured, ratio (measured / bound)
    samples.npz       per-pair ratios (n_pairs, layers, components) when keep_samples=true

and prints per component the mean plasticity over layers, its measured rank, the theoretical rank
(MHA > FC1 > FC2 > LN2 > LN1) and Kendall's tau between the two rankings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from vitef.bounds import bounds_table, compare, estimate_radius, sequence_length
from vitef.config import cli_main, option, save_config
from vitef.data import DataConfig, build_loader, canonical_name
from vitef.errors import ComponentError, ConfigError, VitefError
from vitef.models import BLOCK_COMPONENTS, ModelConfig, build_model_from_config, model_label
from vitef.models.components import DISPLAY_NAMES
from vitef.monitor.analysis_dir import AnalysisDir
from vitef.plasticity import MODES, measure, resolve_components, summarize
from vitef.utils import (
    PRECISIONS,
    atomic_path,
    atomic_write_json,
    check_precision,
    check_writable,
    resolve_device,
    safe_name,
    set_seed,
)

logger = logging.getLogger("apps.vit.analysis")


@dataclasses.dataclass
class AnalysisConfig:
    """Measure the plasticity of every ViT component (arXiv 2602.06883, §3) and its theoretical bound."""

    # The seed's keys: `model_name=base`, and `target=` as a readable synonym of the downstream dataset.
    ALIASES = {"model_name": "model.name", "target": "dataset_name"}

    model: ModelConfig = option(ModelConfig(), "the ViT (default: ViT-B/16 ImageNet-21k, the paper's)")
    data: DataConfig = option(DataConfig(), "where datasets live and how they are loaded")
    source: str = option("imagenet", "pretraining-proxy dataset of the x_i (the paper: ImageNet-1k validation)")
    source_split: str = option("val", "split of the source dataset (for imagenet, val = the official validation)")
    dataset_name: str = option("cifar10", "downstream (target) dataset of the y_i")
    target_split: str = option("test", "split of the target dataset")
    batch_size: int = option(64, "pairs per batch (the paper: 64 for ViT-B, 32 for ViT-L/H)")
    steps: int = option(200, "batches (the paper: 200 for ViT-B, 400 for ViT-L/H); fewer if a dataset ends")
    shuffle: bool = option(True, "draw the images of both streams in a seeded random order")
    mode: str = option("embedding", "embedding (the paper's: every component on e(x)) or hidden (real inputs)")
    components: list[str] = option(list(BLOCK_COMPONENTS), "per-block components to measure")
    precision: str = option("fp32", f"numeric precision: {', '.join(PRECISIONS)} (fp32: no autocast)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    seed: int = option(42, "seed of the image order (the paper: 42)")
    sigma: float = option(1.0, "lower bound on the per-token std of LayerNorm inputs, for the LN bound ||g||_inf/sigma")
    mha_bias: bool = option(
        False, "MHA bound valid with query/key biases (EVA-02, BEiT have q_bias); false: the paper's bias-free formula"
    )
    keep_samples: bool = option(False, "also save every per-pair ratio to samples.npz")
    chunk_size: int | None = option(None, "pairs per forward pass (bounds memory; default: the whole batch)")
    root: str = option("outputs", "output root: results go to <root>/analysis/<model>_<source>_<target>_<mode>/")
    tag: str = option("", "model part of the output folder name (default: derived from model.name and weights)")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        check_precision(self.precision)
        if self.batch_size <= 0 or self.steps <= 0:
            raise ConfigError(f"batch_size={self.batch_size} and steps={self.steps} must be positive")
        if not self.sigma > 0:
            raise ConfigError(f"sigma={self.sigma} must be positive (a lower bound on a standard deviation)")
        if not self.dataset_name or not self.source:
            raise ConfigError("source and dataset_name must name datasets (e.g. source=imagenet dataset_name=cifar10)")
        for key in ("source", "dataset_name"):  # stored canonical, so the output folder has one name per dataset
            try:
                setattr(self, key, canonical_name(getattr(self, key)))
            except VitefError as e:
                raise ConfigError(f"{key}: {e}") from e
        try:
            # Stored canonical (registry names, forward order, `all` expanded): config.yaml and plasticity.json
            # say what was measured, whatever alias or order the command line used.
            self.components = list(resolve_components(self.components))
        except ComponentError as e:
            raise ConfigError(f"components={self.components}: {e}") from None


def main(cfg: AnalysisConfig) -> Path:
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    comps = tuple(cfg.components)  # canonical since validate()
    out_dir = check_writable(run_dir(cfg), "root")  # before the measurement
    model = build_model_from_config(cfg.model, num_classes=0).to(device).eval()
    size = int(model.patch_embed.img_size[0])
    source = make_loader(cfg, cfg.source, cfg.source_split, size, model)
    target = make_loader(cfg, cfg.dataset_name, cfg.target_split, size, model)
    n_pairs = cfg.steps * cfg.batch_size
    logger.info(
        "%s on %s/%s vs %s/%s: up to %d pairs, %s mode, %s, %s",
        cfg.model.name,
        cfg.source,
        cfg.source_split,
        cfg.dataset_name,
        cfg.target_split,
        n_pairs,
        cfg.mode,
        cfg.precision,
        device,
    )

    # The measurement and the bounds.
    with tqdm(total=min(n_pairs, len(source.dataset), len(target.dataset)), unit="pair", desc="plasticity") as bar:
        df = measure(
            model,
            source,
            target,
            mode=cfg.mode,
            n_pairs=n_pairs,
            components=comps,
            precision=cfg.precision,
            keep_samples=cfg.keep_samples,
            device=device,
            progress=bar.update,
            chunk_size=cfg.chunk_size,
        )
    if df.attrs["n_pairs"] < n_pairs:
        logger.warning("only %d pairs (a dataset ran out before %d steps)", df.attrs["n_pairs"], cfg.steps)
    radius = estimate_radius(model, target, max_batches=cfg.steps, device=device)
    bounds = compare(bounds_table(model, r=radius, sigma=cfg.sigma, components=comps, mha_bias=cfg.mha_bias), df)
    summary, tau, p_value = summarize(df)

    write_results(out_dir, cfg, df, bounds, summary, tau, p_value, radius, sequence_length(model))
    print_summary(summary, tau, p_value, df.attrs["n_pairs"], radius, out_dir)
    return out_dir


def make_loader(cfg: AnalysisConfig, name: str, split: str, size: int, model: torch.nn.Module):
    """An eval-transform loader of one stream, in a seeded order."""
    return build_loader(
        name,
        split,
        batch_size=cfg.batch_size,
        size=size,
        shuffle=cfg.shuffle,
        augment=False,
        seed=cfg.seed,
        model=model,
        **cfg.data.loader_kwargs(),
    )


def run_dir(cfg: AnalysisConfig) -> Path:
    """Where the analysis writes: ``<root>/analysis/<model>_<source>_<target>_<mode>`` (docs/ARCHITECTURE.md).

    A sweep reads it to find each run's folder; the app writes no ``status.json``, so the sweep keeps its own.
    """
    return Path(cfg.root) / "analysis" / output_name(cfg)


def output_name(cfg: AnalysisConfig) -> str:
    """``<model>_<source>_<target>_<mode>`` with every part made filesystem-safe."""
    return "_".join(safe_name(part) for part in (model_tag(cfg), cfg.source, cfg.dataset_name, cfg.mode))


def model_tag(cfg: AnalysisConfig) -> str:
    """The model part of the folder name: ``tag``, else the model name plus where non-default weights came from."""
    if cfg.tag:
        return cfg.tag
    name = model_label(cfg.model.name)
    if cfg.model.checkpoint:
        ckpt = Path(cfg.model.checkpoint)
        # A run's checkpoint (<run>/checkpoints/<step>/model.safetensors) is named after its run.
        parts = ckpt.parts
        label = parts[parts.index("checkpoints") - 1] if "checkpoints" in parts[1:] else ckpt.stem
        return f"{name}@{label}"
    if not cfg.model.pretrained:
        return f"{name}-random"
    return name


def write_results(
    out_dir: Path,
    cfg: AnalysisConfig,
    df: pd.DataFrame,
    bounds: pd.DataFrame,
    summary: pd.DataFrame,
    tau: float,
    p_value: float,
    radius: float,
    seq_len: int,
) -> None:
    """Every file atomically; plasticity.json last, so a folder with it is complete."""
    folder = AnalysisDir(out_dir)  # the layout its readers use
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder.config_path)
    if cfg.keep_samples:
        with atomic_path(folder.samples_path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                ratios=df.attrs["samples"],  # (n_pairs, layers, components), NaN for identical pairs
                layers=np.asarray(df.attrs["layers"], dtype=np.int64),
                components=np.asarray(df.attrs["components"], dtype=str),
            )
    with atomic_path(folder.plasticity_path) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(folder.bounds_path) as tmp:
        bounds.to_csv(tmp, index=False)
    atomic_write_json(
        folder.meta_path,
        _finite(
            {
                "model": cfg.model.name,
                "tag": model_tag(cfg),
                "source": f"{cfg.source}/{cfg.source_split}",
                "target": f"{cfg.dataset_name}/{cfg.target_split}",
                "mode": cfg.mode,
                "precision": cfg.precision,
                "n_pairs": int(df.attrs["n_pairs"]),
                "num_layers": int(df["layer"].max()) + 1,
                "radius": radius,
                "sequence_length": seq_len,
                "kendall_tau": tau,
                "kendall_pvalue": p_value,
                "summary": summary.to_dict(orient="records"),
                "rows": df.to_dict(orient="records"),
            }
        ),
    )


def _finite(obj):
    """NaN/inf → None so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def print_summary(summary: pd.DataFrame, tau: float, p_value: float, n: int, radius: float, out_dir: Path) -> None:
    print(f"\nplasticity over {n} pairs (mean over layers of the per-block means):")
    print(f"{'component':<10}{'mean':>10}{'min':>10}{'max':>10}{'measured rank':>15}{'theoretical rank':>18}")
    for row in summary.itertuples():
        name = DISPLAY_NAMES.get(row.component, row.component)
        print(
            f"{name:<10}{row.mean_over_layers:>10.4f}{row.min:>10.4f}{row.max:>10.4f}"
            f"{row.measured_rank:>15d}{row.theoretical_rank:>18d}"
        )
    print(f"Kendall's tau (measured vs theoretical ranking): {tau:.3f} (p = {p_value:.3f})")
    print(f"token radius r = {radius:.3f}; results in {out_dir}")


CONFIG = AnalysisConfig

if __name__ == "__main__":
    cli_main(AnalysisConfig, main, prog="apps.vit.analysis")
