"""Choose what to finetune: score every unit (block × component) of a pretrained ViT on the target data and
pick the highest-scoring units within a parameter budget (vitef.selection; issue 12).

    python -m apps.vit.select config=apps/vit/configs/select_digits.yaml criterion=rgn budget=0.1  # offline
    python -m apps.vit.select dataset_name=cifar10 criterion=plasticity budget=0.05               # ViT-B/16

Criteria: plasticity (mode=embedding|hidden), rgn (‖g‖/‖θ‖), grad_norm (‖g‖), bound, random, paper; a budget
is a fraction of the backbone's parameters (``budget=0.1``) or a number of units (``budget=3``). The rules
(ties, a unit larger than what remains) are in the docstring of :mod:`vitef.selection`. Writes
``<root>/selection/<model>_<dataset>_<criterion>_<budget>_seed<seed>/``:

    config.yaml       the resolved SelectAppConfig
    selection.csv     one row per unit: unit, layer, component, params, score, rank, picked (+ criterion columns)
    selection.md      the scores as a block × component table, picked units starred
    selection.json    the scores of every unit, the pick (also as a trainable list) and its parameter count;
                      written last: a folder holding it is complete

and prints the table, the pick as ``trainable=[...]`` and the command that draws the heat map
(``python -m apps.plots.selection``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from vitef.config import cli_main, option, save_config
from vitef.data import DataConfig, canonical_name
from vitef.errors import ConfigError, VitefError
from vitef.models import BLOCK_COMPONENTS, ModelConfig, build_model_from_config, model_label
from vitef.models.components import display_name
from vitef.selection import (
    MARKDOWN_FILE,
    TABLE_FILE,
    SelectConfig,
    Selection,
    budget_label,
    build_streams,
    select,
    write_selection,
)
from vitef.utils import atomic_path, atomic_write_text, check_writable, resolve_device, safe_name, set_seed

logger = logging.getLogger("apps.vit.select")

PLOT_COMMAND = "python -m apps.plots.selection"


@dataclasses.dataclass
class SelectAppConfig:
    """Score every unit (block × component) of a pretrained ViT on the target data and pick within a budget."""

    # The selection's own keys at the top level: `criterion=rgn budget=0.1` (a YAML file may nest them in select:,
    # the block a training config embeds).
    ALIASES = {
        "criterion": "select.criterion",
        "budget": "select.budget",
        "fill": "select.fill",
        "mode": "select.mode",
        "batches": "select.batches",
        "batch_size": "select.batch_size",
        "split": "select.split",
        "source": "select.source",
        "source_split": "select.source_split",
        "seed": "select.seed",
    }

    model: ModelConfig = option(ModelConfig(), "the pretrained ViT (default: ViT-B/16 ImageNet-21k, the paper's)")
    data: DataConfig = option(DataConfig(), "where datasets live and how they are loaded")
    dataset_name: str = option("cifar10", "the target (downstream) dataset")
    select: SelectConfig = option(SelectConfig(criterion="plasticity"), "criterion, budget and the data it reads")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    root: str = option("outputs", "output root: results go to <root>/selection/<model>_<dataset>_<criterion>_...")
    tag: str = option("", "model part of the output folder name (default: derived from model.name and weights)")

    def validate(self) -> None:
        try:
            self.dataset_name = canonical_name(self.dataset_name)
        except VitefError as e:
            raise ConfigError(f"dataset_name: {e}") from e
        if not self.select.criterion:
            raise ConfigError("criterion= is empty: choose one of plasticity, rgn, grad_norm, bound, random, paper")


def run_dir(cfg: SelectAppConfig) -> Path:
    """Where the selection writes: ``<root>/selection/<model>_<dataset>_<criterion>_<budget>_seed<seed>``.

    A sweep reads it to find each run's folder; the app writes no ``status.json``, so the sweep keeps its own.
    """
    sel = cfg.select
    budget = budget_label(sel.budget).replace("%", "pct").replace(" ", "")  # 10pct, 3units
    parts = (model_tag(cfg), cfg.dataset_name, sel.label(), budget, f"seed{sel.seed}")
    return Path(cfg.root) / "selection" / "_".join(safe_name(p) for p in parts)


def model_tag(cfg: SelectAppConfig) -> str:
    """The model part of the folder name: ``tag``, else the model's label (``-random`` for random weights,
    ``@<file stem>`` for other weights)."""
    if cfg.tag:
        return cfg.tag
    name = model_label(cfg.model.name)
    if cfg.model.checkpoint:
        return f"{name}@{Path(cfg.model.checkpoint).stem}"
    return name if cfg.model.pretrained else f"{name}-random"


def main(cfg: SelectAppConfig) -> Path:
    start = time.perf_counter()
    set_seed(cfg.select.seed)
    device = resolve_device(cfg.device)
    out_dir = check_writable(run_dir(cfg), "root")  # before the compute
    # No head: the gradient criteria put a fresh one of the target's classes in its place.
    model = build_model_from_config(cfg.model, num_classes=0).to(device).eval()
    target, source = build_streams(cfg.select, cfg.dataset_name, model, **cfg.data.loader_kwargs())
    logger.info("%s on %s: criterion %s, budget %s", cfg.model.name, cfg.dataset_name, cfg.select.label(),
                budget_label(cfg.select.budget))  # fmt: skip
    sel = select(model, cfg.select, target=target, source=source, device=device)
    sel.meta = {
        "model": cfg.model.name,
        "tag": model_tag(cfg),
        "dataset": cfg.dataset_name,
        "split": cfg.select.split if target is not None else None,
        "source": f"{cfg.select.source}/{cfg.select.source_split}" if source is not None else None,
        "label": cfg.select.label(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_results(out_dir, cfg, sel)
    print_summary(sel, out_dir)
    return out_dir


def markdown_table(sel: Selection) -> str:
    """The scores as a block × component markdown table; picked units are starred."""
    chosen = set(sel.picked)
    lines = [
        "| block | " + " | ".join(display_name(c) for c in BLOCK_COMPONENTS) + " |",
        "|---:|" + "---:|" * len(BLOCK_COMPONENTS),
    ]
    for layer in range(sel.depth):
        cells = []
        for comp in BLOCK_COMPONENTS:
            unit = f"{comp}.{layer}"
            cells.append(f"{sel.scores[unit]:.4g}" + (" *" if unit in chosen else ""))
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(sel: Selection) -> list[str]:
    """What was picked, in words: criterion, budget, units and parameters."""
    budget = budget_label(sel.budget)
    limit = f" ({sel.budget_limit:,} parameters)" if sel.budget_kind == "params" else ""
    return [
        f"{sel.meta.get('label', sel.criterion)} on {sel.meta.get('dataset', '?')}, budget {budget}{limit}: "
        f"{len(sel.picked)} of {len(sel.units)} units, {sel.picked_params:,} of {sel.backbone_params:,} backbone "
        f"parameters ({100 * sel.picked_fraction:.2f} %); the head trains besides, the embedding stays frozen",
        f"trainable=[{','.join(sel.trainable)}]",
    ]


def write_results(out_dir: Path, cfg: SelectAppConfig, sel: Selection) -> None:
    """Every file atomically; selection.json last, so a folder holding it is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    with atomic_path(out_dir / TABLE_FILE) as tmp:
        sel.table().to_csv(tmp, index=False)
    title = f"# Selection: {sel.meta.get('tag', '')} on {sel.meta.get('dataset', '')}\n\n"
    body = "\n\n".join(summary_lines(sel)) + "\n\n" + markdown_table(sel) + "\n\n(* picked)\n"
    atomic_write_text(out_dir / MARKDOWN_FILE, title + body)
    write_selection(out_dir, sel)


def print_summary(sel: Selection, out_dir: Path) -> None:
    print()
    print(markdown_table(sel))
    print("(* picked)\n")
    for line in summary_lines(sel):
        print(line)
    print(f"results in {out_dir}")
    print(f"heat map: {PLOT_COMMAND} dirs=[{out_dir}]")


CONFIG = SelectAppConfig

if __name__ == "__main__":
    cli_main(SelectAppConfig, main, prog="apps.vit.select")
