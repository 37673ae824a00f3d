"""Evaluate a finetuning run's checkpoint on its test split or any dataset of the registry (arXiv 2602.06883).

    python -m apps.vit.eval config=apps/vit/configs/eval.yaml
    python -m apps.vit.eval log_dir=outputs/runs/cifar10_mha_lr0.01_seed0 eval_dataset=corrupt:fog-5:cifar10

The run is named by ``log_dir`` (a run name under ``<root>/runs`` or a run directory). The model is rebuilt
from the run's saved config and the checkpoint's weights; the result goes into the run directory as
``eval_<dataset>_<split>.json`` (accuracy as a fraction). Everything about the run (model, dataset, data
split seed, normalisation) comes from the run itself; this app's keys only say which checkpoint, on which
data, and how to compute (batch size, precision, device, where the data lives on this machine).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import ClassVar

from apps.vit.train import TrainConfig
from vitef import distributed
from vitef.config import cli_main, option
from vitef.data import build_loader, canonical_name, num_classes
from vitef.errors import ConfigError, VitefError
from vitef.evaluation import evaluate
from vitef.models import build_model
from vitef.monitor import RunDir
from vitef.monitor.run_dir import CHECKPOINTS
from vitef.utils import PRECISIONS, atomic_write_json, check_precision, check_writable, resolve_device


@dataclasses.dataclass
class MachineDataConfig:
    """Where the data lives on this machine and how it is loaded: the only data keys that may differ from the run's."""

    root: str | None = option(None, "dataset root (default: the run's, else $VITEF_DATA, else ./datasets)")
    num_workers: int = option(2, "DataLoader worker processes (0 = load in the main process)")
    download: bool = option(True, "download the evaluation dataset into the root when missing (torchvision)")
    cache: str | None = option(None, "decoded-image cache folder on this machine (default: the run's data.cache)")

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")


@dataclasses.dataclass
class EvalConfig:
    """Evaluate a finetuned run's checkpoint (its best or last) on its dataset or another one."""

    ALIASES: ClassVar[dict[str, str]] = {"num_workers": "data.num_workers", "data_root": "data.root"}
    # Before issue 11 the eval config was the training config: its keys located the run. Say what to write now.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        key: (
            "apps.vit.eval no longer takes the training config: name the run with log_dir=<run name or run "
            "directory> (e.g. log_dir=outputs/runs/cifar10_mha_lr0.01_seed0; the training app prints it at its end)"
        )
        for key in [*(f.name for f in dataclasses.fields(TrainConfig)), *TrainConfig.ALIASES]
    }

    log_dir: str = option("", "the run to evaluate: a run name under <root>/runs, or a run directory (required)")
    root: str = option("outputs", "output root of the training runs (the run is <root>/runs/<log_dir>)")
    eval_dataset: str = option("", "dataset to evaluate on (default: the run's dataset_name)")
    split: str = option("test", "split: train, val or test")
    checkpoint: str = option("best", "best (best validation accuracy) or last (latest step checkpoint)")
    eval_batch_size: int = option(256, "images per evaluation batch and process")
    precision: str = option("fp32", f"numeric precision: {', '.join(PRECISIONS)}")
    device: str = option("auto", "auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    data: MachineDataConfig = option(MachineDataConfig(), "where the data lives on this machine, loader workers")

    def validate(self) -> None:
        if not self.log_dir:
            raise ConfigError(
                "log_dir is empty: name the run to evaluate, e.g. log_dir=outputs/runs/<run> or log_dir=<run name> "
                "with root=<output root>"
            )
        if ".." in Path(self.log_dir).parts and not Path(self.log_dir).expanduser().is_dir():
            raise ConfigError(f"log_dir={self.log_dir!r} must not contain '..': give a run name or a run directory")
        if not self.root:
            raise ConfigError("root is empty: give the output root of the training runs, e.g. root=outputs")
        if self.eval_dataset:
            try:
                self.eval_dataset = canonical_name(self.eval_dataset)
            except VitefError as e:
                raise ConfigError(f"eval_dataset: {e}") from e
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split={self.split!r} must be train, val or test")
        if self.checkpoint not in CHECKPOINTS:
            raise ConfigError(f"checkpoint={self.checkpoint!r} must be one of {', '.join(CHECKPOINTS)}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={self.eval_batch_size} must be >= 1")
        check_precision(self.precision)
        resolve_device(self.device)  # raises ConfigError for cuda on a machine without GPU

    @property
    def run_name(self) -> str:
        return self.log_dir


def run_dir(cfg: EvalConfig) -> Path:
    """The training run evaluated (the sweep convention: the app's output directory).

    The run's ``status.json`` belongs to its training, so a sweep of evaluations keeps its own status record.
    """
    return RunDir.from_log_dir(cfg.root, cfg.log_dir).path


def main(cfg: EvalConfig) -> None:
    info, device = distributed.init_distributed(cfg.device)
    try:
        run = RunDir.from_log_dir(cfg.root, cfg.log_dir)
        trained = run.load_config(TrainConfig)
        check_writable(run.path, "log_dir")  # the result goes into the run directory
        weights, step = run.weights(cfg.checkpoint)
        dataset = cfg.eval_dataset or trained.dataset_name
        model = build_model(
            trained.model.name, pretrained=weights, img_size=trained.model.img_size, **dict(trained.model.overrides)
        )
        classes = num_classes(dataset, cfg.data.root)
        if classes != model.head.out_features:
            raise ConfigError(
                f"eval_dataset={dataset!r} has {classes} classes but the run's head has {model.head.out_features}: "
                f"evaluate on a dataset with the same classes as {trained.dataset_name!r} (e.g. a corruption of it)"
            )
        model.to(device)
        loader = build_loader(
            dataset,
            cfg.split,
            batch_size=cfg.eval_batch_size,
            size=model.patch_embed.img_size[0],
            shuffle=False,
            augment=False,
            seed=trained.seed,  # the run's seed fixes its train/val split
            rank=info.rank,
            world_size=info.world_size,
            device=device,
            model=model,
            **{**trained.data.loader_kwargs(), **_data_overrides(cfg)},
        )
        result = evaluate(model, loader, device, precision=cfg.precision)
        if info.is_main:
            path = run.eval_result_path(dataset, cfg.split)
            payload = {
                "dataset": dataset,
                "split": cfg.split,
                "acc": result.acc,
                "loss": result.loss,
                "n": result.n,
                "checkpoint": cfg.checkpoint,
                "step": step,
                "trained_on": trained.dataset_name,
            }
            atomic_write_json(path, payload)
            print(f"{run.path} [{cfg.checkpoint}, step {step}] on {dataset}/{cfg.split}: acc {100 * result.acc:.2f}%"
                  f" loss {result.loss:.4f} (n={result.n}) -> {path}")  # fmt: skip
    finally:
        distributed.destroy_distributed()


def _data_overrides(cfg: EvalConfig) -> dict:
    """Machine-specific data options of this command (where the data lives, workers) win over the run's."""
    out = {"num_workers": cfg.data.num_workers, "download": cfg.data.download}
    for key in ("root", "cache"):  # None: the run's
        if getattr(cfg.data, key) is not None:
            out[key] = getattr(cfg.data, key)
    return out


CONFIG = EvalConfig  # the sweep convention (vitef.sweep): CONFIG + main(cfg)

if __name__ == "__main__":
    cli_main(EvalConfig, main, argv=sys.argv[1:], prog="apps.vit.eval")
