"""Components trained together (``trainable=[mha, fc1]``, PROTOCOL.md §7) are their own configuration in the study's
tables and figures: the row or column ``MHA+FC1``, its own cells, tests, colour, and the report shows it."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.colors as mcolors
import pandas as pd
import pytest
import yaml
from finetuning_runs import SEEDS, write_all, write_probe, write_run
from scipy import stats

from apps.plots import finetuning as app
from apps.plots import report
from vitef import results as R
from vitef.config import build_config

TAG = "vit_base_patch16_224.orig_in21k_sgd_select-val"
SQ = math.sqrt(2) * 0.01  # sample std (ddof=1) of two values 0.02 apart
# ([best_val_acc per seed], [test acc per seed]) per lr, beside finetuning_runs.VALUES (mha, fc1, ln1).
COMBOS = {
    ("mha", "fc1"): {
        "cifar10": {1e-3: ([0.86, 0.88], [0.93, 0.95]), 1e-2: ([0.80, 0.82], [0.85, 0.83])},  # val: 1e-3 → 94
        "pet": {1e-3: ([0.70, 0.72], [0.74, 0.76]), 1e-2: ([0.60, 0.62], [0.66, 0.64])},  # val: 1e-3 → 75
    },
    ("fc1", "fc2"): {
        "cifar10": {1e-3: ([0.70, 0.70], [0.71, 0.73]), 1e-2: ([0.75, 0.77], [0.78, 0.80])},  # val: 1e-2 → 79
        "pet": {1e-3: ([0.50, 0.50], [0.52, 0.54]), 1e-2: ([0.55, 0.57], [0.58, 0.60])},  # val: 1e-2 → 59
    },
}


def write_combo_run(root: Path, dataset: str, trainable: list[str], lr: float, seed: int, val: float, test: float):
    """A run directory as apps.vit.train writes it for ``trainable`` (a list of several components)."""
    run = write_run(root, dataset, "+".join(trainable), lr, seed, val, test)
    path = run / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["trainable"] = list(trainable)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run


@pytest.fixture
def root(tmp_path):
    out = tmp_path / "out"
    write_all(out)
    for combo, datasets in COMBOS.items():
        for dataset, lrs in datasets.items():
            for lr, (vals, tests) in lrs.items():
                for seed, val, test in zip(SEEDS, vals, tests, strict=True):
                    # One run saved with the authors' alias (attn = mha): still the MHA+FC1 configuration.
                    names = ["attn", "fc1"] if (combo, dataset, lr, seed) == (("mha", "fc1"), "pet", 1e-2, 1) else combo
                    write_combo_run(out, dataset, list(names), lr, seed, val, test)
    write_probe(out, "cifar10", 0.80)
    write_probe(out, "pet", 0.50)
    return out


def cfg(root: Path, **kw):
    return build_config(app.FinetuningPlotsConfig, {"root": str(root), "results_dir": str(root / "results"), **kw})


def _cell(cells: pd.DataFrame, dataset: str, comp: str) -> pd.Series:
    row = cells[(cells["dataset"] == dataset) & (cells["component"] == comp)]
    assert len(row) == 1
    return row.iloc[0]


def test_combination_is_its_own_cell_and_column(root):
    runs = R.collect_finetuning(root)
    assert (runs["trainable"] == "mha+fc1").sum() == 8 and (runs["trainable"] == "fc1+fc2").sum() == 8
    assert R.is_component_run(runs).all()
    cells, missing = R.summarize(runs)
    assert missing.empty
    mf = _cell(cells, "cifar10", "mha+fc1")
    assert (mf["lr"], mf["mean"], mf["std"], mf["status"]) == (1e-3, pytest.approx(0.94), pytest.approx(SQ), "ok")
    assert _cell(cells, "pet", "fc1+fc2")["mean"] == pytest.approx(0.59)
    header, body, _ = R.table_rows(cells)
    # Single components in the registry's order, then the combinations alphabetically, each with its own label.
    assert header == ["dataset", "MHA", "FC1", "LN1", "FC1+FC2", "MHA+FC1"]
    assert body[0] == ["CIFAR-10", "87.00 ± 1.41", "87.00 ± 2.83", "79.00 ± 1.41", "79.00 ± 1.41", "**94.00 ± 1.41**"]
    assert body[2] == ["average", "79.00", "73.00", "61.50", "69.00", "84.50"]
    # MHA against the combination, paired over the datasets' best-LR means, as scipy computes it.
    tests = R.mha_tests(cells).set_index("component")
    x, y = [0.87, 0.71], [0.94, 0.75]
    assert tests.loc["mha+fc1", "mean_diff"] == pytest.approx(-0.055)
    assert tests.loc["mha+fc1", "t"] == pytest.approx(stats.ttest_rel(x, y).statistic)
    # The methods comparison names it as it names every component run.
    labels = set(R.method_labels(runs))
    assert {"full:mha+fc1", "full:fc1+fc2", "full:mha"} <= labels


def test_tables_figures_and_report_show_the_combination(root):
    for command in ("csv", "table", "stat", "figures"):
        app.main(cfg(root, command=command))
    tables = root / "results" / "tables"
    md = (tables / f"finetuning_{TAG}.md").read_text()
    assert "| dataset | MHA | FC1 | LN1 | FC1+FC2 | MHA+FC1 | LP |" in md
    assert "| Pet | 71.00 ± 1.41 | 59.00 ± 1.41 | 44.00 ± 1.41 | 59.00 ± 1.41 | **75.00 ± 1.41** | 50.00 |" in md
    assert "| MHA+FC1 | 2 | -5.50 |" in (tables / f"stats_{TAG}.md").read_text()
    for name in ("accuracy_per_component", "robustness_lr_seed", "lr_gap", "curves_cifar10"):
        assert (root / "results" / "figures" / "finetuning" / TAG / f"{name}.png").stat().st_size > 0

    out = report.main(build_config(report.ReportConfig, {"root": str(root)}))
    text = out.read_text()
    assert "| dataset | MHA | FC1 | LN1 | FC1+FC2 | MHA+FC1 | LP |" in text and "| MHA+FC1 | 2 | -5.50 |" in text


def test_each_combination_has_its_own_colour_and_hatch(root):
    app.main(cfg(root, command="csv"))
    cells, _, _, _ = app.summarize(cfg(root))
    fig = app.plot_accuracy(cells)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["MHA", "FC1", "LN1", "FC1+FC2", "MHA+FC1"]
    bars = dict(zip(labels, ax.patches, strict=True))
    colours = {k: mcolors.to_hex(b.get_facecolor()) for k, b in bars.items()}
    assert len(set(colours.values())) == 5  # MHA+FC1 apart from MHA, FC1 and the other combination
    assert [bars[k].get_hatch() or "" for k in labels] == ["", "", "", "//", "//"]
    fig = app.plot_lr_gap(cells)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == labels
    runs, _, _ = app.load_results(cfg(root))
    fig = app.plot_curves(runs, cells, "cifar10")
    styles = {line.get_label().split(" (")[0]: line.get_linestyle() for line in fig.axes[1].get_lines()}
    assert styles == {"MHA": "-", "FC1": "-", "LN1": "-", "FC1+FC2": "--", "MHA+FC1": "--"}
