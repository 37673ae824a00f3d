"""A tiny app that follows the sweep convention and the run-directory contract, for the sweep tests.

It "trains" for ``steps`` steps, checkpointing after each one, and resumes from its checkpoint like
apps.vit.train does; ``kill_at`` makes it SIGKILL its own process once at that step (a killed job).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

from vitef.config import cli_main, option
from vitef.errors import TrainingError
from vitef.utils import atomic_write_json


@dataclasses.dataclass
class FakeOptim:
    name: str = option("sgd", "optimiser")
    lr: float = option(0.01, "learning rate")


@dataclasses.dataclass
class FakeConfig:
    ALIASES = {"lr": "optim.lr"}

    root: str = option("outputs", "output root")
    log_dir: str = option("fake", "run directory under <root>/runs")
    dataset_name: str = option("a", "dataset")
    trainable: list[str] = option(["all"], "components")
    optim: FakeOptim = option(FakeOptim(), "optimiser")
    seed: int = option(0, "seed")
    steps: int = option(3, "steps")
    fail: bool = option(False, "raise a user error")
    kill_at: int = option(-1, "SIGKILL the process once at this step")

    def validate(self) -> None:
        if self.steps < 1:
            from vitef.errors import ConfigError

            raise ConfigError("steps must be >= 1")


CONFIG = FakeConfig


def main(cfg: FakeConfig) -> None:
    run = Path(cfg.root) / "runs" / cfg.log_dir
    run.mkdir(parents=True, exist_ok=True)
    ckpt = run / "ckpt.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    atomic_write_json(run / "status.json", {"status": "running", "step": start, "message": ""})
    with open(run / "starts.txt", "a") as fh:
        fh.write(f"{start}\n")
    if cfg.fail:
        atomic_write_json(run / "status.json", {"status": "failed", "step": start, "message": "fake failure"})
        raise TrainingError(f"fake failure in {cfg.log_dir}")
    for step in range(start, cfg.steps):
        if step == cfg.kill_at and not (run / "killed").exists():
            (run / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_json(ckpt, {"step": step + 1})
    atomic_write_json(run / "status.json", {"status": "completed", "step": cfg.steps, "message": ""})


if __name__ == "__main__":
    cli_main(FakeConfig, main, prog="sweep_fake_app")
