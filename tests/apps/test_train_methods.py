"""apps.vit.train with select.criterion (the trainable units picked at start), method= (full, bitfit, lora, lp_ft)
and optim.layer_decay: what trains, what stays bit-identical, what the run directory records, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_train

from apps.vit import train as train_app
from vitef.config import build_config
from vitef.errors import ConfigError
from vitef.models import build_model_from_config
from vitef.models.components import unit_of
from vitef.monitor import RunDir
from vitef.selection import read_selection
from vitef.utils import set_seed

SELECT = {"criterion": "plasticity", "budget": 0.1, "source": "digits_subset-01234", "source_split": "train",
          "batches": 2, "batch_size": 8}  # fmt: skip
TINY = tiny_train(optim={"lr": 0.1, "warmup_steps": 0, "scheduler": "cosine"}, trainable=["all"], steps=4)


def cfg_of(tmp_path: Path, **over) -> train_app.TrainConfig:
    return build_config(train_app.TrainConfig, TINY, {"root": str(tmp_path / "out"), "log_dir": "run", **over})


def initial_state(cfg: train_app.TrainConfig) -> dict[str, torch.Tensor]:
    set_seed(cfg.seed)  # the app seeds, then builds: the same pretrained backbone and head
    return build_model_from_config(cfg.model, num_classes=5).state_dict()


def interrupt_and_resume(cfg: train_app.TrainConfig, run: RunDir) -> None:
    """Forget the end of a finished run (its last checkpoint, eval.json) and launch it again: it resumes."""
    last = run.checkpoint_steps()[-1]
    shutil.rmtree(run.step_dir(last))
    run.eval_path.unlink()
    run.write_status("running", last, "pretend it was killed")
    train_app.main(cfg)


def test_select_trains_exactly_the_picked_units_and_resumes_with_the_saved_pick(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path, select=SELECT, checkpoint_period=2, keep_last=2)
    assert cfg.run_name == "run" and cfg.select.seed == -1
    train_app.main(cfg)
    run = RunDir(tmp_path / "out" / "runs" / "run")
    sel = read_selection(run.path)
    assert sel.criterion == "plasticity" and sel.seed == cfg.seed and sel.picked
    assert sel.picked_params <= 0.1 * sel.backbone_params and len(sel.scores) == 10
    assert "selection.json" in {p.name for p in run.path.iterdir()} and run.looks_like_run()
    # Exactly the picked units and the head changed; every other parameter is bit-identical to the start.
    before, after = initial_state(cfg), load_file(run.step_dir(4) / "model.safetensors")
    trained = set(sel.picked) | {"head"}
    for name, value in before.items():
        unit = unit_of(name)
        if unit in trained and name.endswith("weight") and unit != "head":
            assert not torch.equal(value, after[name]), name
        elif unit not in trained:
            assert torch.equal(value, after[name]), name
    result = json.loads(run.eval_path.read_text())
    assert result["trainable"] == sel.trainable and result["select"]["criterion"] == "plasticity"
    head = sum(v.numel() for n, v in before.items() if unit_of(n) == "head")
    assert result["trainable_params"] == sel.picked_params + head
    assert sum(json.loads(run.params_path.read_text())["trainable"].values()) == result["trainable_params"]

    # Resume: the saved selection is read back, never scored again, and the run ends as an uninterrupted one.
    reference = {k: v.clone() for k, v in after.items()}
    saved = run.path.joinpath("selection.json").read_text()

    def no_scoring(*args, **kwargs):
        raise AssertionError("a resumed run must reuse its selection.json")

    monkeypatch.setattr(train_app, "select_units", no_scoring)
    interrupt_and_resume(cfg, run)
    resumed = load_file(run.step_dir(4) / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert run.path.joinpath("selection.json").read_text() == saved


def test_select_seed_follows_the_run_and_trainable_conflicts(tmp_path):
    cfg = cfg_of(tmp_path, select={**SELECT, "criterion": "random", "budget": 2}, seed=3, log_dir="")
    assert cfg.run_name == "digits_subset-56789_vit_tiny_patch16_224_select-random-2units_lr0.1_seed3"
    train_app.main(cfg)
    sel = read_selection(RunDir(tmp_path / "out" / "runs" / cfg.run_name).path)
    assert sel.seed == 3 and len(sel.picked) == 2
    with pytest.raises(ConfigError, match=r"trainable=\['mha'\] and select.criterion=plasticity"):
        cfg_of(tmp_path, select=SELECT, trainable=["mha"])
