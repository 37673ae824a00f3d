"""apps.plots.finetuning methods on generated run directories: the methods table, criterion vs random, the Pareto
figure; the component tables leave the other methods out; the report shows the methods section."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/finetuning_runs.py, tests/methods_runs.py
from finetuning_runs import write_all  # noqa: E402
from methods_runs import write_methods_study  # noqa: E402

from apps.plots import finetuning as app  # noqa: E402
from apps.plots import report  # noqa: E402
from vitef import results as R  # noqa: E402
from vitef.config import build_config  # noqa: E402

TAG = "vit_base_patch16_224.orig_in21k_select-val"


def cfg(root: Path, **kw):
    return build_config(app.FinetuningPlotsConfig, {"root": str(root), "results_dir": str(root / "results"), **kw})


def test_methods_command_writes_tables_and_figure(tmp_path, capsys):
    root = tmp_path / "out"
    write_methods_study(root, ("cifar10", "pet"))
    write_all(root)  # the paper's component runs beside them
    app.main(cfg(root, command="csv"))
    csv = pd.read_csv(root / "results/finetuning/cifar10.csv")
    assert list(csv.columns) == R.FINETUNING_COLUMNS  # method columns: some runs are not component runs
    assert app.has_method_runs(root / "results") and app.has_paper_grid(root / "results")

    app.main(cfg(root, command="methods"))
    tables = root / "results/tables"
    md = (tables / f"methods_{TAG}.md").read_text()
    assert "**CIFAR-10**" in md and "**Pet**" in md
    assert "| random 10% | 1.1k | 10.0 | — | 0.3 | 74.00 ± 4.00 | 3 picks × 1 |" in md
    table = pd.read_csv(tables / f"methods_{TAG}.csv")
    # the component runs are methods too (full:mha, ...); each method's lr chosen among its own
    assert {"full:mha", "lora r4", "select rgn 10%", "random 10%"} <= set(table["group"])
    assert (table["status"] == "ok").all()
    vs = pd.read_csv(tables / f"criterion_vs_random_{TAG}.csv")
    rgn = vs[(vs.dataset == "cifar10") & (vs.criterion == "rgn")].iloc[0]
    assert (round(rgn.z, 6), rgn["rank"], rgn.of) == (1.5, 1, 4)
    assert (
        "| 10% | rgn | 80.00 | 74.00 ± 4.00 | 70.00 – 78.00 | 3 | +1.50 | 1/4 |"
        in (tables / f"criterion_vs_random_{TAG}.md").read_text()
    )
    assert len(pd.read_csv(tables / f"methods_cells_{TAG}.csv")) == 2 * (6 + 3 + 3)  # labels per dataset
    for ext in ("png", "pdf"):
        assert (root / f"results/figures/methods/{TAG}/pareto.{ext}").stat().st_size > 0
    assert "Criterion vs random" in capsys.readouterr().out

    # the component table reads the component runs only (LoRA, BitFit, selections and layer decay left out)
    app.main(cfg(root, command="table"))
    cells = pd.read_csv(next(tables.glob("finetuning_*select-val.csv")))
    assert set(cells["component"]) == {"mha", "fc1", "ln1", "all"}

    out = report.main(build_config(report.ReportConfig, {"root": str(root)}))
    text = out.read_text()
    assert "## Which parameters to finetune" in text and "### Criterion vs random" in text
    assert text.count("pareto.png") == 1  # in the methods section, not again among the figures


def test_component_runs_only_keep_the_old_csv_and_no_methods(tmp_path):
    root = tmp_path / "out"
    write_all(root)
    app.main(cfg(root, command="csv"))
    assert list(pd.read_csv(root / "results/finetuning/pet.csv").columns) == R.BASE_COLUMNS
    assert not app.has_method_runs(root / "results")
    app.main(cfg(root, command="methods"))  # still works: every component is a method
    table = pd.read_csv(root / f"results/tables/methods_{TAG}.csv")
    assert set(table["group"]) == {"full:mha", "full:fc1", "full:ln1"}
    assert not (root / f"results/tables/criterion_vs_random_{TAG}.md").exists()


def test_every_family_has_its_own_style_in_the_pareto_figure():
    assert set(app.FAMILY_STYLE) == set(R.FAMILIES)  # DoRA included: none falls back to the "other" colour
    assert len(set(app.FAMILY_STYLE.values())) == len(app.FAMILY_STYLE)  # no two families look alike
    assert app.FAMILY_STYLE["dora"] != app.FAMILY_STYLE["lora"]
