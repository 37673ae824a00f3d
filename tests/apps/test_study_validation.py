"""apps.study validates the whole study before it runs or writes anything (sweep files, their run
configs, landscape components): a mistake anywhere is one error at once, not after every sweep ran."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apps import study
from vitef.config import build_config
from vitef.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _good_sweep(tmp_path: Path) -> str:
    return _write(
        tmp_path / "good.yaml",
        {
            "name": "ft",
            "app": "train",
            "base": [str(ROOT / "apps/vit/configs/digits.yaml")],
            "overrides": {"steps": 2, "eval_period": 2, "optim.warmup_steps": 1},
            "grid": {"trainable": [["mha"]]},
        },
    )


@pytest.mark.parametrize(
    "second, landscapes, message",
    [
        (None, ["mhaa"], r"landscapes: .*'mhaa'"),
        ({"name": "bad", "app": "train", "grid": {"optim.lrr": [1.0]}}, [], r"sweeps: '.*second.yaml': .*'optim.lrr'"),
        ({"name": "bad", "app": "train", "grid": {"steps": [0]}}, [], r"sweeps: '.*second.yaml': .*steps=0"),
        ({"name": "bad", "app": "nope"}, [], r"sweeps: '.*second.yaml': app='nope' is unknown: choose one of train"),
        ("name: [unclosed\n", [], r"sweeps: '.*second.yaml': .*not valid YAML"),
    ],
)
def test_study_is_validated_before_anything_runs(tmp_path, second, landscapes, message):
    sweeps = [_good_sweep(tmp_path)]
    if second is not None:
        sweeps.append(_write(tmp_path / "second.yaml", second))
    out = tmp_path / "out"
    cfg = build_config(study.StudyConfig, {"root": str(out), "sweeps": sweeps, "landscapes": landscapes})
    with pytest.raises(ConfigError, match=message):
        study.main(cfg)
    assert not out.exists()  # no sweep ran, nothing was written
