"""The strict config loader: precedence, unknown keys, types, files, seed form, --help."""

from __future__ import annotations

import dataclasses

import pytest

from vitef.config import HelpRequested, build_config, load_config, option, save_config, split_argv
from vitef.errors import ConfigError


@dataclasses.dataclass
class Inner:
    lr: float = option(0.1, "learning rate")
    name: str = option("sgd", "optimizer")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")


@dataclasses.dataclass
class App:
    """A test app."""

    steps: int = option(10, "number of steps")
    dataset_name: str = option("cifar10", "dataset")
    tags: list[str] = option(["all"], "components")
    seed: int | None = option(None, "seed")
    optim: Inner = option(Inner(), "optimizer settings")
    extra: dict = option({}, "free-form mapping")

    ALIASES = {"lr": "optim.lr"}


def test_defaults_yaml_cli_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 20\noptim:\n  lr: 0.5\n  name: adamw\n")
    cfg = load_config(App, [f"config={cfg_file}", "optim.lr=0.01"])
    assert cfg.steps == 20  # YAML beats default
    assert cfg.optim.lr == 0.01  # CLI beats YAML
    assert cfg.optim.name == "adamw"  # YAML kept where the CLI is silent
    assert cfg.dataset_name == "cifar10"  # default kept
    assert isinstance(cfg, App) and isinstance(cfg.optim, Inner)


def test_defaults_are_not_shared():
    a, b = load_config(App, []), load_config(App, [])
    a.tags.append("x")
    a.optim.lr = 3.0
    assert b.tags == ["all"] and b.optim.lr == 0.1


def test_seed_form_and_dashes():
    cfg = load_config(App, ["run", "--dataset_name", "cifar100", "--steps=5", "--optim.lr", "0.2"])
    assert (cfg.dataset_name, cfg.steps, cfg.optim.lr) == ("cifar100", 5, 0.2)


def test_list_values_and_scalar_to_list():
    assert load_config(App, ["tags=[mha,fc1]"]).tags == ["mha", "fc1"]
    assert load_config(App, ["tags=mha"]).tags == ["mha"]


def test_string_field_keeps_numeric_looking_text():
    assert load_config(App, ["dataset_name=123"]).dataset_name == "123"


def test_optional_and_open_dict():
    cfg = load_config(App, ["seed=3", "extra.a.b=1"])
    assert cfg.seed == 3 and cfg.extra == {"a": {"b": 1}}
    assert load_config(App, ["seed=null"]).seed is None


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["stepz=3"], "unknown config key 'stepz'"),
        (["optim.lrr=3"], "Valid keys under 'optim': lr, name"),
        (["steps=abc"], "config key 'steps' (command line) expects int"),
        (["optim.lr=-1"], "optim.lr=-1.0 must be positive"),
        (["config=/nonexistent/x.yaml"], "config file not found: '/nonexistent/x.yaml'"),
        (["justaword"], "unexpected argument 'justaword'"),
        (["--steps"], "config key 'steps' (command line) expects int"),
        (["steps.x=1"], "'steps' is a int, not a group"),
    ],
)
def test_errors(argv, needle):
    with pytest.raises(ConfigError) as e:
        load_config(App, argv)
    assert needle in str(e.value)


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(App, ["dataset=cifar10"])
    msg = str(e.value)
    assert "Did you mean 'dataset_name'" in msg
    for key in ("steps", "dataset_name", "tags", "seed", "optim", "extra"):
        assert key in msg


