"""Linear probes at the 8 points of every block of a frozen ViT (Odonnat et al., arXiv 2602.06883, §4).

    python -m apps.vit.linear_probing config=apps/vit/configs/linear_probing.yaml
    python -m apps.vit.linear_probing config=apps/vit/configs/linear_probing_digits.yaml
    python -m apps.vit.linear_probing config=... run_dir=outputs/runs/<log_dir>     # a finetuned run

Features after LN1, MHA, the attention residual, LN2, FC1, the activation, FC2 and the MLP residual of
every block are pooled (mean over patch tokens, or CLS), L2-normalised per row, standardised with
the train split's statistics, and one multinomial logistic regression (scikit-learn's default
objective, fitted for all probes at once by :mod:`vitef.probe.solver`) is fit on the train split and
scored on the test split per probe. The last block's ``res2`` probe is the paper's baseline.

The model is ``model`` (any source of :func:`vitef.models.build_model`), or the best checkpoint of
``run_dir`` rebuilt with the run's architecture and its own head (its shape read from the weights).
``model.name=<file>.safetensors`` with ``model.pretrained=false`` is refused rather than probing a
random model that never read the file: set ``model.pretrained=true``, or name the card's timm
architecture to probe a random model of it.

Outputs (written atomically at the end; nothing is written if anything fails):
- a finetuned run: ``probes.csv``, ``probes.json`` and ``probes_config.yaml`` in its run directory
  (its own ``config.yaml`` is left alone); rows of another dataset/pool already there are kept;
- a pretrained model: ``<root>/probes/<model>_<dataset>_<pool>/`` with ``probes.csv``,
  ``probes.json`` and ``config.yaml``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from vitef.config import cli_main, option, save_config
from vitef.data import SPLITS, DataConfig, build_dataset, canonical_name
from vitef.errors import CheckpointError, ConfigError, ModelError, VitefError
from vitef.models import ModelConfig, build_model, build_model_from_config, model_label, num_blocks
from vitef.monitor import RunDir
from vitef.probe import POOLS, PROBE_POINTS, SolverConfig, check_layers, check_points, extract_features, fit_probes
from vitef.utils import (
    PRECISIONS,
    atomic_write_json,
    atomic_write_text,
    check_precision,
    check_writable,
    resolve_device,
    safe_name,
    set_seed,
)

logger = logging.getLogger("apps.vit.linear_probing")

CSV_COLUMNS = (
    "layer",
    "point",
    "pool",
    "train_acc",
    "test_acc",
    "n_train",
    "n_test",
    "dim",
    "iterations",
    "converged",
    "loss",
    "dataset",
    "model",
)


@dataclasses.dataclass
class LinearProbingConfig:
    """Linear probes at the 8 points of every block of a frozen ViT (pretrained, or a finetuned run)."""

    ALIASES = {"model_name": "model.name", "C": "solver.C"}

    model: ModelConfig = option(ModelConfig(), "the pretrained model to probe (ignored when run_dir is set)")
    run_dir: str | None = option(None, "probe a finetuned run instead: <root>/runs/<log_dir> (its best checkpoint)")
    dataset_name: str | None = option(None, "dataset to probe on (default for a run: the run's dataset_name)")
    data: DataConfig = option(DataConfig(), "where datasets live and how they are loaded")
    train_split: str = option("train", "split the probes are fit on")
    test_split: str = option("test", "split the probes are scored on")
    pool: str = option("mean", "token pooling: mean (over patch tokens, the paper's) or cls")
    layers: list[int] | None = option(None, "block indices to probe (negative counts from the end); null = all")
    points: list[str] = option(list(PROBE_POINTS), "probe points: ln1, mha, res1, ln2, fc1, act, fc2, res2")
    batch_size: int = option(128, "images per forward pass during feature extraction")
    device: str = option("auto", "device of the forward pass: auto, cpu, cuda, cuda:N")
    precision: str = option("fp32", f"forward precision: {', '.join(PRECISIONS)} (features are kept in float32)")
    seed: int = option(0, "seed of the data split and of the max_*_samples subsets")
    root: str = option("outputs", "output root: pretrained-model probes go to <root>/probes/")
    max_train_samples: int | None = option(None, "fit on a seeded random subset of this many train samples")
    max_test_samples: int | None = option(None, "score on a seeded random subset of this many test samples")
    solver: SolverConfig = option(SolverConfig(), "the batched logistic-regression solver")

    def validate(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(f"pool={self.pool!r} is unknown: use mean (the paper's) or cls")
        self.points = check_points(self.points)
        for key in ("train_split", "test_split"):
            if getattr(self, key) not in SPLITS:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not a split: use one of {', '.join(SPLITS)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        check_precision(self.precision)
        for key in ("max_train_samples", "max_test_samples"):
            value = getattr(self, key)
            if value is not None and value < 2:
                raise ConfigError(f"{key}={value} must be >= 2 (or null for the whole split)")
        if self.run_dir is None and not self.dataset_name:
            raise ConfigError("dataset_name is required to probe a pretrained model (e.g. dataset_name=cifar10)")
        if self.dataset_name:
            try:
                self.dataset_name = canonical_name(self.dataset_name)  # stored canonical: one folder per dataset
            except VitefError as e:
                raise ConfigError(f"dataset_name: {e}") from e


def main(cfg: LinearProbingConfig) -> None:
    check_writable(probes_dir(cfg), "run_dir" if cfg.run_dir else "root")  # before minutes of features
    set_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, dataset_name, label, out_dir, config_name = load_source(cfg)
    check_layers(cfg.layers, num_blocks(model))  # fail before any data is read
    img_size = int(model.patch_embed.img_size[0])
    logger.info("probing %s on %s (%s pooling, %d px) -> %s", label, dataset_name, cfg.pool, img_size, out_dir)

    train_loader = make_loader(cfg, model, dataset_name, cfg.train_split, img_size, cfg.max_train_samples)
    test_loader = make_loader(cfg, model, dataset_name, cfg.test_split, img_size, cfg.max_test_samples)
    extract = dict(layers=cfg.layers, points=cfg.points, pool=cfg.pool, device=device, precision=cfg.precision)
    start = time.perf_counter()
    train = extract_features(model, train_loader, desc=f"features {cfg.train_split}", **extract)
    test = extract_features(model, test_loader, desc=f"features {cfg.test_split}", **extract)
    logger.info("features: %d probes, %.1f MB, %.1f s", len(train.keys), train.nbytes() / 2**20, _since(start))
    del model  # free the forward's memory before solving

    start = time.perf_counter()
    rows = fit_probes(train, test, train_loader.dataset.num_classes, cfg.solver)
    logger.info("solver: %.1f s", _since(start))
    for row in rows:
        row.update(pool=cfg.pool, dataset=dataset_name, model=label)

    write_results(out_dir, rows, cfg, config_name)
    print_summary(rows, out_dir)


def probes_dir(cfg: LinearProbingConfig) -> Path:
    """Where results go: the finetuned run probed, or ``<root>/probes/<model>_<dataset>_<pool>``."""
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser()
    return Path(cfg.root) / "probes" / f"{model_label(cfg.model.name)}_{safe_name(cfg.dataset_name)}_{cfg.pool}"


def run_dir(cfg: LinearProbingConfig) -> Path:
    """The output directory a sweep records: :func:`probes_dir`.

    The app writes no ``status.json`` (probing a finetuned run must not touch the run's own status), so a sweep
    keeps the run's status in its own record.
    """
    return probes_dir(cfg)


def load_source(cfg: LinearProbingConfig):
    """The frozen model, dataset name, model label, output directory and config file name."""
    if cfg.run_dir is None:
        model = build_model_from_config(cfg.model)
        return model, cfg.dataset_name, model_label(cfg.model.name), probes_dir(cfg), "config.yaml"
    run = RunDir(Path(cfg.run_dir).expanduser())
    if not run.path.is_dir():
        raise ConfigError(f"run_dir='{cfg.run_dir}' does not exist: give <root>/runs/<log_dir> of a training run")
    if not run.config_path.is_file():
        raise ConfigError(f"run_dir='{cfg.run_dir}' has no config.yaml: it is not a vitef run directory")
    train_cfg = run.read_config()
    model_cfg = train_cfg.get("model")
    if not isinstance(model_cfg, dict) or not model_cfg.get("name"):
        raise ConfigError(f"{run.config_path} has no model.name: cannot rebuild the run's architecture")
    dataset_name = cfg.dataset_name or train_cfg.get("dataset_name")
    if not dataset_name:
        raise ConfigError(f"{run.config_path} has no dataset_name: set dataset_name=... to choose the probing dataset")
    try:
        weights, _ = run.weights("best")
    except CheckpointError as e:
        raise ModelError(
            f"run_dir='{cfg.run_dir}' has no best checkpoint ({run.best_model_path}): let the training run reach its "
            "first evaluation, or probe another run"
        ) from e
    # The best checkpoint holds every weight (head included), so no hub download happens here.
    model = build_model(
        model_cfg["name"],
        pretrained=weights,
        img_size=model_cfg.get("img_size"),
        **dict(model_cfg.get("overrides") or {}),
    )
    return model, dataset_name, f"{model_cfg['name']}@{run.path.name}", run.path, "probes_config.yaml"


def make_loader(cfg: LinearProbingConfig, model, dataset_name: str, split: str, size: int, limit: int | None):
    """Eval-transform loader over ``split`` in a fixed order, optionally a seeded random subset."""
    data = cfg.data
    dataset = build_dataset(
        dataset_name,
        split,
        size=size,
        augment=False,
        root=data.root,
        seed=cfg.seed,
        download=data.download,
        normalize=data.normalize,
        model=model,
        digits_size=data.digits_size,
        cache=data.cache,
    )
    num_classes = dataset.num_classes
    if limit is not None and limit < len(dataset):
        g = torch.Generator().manual_seed(cfg.seed)
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:limit].sort().values.tolist())
        dataset.num_classes = num_classes  # type: ignore[attr-defined]
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=data.num_workers)


def write_results(out_dir: Path, rows: list[dict], cfg: LinearProbingConfig, config_name: str) -> None:
    """probes.csv + probes.json (kept rows of other dataset/pool first) and the resolved config, atomically."""
    csv_path, json_path = out_dir / "probes.csv", out_dir / "probes.json"
    kept = [r for r in _read_rows(csv_path) if (r["dataset"], r["pool"]) != (rows[0]["dataset"], cfg.pool)]
    all_rows = [*kept, *({c: r[c] for c in CSV_COLUMNS} for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(all_rows)
    save_config(cfg, out_dir / config_name)
    atomic_write_json(json_path, all_rows)
    atomic_write_text(csv_path, buf.getvalue())


def _read_rows(path: Path) -> list[dict]:
    """Rows of an existing probes.csv, typed as written (missing or foreign file: none)."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                logger.warning("%s has other columns than this version writes; it will be replaced", path)
                return []
            rows = list(reader)
        ints, floats = ("layer", "n_train", "n_test", "dim", "iterations"), ("train_acc", "test_acc", "loss")
        for r in rows:
            r.update({k: int(r[k]) for k in ints})
            r.update({k: float(r[k]) for k in floats})
            r["converged"] = r["converged"] == "True"
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError) as e:  # damaged: like a foreign file
        logger.warning("%s cannot be read (%s); it will be replaced", path, e)
        return []
    return rows


