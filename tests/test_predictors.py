"""vitef.predictors and `apps.plots.finetuning predictors`: exact taus on generated runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/finetuning_runs.py
from finetuning_runs import write_probe, write_run  # noqa: E402

from apps.plots import finetuning as app  # noqa: E402
from vitef import predictors as P  # noqa: E402
from vitef.config import build_config  # noqa: E402

MODEL = "vit_base_patch16_224.orig_in21k"
COMPS = ("mha", "fc1", "ln1", "ln2")
# Test accuracy per dataset and component (one lr, both seeds equal).
ACC = {"d1": {"mha": 0.9, "fc1": 0.8, "ln1": 0.7, "ln2": 0.6}, "d2": {"mha": 0.5, "fc1": 0.7, "ln1": 0.6, "ln2": 0.4}}
PLASTICITY = {"mha": 4.0, "fc1": 3.0, "ln1": 2.0, "ln2": 1.0}
BOUND_PER_LAYER = {"mha": [10.0, 30.0], "fc1": [5.0, 5.0], "ln1": [1.0, 9.0], "ln2": [2.0, 2.0]}  # means 20, 5, 5, 2
GRAD = {"mha": 1.0, "fc1": 3.0, "ln1": 2.0, "ln2": 0.5}  # first-step value; rises by 1 per step


def write_analysis(root: Path, dataset: str, mode: str, model: str = MODEL, tag: str | None = None) -> Path:
    out = root / "analysis" / f"{tag or 'base'}_imagenet_{dataset}_{mode}"
    out.mkdir(parents=True)
    summary = [{"component": c, "mean_over_layers": v} for c, v in PLASTICITY.items()]
    meta = {"model": model, "tag": tag or "vit_base_patch16_224.orig_in21k", "target": f"{dataset}/test",
            "mode": mode, "summary": summary}  # fmt: skip
    (out / "plasticity.json").write_text(json.dumps(meta))
    rows = [(layer, c, b) for c, bs in BOUND_PER_LAYER.items() for layer, b in enumerate(bs)]
    pd.DataFrame(rows, columns=["layer", "component", "bound"]).to_csv(out / "bounds.csv", index=False)
    return out


@pytest.fixture
def study(tmp_path):
    out = tmp_path / "outputs"
    for dataset, accs in ACC.items():
        for comp, acc in accs.items():
            for seed in (0, 1):
                run = write_run(out, dataset, comp, 0.01, seed, acc, acc, steps=6)
                rows = [{"step": s, "loss": 1.0, f"grad_norm/{comp}": GRAD[comp] + (s - 1)} for s in range(1, 7)]
                (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_probe(out, dataset, 0.5)
    write_analysis(out, "d1", "embedding")
    write_analysis(out, "d1", "hidden")
    write_analysis(out, "d2", "embedding")  # no hidden-mode analysis of d2: reported missing
    write_analysis(out, "d2", "hidden", tag="vit_base_patch16_224.orig_in21k-random")  # not the pretrained model
    cfg = build_config(
        app.FinetuningPlotsConfig,
        {"root": str(out), "results_dir": str(tmp_path / "results"), "first_steps": 3},
    )
    app.main(build_config(app.FinetuningPlotsConfig, {**_as_dict(cfg), "command": "csv"}))
    return cfg


def _as_dict(cfg) -> dict:
    return {"root": cfg.root, "results_dir": cfg.results_dir, "first_steps": cfg.first_steps}


def test_taus_equal_a_direct_computation(study, capsys):
    app.main(build_config(app.FinetuningPlotsConfig, {**_as_dict(study), "command": "predictors"}))
    tables = Path(study.results_dir) / "tables"
    taus = pd.read_csv(next(tables.glob("predictors_*_select-val.csv")))
    t = taus.set_index(["dataset", "signal", "target"])
    x = [PLASTICITY[c] for c in COMPS]
    for dataset in ACC:
        y = [ACC[dataset][c] for c in COMPS]
        want = kendalltau(x, y)
        row = t.loc[(dataset, "plasticity_embedding", "acc")]
        assert row["tau"] == pytest.approx(want.statistic) and row["p_value"] == pytest.approx(want.pvalue)
        # Within one task the gain over linear probing ranks the components like the accuracy.
        assert t.loc[(dataset, "plasticity_embedding", "gain"), "tau"] == pytest.approx(want.statistic)
    assert t.loc[("d1", "plasticity_embedding", "acc"), "tau"] == pytest.approx(1.0)
    assert t.loc[("d1", "plasticity_embedding", "acc"), "signal_ranking"] == "MHA > FC1 > LN1 > LN2"
    # Gradient norms: mean of the first 3 steps = first value + 1.
    g = [GRAD[c] + 1 for c in COMPS]
    assert t.loc[("d2", "grad_norm", "acc"), "tau"] == pytest.approx(
        kendalltau(g, [ACC["d2"][c] for c in COMPS]).statistic
    )
    signals = pd.read_csv(next(tables.glob("predictor_signals_*.csv")))
    gn = signals[(signals["signal"] == "grad_norm") & (signals["dataset"] == "d1")].set_index("component")["value"]
    assert gn.to_dict() == pytest.approx({c: GRAD[c] + 1 for c in COMPS})
    # Bounds: mean over blocks of bounds.csv (ties between FC1 and LN1 are ties for tau-b too).
    b = [sum(v) / 2 for v in (BOUND_PER_LAYER[c] for c in COMPS)]
    assert t.loc[("d1", "bound", "acc"), "tau"] == pytest.approx(kendalltau(b, [ACC["d1"][c] for c in COMPS]).statistic)
    # Pooled over both tasks: the gain (acc - lp) / lp over the 8 (task, component) pairs.
    pooled_x = x + x
    pooled_gain = [(ACC[d][c] - 0.5) / 0.5 for d in ACC for c in COMPS]
    assert t.loc[("all", "plasticity_embedding", "gain"), "tau"] == pytest.approx(
        kendalltau(pooled_x, pooled_gain).statistic
    )
    assert t.loc[("all", "plasticity_embedding", "gain"), "n"] == 8
    # Missing inputs are rows that say so, never dropped (the random-weights analysis does not count).
    hidden = t.loc[("d2", "plasticity_hidden", "acc")]
    assert math.isnan(hidden["tau"]) and "missing plasticity_hidden" in hidden["status"]
    assert t.loc[("all", "plasticity_hidden", "acc"), "status"] == "only one task"
    md = next(tables.glob("predictors_*_select-val.md")).read_text()
    assert "Missing inputs: d2: missing plasticity_hidden (no analysis folder)" in md
    assert "| d1 | plasticity (embedding) | MHA > FC1 > LN1 > LN2 | MHA > FC1 > LN1 > LN2 | +1.00 |" in md


def test_no_analysis_and_no_metrics_are_reported(tmp_path):
    out = tmp_path / "outputs"
    for comp, acc in ACC["d1"].items():
        write_run(out, "d1", comp, 0.01, 0, acc, acc)  # metrics without per-component gradient norms
    cfg = {"root": str(out), "results_dir": str(tmp_path / "results")}
    app.main(build_config(app.FinetuningPlotsConfig, {**cfg, "command": "csv"}))
    app.main(build_config(app.FinetuningPlotsConfig, {**cfg, "command": "predictors"}))
    taus = pd.read_csv(next((tmp_path / "results/tables").glob("predictors_*_select-val.csv")))
    d1 = taus[(taus["dataset"] == "d1") & (taus["target"] == "acc")].set_index("signal")["status"]
    assert d1["plasticity_embedding"] == "missing plasticity_embedding (no analysis folder)"
    assert d1["grad_norm"] == "missing grad_norm (no metrics.jsonl of its runs)"
    gain = taus[(taus["dataset"] == "d1") & (taus["target"] == "gain")].set_index("signal")["status"]
    assert gain["bound"] == "missing bound (no analysis folder)"


def test_collect_analyses_reads_plasticity_and_bounds(tmp_path):
    write_analysis(tmp_path, "d1", "embedding")
    df = P.collect_analyses(tmp_path).set_index("component")
    assert df.loc["mha", "bound"] == 20.0 and df.loc["ln1", "plasticity"] == 2.0
    assert set(df["dataset"]) == {"d1"} and set(df["mode"]) == {"embedding"}
