"""RunDir's reading side: the one way apps, results and sweeps read a run directory."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from vitef.config import option
from vitef.errors import CheckpointError, ConfigError
from vitef.monitor import MetricsLogger, RunDir, save_best, save_checkpoint


@dataclasses.dataclass
class _Cfg:
    lr: float = option(0.1, "learning rate")
    device: str = option("auto", "device")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0")


def test_config_as_dict_and_as_dataclass(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match="no run at .*config.yaml missing"):
        run.read_config()
    run.path.mkdir()
    run.config_path.write_text("lr: 0.5\ndevice: cuda:3\n")
    assert run.read_config() == {"lr": 0.5, "device": "cuda:3"}
    # The saved device is not needed to read a run (this machine may lack it).
    assert run.load_config(_Cfg) == _Cfg(lr=0.5, device="auto")
    run.config_path.write_text("lr: -1\n")
    with pytest.raises(ConfigError, match="lr=-1"):  # the one strict loader validates what it reads
        run.load_config(_Cfg)
    run.config_path.write_text("nope: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'nope'.*config.yaml"):
        run.load_config(_Cfg)
    for damaged in ("lr: [0.1\n", "- a list\n"):
        run.config_path.write_text(damaged)
        with pytest.raises(ConfigError, match="config.yaml"):
            run.read_config()


def test_weights_best_and_last(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    with pytest.raises(CheckpointError, match="no best checkpoint yet.*checkpoint=last"):
        run.weights("best")
    with pytest.raises(CheckpointError, match="no step checkpoint"):
        run.weights("last")
    with pytest.raises(ConfigError, match="checkpoint='newest'"):
        run.weights("newest")
    model = nn.Linear(2, 2)
    for step in (2, 4):
        save_checkpoint(run.step_dir(step), model, {"step": step})
    save_best(run.best_dir, model, {"step": 2, "val_acc": 0.5})
    assert run.weights("best") == (run.best_model_path, 2)
    assert run.weights("last") == (run.step_dir(4) / "model.safetensors", 4)


def test_eval_params_and_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert run.read_eval() is None and run.read_params() is None and run.read_metrics() == []
    run.eval_path.write_text('{"acc": 0.75}')
    assert run.read_eval() == {"acc": 0.75}
    run.eval_path.write_text('{"acc": 0.7')
    with pytest.raises(CheckpointError, match="eval.json is not valid JSON.*evaluate that run again"):
        run.read_eval()
    run.eval_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        run.read_eval()
    logger = MetricsLogger(run.metrics_path, tensorboard_dir=None)
    logger.log({"step": 1, "loss": 2.0})
    logger.log({"step": 2, "loss": 1.0})
    logger.close()
    with run.metrics_path.open("a") as f:
        f.write('{"step": 3, "lo')  # a run killed while writing its last line
    assert [(r["step"], r["loss"]) for r in run.read_metrics()] == [(1, 2.0), (2, 1.0)]
