"""Bad model overrides, bad config files: one clear error, never a traceback (issue 10, item 6)."""

from __future__ import annotations

import json

import pytest
import torch

from vitef.config import build_config, read_yaml_file
from vitef.errors import ConfigError, ModelError
from vitef.models import ModelConfig, build_model, save_timm_safetensors

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"patch_sise": 8},
            "unknown key 'patch_sise' (not an argument of timm's VisionTransformer). Did you mean 'patch_size'?",
        ),  # fmt: skip
        ({"patch_size": 0}, "model.overrides.patch_size=0 must be a positive integer"),
        ({"depth": -1}, "model.overrides.depth=-1 must be a positive integer"),
        ({"embed_dim": 32.5}, "model.overrides.embed_dim=32.5 must be a positive integer"),
        ({"mlp_ratio": "x"}, "model.overrides.mlp_ratio='x' must be a positive number"),
        ({"num_classes": 3}, "model.overrides has 'num_classes': the head is sized by the dataset or the weights"),
    ],
)
def test_bad_override_keys_and_values(overrides, message):
    if "num_classes" not in overrides:  # build_model's own num_classes argument takes that one
        with pytest.raises(ModelError) as e:
            build_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **overrides})
        assert message in str(e.value)
    # The same check runs when the config is loaded, before any app does work.
    with pytest.raises(ConfigError) as e:
        build_config(ModelConfig, {"name": "vit_tiny_patch16_224", "overrides": overrides})
    assert message in str(e.value)


def test_img_size_belongs_to_model_img_size():
    with pytest.raises(ConfigError, match="model.overrides has 'img_size': use model.img_size"):
        build_config(ModelConfig, {"name": "vit_tiny_patch16_224", "overrides": {"img_size": 32}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 5}, "cannot build 'vit_tiny_patch16_224' with .*num_heads=5.*AssertionError"),
        ({"patch_size": 64}, "has a 64-pixel patch, larger than its 32-pixel input"),
    ],
)
def test_impossible_architectures(overrides, message):
    with pytest.raises(ModelError, match=message):
        build_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **overrides})


def test_build_error_with_pretrained_weights_is_not_reported_as_a_download_failure():
    # timm builds before it downloads: the architecture's error is the one to report, even offline.
    with pytest.raises(ModelError, match="cannot build 'vit_tiny_patch16_224.augreg_in21k'.*num_heads=5") as e:
        build_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True, num_heads=5)
    assert "could not load pretrained weights" not in str(e.value)


def test_overrides_on_a_card_and_a_transformers_dir(tmp_path):
    model = build_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY)
    path = tmp_path / "m.safetensors"
    save_timm_safetensors(model, path)
    arch = {k: v for k, v in TINY.items() if k != "img_size"}
    path.with_suffix(".json").write_text(json.dumps({"model": {"name": "vit_tiny_patch16_224", "img_size": 32,
                                                               "overrides": arch}}))  # fmt: skip
    with pytest.raises(ModelError, match="cannot build .*num_heads=5"):
        build_model(str(path), num_heads=5)
    path.with_suffix(".json").write_text(json.dumps({"model": {"name": "vit_tiny_patch16_224",
                                                               "overrides": {"patch_sise": 8}}}))  # fmt: skip
    with pytest.raises(ModelError, match=r"card '.*m.json': model.overrides has an unknown key 'patch_sise'"):
        build_model(str(path))
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 128, "image_size": 16, "patch_size": 8}  # fmt: skip
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"cannot build '{hf}' with .*num_heads=3"):
        build_model(str(hf), pretrained=False, num_heads=3)
    (hf / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    with pytest.raises(ModelError, match="config.json has a value of the wrong type"):
        build_model(str(hf), pretrained=False)
    (hf / "config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ModelError, match="is not valid JSON"):
        build_model(str(hf), pretrained=False)


def test_weights_file_named_with_pretrained_false_is_refused(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config(ModelConfig, {"name": str(tmp_path / "w.safetensors"), "pretrained": False})
    msg = str(e.value)
    assert "model.pretrained=false would not read it" in msg and "set model.pretrained=true" in msg
    assert "'model' entry of its card 'w.json'" in msg
    # A separate checkpoint file is loaded whatever pretrained says.
    model = build_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **TINY)
    save_timm_safetensors(model, tmp_path / "w.safetensors")
    weights = str(tmp_path / "w.safetensors")
    cfg = build_config(ModelConfig, {"name": weights, "checkpoint": weights, "pretrained": False})
    assert cfg.checkpoint


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not a text file (not UTF-8): give a YAML file"),
        (b"steps: [1, 2\nlr: 3\n", "is not valid YAML: while parsing a flow sequence"),
        (b"- a\n- b\n", "must hold a mapping of keys, got list"),
    ],
    ids=["binary", "syntax", "list"],
)
def test_read_yaml_file_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        read_yaml_file(path)
    assert f"config file '{path}' {message}" in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_read_yaml_file_missing_directory_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: '.*nope.yaml'"):
        read_yaml_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        read_yaml_file(tmp_path)
    assert read_yaml_file(_write(tmp_path / "empty.yaml", b"")) == {}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_torch_is_untouched_by_failed_builds():
    # A failed meta-device build must not leave the default device changed.
    with pytest.raises(ModelError):
        build_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True, num_heads=5)
    assert torch.empty(1).device.type == "cpu"
