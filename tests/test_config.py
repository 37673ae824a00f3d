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
# In-process through cli_main, as `python -m` runs it; --help runs as a real `python -m` (exit 0, keys on stdout).


def test_app_unknown_key_exits_2(run_inprocess):
    r = run_inprocess("apps.vit.components", "model.nme=vit_tiny_patch16_224")
    assert r.returncode == 2
    assert "error: unknown config key 'model.nme'" in r.stderr and "Valid keys under 'model'" in r.stderr
    assert "Traceback" not in r.stderr


def test_app_wrong_type_exits_2(run_inprocess):
    r = run_inprocess("apps.vit.components", "num_classes=ten")
    assert r.returncode == 2 and "config key 'num_classes' (command line) expects int" in r.stderr


def test_app_missing_yaml_exits_2(run_inprocess, tmp_path):
    r = run_inprocess("apps.vit.components", f"config={tmp_path / 'missing.yaml'}")
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_app_help_exits_0(run_app):
    r = run_app("apps.vit.components", "--help")
    assert r.returncode == 0 and "model.name" in r.stdout and "trainable" in r.stdout


def test_app_yaml_then_cli(run_inprocess, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: vit_tiny_patch16_224\n  pretrained: false\ntrainable: [ln1]\n")
    r = run_inprocess("apps.vit.components", f"config={cfg}", "trainable=[fc1]")
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


# ---- layered config files: config=[a,b] and base: ---------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_list_layers_in_order_and_cli_wins(tmp_path):
    a = _write(tmp_path / "a.yaml", "steps: 20\ntags: [mha, fc1]\noptim:\n  lr: 0.5\n  name: adamw\nextra: {x: 1}\n")
    b = _write(tmp_path / "b.yaml", "steps: 30\ntags: [ln1]\noptim:\n  lr: 0.25\nextra: {y: 2}\n")
    cfg = load_config(App, [f"config=[{a},{b}]"])
    assert cfg.steps == 30 and cfg.optim.lr == 0.25  # the later file wins
    assert cfg.optim.name == "adamw"  # merged key by key: what b does not say stays a's
    assert cfg.tags == ["ln1"]  # a list is replaced whole
    assert cfg.extra == {"x": 1, "y": 2}
    assert load_config(App, [f"config=[{b},{a}]"]).steps == 20
    cli = load_config(App, [f"config=[{a}, {b}]", "steps=7", "lr=0.125"])  # spaces in the list are fine
    assert (cli.steps, cli.optim.lr, cli.optim.name) == (7, 0.125, "adamw")
    assert load_config(App, [f"config=[{a}]"]) == load_config(App, [f"config={a}"])


def test_base_chain_is_relative_to_each_file(tmp_path, monkeypatch):
    _write(tmp_path / "shared/root.yaml", "steps: 1\ndataset_name: pet\noptim:\n  name: adamw\n  lr: 0.5\n")
    _write(tmp_path / "shared/mid.yaml", "base: root.yaml\nsteps: 2\noptim:\n  lr: 0.25\n")
    _write(tmp_path / "other/extra.yaml", "seed: 9\n")
    top = _write(tmp_path / "runs/top.yaml", "base: [../shared/mid.yaml, ../other/extra.yaml]\nsteps: 3\n")
    monkeypatch.chdir(tmp_path / "other")  # paths in base: do not depend on the current directory
    cfg = load_config(App, [f"config={top}"])
    assert (cfg.steps, cfg.optim.lr, cfg.optim.name, cfg.dataset_name, cfg.seed) == (3, 0.25, "adamw", "pet", 9)
    # A file given on the command line after one with bases still wins over all of them.
    over = _write(tmp_path / "over.yaml", "dataset_name: flowers102\n")
    assert load_config(App, [f"config=[{top},{over}]", "seed=1"]).dataset_name == "flowers102"


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("optim:\n  momentum: 0.9\n", r"key 'optim.momentum' \(in .*base.yaml, base of .*top.yaml\)"),
        ("steps: many\n", r"config key 'steps' \(in .*base.yaml, base of .*top.yaml\) expects int"),
        ("- 1\n", r"base file of .*top.yaml '.*base.yaml' must hold a mapping"),
    ],
    ids=["unknown-key", "wrong-type", "not-a-mapping"],
)
def test_bad_base_file_error_names_it_and_the_file_that_named_it(tmp_path, base, message):
    _write(tmp_path / "base.yaml", base)
    top = _write(tmp_path / "top.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=message):
        load_config(App, [f"config={top}"])


def test_base_missing_file_names_the_file_that_named_it(tmp_path):
    top = _write(tmp_path / "top.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(App, [f"config={top}"])
    msg = str(e.value)
    assert "base file of" in msg and "top.yaml" in msg and "not found" in msg and "nope.yaml" in msg
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(App, [f"config=[{top.with_name('absent.yaml')},{top}]"])


def test_base_cycle_is_an_error(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: sub/../a.yaml\n")  # the same file under another spelling
    with pytest.raises(ConfigError, match=r"cycle through 'base': .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(App, [f"config={tmp_path / 'a.yaml'}"])
    _write(tmp_path / "self.yaml", "base: self.yaml\nsteps: 1\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(App, [f"config={tmp_path / 'self.yaml'}"])
    # The same file twice is no cycle: a diamond, or one file listed twice.
    _write(tmp_path / "d.yaml", "steps: 5\n")
    _write(tmp_path / "l.yaml", "base: d.yaml\n")
    _write(tmp_path / "r.yaml", "base: d.yaml\n")
    top = _write(tmp_path / "top.yaml", "base: [l.yaml, r.yaml]\n")
    assert load_config(App, [f"config=[{top},{top}]"]).steps == 5


@pytest.mark.parametrize(
    "value, needle",
    [
        ("base: 3\n", "'base: 3' in"),
        ("base: [a.yaml, {x: 1}]\n", "must name a YAML file or a list of them"),
        ("base: ''\n", "must name a YAML file"),
    ],
)
def test_bad_base_values(tmp_path, value, needle):
    top = _write(tmp_path / "top.yaml", value)
    with pytest.raises(ConfigError) as e:
        load_config(App, [f"config={top}"])
    assert needle in str(e.value) and "top.yaml" in str(e.value)


def test_empty_base_and_bad_config_lists(tmp_path):
    top = _write(tmp_path / "top.yaml", "base: []\nsteps: 4\n")
    assert load_config(App, [f"config={top}"]).steps == 4
    null = _write(tmp_path / "n.yaml", "base: null\n")
    assert load_config(App, [f"config={null}"]).steps == 10
    for value in ("[]", "[a.yaml, [b.yaml]]", "[a.yaml", ""):
        with pytest.raises(ConfigError, match="config="):
            load_config(App, [f"config={value}"])


@dataclasses.dataclass
class WithBase:
    base: list[str] = option([], "the app's own 'base' field (as a sweep has)")
    steps: int = option(1, "steps")


def test_an_app_with_a_base_field_keeps_it(tmp_path):
    top = _write(tmp_path / "top.yaml", "base: [not/a/file.yaml]\nsteps: 2\n")
    cfg = load_config(WithBase, [f"config={top}"])
    assert cfg.base == ["not/a/file.yaml"] and cfg.steps == 2
