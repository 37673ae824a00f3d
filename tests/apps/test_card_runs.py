"""Eval and linear probing of runs finetuned from a card file or a transformers directory (issue 10, items 1, 9).

The README's offline workflow (train from the bundled ``vit_digits.safetensors``, then ``apps.vit.eval``
and ``apps.vit.linear_probing run_dir=...``) failed because the card's architecture was built with
timm's 1000-class head before the run's head was loaded. Nothing here depends on the bundled model's
accuracy, width or depth: it may be retrained.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apps.vit import eval as eval_app
from apps.vit import linear_probing as probe_app
from apps.vit import train as train_app
from vitef.config import cli_main, load_config
from vitef.models import build_model, num_blocks
from vitef.monitor import RunDir

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "apps/vit/pretrained/vit_digits.safetensors"
FAST_TRAIN = ["steps=4", "eval_period=2", "optim.warmup_steps=1", "batch_size=32", "eval_batch_size=256", "log_every=2"]
FAST_PROBE = ["max_train_samples=200", "max_test_samples=80", "batch_size=256"]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name the bundled model by a path relative to the repository


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_model_is_the_runs(model, run: RunDir) -> None:
    """The model the app built holds exactly the run's best checkpoint, head included."""
    best = load_file(str(run.best_model_path))
    own = model.state_dict()
    assert sorted(own) == sorted(best)
    for key, value in best.items():
        assert torch.equal(own[key], value), key


def test_readme_workflow_from_the_bundled_card_file(tmp_path, in_repo, capsys):
    cfg = load_config(
        train_app.TrainConfig,
        ["config=apps/vit/configs/digits_pretrained.yaml", *FAST_TRAIN, f"root={tmp_path}"],
    )
    train_app.main(cfg)
    run = RunDir.from_log_dir(str(tmp_path), cfg.run_name)
    trained = json.loads(run.eval_path.read_text())
    classes = 5  # digits_subset-56789

    # python -m apps.vit.eval log_dir=<run>
    eval_app.main(load_config(eval_app.EvalConfig, [f"log_dir={run.path}"]))
    result = json.loads(run.eval_result_path("digits_subset-56789", "test").read_text())
    # The rebuilt model scores exactly what the training process measured on its in-memory best model.
    assert (result["acc"], result["n"], result["step"]) == (trained["acc"], trained["n"], trained["best_step"])

    # python -m apps.vit.linear_probing config=apps/vit/configs/linear_probing_digits.yaml run_dir=<run>
    pcfg = load_config(
        probe_app.LinearProbingConfig,
        ["config=apps/vit/configs/linear_probing_digits.yaml", f"run_dir={run.path}", *FAST_PROBE],
    )
    model, *_ = probe_app.load_source(pcfg)
    assert model.num_classes == classes
    _assert_model_is_the_runs(model, run)
    probe_app.main(pcfg)
    rows = _rows(run.path / "probes.csv")
    depth = num_blocks(build_model(str(CARD)))
    assert [(int(r["layer"]), r["point"]) for r in rows] == [
        (i, p) for i in range(depth) for p in ("ln1", "mha", "res1", "ln2", "fc1", "act", "fc2", "res2")
    ]
    assert {r["model"] for r in rows} == {f"apps/vit/pretrained/vit_digits.safetensors@{run.path.name}"}


@pytest.mark.parametrize("kind", ["default_labels", "vitmodel"])
def test_eval_and_probe_of_a_run_from_a_transformers_directory(tmp_path, kind):
    """Finetuned from a transformers directory (two default labels without id2label, or no classifier)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8
    )
    cls = transformers.ViTModel if kind == "vitmodel" else transformers.ViTForImageClassification
    cls(hf_cfg).save_pretrained(tmp_path / "hf")
    data = ["dataset_name=digits_subset-56789", "data.digits_size=16", "data.num_workers=0"]
    model = [f"model.name={tmp_path / 'hf'}", "model.pretrained=true"]
    cfg = load_config(train_app.TrainConfig, [*model, *data, *FAST_TRAIN, "tensorboard=false", f"root={tmp_path}"])
    train_app.main(cfg)
    run = RunDir.from_log_dir(str(tmp_path), cfg.run_name)
    trained = json.loads(run.eval_path.read_text())

    eval_app.main(load_config(eval_app.EvalConfig, [f"log_dir={run.path}"]))  # digits_size: the run's
    result = json.loads(run.eval_result_path("digits_subset-56789", "test").read_text())
    assert (result["acc"], result["n"]) == (trained["acc"], trained["n"])

    pcfg = load_config(
        probe_app.LinearProbingConfig,
        [f"run_dir={run.path}", *FAST_PROBE, "layers=[-1]", "points=[res2]", "data.digits_size=16", "device=cpu"],
    )
    built, *_ = probe_app.load_source(pcfg)
    assert built.num_classes == 5
    _assert_model_is_the_runs(built, run)
    probe_app.main(pcfg)
    assert [(r["layer"], r["point"]) for r in _rows(run.path / "probes.csv")] == [("1", "res2")]


# -- a weights file named with pretrained=false (issue 10, item 9) ----------------------------------------------


def test_probing_a_card_file_with_pretrained_false_is_refused(tmp_path, in_repo, capsys):
    argv = [
        "config=apps/vit/configs/linear_probing_digits.yaml",  # sets model.pretrained: false
        "model.name=apps/vit/pretrained/vit_digits.safetensors",
        f"root={tmp_path}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(probe_app.LinearProbingConfig, probe_app.main, argv=argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "model.pretrained=false would not read it" in err and "set model.pretrained=true" in err
    assert list(tmp_path.iterdir()) == []

    # With pretrained=true (and no random-model overrides) the probed model is the file's.
    pretrained = "config=apps/vit/configs/linear_probing_digits_pretrained.yaml"
    cfg = load_config(probe_app.LinearProbingConfig, [pretrained, f"root={tmp_path}"])
    model, *_ = probe_app.load_source(cfg)
    file = load_file(str(CARD))
    assert sorted(model.state_dict()) == sorted(file)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in file.items())
