"""apps.vit.select and apps.plots.selection end to end: a tiny model for every criterion, the bundled model for one."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny import TINY_DATA, TINY_MODEL

from apps.plots import selection as plot_app
from apps.vit import select as select_app
from vitef.config import build_config, cli_main, load_config
from vitef.selection import CRITERIA, read_selection

ROOT = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = ROOT / "apps/vit/configs/select_digits.yaml"


def tiny_cfg(root: Path, **select):
    data = {
        "model": TINY_MODEL,
        "data": TINY_DATA,
        "dataset_name": "digits_subset-56789",
        "device": "cpu",
        "root": str(root),
        "select": {"source": "digits_subset-01234", "source_split": "train", "batches": 2, "batch_size": 8, **select},
    }
    return build_config(select_app.SelectAppConfig, data)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_on_a_tiny_model(criterion, tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, criterion=criterion, budget=0.2)
    out = select_app.main(cfg)
    assert out == select_app.run_dir(cfg) and out.parent == tmp_path / "selection"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "selection.csv", "selection.json", "selection.md"]
    data = json.loads((out / "selection.json").read_text())
    units = [u["unit"] for u in data["units"]]
    assert units == [f"{c}.{i}" for i in range(2) for c in ("ln1", "mha", "ln2", "fc1", "fc2")]
    assert all(isinstance(u["score"], float) for u in data["units"])  # a score for every unit
    assert 0 < data["picked_params"] <= 0.2 * data["backbone_params"] and data["picked"]
    assert data["picked_params"] == sum(u["params"] for u in data["units"] if u["picked"])
    assert data["criterion"] == criterion and data["dataset"] == "digits_subset-56789"
    table = pd.read_csv(out / "selection.csv")
    assert list(table["unit"]) == units and table["picked"].sum() == len(data["picked"])
    text = capsys.readouterr().out
    assert f"trainable=[{','.join(data['trainable'])}]" in text
    assert f"python -m apps.plots.selection dirs=[{out}]" in text
    assert yaml.safe_load((out / "config.yaml").read_text())["select"]["criterion"] == criterion


def test_tiny_selection_is_deterministic_and_drawn(tmp_path, capsys):
    first = select_app.main(tiny_cfg(tmp_path / "a", criterion="rgn", budget=2))
    second = select_app.main(tiny_cfg(tmp_path / "b", criterion="rgn", budget=2))
    a, b = read_selection(first), read_selection(second)
    assert a.scores == b.scores and a.picked == b.picked and len(a.picked) == 2
    assert first.name == "vit_tiny_patch16_224-random_digits_subset-56789_rgn_2units_seed0"
    # The heat maps: one per folder (a second folder of the same name is numbered) and the overview, PNG and PDF.
    plot = build_config(plot_app.SelectionPlotConfig, {"dirs": [str(tmp_path / "*" / "selection" / "*")],
                                                       "out": str(tmp_path / "figs")})  # fmt: skip
    written = plot_app.main(plot)
    stems = (first.name, f"{first.name}_1", "overview")
    assert sorted(p.name for p in written) == sorted(f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf"))
    assert all(p.stat().st_size > 1000 for p in written)


def test_bundled_model_ten_percent_budget(tmp_path, capsys):
    # The offline example of the README: the bundled digits ViT on its downstream task.
    cfg = load_config(select_app.SelectAppConfig, [f"config={DIGITS_CONFIG}", "criterion=rgn", f"root={tmp_path}"])
    out = select_app.main(cfg)
    assert out.name == "vit_digits_digits_subset-56789_rgn_10pct_seed0"
    sel = read_selection(out)
    assert len(sel.units) == 6 * 5 and len(sel.scores) == 30
    assert sel.picked_params <= 0.1 * sel.backbone_params and sel.picked
    assert sel.meta["seconds"] < 60


def test_the_other_task_name_and_aliases(tmp_path):
    cfg = load_config(
        select_app.SelectAppConfig,
        [f"config={DIGITS_CONFIG}", "dataset_name=digits_c-impulse_noise-5", "criterion=plasticity", "mode=hidden",
         "budget=3", "seed=1", f"root={tmp_path}"],
    )  # fmt: skip
    assert cfg.dataset_name == "digits_c-corruption-impulse_noise-severity-5"
    assert cfg.select.mode == "hidden" and cfg.select.budget == 3 and cfg.select.seed == 1
    assert select_app.run_dir(cfg).name == (
        "vit_digits_digits_c-corruption-impulse_noise-severity-5_plasticity-hidden_3units_seed1"
    )


def _exit(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(module.CONFIG, module.main, argv=argv, prog=module.__name__)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_help_and_errors(tmp_path, capsys):
    code, out, _ = _exit(select_app, ["--help"], capsys)
    assert code == 0 and "select.criterion" in out and "select.budget" in out and "criterion" in out
    base = [f"config={DIGITS_CONFIG}", f"root={tmp_path / 'out'}"]
    for argv, match in [
        (["criterion=fisher"], "criterion='fisher' is unknown: choose one of plasticity"),
        (["criterion="], "criterion= is empty"),
        (["budget=0.00001"], "fewer than the smallest unit"),
        (["budget=200"], "budget=200 units, but the model has 30"),
        (["budget=1.5"], "neither a fraction"),
        (["dataset_name=digitz"], "dataset_name: "),
    ]:
        code, _, err = _exit(select_app, base + argv, capsys)
        assert code == 2 and match in err, (argv, err)
        assert not (tmp_path / "out").exists(), argv  # nothing written
    code, _, err = _exit(plot_app, [f"dirs=[{tmp_path}/nowhere/*]", f"out={tmp_path}/figs"], capsys)
    assert code == 2 and "no selection folder" in err and "python -m apps.vit.select" in err
