"""vitef.results: best-LR selection (val and test), std over seeds, missing runs, LP gain, tests vs scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from finetuning_runs import write_all, write_probe, write_run
from scipy import stats

from vitef import results as R

SQ = math.sqrt(2) * 0.01  # sample std (ddof=1) of two values 0.02 apart


@pytest.fixture
def runs(tmp_path):
    write_all(tmp_path)
    return R.collect_finetuning(tmp_path)


def _cell(cells, dataset, comp):
    row = cells[(cells["dataset"] == dataset) & (cells["component"] == comp)]
    assert len(row) == 1
    return row.iloc[0]


def test_collect_reads_the_run_directory_contract(tmp_path, runs):
    assert len(runs) == 2 * 3 * 2 * 2
    assert list(runs.columns) == R.FINETUNING_COLUMNS
    r = runs[(runs["dataset"] == "cifar10") & (runs["trainable"] == "mha") & (runs["lr"] == 1e-2) & (runs["seed"] == 1)]
    r = r.iloc[0]
    assert (r["optimizer"], r["model"], r["status"]) == ("sgd", "vit_base_patch16_224.orig_in21k", "completed")
    assert (r["best_val_acc"], r["test_acc"], r["best_step"]) == (0.85, 0.86, 20)
    # runs_glob restricts the directories read
    assert set(R.collect_finetuning(tmp_path, "main/pet/**")["dataset"]) == {"pet"}


def test_best_lr_selected_on_validation(runs):
    cells, missing = R.summarize(runs, select_on="val", ddof=1)
    assert missing.empty and (cells["status"] == "ok").all()
    expected = {  # (dataset, component): (lr, mean, std) worked out by hand from finetuning_runs.VALUES
        ("cifar10", "mha"): (1e-2, 0.87, SQ),
        ("cifar10", "fc1"): (1e-3, 0.87, 2 * SQ),
        ("cifar10", "ln1"): (1e-3, 0.79, SQ),  # validation tie -> smaller lr
        ("pet", "mha"): (1e-2, 0.71, SQ),
        ("pet", "fc1"): (1e-2, 0.59, SQ),
        ("pet", "ln1"): (1e-3, 0.44, SQ),
    }
    for (d, c), (lr, mean, std) in expected.items():
        cell = _cell(cells, d, c)
        assert (
            cell["lr"] == pytest.approx(lr)
            and cell["mean"] == pytest.approx(mean)
            and cell["std"] == pytest.approx(std)
        )
        assert cell["n_seeds"] == 2
    assert list(cells["component"].unique()) == ["mha", "fc1", "ln1"]  # theoretical order
    assert _cell(cells, "cifar10", "mha")["lr_gap"] == pytest.approx(0.91 - 0.87)


def test_best_lr_selected_on_test_and_ddof(runs):
    cells, _ = R.summarize(runs, select_on="test", ddof=0)
    assert _cell(cells, "cifar10", "mha")[["lr", "mean"]].tolist() == pytest.approx([1e-3, 0.91])
    assert _cell(cells, "cifar10", "mha")["std"] == pytest.approx(0.01)  # population std of (0.90, 0.92)
    assert _cell(cells, "cifar10", "ln1")[["lr", "mean", "std"]].tolist() == pytest.approx([1e-2, 0.84, 0.0])
    assert _cell(cells, "cifar10", "fc1")["lr"] == pytest.approx(1e-3)


def test_averages_and_relative_gain(tmp_path, runs):
    write_probe(tmp_path, "cifar10", 0.80)
    write_probe(tmp_path, "pet", 0.50)
    lp = R.lp_baselines(R.collect_probes(tmp_path))
    assert lp.to_dict() == pytest.approx({"cifar10": 0.80, "pet": 0.50})  # last block's res2 only
    cells, _ = R.summarize(runs)
    cells = R.add_relative_gain(cells, lp)
    avg = R.averages(cells).set_index("component")
    assert avg.loc["mha", "mean"] == pytest.approx((0.87 + 0.71) / 2)
    assert avg.loc["ln1", "mean"] == pytest.approx((0.79 + 0.44) / 2)
    assert avg.loc["mha", "gain"] == pytest.approx(((0.87 - 0.8) / 0.8 + (0.71 - 0.5) / 0.5) / 2)
    header, body, notes = R.table_rows(cells)
    md = R.to_markdown(header, body, notes)
    assert "| CIFAR-10 | **87.00 ± 1.41** | **87.00 ± 2.83** | 79.00 ± 1.41 | 80.00 |" in md
    assert "| average | 79.00 | 73.00 | 61.50 | 65.00 |" in md
    assert f"{100 * avg.loc['mha', 'gain']:+.2f}" in md
    tex = R.to_latex(header, body, notes)
    assert r"\textbf{87.00 $\pm$ 1.41}" in tex and r"\toprule" in tex


def test_missing_runs_are_listed_and_excluded(tmp_path):
    skip = {("pet", "mha", 1e-2, 1)}
    write_all(tmp_path, skip=skip)
    write_run(tmp_path, "pet", "fc1", 1e-3, 0, None, None, status="failed")  # overwrite one run as failed
    (tmp_path / "runs/main/pet/fc1/sgd_lr0.001_seed0/eval.json").unlink()
    cells, missing = R.summarize(R.collect_finetuning(tmp_path))
    assert sorted(map(tuple, missing[["dataset", "component", "lr", "seed", "status"]].values.tolist())) == [
        ("pet", "fc1", 1e-3, 0, "failed"),
        ("pet", "mha", 1e-2, 1, "absent"),
    ]
    mha = _cell(cells, "pet", "mha")  # 1e-2 is incomplete: chosen among complete lrs only
    assert (mha["status"], mha["lr"], mha["mean"]) == ("partial", 1e-3, pytest.approx(0.63))
    avg = R.averages(cells).set_index("component")
    assert avg.loc["mha", "n"] == 1 and avg.loc["mha", "mean"] == pytest.approx(0.87)  # pet left out
    _, body, notes = R.table_rows(cells)
    assert body[1][1].endswith("†") and body[-1][1] == "87.00 (1/2)"
    assert any("partial" in n for n in notes)
    # a cell with no complete lr at all is missing, shown as a dash
    write_run(tmp_path, "pet", "fc1", 1e-2, 1, None, None, status="running")
    (tmp_path / "runs/main/pet/fc1/sgd_lr0.01_seed1/eval.json").unlink()
    cells, _ = R.summarize(R.collect_finetuning(tmp_path))
    assert _cell(cells, "pet", "fc1")["status"] == "missing"
    assert np.isnan(_cell(cells, "pet", "fc1")["mean"])


def test_expected_grid_from_arguments(runs):
    cells, missing = R.summarize(runs, lrs=[1e-3, 1e-2, 3e-2], seeds=[0, 1])
    assert len(missing) == 2 * 3 * 2  # every (dataset, component) lacks lr 3e-2 for both seeds
    assert set(cells["status"]) == {"partial"}


def test_duplicate_runs_are_an_error(tmp_path, runs):
    dup = runs.iloc[[0]].assign(run_dir="elsewhere")
    with pytest.raises(R.ResultsError, match="several runs"):
        R.summarize(pd.concat([runs, dup]))


def test_mha_tests_match_scipy():
    mha = [0.90, 0.80, 0.70, 0.85, 0.95, 0.60]
    fc1 = [0.88, 0.81, 0.65, 0.80, 0.94, 0.55]
    ln1 = [0.80, 0.70, 0.69, 0.70, 0.90, 0.50]
    rows = []
    for i in range(6):
        for comp, v in (("mha", mha), ("fc1", fc1), ("ln1", ln1)):
            rows.append({"dataset": f"d{i}", "component": comp, "status": "ok", "mean": v[i]})
    tests = R.mha_tests(pd.DataFrame(rows)).set_index("component")
    for comp, v in (("fc1", fc1), ("ln1", ln1)):
        t = stats.ttest_rel(mha, v)
        w = stats.wilcoxon(mha, v, alternative="greater")
        assert tests.loc[comp, "p_ttest"] == pytest.approx(t.pvalue)
        assert tests.loc[comp, "t"] == pytest.approx(t.statistic)
        assert tests.loc[comp, "p_wilcoxon"] == pytest.approx(w.pvalue)
        assert tests.loc[comp, "n"] == 6
    assert tests.loc["ln1", "p_wilcoxon"] == pytest.approx(1 / 64)  # all 6 differences positive: exact 2^-6


def test_read_metrics_and_mean_curve(tmp_path):
    a = write_run(tmp_path, "cifar10", "mha", 1e-2, 0, 0.5, 0.5)
    b = write_run(tmp_path, "cifar10", "mha", 1e-2, 1, 0.5, 0.5)
    with open(b / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 21, "grad_n')  # a run killed while writing its last line
    curve = R.mean_curve([a, b], "grad_norm")
    assert len(curve) == 20  # steps both runs logged
    assert curve["mean"].iloc[0] == pytest.approx(((1.0 + 0.1) + (2.0 + 0.1)) / 2)
    assert curve["max"].iloc[0] == pytest.approx(2.1)


def test_dataset_names_and_labels():
    assert R.dataset_key("cifar10_c-corruption-snow-severity-5") == "cifar10_c-snow"
    assert R.dataset_key("cifar10_c-gaussian_noise-5") == "cifar10_c-gaussian_noise"
    assert R.dataset_label("cifar10_c-motion_blur") == "C10-C motion blur"
    assert R.order_datasets(["pet", "zzz", "cifar100", "cifar10"]) == ["cifar10", "cifar100", "pet", "zzz"]
    assert R.order_components(["all", "ln1", "fc1", "mha"]) == ["mha", "fc1", "ln1", "all"]


def test_lp_baseline_of_the_finetuned_model(tmp_path):
    write_probe(tmp_path, "pet", 0.50, model="base")
    write_probe(tmp_path / "other", "pet", 0.70, model="large")
    probes = pd.concat([R.collect_probes(tmp_path), R.collect_probes(tmp_path / "other")])
    assert R.lp_baselines(probes, model="large").to_dict() == {"pet": 0.70}
    assert R.lp_baselines(probes, model="base").to_dict() == {"pet": 0.50}
    with pytest.raises(R.ResultsError, match="no probes of model 'huge'"):
        R.lp_baselines(probes, model="huge")


def test_component_names_labels_and_order_come_from_the_registry():
    from vitef.models.components import DISPLAY_NAMES, DISPLAY_ORDER

    assert R.COMPONENT_LABELS is DISPLAY_NAMES and R.COMPONENT_ORDER == list(DISPLAY_ORDER)
    assert [R.component_label(c) for c in ("mha", "ln1", "all", "emb", "fc1+fc2")] == [
        "MHA",
        "LN1",
        "all",
        "emb",
        "FC1+FC2",
    ]
    # Runs saved before `trainable` was stored canonical hold the name as typed: tables show the registry's.
    assert R.trainable_name(["attn"]) == "mha" and R.trainable_name(["ffn_fc1", "fc2"]) == "fc1+fc2"
    assert R.trainable_name("all") == "all" and R.trainable_name(["mystery"]) == "mystery"


def test_damaged_probe_config_is_one_clear_error(tmp_path):
    out = write_probe(tmp_path, "cifar10", 0.80)
    (out / "config.yaml").write_text("dataset_name: [cifar10\n")
    with pytest.raises(R.ResultsError, match="config.yaml.*not valid YAML.*probe that model again"):
        R.collect_probes(tmp_path)
