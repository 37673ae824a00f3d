"""A tiny app that follows the sweep convention and the run-directory contract, for the sweep tests.

It "trains" for ``steps`` steps, checkpointing after each one, and resumes from its checkpoint like apps.vit.train
does (``overwrite`` starts afresh); ``kill_at`` makes it SIGKILL its own process once at that step (a killed job);
``sleep`` makes it write its pid to ``pid`` and sleep (a long run); with ``graceful`` a SIGTERM ends that sleep as
apps.vit.train stops on it (a ``stopped`` marker, status failed, exit 143), and the next start does not sleep. It
imports neither torch nor vitef.config so that the subprocess backends start it in a fraction of a second; its
command line only takes ``config=FILE.yaml`` (what the sweep passes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from vitef.errors import ConfigError, TrainingError, VitefError


@dataclasses.dataclass
class FakeOptim:
    name: str = "sgd"
    lr: float = 0.01


@dataclasses.dataclass
class FakeConfig:
    ALIASES = {"lr": "optim.lr"}

    root: str = "outputs"
    log_dir: str = "fake"
    dataset_name: str = "a"
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    optim: FakeOptim = dataclasses.field(default_factory=FakeOptim)
    seed: int = 0
    steps: int = 3
    fail: bool = False
    kill_at: int = -1
    write_status: bool = True
    overwrite: bool = False
    sleep: float = 0.0
    graceful: bool = False  # with sleep: SIGTERM stops the sleep like apps.vit.train stops (marker, exit 143)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")


CONFIG = FakeConfig


def main(cfg: FakeConfig) -> None:
    run = Path(cfg.root) / "runs" / cfg.log_dir
    run.mkdir(parents=True, exist_ok=True)
    ckpt = run / "ckpt.json"
    if cfg.overwrite and ckpt.exists():
        ckpt.unlink()
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    if cfg.write_status:
        atomic_write_json(run / "status.json", {"status": "running", "step": start, "message": ""})
    with open(run / "starts.txt", "a") as fh:
        fh.write(f"{start}\n")
    if cfg.fail and cfg.write_status:
        atomic_write_json(run / "status.json", {"status": "failed", "step": start, "message": "fake failure"})
    if cfg.fail:
        raise TrainingError(f"fake failure in {cfg.log_dir}")
    if cfg.sleep and not (run / "stopped").exists():  # a run stopped once resumes without sleeping
        if cfg.graceful:
            signal.signal(signal.SIGTERM, lambda *_: _stop(run, start))
        (run / "pid").write_text(str(os.getpid()))
        time.sleep(cfg.sleep)
    for step in range(start, cfg.steps):
        if step == cfg.kill_at and not (run / "killed").exists():
            (run / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_json(ckpt, {"step": step + 1})
    if cfg.write_status:
        atomic_write_json(run / "status.json", {"status": "completed", "step": cfg.steps, "message": ""})


def _stop(run: Path, step: int) -> None:
    """As apps.vit.train on SIGTERM: the progress is saved (here: nothing to save), the run says so, exit 143."""
    (run / "stopped").touch()
    atomic_write_json(run / "status.json", {"status": "failed", "step": step, "message": "stopped by SIGTERM"})
    sys.stderr.write("stopped: SIGTERM\n")
    sys.exit(128 + signal.SIGTERM)


def atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


if __name__ == "__main__":
    (arg,) = sys.argv[1:]
    data = yaml.safe_load(Path(arg.removeprefix("config=")).read_text())
    cfg = FakeConfig(**{**data, "optim": FakeOptim(**data["optim"])})
    try:
        cfg.validate()
        main(cfg)
    except VitefError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
