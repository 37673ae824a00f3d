"""vitef.results for the methods of issue 12: method columns, labels, method cells, Pareto front, criterion vs random.

Synthetic run directories (tests/methods_runs.py); every expected number is worked out by hand below.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from finetuning_runs import write_run
from methods_runs import write_method_run, write_methods_study

from vitef import results as R


def _row(df, **where):
    for key, value in where.items():
        df = df[df[key] == value]
    assert len(df) == 1, where
    return df.iloc[0]


def test_read_run_tells_methods_apart(tmp_path):
    old = write_run(tmp_path, "cifar10", "mha", 0.01, 1, 0.8, 0.81)  # a run of before issue 12: defaults
    row = R.read_run(old)
    assert list(row) == R.FINETUNING_COLUMNS
    assert {k: row[k] for k in R.METHOD_COLUMNS if k != "budget"} == {
        k: v for k, v in R.METHOD_DEFAULTS.items() if k != "budget"
    }
    assert math.isnan(row["budget"]) and row["trainable"] == "mha"

    sel = R.read_run(write_method_run(tmp_path, "cifar10", 0.3, 2, 0.8, 0.8, select={"criterion": "rgn"},
                                      trainable_params=1_050))  # fmt: skip
    assert (sel["method"], sel["criterion"], sel["budget"], sel["select_seed"]) == ("full", "rgn", 0.1, 2)  # run seed
    assert (sel["trainable_params"], sel["backbone_params"], sel["head_params"]) == (1_050, 10_000, 50)
    hidden = R.read_run(write_method_run(tmp_path, "pet", 0.3, 0, 0.8, 0.8,
                                         select={"criterion": "plasticity", "mode": "hidden", "seed": 7}))  # fmt: skip
    assert (hidden["criterion"], hidden["select_seed"], hidden["trainable_params"]) == ("plasticity-hidden", 7, -1)
    lora = R.read_run(write_method_run(tmp_path, "pet", 0.3, 0, 0.8, 0.8, method="lora", lora_rank=4))
    ld = R.read_run(write_method_run(tmp_path, "pet", 0.3, 0, 0.8, 0.8, layer_decay=0.75))
    assert (lora["method"], lora["lora_rank"], ld["layer_decay"], ld["method"]) == ("lora", 4, 0.75, "full")

    df = R.collect_finetuning(tmp_path)
    assert R.is_component_run(df).tolist() == [r == str(old) for r in df["run_dir"]]
    assert list(R.drop_default_method_columns(df[df["run_dir"] == str(old)]).columns) == R.BASE_COLUMNS
    assert list(R.drop_default_method_columns(df).columns) == R.FINETUNING_COLUMNS
    # A CSV written before issue 12 (no method columns) reads as component runs
    assert R.with_method_columns(df[R.BASE_COLUMNS])["method"].eq("full").all()


def test_method_family_of_lp_ft():
    row = R.with_method_columns(pd.DataFrame([{"method": "lp_ft", "trainable": "all"}])).iloc[0]
    assert R.method_family(row) == "lp-ft"


def test_dora_runs_have_their_rank_label_and_family_after_lora(tmp_path):
    dora = write_method_run(tmp_path, "pet", 0.3, 0, 0.84, 0.83, method="dora", lora_rank=16, trainable_params=900)
    row = R.read_run(dora)
    assert (row["method"], row["lora_rank"], row["trainable_params"]) == ("dora", 16, 900)
    assert R.method_label("dora", lora_rank=8) == "dora r8"
    assert R.method_label("dora", "mha", lora_rank=4) == "dora r4:mha"
    write_method_run(tmp_path, "pet", 0.3, 0, 0.80, 0.81, method="lora", lora_rank=16, trainable_params=850)
    write_method_run(tmp_path, "pet", 0.3, 0, 0.70, 0.72, method="bitfit", trainable_params=250)
    cells = R.method_cells(R.collect_finetuning(tmp_path), "val", 1)
    # its own family, ordered between LoRA and BitFit (FAMILIES), with its own rank in the label
    assert cells[["label", "family", "mean"]].values.tolist() == [
        ["lora r16", "lora", pytest.approx(0.81)], ["dora r16", "dora", pytest.approx(0.83)],
        ["bitfit", "bitfit", pytest.approx(0.72)],
    ]  # fmt: skip
    assert _row(cells, label="dora r16")["backbone_share"] == pytest.approx((900 - 50) / 10_000)


def test_method_labels():
    assert R.method_label(trainable="mha") == "full:mha"
    assert R.method_label(layer_decay=0.75) == "full:all ld0.75"
    assert R.method_label("lora", lora_rank=8) == "lora r8"
    assert R.method_label("lora", "mha", lora_rank=4) == "lora r4:mha"
    assert R.method_label("bitfit") == "bitfit"
    assert R.method_label("bitfit", "fc1+fc2") == "bitfit:fc1+fc2"
    assert R.method_label("lp_ft") == "lp-ft"
    assert R.method_label("lp_ft", "mha") == "lp-ft:mha"
    assert R.method_label(criterion="plasticity", budget=0.1) == "select plasticity 10%"
    assert R.method_label(criterion="rgn", budget=3) == "select rgn 3 units"
    assert R.method_label("bitfit", criterion="rgn", budget=0.05) == "select rgn 5% bitfit"
    assert R.method_label(criterion="random", budget=0.1, select_seed=2) == "random 10% seed 2"
    assert R.method_label(criterion="random", budget=0.1, select_seed=2, pick=False) == "random 10%"
    assert R.method_label(trainable="all", optimizer="adamw") == "full:all adamw"


@pytest.fixture
def cells(tmp_path):
    write_methods_study(tmp_path / "o", ("cifar10", "pet"))
    return R.method_cells(R.collect_finetuning(tmp_path / "o"), "val", 1)


def test_method_cells_choose_each_methods_lr(cells):
    c10 = cells[cells["dataset"] == "cifar10"]
    full = _row(c10, label="full:all")
    # lr 0.3 (val 0.90 > 0.80); test (0.86 + 0.84) / 2; the sample std of two values 0.02 apart
    expected = (0.3, 0.85, math.sqrt(2) * 0.01, 2)
    assert (full["lr"], full["mean"], full["std"], full["n_seeds"]) == pytest.approx(expected)
    assert full["status"] == "ok" and full["backbone_share"] == pytest.approx(1.0)
    assert full["images_per_s"] == pytest.approx(110.0)  # the two seeds at the chosen lr, not lr 0.1's 50
    assert math.isnan(_row(c10, label="select rgn 10%")["images_per_s"])  # eval.json without it: unknown
    # one lr only: chosen among its own lrs (not 'partial' for lacking the baselines' 0.1)
    rgn = _row(c10, label="select rgn 10%")
    assert (rgn["status"], rgn["mean"], rgn["family"]) == ("ok", pytest.approx(0.80), "select")
    assert rgn["backbone_share"] == pytest.approx((1_050 - 50) / 10_000)
    assert _row(c10, label="lora r4")["backbone_share"] == pytest.approx(0.08)
    assert _row(c10, label="random 10% seed 2")[["group", "select_seed"]].tolist() == ["random 10%", 2]
    assert set(c10["family"]) == set(R.FAMILIES) - {"components", "lp-ft", "dora"}  # no LP-FT nor DoRA run here
    assert list(cells["dataset"].unique()) == ["cifar10", "pet"]
    assert _row(cells, dataset="pet", label="bitfit")["mean"] == pytest.approx(0.62)


def test_method_table_and_pareto_front(cells):
    table = R.method_table(cells, ddof=1)
    c10 = table[table["dataset"] == "cifar10"]
    rand = _row(c10, group="random 10%")
    # the three picks 0.70, 0.74, 0.78: mean 0.74, sample std 0.04; mean parameters (950 + 1050 + 1150) / 3
    assert (rand["mean"], rand["std"], rand["n_picks"], rand["n"]) == pytest.approx((0.74, 0.04, 3, 1))
    assert rand["trainable_params"] == pytest.approx(1_050)
    # (params, acc): bitfit (250, .72), lora (850, .83), ld (10050, .87) are beaten by nobody; rgn (1050, .80) is
    # beaten by lora, full (10050, .85) by ld
    front = set(c10[c10["pareto"]]["group"])
    assert front == {"bitfit", "lora r4", "full:all ld0.75"}
    assert c10["group"].tolist() == [
        "full:all", "full:all ld0.75", "lora r4", "bitfit", "select rgn 10%", "select paper 10%", "random 10%"
    ]  # fmt: skip
    md = R.methods_markdown(table)
    assert "| full:all ld0.75 ◆ | 10.1k | 100.0 | — | 0.3 | **87.00** | 1 |" in md  # no images/s: an older run
    assert "| random 10% | 1.1k | 10.0 | — | 0.3 | 74.00 ± 4.00 | 3 picks × 1 |" in md
    assert "| full:all | 10.1k | 100.0 | 110 | 0.3 | 85.00 ± 1.41 | 2 |" in md  # the runs at the chosen lr
    assert "| lora r4 ◆ | 850 | 8.0 | 150 | 0.3 | 83.00 | 1 |" in md


def test_pareto_front_by_hand():
    front = R.pareto_front([1, 2, 2, 3, 4, np.nan], [0.5, 0.4, 0.6, 0.6, 0.7, 0.9])
    assert front.tolist() == [True, False, True, False, True, False]


def test_criterion_vs_random(cells):
    vs = R.criterion_vs_random(cells, ddof=1)
    assert list(vs.columns) == R.VS_RANDOM_COLUMNS and len(vs) == 4
    rgn = _row(vs, dataset="cifar10", criterion="rgn")
    # random picks 0.70, 0.74, 0.78 (mean 0.74, std 0.04): rgn 0.80 -> z 1.5, better than all three
    assert (rgn["acc"], rgn["random_mean"], rgn["random_std"], rgn["z"]) == pytest.approx((0.80, 0.74, 0.04, 1.5))
    assert (rgn["n_random"], rgn["rank"], rgn["of"], rgn["random_min"], rgn["random_max"]) == pytest.approx(
        (3, 1, 4, 0.70, 0.78)
    )
    paper = _row(vs, dataset="pet", criterion="paper")
    # pet is 10 points lower: paper 0.62 against 0.60, 0.64, 0.68 -> z -0.5, two picks better
    assert (paper["z"], paper["rank"], paper["of"]) == pytest.approx((-0.5, 3, 4))
    md = R.vs_random_markdown(vs)
    assert "| 10% | rgn | 80.00 | 74.00 ± 4.00 | 70.00 – 78.00 | 3 | +1.50 | 1/4 |" in md


def test_criterion_without_random_picks(tmp_path):
    write_method_run(tmp_path, "cifar10", 0.3, 0, 0.8, 0.8, select={"criterion": "bound", "budget": 0.33})
    vs = R.criterion_vs_random(R.method_cells(R.collect_finetuning(tmp_path)))
    assert vs[["criterion", "n_random", "rank", "of"]].values.tolist() == [["bound", 0, 1, 1]]
    assert math.isnan(vs["z"].iloc[0]) and math.isnan(vs["random_mean"].iloc[0])