def print_summary(rows: list[dict], out_dir: Path) -> None:
    """Test accuracy (%) per block and point, the best probe and the paper's baseline (last res2)."""
    points = [p for p in PROBE_POINTS if any(r["point"] == p for r in rows)]
    table = {(r["layer"], r["point"]): r for r in rows}
    print(f"\nlinear probes: {rows[0]['model']} on {rows[0]['dataset']} ({rows[0]['pool']} pooling), test acc %")
    print("block " + "".join(f"{p:>8}" for p in points))
    for layer in sorted({r["layer"] for r in rows}):
        cells = [f"{100 * table[(layer, p)]['test_acc']:8.2f}" if (layer, p) in table else " " * 8 for p in points]
        print(f"{layer:>5} " + "".join(cells))
    best = max(rows, key=lambda r: r["test_acc"])
    print(f"best probe: block {best['layer']} {best['point']} = {100 * best['test_acc']:.2f}%")
    last = max(r["layer"] for r in rows)
    if (last, "res2") in table:
        print(f"baseline (block {last} res2, the paper's): {100 * table[(last, 'res2')]['test_acc']:.2f}%")
    not_conv = sum(not r["converged"] for r in rows)
    if not_conv:
        print(f"warning: {not_conv} probe(s) did not converge (raise solver.max_iter)")
    print(f"results: {out_dir / 'probes.csv'}")


def _since(start: float) -> float:
    return time.perf_counter() - start


CONFIG = LinearProbingConfig

if __name__ == "__main__":
    cli_main(LinearProbingConfig, main, prog="apps.vit.linear_probing")
