"""apps.plots.finetuning csv | table | stat | figures on generated run directories (hand-computed numbers)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/finetuning_runs.py
from finetuning_runs import write_all, write_probe, write_run  # noqa: E402

from apps.plots import finetuning as app  # noqa: E402
from vitef.config import build_config  # noqa: E402


def cfg(tmp_path, **kw):
    return build_config(app.FinetuningPlotsConfig, {"root": str(tmp_path / "outputs"),
                                                    "results_dir": str(tmp_path / "results"), **kw})  # fmt: skip


@pytest.fixture
def study(tmp_path):
    out = tmp_path / "outputs"
    write_all(out)
    write_probe(out, "cifar10", 0.80)
    write_probe(out, "pet", 0.50)
    return tmp_path


def test_csv_and_table_from_the_command_line(study, run_app):
    r = run_app("apps.plots.finetuning", "csv", f"root={study / 'outputs'}", f"results_dir={study / 'results'}")
    assert r.returncode == 0, r.stderr
    assert "cifar10: 12 runs (12 completed)" in r.stdout
    c10 = pd.read_csv(study / "results/finetuning/cifar10.csv")
    assert list(c10.columns) == [
        "dataset", "trainable", "optimizer", "lr", "seed", "model", "status", "best_val_acc", "test_acc",
        "best_step", "run_dir",
    ]  # fmt: skip
    row = c10[(c10.trainable == "mha") & (c10.lr == 0.01) & (c10.seed == 1)].iloc[0]
    assert (row.best_val_acc, row.test_acc, row.status) == (0.85, 0.86, "completed")
    lp = pd.read_csv(study / "results/linear_probing/pet.csv")
    assert len(lp) == 16 and lp[(lp.layer == 1) & (lp.point == "res2")].test_acc.item() == 0.5

    r = run_app("apps.plots.finetuning", "table", f"results_dir={study / 'results'}")
    assert r.returncode == 0, r.stderr
    md = (study / "results/tables/finetuning_vit_base_patch16_224.orig_in21k_sgd_select-val.md").read_text()
    assert md in r.stdout
    # val selection: cifar10 mha at lr 1e-2 -> 87.00 ± 1.41 (std ddof=1); pet mha 71.00
    assert "| CIFAR-10 | **87.00 ± 1.41** | **87.00 ± 2.83** | 79.00 ± 1.41 | 80.00 |" in md
    assert "| Pet | **71.00 ± 1.41** | 59.00 ± 1.41 | 44.00 ± 1.41 | 50.00 |" in md
    assert "| average | 79.00 | 73.00 | 61.50 | 65.00 |" in md
    gain = ((0.87 - 0.8) / 0.8 + (0.71 - 0.5) / 0.5) / 2
    assert f"| gain vs LP (%) | {100 * gain:+.2f} |" in md
    tex = (study / "results/tables/finetuning_vit_base_patch16_224.orig_in21k_sgd_select-val.tex").read_text()
    assert r"\textbf{87.00 $\pm$ 1.41}" in tex


def test_table_select_on_test_reproduces_the_authors_choice(study, capsys):
    app.main(cfg(study, command="csv"))
    app.main(cfg(study, command="table", select_on="test"))
    cells = pd.read_csv(study / "results/tables/finetuning_vit_base_patch16_224.orig_in21k_sgd_select-test.csv")
    mha = cells[(cells.dataset == "cifar10") & (cells.component == "mha")].iloc[0]
    assert (mha.lr, mha["mean"]) == (pytest.approx(1e-3), pytest.approx(0.91))
    ln1 = cells[(cells.dataset == "cifar10") & (cells.component == "ln1")].iloc[0]
    assert (ln1.lr, ln1["mean"], ln1["std"]) == (pytest.approx(1e-2), pytest.approx(0.84), pytest.approx(0.0))
    assert "| CIFAR-10 | **91.00 ± 1.41** |" in capsys.readouterr().out


def test_missing_runs_are_reported(tmp_path, caplog):
    write_all(tmp_path / "outputs", skip={("pet", "mha", 1e-2, 1)})
    app.main(cfg(tmp_path, command="csv"))
    app.main(cfg(tmp_path, command="table"))
    assert "1 lr x seed runs are missing or unfinished" in caplog.text and "pet/mha: 1" in caplog.text
    missing = pd.read_csv(next((tmp_path / "results/tables").glob("missing_*.csv")))
    assert missing[["dataset", "component", "lr", "seed", "status"]].values.tolist() == [
        ["pet", "mha", 0.01, 1, "absent"]
    ]
    md = next((tmp_path / "results/tables").glob("finetuning_*.md")).read_text()
    assert "| Pet | **63.00 ± 2.83** † |" in md and "| average | 87.00 (1/2) |" in md


def test_stat_matches_scipy_on_the_best_lr_means(tmp_path):
    mha = [0.90, 0.80, 0.70, 0.85, 0.95, 0.60]
    fc1 = [0.88, 0.81, 0.65, 0.80, 0.94, 0.55]
    out = tmp_path / "outputs"
    for i in range(6):
        for comp, means in (("mha", mha), ("fc1", fc1)):
            for lr, shift in ((1e-2, 0.0), (1e-3, -0.1)):  # 1e-2 is best on val and test
                for seed, d in ((0, -0.01), (1, 0.01)):
                    acc = means[i] + shift + d
                    write_run(out, f"d{i}", comp, lr, seed, acc, acc)
    app.main(cfg(tmp_path, command="csv"))
    app.main(cfg(tmp_path, command="stat"))
    tests = pd.read_csv(next((tmp_path / "results/tables").glob("stats_*.csv"))).set_index("component")
    t = stats.ttest_rel(mha, fc1)
    w = stats.wilcoxon(mha, fc1, alternative="greater")
    assert tests.loc["fc1", "n"] == 6
    assert tests.loc["fc1", "p_ttest"] == pytest.approx(t.pvalue, rel=1e-6)
    assert tests.loc["fc1", "p_wilcoxon"] == pytest.approx(w.pvalue, rel=1e-6)
    assert tests.loc["fc1", "mean_diff"] == pytest.approx(sum(a - b for a, b in zip(mha, fc1, strict=True)) / 6)


def test_figures_are_written_as_png_and_pdf(study):
    app.main(cfg(study, command="csv"))
    app.main(cfg(study, command="figures"))
    out = study / "results/figures/finetuning/vit_base_patch16_224.orig_in21k_sgd_select-val"
    for name in ("accuracy_per_component", "robustness_lr_seed", "lr_gap", "curves_cifar10", "curves_pet"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name


def test_errors_name_the_fix(tmp_path):
    from vitef.errors import ConfigError
    from vitef.results import ResultsError

    with pytest.raises(ResultsError, match="run `python -m apps.plots.finetuning csv` first"):
        app.main(cfg(tmp_path, command="table"))
    with pytest.raises(ResultsError, match="no training runs"):
        app.main(cfg(tmp_path, command="csv"))
    with pytest.raises(ConfigError, match="unknown command 'plot'"):
        cfg(tmp_path, command="plot")
    write_run(tmp_path / "outputs", "pet", "mha", 1e-2, 0, 0.5, 0.5, optimizer="adamw")
    write_run(tmp_path / "outputs", "pet", "mha", 1e-2, 0, 0.5, 0.5)
    app.main(cfg(tmp_path, command="csv"))
    with pytest.raises(ResultsError, match="mix several optimizers"):
        app.main(cfg(tmp_path, command="table"))
    app.main(cfg(tmp_path, command="table", optimizer="adamw"))
    assert math.isnan(pd.read_csv(next((tmp_path / "results/tables").glob("finetuning_*adamw*.csv")))["std"][0])
