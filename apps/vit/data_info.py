"""Check a dataset: split sizes, classes and one batch's shape and value range.

    python -m apps.vit.data_info name=digits
    python -m apps.vit.data_info name=cifar10_c-corruption-snow-severity-5 data.root=/data splits=[test]

Useful before launching finetuning runs (arXiv 2602.06883, §3 datasets): a missing or corrupt dataset fails
here with the same message the training app would give.
"""

from __future__ import annotations

import dataclasses

from vitef.config import cli_main, option
from vitef.data import DataConfig, build_loader


@dataclasses.dataclass
class DataInfoConfig:
    """Print the split sizes of a dataset and the shape of its first batch."""

    name: str = option("digits", "dataset name (e.g. digits, cifar10, domainnet-clipart, imagefolder:/path)")
    splits: list[str] = option(["train", "val", "test"], "splits to load")
    size: int = option(224, "input side in pixels")
    batch_size: int = option(8, "batch size of the sample batch")
    seed: int = option(0, "run seed (train/val split of CIFAR and Pet)")
    data: DataConfig = option(DataConfig(num_workers=0), "where and how to load data")

    ALIASES = {"dataset_name": "name"}


def main(cfg: DataInfoConfig) -> None:
    rows = []
    for split in cfg.splits:  # load everything first: an error prints alone, not under a half table
        loader = build_loader(cfg.name, split, batch_size=cfg.batch_size, size=cfg.size, seed=cfg.seed,
                              device="cpu", **cfg.data.loader_kwargs())  # fmt: skip
        x, y = next(iter(loader))
        batch = f"x {tuple(x.shape)} in [{x.min():.2f}, {x.max():.2f}], labels {y.tolist()}"
        rows.append(f"{split:<8}{len(loader.dataset):>10,}{loader.num_classes:>9}  {batch}")
    print(f"{cfg.name}\n{'split':<8}{'images':>10}{'classes':>9}  first batch")
    print("\n".join(rows))


CONFIG = DataInfoConfig

if __name__ == "__main__":
    cli_main(DataInfoConfig, main, prog="apps.vit.data_info")
