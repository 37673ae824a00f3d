"""apps.vit.pretrain refuses what it would not honour: the finetuning keys it inherits from the training app
(method, lora.*, select.*) at any value but their defaults, and a finished run trained with another config (the
card would describe the config, not the weights). --help marks the inherited keys it does not use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from tiny import tiny_train

from apps.vit import pretrain
from apps.vit.train import TrainConfig
from vitef.config import flatten, load_config, to_dict, to_yaml
from vitef.errors import ConfigError

APP = "apps.vit.pretrain"
RECIPE = "apps/vit/configs/pretrain_digits.yaml"
REASON = {
    "method": "it trains every parameter from scratch",
    "lora": "LoRA adapters belong to method=lora, and pretraining trains every parameter from scratch",
    "select": "a selection criterion picks units of a pretrained model to finetune, and pretraining trains every unit",
}


def refusal(key: str, value: str, default: str, also: str = "") -> str:
    """The whole message of a refused key (stderr of the command is ``error: <it>``)."""
    why = REASON[key.split(".")[0]]
    return (
        f"{key}={value} is not supported by apps.vit.pretrain ({why}): remove {key}=... (its default is {default})"
        f"{also}, or finetune with apps.vit.train"
    )


def tiny_yaml(tmp_path: Path, **over) -> Path:
    """The tests' tiny model (4 steps, validated at 2 and 4) as a pretraining config file, every component trained."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_train(trainable=["all"], log_dir="pre", **over)))
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=lora"], refusal("method", "lora", "full")),
        (["method=bitfit"], refusal("method", "bitfit", "full")),
        (["method=lp_ft"], refusal("method", "lp_ft", "full")),
        (["lora.rank=4"], refusal("lora.rank", "4", "8")),
        # Out of range for LoRA too: the refusal says what to do, not how to make an unused value valid.
        (["lora.rank=0"], refusal("lora.rank", "0", "8")),
        (["lora.modules=[qkv]"], refusal("lora.modules", "['qkv']", "['qkv', 'proj', 'fc1', 'fc2']")),
        (["select.criterion=plasticity"], refusal("select.criterion", "plasticity", "''")),
        (["select.criterion=nonsense"], refusal("select.criterion", "nonsense", "''")),
        (["select.budget=0.5", "select.seed=3"], refusal("select.budget", "0.5", "0.1", "; also remove select.seed")),
        # Each key is named even where the training app has a message of its own for the combination.
        (["method=lora", "lora.rank=4"], refusal("lora.rank", "4", "8")),
        (["method=lora", "select.criterion=rgn"], refusal("select.criterion", "rgn", "''")),
    ],
)
def test_unsupported_keys_exit_2_naming_the_key_and_the_fix(tmp_path, run_inprocess, args, message):
    out = tmp_path / "out"
    r = run_inprocess(APP, f"config={tiny_yaml(tmp_path)}", f"root={out}", f"export={out}/m.safetensors", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not out.exists()  # refused up front: no run directory, no export folder


def test_unsupported_keys_are_refused_from_a_config_file_too(tmp_path):
    path = tiny_yaml(tmp_path, method="lora", lora={"rank": 4})
    with pytest.raises(ConfigError) as e:
        load_config(pretrain.PretrainConfig, [f"config={path}", f"export={tmp_path}/m.safetensors"])
    assert str(e.value) == refusal("lora.rank", "4", "8")
    with pytest.raises(ConfigError) as e:
        load_config(pretrain.PretrainConfig, [f"config={path}", f"export={tmp_path}/m.safetensors", "lora.rank=8"])
    assert str(e.value) == refusal("method", "lora", "full")


def test_default_and_recipe_configs_validate_and_a_saved_config_reads_back(tmp_path):
    # The defaults: only the export is required (random weights by default: pretrained=true is refused).
    cfg = load_config(pretrain.PretrainConfig, [f"export={tmp_path}/m.safetensors"])
    assert (cfg.method, cfg.model.pretrained, cfg.model.checkpoint, cfg.select.enabled) == ("full", False, None, False)
    recipe = load_config(pretrain.PretrainConfig, [f"config={RECIPE}", f"root={tmp_path}"])
    assert recipe.export == "apps/vit/pretrained/vit_digits.safetensors" and recipe.method == "full"
    # The defaults spelled out are accepted, so a run's saved config.yaml (every key written) loads again...
    explicit = ["method=full", "lora.rank=8", "lora.modules=[qkv,proj,fc1,fc2]", "select.criterion=", "select.seed=-1"]
    assert load_config(pretrain.PretrainConfig, [f"config={RECIPE}", f"root={tmp_path}", *explicit]) == recipe
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(recipe))
    assert load_config(pretrain.PretrainConfig, [f"config={saved}"]) == recipe
    # ... and it is still a training config with the same keys (sweeps cost it and compare it as one).
    assert isinstance(recipe, TrainConfig)
    train_keys = set(flatten(to_dict(TrainConfig())))
    assert set(flatten(to_dict(pretrain.PretrainConfig()))) == train_keys | {"export", "card_analysis", "card_targets"}
    for group in ("lora", "select"):
        assert to_dict(getattr(pretrain.PretrainConfig(), group)) == to_dict(getattr(TrainConfig(), group))


def test_help_marks_the_keys_pretraining_does_not_use(run_inprocess):
    r = run_inprocess(APP, "--help")
    assert r.returncode == 0
    rows = {line.split(":")[0].strip(): line for line in r.stdout.splitlines() if line.startswith("  ")}
    marked = {key for key, line in rows.items() if "unused by apps.vit.pretrain (keep the default): " in line}
    unused = {k for k in flatten(to_dict(TrainConfig())) if k == "method" or k.split(".")[0] in ("lora", "select")}
    assert marked == unused and len(unused) > 10
    assert "rank r of the adapters" in rows["lora.rank"]  # what the key is stays said
    assert rows["model.pretrained"].split("=")[1].split()[0] == "False"
    assert "export" in rows and "unused" not in rows["export"]


def _card(export: Path) -> dict:
    return json.loads(export.with_suffix(".json").read_text())


def test_a_finished_run_trained_with_another_config_is_not_exported_as_this_one(tmp_path, run_inprocess):
    """A finished run is not trained again: without the training app's config check the export would be its 4-step
    weights under a card saying steps=2."""
    export = tmp_path / "m.safetensors"
    base = [f"config={tiny_yaml(tmp_path)}", f"root={tmp_path / 'out'}", f"export={export}"]
    assert run_inprocess(APP, *base).returncode == 0
    card, digest = _card(export), hashlib.sha256(export.read_bytes()).hexdigest()
    assert card["steps"] == 4 and card["sha256"] == digest
    r = run_inprocess(APP, *base, "steps=2")
    assert r.returncode == 2
    run = tmp_path / "out" / "runs" / "pre"
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: run directory {run} exists with a different config (steps: 4 -> 2). Use overwrite=true to replace "
        "it, or another log_dir"
    )
    assert _card(export) == card  # untouched
    # Export keys and the keys a resumed run may change do not make another run: exported again, same weights.
    again = tmp_path / "elsewhere" / "again.safetensors"
    r = run_inprocess(APP, *base[:2], f"export={again}", "data.num_workers=0", "log_every=1")
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(again.read_bytes()).hexdigest() == digest and _card(again)["steps"] == 4
    # overwrite=true trains the new config.
    assert run_inprocess(APP, *base, "steps=2", "overwrite=true").returncode == 0
    assert _card(export)["steps"] == 2 and json.loads((run / "status.json").read_text())["step"] == 2