def test_yaml_errors(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.momentum' \(in .*bad.yaml\)"):
        load_config(App, [f"config={bad_key}"])
    bad_type = tmp_path / "type.yaml"
    bad_type.write_text("steps: many\n")
    with pytest.raises(ConfigError, match="config key 'steps' .* expects int"):
        load_config(App, [f"config={bad_type}"])
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(App, [f"config={not_yaml}"])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(App, [f"config={scalar}"])


def test_help_lists_every_key_with_default_and_description():
    with pytest.raises(HelpRequested) as h:
        load_config(App, ["--help"], prog="apps.test")
    text = h.value.text
    assert "usage: python -m apps.test" in text
    assert "optim.lr: float = 0.1" in text and "learning rate" in text
    assert "dataset_name: str = 'cifar10'" in text


def test_split_argv_config_and_pairs():
    path, pairs, want_help = split_argv(["config=a.yaml", "x=1", "--y", "2"])
    assert path == "a.yaml" and pairs == [("x", "1"), ("y", "2")] and not want_help


def test_save_config_roundtrip(tmp_path):
    cfg = load_config(App, ["tags=[mha]", "optim.lr=0.3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(App, [f"config={tmp_path / 'config.yaml'}"])
    assert again == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_build_config_from_dicts():
    cfg = build_config(App, {"steps": 3}, ("sweep", {"optim": {"lr": 0.5}}))
    assert cfg.steps == 3 and cfg.optim.lr == 0.5
    with pytest.raises(ConfigError, match=r"unknown config key 'nope' \(sweep\)"):
        build_config(App, ("sweep", {"nope": 1}))


# ---- the same rules seen by a user of an app: message and non-zero exit -------------------------


def test_app_unknown_key_exits_2(run_app):
    r = run_app("apps.vit.components", "model.nme=vit_tiny_patch16_224")
    assert r.returncode == 2
    assert "error: unknown config key 'model.nme'" in r.stderr and "Valid keys under 'model'" in r.stderr
    assert "Traceback" not in r.stderr


def test_app_wrong_type_exits_2(run_app):
    r = run_app("apps.vit.components", "num_classes=ten")
    assert r.returncode == 2 and "config key 'num_classes' (command line) expects int" in r.stderr


def test_app_missing_yaml_exits_2(run_app, tmp_path):
    r = run_app("apps.vit.components", f"config={tmp_path / 'missing.yaml'}")
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_app_help_exits_0(run_app):
    r = run_app("apps.vit.components", "--help")
    assert r.returncode == 0 and "model.name" in r.stdout and "trainable" in r.stdout


def test_app_yaml_then_cli(run_app, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: vit_tiny_patch16_224\n  pretrained: false\ntrainable: [ln1]\n")
    r = run_app("apps.vit.components", f"config={cfg}", "trainable=[fc1]")
    assert r.returncode == 0, r.stderr
    assert "trainable=['fc1']" in r.stdout
    fc1 = next(line for line in r.stdout.splitlines() if line.startswith("fc1"))
    assert fc1.split()[1] == fc1.split()[2]  # all of FC1 trains


def test_aliases_on_cli_and_yaml(tmp_path):
    assert load_config(App, ["lr=0.02"]).optim.lr == 0.02
    assert load_config(App, ["--lr", "0.03"]).optim.lr == 0.03
    f = tmp_path / "a.yaml"
    f.write_text("lr: 0.5\noptim:\n  name: adamw\n")
    cfg = load_config(App, [f"config={f}"])
    assert (cfg.optim.lr, cfg.optim.name) == (0.5, "adamw")
    with pytest.raises(ConfigError, match=r"lr \(=optim.lr\)"):
        load_config(App, ["nope=1"])


@dataclasses.dataclass
class Verbs:
    command: str = option("table", "what to do")
    dry_run: bool = option(False, "only print")


def test_verb_and_bare_flags():
    cfg = load_config(Verbs, ["csv", "--dry-run"])
    assert cfg.command == "csv" and cfg.dry_run is True
    # A bare flag followed by key=value pairs stays a flag.
    cfg = load_config(Verbs, ["--dry-run", "command=stat"])
    assert cfg.command == "stat" and cfg.dry_run is True
    assert load_config(Verbs, ["--dry-run=false"]).dry_run is False
    # Without a `command` field only the seed's `run` verb is accepted.
    assert load_config(App, ["run"]).steps == 10
    with pytest.raises(ConfigError, match="unexpected argument 'csv'"):
        load_config(App, ["csv"])
