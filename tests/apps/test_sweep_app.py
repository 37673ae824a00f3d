"""apps.vit.sweep from the command line: dry run, kill + resume, failures listed, the real training app,
and the study's sweep files (run counts of PROTOCOL.md §2)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import yaml
from tiny import digits_train_sweep

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
# the fake app lives in tests/; sweep files may name it through the test hook only
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "VITEF_SWEEP_TEST_APPS": "sweep_fake_app"}


def write_sweep(tmp_path: Path, **kw) -> Path:
    data = {"name": "cli", "app": "sweep_fake_app", "root": str(tmp_path / "out"), **kw}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dry_run_lists_runs_and_runs_nothing(tmp_path, run_inprocess):
    path = write_sweep(tmp_path, grids=[{"dataset_name": ["a", "b"], "seed": [0, 1]}, {"dataset_name": ["c"]}],
                       run_name="{dataset_name}/s{seed}")  # fmt: skip
    r = run_inprocess("apps.vit.sweep", f"config={path}", "--dry-run", env=ENV)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 7 and lines[-2].startswith("5 runs in sweep cli (5 new): 5 to launch")
    assert lines[-1].startswith("cost: not estimated for app sweep_fake_app (5 runs): only training runs")
    assert f"new        {tmp_path / 'out/runs/cli/a/s1'}  dataset_name=a seed=1" in lines
    assert not (tmp_path / "out").exists()


def test_killed_sweep_resumes_and_skips_completed(tmp_path, run_app, run_inprocess):
    # the second run SIGKILLs its own process at step 2 (in-process backend: the whole sweep dies); the
    # relaunches run in this process (the fake app kills itself once only)
    path = write_sweep(tmp_path, grid={"seed": [0, 1, 2]}, overrides={"steps": 4}, run_name="s{seed}")
    cfg = yaml.safe_load(path.read_text())
    cfg["grids"] = [{"seed": [0]}, {"seed": [1], "kill_at": [2]}, {"seed": [2]}]
    del cfg["grid"]
    path.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "out" / "runs" / "cli"
    first = run_app("apps.vit.sweep", f"config={path}", env=ENV)
    assert first.returncode == -signal.SIGKILL
    assert [json.loads((runs / f"s{i}" / "status.json").read_text())["status"] for i in (0, 1)] == [
        "completed",
        "running",
    ]
    assert not (runs / "s2").exists()
    second = run_inprocess("apps.vit.sweep", f"config={path}", env=ENV)
    assert second.returncode == 0, second.stderr
    assert "3 runs, 1 already completed (skipped), 2 launched, 0 failed" in second.stdout
    assert (runs / "s0" / "starts.txt").read_text() == "0\n"  # not run again
    assert (runs / "s1" / "starts.txt").read_text() == "0\n2\n"  # resumed from its checkpoint
    assert (runs / "s2" / "starts.txt").read_text() == "0\n"
    third = run_inprocess("apps.vit.sweep", f"config={path}", env=ENV)
    assert "3 runs, 3 already completed (skipped), 0 launched" in third.stdout


def test_failures_are_listed_and_exit_nonzero(tmp_path, run_inprocess):
    path = write_sweep(tmp_path, grid={"seed": [0, 1], "fail": [True, False]}, run_name="s{seed}_{fail}")
    r = run_inprocess("apps.vit.sweep", f"config={path}", env=ENV)
    assert r.returncode == 2
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
    assert failed == [
        f"FAILED {tmp_path / 'out/runs/cli' / f's{i}_true'}: TrainingError: fake failure in cli/s{i}_true"
        for i in (0, 1)
    ]
    assert "error: 2 of 4 launched runs failed (listed above)" in r.stderr


def test_bad_sweep_file_is_one_clear_error(tmp_path, run_inprocess):
    r = run_inprocess("apps.vit.sweep", f"config={write_sweep(tmp_path, grid={'optim.lrr': [1]})}", env=ENV)
    assert r.returncode == 2 and "unknown config key 'optim.lrr'" in r.stderr
    r = run_inprocess("apps.vit.sweep", f"config={write_sweep(tmp_path, app='nope')}", env=ENV)
    assert r.returncode == 2 and "app='nope' is unknown" in r.stderr


def test_real_training_app_runs_and_is_skipped_on_relaunch(tmp_path, run_inprocess):
    path = tmp_path / "digits.yaml"
    sweep = digits_train_sweep(
        "tiny",
        tmp_path / "out",
        "{dataset_name}/{trainable}",
        steps=2,
        eval_period=1,
        dataset_name="digits_subset-56789",
    )
    path.write_text(yaml.safe_dump(sweep))
    r = run_inprocess("apps.vit.sweep", f"config={path}", env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 runs, 0 already completed (skipped), 2 launched, 0 failed" in r.stdout
    for comp in ("mha", "ln1"):
        run = tmp_path / "out/runs/tiny/digits_subset-56789" / comp
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        assert 0 <= json.loads((run / "eval.json").read_text())["acc"] <= 1
        assert yaml.safe_load((run / "config.yaml").read_text())["trainable"] == [comp]
    r = run_inprocess("apps.vit.sweep", f"config={path}", env=ENV)
    assert "2 runs, 2 already completed (skipped), 0 launched" in r.stdout


STUDY = {  # sweep file: runs (PROTOCOL.md §2)
    "main": 924,  # 11 datasets x 7 configurations x 4 lrs x 3 seeds
    "adamw": 288,  # 4 datasets x 6 x 4 x 3
    "model_size": 144,  # 2 models x 6 x 4 x 3
    "plasticity": 33,  # 3 models x 11 datasets
    "linear_probing": 11,
    "digits": 48,
}


@pytest.mark.parametrize("name", sorted(STUDY))
def test_study_sweep_files_expand(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # sweep files name config files relative to the repository root
    import apps.vit.sweep as app
    from vitef.config import load_config
    from vitef.sweep import expand

    cfg = load_config(app.SweepConfig, [f"config={ROOT / 'apps/vit/sweeps' / f'{name}.yaml'}"])
    runs = expand(cfg, app.app_module(cfg.app))
    assert len(runs) == STUDY[name]
    assert len({r.run_dir for r in runs}) == len(runs)
    if name == "main":
        lrs = {(r.cfg.dataset_name.startswith("domainnet"), r.cfg.optim.lr) for r in runs}
        assert lrs == {(False, x) for x in (1e-3, 3e-3, 1e-2, 3e-2)} | {(True, x) for x in (3e-3, 1e-2, 3e-2, 6e-2)}
        assert {r.cfg.seed for r in runs} == {0, 42, 3407} and {r.cfg.optim.name for r in runs} == {"sgd"}
        assert len({r.cfg.dataset_name for r in runs}) == 11
    if name == "model_size":
        acc = {(r.cfg.model.name, r.cfg.batch_size, r.cfg.optim.grad_accumulation) for r in runs}
        assert acc == {("large", 512, 4), ("huge", 512, 8)}


@pytest.mark.parametrize(
    ("name", "folder", "own_status"),
    [("plasticity", "analysis", False), ("linear_probing", "probes", False), ("digits", "runs", True)],
)
def test_apps_declare_their_run_directory(name, folder, own_status, monkeypatch):
    # Each app module says where it writes (run_dir(cfg)); apps without one follow <root>/runs/<log_dir> and keep
    # their own status.json. The short name and the module name of an app give the same runs.
    monkeypatch.chdir(ROOT)
    import apps.vit.sweep as app
    from vitef.config import load_config
    from vitef.sweep import expand

    cfg = load_config(app.SweepConfig, [f"config={ROOT / 'apps/vit/sweeps' / f'{name}.yaml'}", "root=out"])
    runs = expand(cfg, app.app_module(cfg.app))
    assert {r.run_dir.relative_to("out").parts[0] for r in runs} == {folder}
    assert {r.own_status for r in runs} == {own_status}
    if not own_status:  # the sweep keeps the status of apps that do not write one
        assert all(r.status_path.is_relative_to(Path("out") / "sweeps") for r in runs)
    by_module = expand(cfg, app.APPS[cfg.app])
    assert [(r.run_dir, r.own_status) for r in by_module] == [(r.run_dir, r.own_status) for r in runs]


def test_main_grid_dry_run_shows_924_and_their_cost(run_inprocess):
    r = run_inprocess("apps.vit.sweep", "config=apps/vit/sweeps/main.yaml", "root=/nonexistent-vitef", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    end = lines.index("924 runs in sweep main (924 new): 924 to launch on backend local")
    assert end == 924
    # 84 runs per dataset x (7 x 10k + 2 x 20k + 5k + 4k steps) x 512 images = 5.118 G images
    assert lines[end + 1] == (
        "cost: 924 training runs, 5.12 G images (steps x batch_size each); GPU-hours = images / the images/s "
        "measured in benchmarks/rates.csv"
    )
    h200 = next(line for line in lines[end + 2 :] if line.startswith("  NVIDIA H200: "))
    found = re.match(r"  NVIDIA H200: ([\d,]+) GPU-hours for vit_base_patch16_224 at 224 px, fp32, compile=false at "
                     r"([\d,]+) images/s \(step rate", h200)  # fmt: skip
    assert found, h200
    hours, rate = found.group(1), float(found.group(2).replace(",", ""))
    assert hours == f"{84 * 119_000 * 512 / rate / 3600:,.0f}"
    assert h200.endswith("792 runs train part of the model (emb, ln1, mha, ln2, fc1, fc2) at trainable=all's rate: "
                         "an upper bound")  # fmt: skip
    # the README's GPU-hour column is this estimate (python -m benchmarks.rates writes it)
    readme = next(line for line in (ROOT / "README.md").read_text().splitlines() if "sweeps/main.yaml` | 924 |" in line)
    assert f"| {hours} † (step) |" in readme
