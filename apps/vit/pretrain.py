"""Pretrain a ViT from scratch and export it as a timm-layout ``.safetensors`` file with a model card.

    python -m apps.vit.pretrain config=apps/vit/configs/pretrain_digits.yaml

This is how the bundled offline model ``apps/vit/pretrained/vit_digits.safetensors`` was made: a small
ViT trained on the bundled ``digits_subset-01234`` (digits 0–4), playing the role of the paper's
ImageNet-21k checkpoint in the offline study (arXiv 2602.06883): plasticity is measured between its
pretraining distribution and downstream tasks (a corruption shift, new classes), and its components
are finetuned one type at a time.

It is the training app (``apps.vit.train``) — same config keys, run directory, resume — followed by an
export of the best-validation checkpoint and a JSON card next to it (test accuracy, config, SHA-256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

from apps.vit import train
from vitef.config import cli_main, option, to_dict
from vitef.errors import ConfigError
from vitef.monitor import RunDir
from vitef.utils import atomic_path, atomic_write_json


@dataclasses.dataclass
class PretrainConfig(train.TrainConfig):
    """Pretrain a ViT (random init, every component trains) and export its best checkpoint."""

    export: str = option("", "where to write the weights (.safetensors); a .json card is written beside it")

    def validate(self) -> None:
        super().validate()
        if not self.export.endswith(".safetensors"):
            raise ConfigError(f"export={self.export!r} must be a path ending in .safetensors")
        if self.model.pretrained or self.model.checkpoint:
            raise ConfigError("pretraining starts from random weights: set model.pretrained=false, no checkpoint")


CONFIG = PretrainConfig


def card_path(export: str | Path) -> Path:
    """The JSON card written beside exported weights."""
    return Path(export).with_suffix(".json")


def main(cfg: PretrainConfig) -> None:
    train.main(cfg)
    run = RunDir.from_log_dir(cfg.root, cfg.run_name)
    evaluation = json.loads(run.eval_path.read_text())
    with atomic_path(cfg.export) as tmp:
        shutil.copyfile(run.best_model_path, tmp)
    digest = hashlib.sha256(Path(cfg.export).read_bytes()).hexdigest()
    model = to_dict(cfg.model)
    model["pretrained"] = False
    atomic_write_json(
        card_path(cfg.export),
        {
            "weights": Path(cfg.export).name,
            "sha256": digest,
            "model": model,
            "dataset": cfg.dataset_name,
            "num_classes": _num_classes(cfg),
            "test_acc": evaluation["acc"],
            "best_val_acc": evaluation["best_val_acc"],
            "best_step": evaluation["best_step"],
            "steps": cfg.steps,
            "seed": cfg.seed,
            "made_by": "python -m apps.vit.pretrain " + " ".join(sys.argv[1:]),
        },
    )
    print(f"exported {cfg.export} (test acc {100 * evaluation['acc']:.2f}%, card {card_path(cfg.export)})")


def _num_classes(cfg: PretrainConfig) -> int:
    from vitef.data import num_classes

    return num_classes(cfg.dataset_name, cfg.data.root)


if __name__ == "__main__":
    cli_main(PretrainConfig, main, argv=sys.argv[1:], prog="apps.vit.pretrain")
