"""apps.vit.eval: accuracy equals a direct computation; results in the run directory; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_train, tiny_vit

from apps.vit import eval as eval_app
from apps.vit import train as train_app
from vitef.config import build_config, load_config
from vitef.data import build_loader
from vitef.errors import CheckpointError, ConfigError
from vitef.monitor import RunDir

TINY = tiny_train(optim={"lr": 0.05, "warmup_steps": 0, "scheduler": "constant"}, trainable=["fc2"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train_app.main(build_config(train_app.TrainConfig, TINY, {"root": str(root), "log_dir": "run"}))
    return root, RunDir(root / "runs" / "run")


def direct_accuracy(weights, dataset: str) -> tuple[float, int]:
    """Argmax accuracy over every test sample, computed here without vitef.evaluation."""
    model = tiny_vit(pretrained=weights).eval()
    loader = build_loader(dataset, "test", batch_size=7, size=16, seed=0, digits_size=16)
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total, total


def test_eval_accuracy_equals_direct_computation(trained_run, capsys):
    root, run = trained_run
    cfg = build_config(eval_app.EvalConfig, {"root": str(root), "log_dir": "run", "eval_batch_size": 32})
    eval_app.main(cfg)
    out = json.loads(run.eval_result_path("digits_subset-56789", "test").read_text())
    acc, n = direct_accuracy(run.best_model_path, "digits_subset-56789")
    assert out["acc"] == acc and out["n"] == n == 180
    assert out["step"] == json.loads((run.best_dir / "best.json").read_text())["step"]
    # Same as the training app's own test evaluation of the best checkpoint.
    assert out["acc"] == json.loads(run.eval_path.read_text())["acc"]
    assert "acc" in capsys.readouterr().out


def test_eval_on_a_corruption_by_run_path(trained_run):
    root, run = trained_run
    dataset = "corrupt:contrast-5:digits_subset-56789"
    cfg = build_config(eval_app.EvalConfig, {"log_dir": str(run.path), "eval_dataset": dataset, "checkpoint": "last"})
    eval_app.main(cfg)
    out = json.loads(run.eval_result_path(dataset, "test").read_text())
    acc, n = direct_accuracy(run.step_dir(4) / "model.safetensors", dataset)
    assert (out["acc"], out["n"], out["step"], out["checkpoint"]) == (acc, n, 4, "last")


def test_missing_run_or_checkpoint_fails_clearly(trained_run, tmp_path, run_inprocess):
    root, run = trained_run
    with pytest.raises(ConfigError, match="no run at"):
        eval_app.main(build_config(eval_app.EvalConfig, {"root": str(tmp_path), "log_dir": "nope"}))
    # A run without a best checkpoint (e.g. killed before its first validation).
    bare = RunDir(tmp_path / "runs" / "bare")
    bare.path.mkdir(parents=True)
    bare.config_path.write_text(run.config_path.read_text())
    r = run_inprocess("apps.vit.eval", f"root={tmp_path}", "log_dir=bare")
    assert r.returncode == 2 and "no best checkpoint" in r.stderr
    assert sorted(p.name for p in bare.path.iterdir()) == ["config.yaml"]  # nothing half-written
    with pytest.raises(CheckpointError, match="no step checkpoint"):
        last = {"root": str(tmp_path), "log_dir": "bare", "checkpoint": "last"}
        eval_app.main(build_config(eval_app.EvalConfig, last))
    with pytest.raises(ConfigError, match="classes"):
        eval_app.main(build_config(eval_app.EvalConfig, {"log_dir": str(run.path), "eval_dataset": "digits"}))


def test_training_keys_say_what_to_write_instead(tmp_path):
    # Before its own config, apps.vit.eval took the training config; now the run is named by log_dir.
    for argv in (["trainable=[mha]"], ["lr=0.01"], ["config=apps/vit/configs/digits.yaml"]):
        with pytest.raises(ConfigError, match="not an option of this app.*log_dir=<run name or run directory>"):
            load_config(eval_app.EvalConfig, argv)
    with pytest.raises(ConfigError, match="log_dir is empty"):
        load_config(eval_app.EvalConfig, [])


def test_shipped_eval_yaml_names_a_run_of_the_quickstart():
    cfg = load_config(eval_app.EvalConfig, ["config=apps/vit/configs/eval.yaml"])
    assert (cfg.root, cfg.checkpoint, cfg.split) == ("outputs/quickstart", "best", "test")
    assert eval_app.run_dir(cfg) == Path("outputs/quickstart/runs") / cfg.log_dir
