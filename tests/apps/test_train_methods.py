"""apps.vit.train with select.criterion (the trainable units picked at start), method= (full, bitfit, lora, dora, lp_ft)
and optim.layer_decay: what trains, what stays bit-identical, what the run directory records, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_train, untimed

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


def test_bitfit_trains_the_biases_and_the_head_only(tmp_path):
    cfg = cfg_of(tmp_path, method="bitfit", trainable=["mha", "fc1"], log_dir="")
    assert cfg.run_name == "digits_subset-56789_vit_tiny_patch16_224_bitfit_mha-fc1_lr0.1_seed0"
    train_app.main(cfg)
    run = RunDir(tmp_path / "out" / "runs" / cfg.run_name)
    before, after = initial_state(cfg), load_file(run.step_dir(4) / "model.safetensors")
    expected = 0
    for name, value in before.items():
        trains = unit_of(name) == "head" or (name.endswith(".bias") and unit_of(name).split(".")[0] in ("mha", "fc1"))
        expected += value.numel() * trains
        assert torch.equal(value, after[name]) != trains, name
    result = json.loads(run.eval_path.read_text())
    assert result["method"] == "bitfit" and result["trainable_params"] == expected


def test_layer_decay_run_logs_the_heads_lr(tmp_path):
    cfg = cfg_of(tmp_path, optim={**TINY["optim"], "scheduler": "constant", "layer_decay": 0.5}, log_dir="")
    assert cfg.run_name == "digits_subset-56789_vit_tiny_patch16_224_ld0.5_all_lr0.1_seed0"
    train_app.main(cfg)
    rows = RunDir(tmp_path / "out" / "runs" / cfg.run_name).read_metrics()
    assert [r["lr"] for r in rows if "lr" in r] == [0.1] * 4


@pytest.mark.parametrize(
    "over, match",
    [
        ({"method": "prompt"}, "method='prompt' is unknown: choose one of full, bitfit, lora"),
        ({"method": "lora", "lora": {"rank": 0}}, "lora.rank=0"),
        ({"method": "lora", "lora": {"modules": ["q"]}}, r"lora.modules=\['q'\]: choose among qkv, proj, fc1, fc2"),
        ({"method": "lora", "select": SELECT}, "method=lora with select.criterion"),
        ({"method": "dora", "select": SELECT}, "method=dora with select.criterion"),
        ({"method": "dora", "lora": {"rank": 0}}, "lora.rank=0"),
    ],
)
def test_bad_methods_name_the_key_and_the_choices(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of(tmp_path, **over)
    assert not (tmp_path / "out").exists()


def wrapped_initial(cfg: train_app.TrainConfig):
    """The LoRA (or DoRA) model as the app builds it at start (same seed, same draws)."""
    from vitef.adapters import add_lora
    from vitef.models import set_trainable

    set_seed(cfg.seed)
    model = build_model_from_config(cfg.model, num_classes=5)
    set_trainable(model, cfg.trainable)
    add_lora(model, cfg.lora, cfg.trainable, dora=cfg.method == "dora")
    return model


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_best_checkpoint_is_a_plain_timm_model_with_the_adapted_logits_and_resumes_exactly(tmp_path, method):
    """method=lora, and method=dora (the same adapters plus a magnitude per output row of each adapted module)."""
    from tiny import tiny_vit

    from vitef.adapters import adapter_state, base_fingerprint, load_adapter_state, load_merged
    from vitef.monitor import load_state

    over = {"method": method, "lora": {"rank": 4, "alpha": 8}, "trainable": ["mha", "fc1.1"]}
    named = cfg_of(tmp_path, **over, log_dir="").run_name
    assert named == f"digits_subset-56789_vit_tiny_patch16_224_{method}-r4_mha-fc1.1_lr0.1_seed0"
    cfg = cfg_of(tmp_path, **over, eval_period=2, checkpoint_period=2, keep_last=2)
    train_app.main(cfg)
    run = RunDir(tmp_path / "out" / "runs" / "run")
    result = json.loads(run.eval_path.read_text())
    best_step = result["best_step"]
    # The adapted model at the best step: the start's base + the saved adapters (+ head from the merged file).
    adapted = wrapped_initial(cfg)
    start, initial_adapters = base_fingerprint(adapted), adapter_state(adapted)
    state = load_state(run.step_dir(best_step))
    assert state["lora"]["base_sha256"] == start  # the frozen base under the adapters is bit-identical after training
    load_merged(adapted, run.step_dir(best_step) / "model.safetensors")
    load_adapter_state(adapted, state["lora"]["adapters"])
    # The best checkpoint is a timm-layout file: build_model loads it as a plain ViT with the adapted logits.
    plain = tiny_vit(pretrained=run.best_model_path)  # head from the file (num_classes= would draw a new one)
    assert not any("lora" in n or "base_layer" in n for n in load_file(run.best_model_path))
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), adapted.eval()(images), atol=1e-5, rtol=0)
    # Frozen components are bit-identical; trainable parameters: adapters + head, in eval.json and params.json.
    before, after = initial_state(cfg), load_file(run.best_model_path)
    for name in before:
        if unit_of(name).split(".")[0] in ("ln1", "ln2", "emb", "fc2") or name == "blocks.0.mlp.fc1.weight":
            assert torch.equal(before[name], after[name]), name
    adapters = sum(t.numel() for t in state["lora"]["adapters"].values())
    head = sum(v.numel() for n, v in before.items() if unit_of(n) == "head")
    magnitudes = 2 * (96 + 32) + 128 if method == "dora" else 0  # one per output row of each adapted module
    assert adapters == 2 * 4 * ((32 + 96) + (32 + 32)) + 4 * (32 + 128) + magnitudes  # rank 4: qkv, proj; fc1.1
    assert sum(".lora_magnitude_vector." in n for n in state["lora"]["adapters"]) == (5 if method == "dora" else 0)
    for name, tensor in state["lora"]["adapters"].items():  # A, B (and DoRA's m) trained away from the start
        assert not torch.equal(tensor, initial_adapters[name]), name
    assert result["trainable_params"] == adapters + head and result["method"] == method
    assert sum(json.loads(run.params_path.read_text())["trainable"].values()) == adapters + head
    # Resume equals uninterrupted: same merged weights and adapters at the end.
    reference = load_file(run.step_dir(4) / "model.safetensors")
    reference_adapters = load_state(run.step_dir(4))["lora"]["adapters"]
    interrupt_and_resume(cfg, run)
    resumed = load_file(run.step_dir(4) / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    got = load_state(run.step_dir(4))["lora"]["adapters"]
    assert all(torch.equal(reference_adapters[k], got[k]) for k in reference_adapters)
    assert untimed(json.loads(run.eval_path.read_text())) == untimed(result)
