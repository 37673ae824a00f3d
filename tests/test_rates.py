"""vitef.rates: the measured-rates table, the GPU-hours of a list of runs, and the sweep dry run's cost summary."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from apps.vit import sweep as sweep_app
from apps.vit.train import TrainConfig
from vitef.config import build_config
from vitef.errors import ConfigError
from vitef.rates import COLUMNS, CostKey, RunCost, estimate, find_rate, read_rates, train_run_cost, trainable_key
from vitef.sweep import SweepConfig, expand

ROOT = Path(__file__).resolve().parents[1]
HEADER = ",".join(COLUMNS)
BASE = CostKey("vit_base_patch16_224", 224, "fp32", False)


def row(**over) -> str:
    values = {
        "model": "vit_base_patch16_224",
        "img_size": "224",
        "precision": "fp32",
        "compile": "false",
        "trainable": "all",
        "batch": "256",
        "gpu": "NVIDIA H200",
        "what": "step",
        "images_per_s": "413",
        "date": "",
        "commit": "",
        "torch": "2.11",
        "timm": "1.0.29",
        "source": "test",
        "notes": "",
        **over,
    }
    return ",".join(values[c] for c in COLUMNS)


def table(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    path = tmp_path / "rates.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_repository_table_parses_with_the_issue_13_and_measured_rates():
    rates = read_rates(ROOT / "benchmarks" / "rates.csv")
    report = {(r.what, r.precision, r.compile): r.images_per_s for r in rates if r.source == "issue 13 report"}
    assert report[("step", "fp32", False)] == 413 and report[("step", "bf16", False)] == 2509
    assert report[("app", "bf16", True)] == 3200 and report[("plain", "bf16", True)] == 3575
    assert all(r.source for r in rates)
    # The benchmarks' own rows (gpu_check.sh on an H200): dated, with the commit measured.
    measured = [r for r in rates if r.source.startswith("python -m benchmarks.") and r.gpu == "NVIDIA H200"]
    assert measured and all(r.date and r.commit and r.torch and r.timm for r in measured)
    tf32 = [r.images_per_s for r in measured if (r.what, r.precision, r.compile) == ("step", "tf32", False)]
    assert tf32 and min(tf32) >= 1150  # issue 13's acceptance figure


def test_rows_parse_with_their_types_and_line(tmp_path):
    path = table(tmp_path, row(), row(trainable="FC2+fc1", compile="TRUE", batch="", date="2026-01-02", what="app"))
    first, second = read_rates(path)
    assert (first.img_size, first.compile, first.batch, first.images_per_s, first.line) == (224, False, 256, 413.0, 2)
    assert (second.trainable, second.compile, second.batch, second.date, second.line) == ("fc1+fc2", True, None,
                                                                                        "2026-01-02", 3)  # fmt: skip
    assert trainable_key(["mha", "all"]) == "all" and trainable_key(["attn"]) == "mha"


@pytest.mark.parametrize(
    ("over", "column"),
    [
        ({"images_per_s": "fast"}, "images_per_s"),
        ({"images_per_s": "0"}, "images_per_s"),
        ({"img_size": "224.5"}, "img_size"),
        ({"precision": "fp8"}, "precision"),
        ({"compile": "yes"}, "compile"),
        ({"what": "bench"}, "what"),
        ({"trainable": "mlp"}, "trainable"),
        ({"date": "May 2026"}, "date"),
        ({"batch": "-1"}, "batch"),
        ({"gpu": ""}, "gpu"),
    ],
)
def test_a_bad_row_names_the_file_line_and_column(tmp_path, over, column):
    path = table(tmp_path, row(), row(**over))
    with pytest.raises(ConfigError, match=rf"rates table {path}, line 3: {column}="):
        read_rates(path)


def test_a_bad_header_or_a_short_row_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"line 1: the header has missing notes; unknown note: write exactly"):
        read_rates(table(tmp_path, header=HEADER.replace("notes", "note")))
    with pytest.raises(ConfigError, match=r"line 2: 15 fields expected"):
        read_rates(table(tmp_path, row(notes="a, b")))  # an unquoted comma
    with pytest.raises(ConfigError, match=r"cannot be read"):
        read_rates(tmp_path / "absent.csv")


def test_estimate_is_images_over_the_rate_by_hand(tmp_path):
    # The issue's arithmetic: 924 runs x 10k steps x 512 images at 413 images/s.
    rates = read_rates(table(tmp_path, row(), row(gpu="NVIDIA A100", images_per_s="700")))
    est = estimate([RunCost(BASE, "all", 10_000 * 512)] * 924, rates, source="rates.csv")
    assert est.images == 924 * 10_000 * 512
    h200, a100 = est.gpus
    assert h200.hours == pytest.approx(924 * 10_000 * 512 / 413 / 3600)  # 3,181.9 h
    assert a100.hours == pytest.approx(924 * 10_000 * 512 / 700 / 3600)
    lines = est.lines(app="train")
    assert lines[0].startswith("cost: 924 training runs, 4.73 G images (steps x batch_size each)")
    assert lines[1].startswith("  NVIDIA H200: 3,182 GPU-hours for vit_base_patch16_224 at 224 px, fp32, "
                               "compile=false at 413 images/s (step rate")  # fmt: skip
    assert lines[2].startswith("  NVIDIA A100: 1,877 GPU-hours") and len(lines) == 3


def test_frozen_runs_use_the_all_rate_as_an_upper_bound_unless_measured(tmp_path):
    rates = read_rates(table(tmp_path, row(), row(trainable="ln1", images_per_s="826")))
    costs = [RunCost(BASE, t, 1000) for t in ("all", "ln1", "mha", "mha")]
    assert find_rate(rates, "NVIDIA H200", BASE, "mha") == (rates[0], True)
    assert find_rate(rates, "NVIDIA H200", BASE, "ln1") == (rates[1], False)
    (g,) = estimate(costs, rates).gpus
    assert g.hours == pytest.approx((3000 / 413 + 1000 / 826) / 3600)
    assert g.parts[0].fallback == {"mha": 2}
    assert "; 2 runs train part of the model (mha) at trainable=all's rate: an upper bound" in g.lines()[0]


def test_rate_preference_app_then_step_then_latest_and_never_plain(tmp_path):
    rows = [row(what="plain", images_per_s="9999"), row(date="2026-02-01"), row(date="2026-03-01", images_per_s="450"),
            row(date="2026-01-01", images_per_s="500")]  # fmt: skip
    rates = read_rates(table(tmp_path, *rows))
    assert find_rate(rates, "NVIDIA H200", BASE, "all")[0].images_per_s == 450
    rates += read_rates(table(tmp_path, row(what="app", images_per_s="300")))
    assert find_rate(rates, "NVIDIA H200", BASE, "all")[0].images_per_s == 300
    only_plain = read_rates(table(tmp_path, row(what="plain")))
    assert estimate([RunCost(BASE, "all", 1)], only_plain).gpus == []  # a GPU with plain rows only is not listed


def test_unmeasured_runs_are_said_so(tmp_path):
    rates = read_rates(table(tmp_path, row()))
    fp16 = dataclasses.replace(BASE, precision="fp16")
    lines = estimate([RunCost(fp16, "all", 100)] * 3, rates, source="r.csv").lines()
    assert lines[1] == "  NVIDIA H200: rate unmeasured for vit_base_patch16_224 at 224 px, fp16, compile=false (3 runs)"
    assert lines[2].startswith("  to estimate the unmeasured runs, measure their rate (python -m benchmarks.train")
    mixed = estimate([RunCost(fp16, "all", 100), RunCost(BASE, "all", 413 * 3600)], rates).lines()
    assert mixed[1] == "  NVIDIA H200: >= 1.0 GPU-hours (the runs with a measured rate only)"
    assert mixed[2] == "    rate unmeasured for vit_base_patch16_224 at 224 px, fp16, compile=false: 1 runs, 100 images"
    assert mixed[3].startswith("    1.0 GPU-hours for vit_base_patch16_224 at 224 px, fp32, compile=false: 1 runs")
    assert estimate([RunCost(BASE, "all", 1)], []).lines()[1] == "  no rate measured in the rates table: GPU-hours " \
                                                                 "not estimated"  # fmt: skip
    assert estimate([None, None], rates).lines(app="analysis") == [
        "cost: not estimated for app analysis (2 runs): only training runs have a cost model "
        "(steps x batch_size images at a measured rate)"
    ]


def test_train_run_cost_reads_the_training_config():
    cfg = build_config(TrainConfig, {"steps": 3000, "batch_size": 64, "trainable": ["fc2", "fc1"], "precision": "bf16"})
    assert train_run_cost(cfg) == RunCost(CostKey("vit_base_patch16_224", 224, "bf16", False), "fc1+fc2", 192_000)
    big = build_config(TrainConfig, {"model": {"name": "vit_large_patch16_224.augreg_in21k", "img_size": 384}})
    assert train_run_cost(big).key == CostKey("vit_large_patch16_224", 384, "fp32", False)
    small = build_config(TrainConfig, {"model": {"name": "vit_tiny_patch16_224", "overrides": {"depth": 2}}})
    assert train_run_cost(small).key.model == 'vit_tiny_patch16_224+{"depth":2}'  # only its own row matches


def test_dry_run_prints_the_cost_after_the_runs(tmp_path, capsys):
    cfg = build_config(
        SweepConfig,
        {"name": "t", "app": "train", "root": str(tmp_path / "out"), "overrides": {"steps": 10_000, "batch_size": 512},
         "grid": {"trainable": [["all"], ["mha"]], "seed": [0, 1]}, "run_name": "{trainable}/s{seed}"},
    )  # fmt: skip
    runs = expand(cfg, sweep_app.app_module(cfg.app))
    sweep_app.print_runs(cfg, runs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == "4 runs in sweep t (4 new): 4 to launch on backend local"
    assert lines[5] == (
        f"cost: 4 training runs, 20.5 M images (steps x batch_size each); GPU-hours = images / the images/s "
        f"measured in {sweep_app._shown_path(sweep_app.RATES_FILE)}"
    )
    assert lines[6].startswith(
        "  NVIDIA H200: 14 GPU-hours for vit_base_patch16_224 at 224 px, fp32, compile=false at 410 images/s"
    )  # fmt: skip  (4 x 5.12 M / 410 / 3600 = 13.9: the latest measured step rate)
    assert lines[6].endswith("; 2 runs train part of the model (mha) at trainable=all's rate: an upper bound")
    # another table; a missing one is said so
    rates = table(tmp_path, row(gpu="NVIDIA A100", images_per_s="1024", precision="fp32"))
    assert sweep_app.cost_lines(cfg, runs, rates)[1].startswith("  NVIDIA A100: 5.6 GPU-hours")
    assert sweep_app.cost_lines(cfg, runs, tmp_path / "none.csv")[1].endswith("none.csv (not found): GPU-hours "
                                                                             "not estimated")  # fmt: skip


def test_readme_table_script_marks_sources(tmp_path, monkeypatch):
    from benchmarks import rates as script

    monkeypatch.setattr(script, "SWEEPS", (("digits", "apps/vit/sweeps/digits.yaml"),))
    out = script.table(table(tmp_path, row())).splitlines()
    assert out[0] == ("| experiment | command | runs | images | H200 GPU-hours, as configured (fp32) | "
                      "H200 GPU-hours, bf16 + compile |")  # fmt: skip
    assert out[2] == ("| digits | `python -m apps.vit.sweep config=apps/vit/sweeps/digits.yaml` | 48 | 307 k | "
                      "unmeasured | unmeasured |")  # fmt: skip


def test_measured_rates_are_written_atomically_and_read_back(tmp_path, monkeypatch):
    from vitef.rates import measured_rate, write_rates

    monkeypatch.setenv("VITEF_COMMIT", "0123456789abcdef")
    out = tmp_path / "measured.csv"
    a = measured_rate(
        model="vit_base_patch16_224", img_size=224, precision="tf32", compile=False, trainable=["mha", "ln1"],
        batch=256, what="step", images_per_s=1234.4, source="python -m benchmarks.train", notes="a, quoted", gpu="G",
    )  # fmt: skip
    write_rates(out, [a])
    b = dataclasses.replace(a, precision="bf16", compile=True, what="app", images_per_s=3601.0)
    write_rates(out, [b])  # appended after the first row
    rows = read_rates(out)
    assert [(r.precision, r.compile, r.what, r.images_per_s) for r in rows] == [
        ("tf32", False, "step", 1234.0),
        ("bf16", True, "app", 3601.0),
    ]
    assert rows[0].trainable == "ln1+mha" and rows[0].commit == "0123456789ab" and rows[0].notes == "a, quoted"
    assert rows[0].gpu == "G" and rows[0].batch == 256 and len(rows[0].date) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["measured.csv"]  # no temporary file left
