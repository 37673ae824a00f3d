"""Bad model overrides and config files through the apps' entry points: one `error:` line, exit 2, nothing
written (issue 10, item 6). In-process through ``cli_main``, the function ``python -m`` runs."""

from __future__ import annotations

import importlib

import pytest
import yaml

from vitef.config import cli_main

TINY_MODEL = ["model.name=vit_tiny_patch16_224", "model.pretrained=false", "model.img_size=16"]
SHORT = ["steps=2", "eval_period=1", "optim.warmup_steps=0"]
APPS = {
    "apps.vit.train": [*TINY_MODEL, "dataset_name=digits_subset-56789", *SHORT],
    "apps.vit.analysis": [*TINY_MODEL, "source=digits_subset-01234", "dataset_name=digits_subset-56789"],
    "apps.vit.loss_landscape": [*TINY_MODEL, "steps=2"],
}
OVERRIDES = {
    "{patch_sise: 8}": "model.overrides has an unknown key 'patch_sise' (not an argument of timm's "
    "VisionTransformer). Did you mean 'patch_size'?",
    "{patch_size: 0}": "model.overrides.patch_size=0 must be a positive integer",
    "{num_heads: 5}": "cannot build 'vit_tiny_patch16_224' with",
}


def _run(module: str, argv: list[str], capsys) -> str:
    app = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(app.CONFIG, app.main, argv=argv, prog=module)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("overrides", list(OVERRIDES))
@pytest.mark.parametrize("module", list(APPS))
def test_bad_overrides(tmp_path, capsys, module, overrides):
    root = tmp_path / "out"
    err = _run(module, [*APPS[module], f"model.overrides={overrides}", f"root={root}"], capsys)
    assert OVERRIDES[overrides] in err
    assert not root.exists()


@pytest.mark.parametrize("module", list(APPS))
def test_config_file_that_is_binary(tmp_path, capsys, module):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)))
    err = _run(module, [f"config={path}"], capsys)
    assert f"config file '{path}' is not a text file (not UTF-8): give a YAML file" in err


@pytest.mark.parametrize("content", [b"steps: [1, 2\n", bytes(range(256))], ids=["yaml-syntax", "binary"])
def test_sweep_base_file_that_is_not_yaml(tmp_path, capsys, content):
    base = tmp_path / "base.yaml"
    base.write_bytes(content)
    sweep = tmp_path / "sweep.yaml"
    root = tmp_path / "out"
    sweep.write_text(yaml.safe_dump({"name": "s", "app": "apps.vit.train", "root": str(root), "base": [str(base)],
                                     "grid": {"seed": [0, 1]}}))  # fmt: skip
    err = _run("apps.vit.sweep", [f"config={sweep}"], capsys)
    assert f"config file named by sweep 's' '{base}' is not" in err
    assert not root.exists()
