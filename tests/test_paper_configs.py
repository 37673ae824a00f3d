"""The paper's per-dataset training configs (paper.yaml + a delta each) resolve as the full files did.

``paper_configs_before.json`` holds the 11 files as they were before they were layered on
``apps/vit/configs/paper.yaml``. The expected config is built from those mappings, so a later change of a
dataclass default moves both sides alike, and only a change of what the files say fails here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vitef.config import build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "apps/vit/configs"
BEFORE = json.loads((Path(__file__).with_name("paper_configs_before.json")).read_text())["files"]


@pytest.fixture(scope="module")
def train_config():
    from apps.vit.train import TrainConfig

    return TrainConfig


@pytest.mark.parametrize("stem", sorted(BEFORE))
def test_dataset_file_resolves_as_before(stem, train_config):
    path = CONFIGS / f"{stem}.yaml"
    assert "base: paper.yaml" in path.read_text()  # the file is a delta, not a copy of the shared block
    now = load_config(train_config, [f"config={path}"])
    assert now == build_config(train_config, (f"{stem}.yaml before", BEFORE[stem]))


def test_paper_yaml_alone_and_as_first_layer(train_config, tmp_path):
    paper = load_config(train_config, [f"config={CONFIGS / 'paper.yaml'}", "dataset_name=pet"])
    assert (paper.optim.name, paper.optim.warmup_steps, paper.batch_size) == ("sgd", 2000, 512)
    mine = tmp_path / "mine.yaml"
    mine.write_text("optim:\n  momentum: 0.5\nsteps: 3000\neval_period: 100\n")
    cfg = load_config(train_config, [f"config=[{CONFIGS / 'pet.yaml'},{mine}]", "seed=42"])
    expected = build_config(train_config, BEFORE["pet"], {"optim": {"momentum": 0.5}, "steps": 3000},
                            {"eval_period": 100, "seed": 42})  # fmt: skip
    assert cfg == expected


def test_main_sweep_runs_carry_the_files_values(monkeypatch, train_config):
    # The sweep reads the per-dataset files itself (vitef.sweep.expand), base: included: every run is its
    # dataset's old config with the grid's trainable, lr and seed.
    monkeypatch.chdir(ROOT)
    import apps.vit.sweep as app
    from vitef.sweep import expand

    sweep = load_config(app.SweepConfig, ["config=apps/vit/sweeps/main.yaml"])
    runs = expand(sweep, app.app_module(sweep.app))
    assert len(runs) == 924
    before = {cfg["dataset_name"]: build_config(train_config, cfg) for cfg in BEFORE.values()}

    def comparable(cfg):
        d = dataclasses.asdict(cfg)
        for key in ("trainable", "seed", "log_dir", "root"):
            d.pop(key)
        d["optim"].pop("lr")
        return d

    expected = {name: comparable(cfg) for name, cfg in before.items()}
    assert {r.cfg.dataset_name for r in runs} == set(expected)
    for r in runs:
        assert comparable(r.cfg) == expected[r.cfg.dataset_name], r.log_dir
