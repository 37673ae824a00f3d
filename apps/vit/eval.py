"""Evaluate a finetuning run's checkpoint on its test split or any dataset of the registry (arXiv 2602.06883).

    python -m apps.vit.eval config=apps/vit/configs/cifar10.yaml trainable=[mha] lr=1e-2 seed=0
    python -m apps.vit.eval log_dir=outputs/runs/cifar10_mha_lr0.01_seed0 eval_dataset=corrupt:fog-5:cifar10

The run is found exactly as the training app finds it (same config and overrides, or ``log_dir`` = a
run name or directory). The model is rebuilt from the run's saved config and the checkpoint's weights;
the result goes into the run directory as ``eval_<dataset>_<split>.json`` (accuracy as a fraction).
"""

from __future__ import annotations

import dataclasses
import sys

from apps.vit.train import TrainConfig, load_run_config
from vitef import distributed
from vitef.config import cli_main, option
from vitef.data import build_loader, num_classes, parse_name
from vitef.errors import CheckpointError, ConfigError, VitefError
from vitef.evaluation import evaluate
from vitef.models import build_model
from vitef.monitor import RunDir, read_best
from vitef.utils import atomic_write_json, check_writable

CHECKPOINTS = ("best", "last")


@dataclasses.dataclass
class EvalConfig(TrainConfig):
    """Evaluate a finetuned run's checkpoint; the training keys locate the run (as in apps.vit.train)."""

    eval_dataset: str = option("", "dataset to evaluate on (default: the run's dataset_name)")
    split: str = option("test", "split: train, val or test")
    checkpoint: str = option("best", "best (best validation accuracy) or last (latest step checkpoint)")

    def validate(self) -> None:
        super().validate()
        if self.eval_dataset:
            try:
                parse_name(self.eval_dataset)
            except VitefError as e:
                raise ConfigError(f"eval_dataset: {e}") from e
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split={self.split!r} must be train, val or test")
        if self.checkpoint not in CHECKPOINTS:
            raise ConfigError(f"checkpoint={self.checkpoint!r} must be one of {', '.join(CHECKPOINTS)}")


def main(cfg: EvalConfig) -> None:
    info, device = distributed.init_distributed(cfg.device)
    try:
        run = RunDir.from_log_dir(cfg.root, cfg.run_name)
        trained = load_run_config(run)
        check_writable(run.path, "log_dir")  # the result goes into the run directory
        weights, step = _checkpoint_file(run, cfg.checkpoint)
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


def _checkpoint_file(run: RunDir, which: str):
    """The weights file and its step for ``best`` or ``last``; a clear error when the run has none."""
    if which == "best":
        if not run.best_model_path.is_file():
            raise CheckpointError(
                f"{run.best_model_path} not found: the run has no best checkpoint yet (it saves one at its first "
                "validation); train longer or use checkpoint=last"
            )
        return run.best_model_path, read_best(run.best_dir).get("step")
    last = run.latest_checkpoint()
    if last is None:
        raise CheckpointError(f"{run.checkpoints_dir} has no step checkpoint: train the run first")
    return last / "model.safetensors", int(last.name.split("_")[1])


def _data_overrides(cfg: EvalConfig) -> dict:
    """Machine-specific data options of this command (where the data lives, workers) win over the run's."""
    return {"root": cfg.data.root, "num_workers": cfg.data.num_workers, "download": cfg.data.download}


CONFIG = EvalConfig  # the sweep convention (vitef.sweep): CONFIG + main(cfg)

if __name__ == "__main__":
    cli_main(EvalConfig, main, argv=sys.argv[1:], prog="apps.vit.eval")
