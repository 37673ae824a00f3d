"""TensorBoard for real (issue 14.5): a run with tensorboard=true writes event files whose scalars are the numbers of
metrics.jsonl (float32, as TensorBoard stores them), also across a resume; without the package, asking for them
is one clear ConfigError before anything is written. The same for submitit (backend=slurm)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import tiny_train

from apps.vit import train as train_app
from vitef.config import build_config
from vitef.errors import ConfigError
from vitef.monitor import MetricsLogger, RunDir, read_metrics
from vitef.monitor.metrics import TENSORBOARD_MISSING, require_tensorboard
from vitef.sweep import SweepConfig


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``folder``: tag → [(step, value)] in step order."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event, no sampling
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def from_metrics(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the event files must hold: every number of every row at its step, rounded to float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, []).append((int(row["step"]), float(np.float32(value))))
    return out


def test_train_run_writes_event_files_equal_to_metrics_jsonl(tmp_path):
    over = {"root": str(tmp_path / "out"), "log_dir": "run", "tensorboard": True, "steps": 6, "eval_period": 3}
    train_app.main(build_config(train_app.TrainConfig, tiny_train(), over))
    run = RunDir(tmp_path / "out" / "runs" / "run")
    assert list(run.tensorboard_dir.glob("events.out.tfevents.*"))
    rows = read_metrics(run.metrics_path)
    expected = from_metrics(rows)
    assert {"loss", "lr", "grad_norm", "grad_norm/mha", "val_loss", "val_acc"} <= set(expected)
    assert [s for s, _ in expected["loss"]] == list(range(1, 7)) and [s for s, _ in expected["val_acc"]] == [3, 6]
    assert scalars(run.tensorboard_dir) == expected


def test_resume_drops_the_events_after_the_resumed_step(tmp_path):
    # A run killed after step 5 resumes from its step-3 checkpoint: metrics.jsonl keeps steps 1-3 and the new 4-6;
    # the event files must say the same, not hold both the old and the new steps 4 and 5.
    path, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    with MetricsLogger(path, tb) as first:
        for step in range(1, 6):
            first.log({"step": step, "loss": 1.0 / step})
    with MetricsLogger(path, tb) as resumed:
        resumed.truncate_after(3)
        for step in range(4, 7):
            resumed.log({"step": step, "loss": 10.0 + step})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert scalars(tb) == from_metrics(rows)


def test_missing_package_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    expected = "tensorboard=true needs the tensorboard package: pip install tensorboard, or set tensorboard=false"
    assert TENSORBOARD_MISSING == expected
    with pytest.raises(ConfigError, match="^" + expected + "$"):
        require_tensorboard()
    with pytest.raises(ConfigError, match=expected):
        build_config(train_app.TrainConfig, tiny_train(tensorboard=True), {"root": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=expected):
        MetricsLogger(tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "tb")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
    # tensorboard=false needs nothing.
    cfg = build_config(train_app.TrainConfig, tiny_train(tensorboard=False), {"root": str(tmp_path / "out")})
    assert cfg.tensorboard is False


def test_cli_exit_status_without_tensorboard(tmp_path, monkeypatch, run_inprocess):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    r = run_inprocess("apps.vit.train", "dataset_name=digits", f"root={tmp_path / 'out'}", "tensorboard=true")
    assert r.returncode == 2 and r.stderr.startswith("error: tensorboard=true needs the tensorboard package")


def test_slurm_backend_without_submitit_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    grid = {"name": "s", "grid": {"seed": [0]}, "app": "apps.vit.train"}
    with pytest.raises(ConfigError, match=r"backend=slurm needs the submitit package: pip install submitit"):
        build_config(SweepConfig, {**grid, "backend": "slurm"})
    assert build_config(SweepConfig, {**grid, "backend": "slurm", "dry_run": True}).dry_run  # listing needs nothing
    assert build_config(SweepConfig, {**grid, "backend": "local"}).backend == "local"
