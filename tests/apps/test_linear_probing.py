"""apps.vit.linear_probing end to end, offline on the bundled digits with a tiny ViT (arXiv 2602.06883, §4)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY_ARGV, TINY_MODEL, tiny_vit

from vitef.monitor import save_best

APP = "apps.vit.linear_probing"
FAST = [
    "dataset_name=digits_subset-012",
    "max_train_samples=120",
    "max_test_samples=60",
    "batch_size=64",
    "device=cpu",
    "solver.device=cpu",
    "data.num_workers=0",
    "data.digits_size=16",
]


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_pretrained_model_writes_every_file(run_app, tmp_path):
    res = run_app(APP, *TINY_ARGV, *FAST, f"root={tmp_path}")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "probes" / "vit_tiny_patch16_224_digits_subset-012_mean"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "probes.csv", "probes.json"]
    rows = _rows(out / "probes.csv")
    points = ["ln1", "mha", "res1", "ln2", "fc1", "act", "fc2", "res2"]
    assert [(int(r["layer"]), r["point"]) for r in rows] == [(i, p) for i in range(2) for p in points]
    for r in rows:
        assert r["pool"] == "mean" and r["dataset"] == "digits_subset-012"
        assert int(r["n_train"]) == 120 and int(r["n_test"]) == 60
        assert int(r["dim"]) == (128 if r["point"] in ("fc1", "act") else 32)
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and r["converged"] == "True"
    # Random features of 3 digit classes are still far above chance (1/3).
    assert max(float(r["test_acc"]) for r in rows) > 0.6
    assert json.loads((out / "probes.json").read_text())[0].keys() >= {"layer", "point", "train_acc", "iterations"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["pool"] == "mean" and saved["solver"]["C"] == 1.0 and saved["model"]["img_size"] == 16
    assert "baseline (block 1 res2" in res.stdout and "best probe" in res.stdout


def _write_run(tmp_path: Path) -> Path:
    """A run directory in the contract's format, as apps.vit.train writes it."""
    run = tmp_path / "runs" / "tiny_run"
    torch.manual_seed(0)
    model = tiny_vit(num_classes=3)
    save_best(run / "checkpoints" / "best", model, {"step": 1, "val_acc": 0.5})  # as the training app writes it
    config = {
        "dataset_name": "digits_subset-012",
        "model": TINY_MODEL,
        "trainable": ["mha"],
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_finetuned_run_probes_into_its_directory(run_inprocess, tmp_path):
    run = _write_run(tmp_path)
    before = (run / "config.yaml").read_text()
    fast = [a for a in FAST if not a.startswith("dataset_name")]
    res = run_inprocess(APP, f"run_dir={run}", *fast, "pool=cls", "layers=[-1]", "points=[res2,fc1]")
    assert res.returncode == 0, res.stderr
    assert (run / "config.yaml").read_text() == before  # the run's own config is left alone
    assert (run / "probes_config.yaml").is_file()
    rows = _rows(run / "probes.csv")
    assert [(r["layer"], r["point"], r["pool"]) for r in rows] == [("1", "fc1", "cls"), ("1", "res2", "cls")]
    assert rows[0]["model"] == "vit_tiny_patch16_224@tiny_run"
    # A second pooling adds its rows next to the first instead of replacing them.
    res = run_inprocess(APP, f"run_dir={run}", *fast, "pool=mean", "layers=[-1]", "points=[res2]")
    assert res.returncode == 0, res.stderr
    assert [r["pool"] for r in _rows(run / "probes.csv")] == ["cls", "cls", "mean"]
    assert len(json.loads((run / "probes.json").read_text())) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["points=[res2,attn_out]"], "unknown probe point(s) 'attn_out'"),
        (["run_dir={tmp}/runs/missing"], "does not exist"),
        (["run_dir={tmp}/runs/tiny_run", "+no_best"], "has no best checkpoint"),
        (["pool=max"], "pool='max' is unknown"),
        (["layers=[5]"], "block 5 does not exist"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, capsys, args, message):
    from apps.vit.linear_probing import LinearProbingConfig, main
    from vitef.config import cli_main

    run = _write_run(tmp_path)
    if "+no_best" in args:
        (run / "checkpoints" / "best" / "model.safetensors").unlink()
        args = [a for a in args if a != "+no_best"]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same entry point, without a fresh interpreter
        cli_main(LinearProbingConfig, main, argv=[*TINY_ARGV, *FAST, f"root={tmp_path}", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_help_lists_the_keys(run_inprocess):
    res = run_inprocess(APP, "--help")
    assert res.returncode == 0
    for key in ("run_dir", "pool", "points", "solver.C", "max_train_samples", "layers"):
        assert key in res.stdout
