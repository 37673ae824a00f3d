"""vitef.sweep: grid expansion and naming, idempotent relaunch, failures, kill + resume, submitit backend.

The machinery is tested on tests/sweep_fake_app.py, a tiny app that follows the run-directory contract
and resumes from its checkpoint like apps.vit.train (tests/apps/test_sweep_app.py drives the real apps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml
from tiny import SWEEP_MODEL, sweep_train_overrides, untimed

from vitef.config import build_config
from vitef.errors import ConfigError
from vitef.sweep import SweepConfig, SweepError, expand, expand_dotted, format_value, launch

TESTS = Path(__file__).resolve().parent
APP = "sweep_fake_app"


@pytest.fixture(autouse=True)
def fake_app_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # for the subprocess backends


def sweep(tmp_path, **kw) -> SweepConfig:
    base = {
        "name": "t",
        "app": APP,
        "root": str(tmp_path / "out"),
        "run_name": "{dataset_name}/{trainable}/lr{lr}_s{seed}",
    }
    return build_config(SweepConfig, {**base, **kw})


def starts(run) -> list[int]:
    return [int(x) for x in (run.run_dir / "starts.txt").read_text().split()]


def test_grid_union_naming_and_layers(tmp_path):
    per_dataset = tmp_path / "b.yaml"
    per_dataset.write_text(yaml.safe_dump({"dataset_name": "b", "steps": 7, "seed": 5}))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"steps": 2, "optim": {"name": "adamw"}}))
    s = sweep(
        tmp_path,
        base=[str(base)],
        overrides={"optim.name": "sgd", "seed": 1},
        grids=[
            {"dataset_name": ["a"], "trainable": [["mha"], ["fc1", "fc2"]], "lr": [1e-3, 3e-2]},
            {"config": [str(per_dataset)], "optim.lr": [0.06]},
        ],
    )
    runs = expand(s, APP)
    assert len(runs) == 2 * 2 + 1
    names = [r.log_dir for r in runs]
    assert names[:2] == ["t/a/mha/lr0.001_s1", "t/a/mha/lr0.03_s1"]  # last grid key varies fastest
    assert names[2] == "t/a/fc1+fc2/lr0.001_s1"
    assert names[4] == "t/b/all/lr0.06_s1"  # dataset_name from the point's config file, seed from overrides
    last = runs[4].cfg
    # base < point's config file < overrides < grid point
    assert (last.steps, last.seed, last.optim.name, last.optim.lr) == (7, 1, "sgd", 0.06)
    assert runs[0].cfg.root == str(tmp_path / "out") and runs[0].cfg.log_dir == names[0]
    assert runs[0].run_dir == tmp_path / "out" / "runs" / names[0]
    # the fast per-point build equals a full build of every layer
    for run in runs:
        layers = [yaml.safe_load(base.read_text())]
        if "config" in run.point:
            layers.append(yaml.safe_load(per_dataset.read_text()))
        layers += [
            expand_dotted(dict(s.overrides)),
            expand_dotted({k: v for k, v in run.point.items() if k != "config"}),
        ]
        full = build_config(sys.modules[APP].CONFIG, *layers)
        assert dataclasses.replace(full, log_dir=run.log_dir, root=s.root) == run.cfg
    # nested grid keys fall back to the full build
    nested = expand(sweep(tmp_path, grid={"optim": [{"name": "adamw"}], "lr": [0.5]}, run_name="x"), APP)
    assert (nested[0].cfg.optim.name, nested[0].cfg.optim.lr) == ("adamw", 0.5)
    with pytest.raises(ConfigError, match="eval|steps must be >= 1"):  # combinations are validated as a whole
        expand(sweep(tmp_path, grid={"steps": [0, 1]}, run_name="{steps}"), APP)
    # deterministic: expanding again gives the same directories
    assert [r.run_dir for r in expand(s, APP)] == [r.run_dir for r in runs]


def test_names_are_filesystem_safe_and_default():
    assert format_value("corrupt:snow-5:cifar10") == "corrupt_snow-5_cifar10"
    assert format_value([0.9, 0.999]) == "0.9+0.999"
    assert format_value(3e-5) == "3e-05"
    assert format_value("a/b c") == "a_b_c"


def test_default_run_name_and_clashes(tmp_path):
    runs = expand(sweep(tmp_path, run_name="", grid={"seed": [0, 42], "optim.name": ["sgd"]}), APP)
    assert [r.log_dir for r in runs] == ["t/seed-0/name-sgd", "t/seed-42/name-sgd"]
    with pytest.raises(SweepError, match="both map to run directory"):
        expand(sweep(tmp_path, run_name="{dataset_name}", grid={"seed": [0, 1]}), APP)
    with pytest.raises(SweepError, match="placeholder '{nope}'"):
        expand(sweep(tmp_path, run_name="{nope}", grid={"seed": [0]}), APP)
    # overlapping grids give one run per distinct config
    assert len(expand(sweep(tmp_path, grids=[{"seed": [0, 1]}, {"seed": [1, 2]}]), APP)) == 3


def test_bad_sweeps_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        expand(sweep(tmp_path, grid={"optim.lrr": [1.0]}), APP)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        expand(sweep(tmp_path, grid={"steps": [0]}), APP)
    with pytest.raises(ConfigError, match="non-empty list"):
        sweep(tmp_path, grid={"seed": 3})
    with pytest.raises(ConfigError, match="backend"):
        sweep(tmp_path, backend="kubernetes")
    with pytest.raises(SweepError, match="CONFIG"):
        expand(sweep(tmp_path, app="vitef.utils"), "vitef.utils")


def test_in_process_runs_skips_completed_and_lists_failures(tmp_path):
    s = sweep(tmp_path, grid={"dataset_name": ["a", "b"], "seed": [0, 1], "fail": [False, True]},
              run_name="{dataset_name}/s{seed}_fail{fail}")  # fmt: skip
    result = launch(s, APP)
    assert (result.total, len(result.launched), len(result.skipped)) == (8, 8, 0)
    assert len(result.failures) == 4  # every failing run was tried: one failure does not stop the others
    assert all("TrainingError: fake failure" in f.message and "failtrue" in str(f.run_dir) for f in result.failures)
    runs = expand(s, APP)
    assert [r.status for r in runs] == ["completed", "failed"] * 4
    again = launch(s, APP)
    assert (len(again.skipped), len(again.launched), len(again.failures)) == (4, 4, 4)
    for r in runs:  # completed runs were not run again; failed ones were retried
        assert starts(r) == ([0, 0] if r.cfg.fail else [0])


def test_sweep_records_status_for_apps_that_do_not(tmp_path):
    s = sweep(tmp_path, grid={"seed": [0, 1]}, overrides={"write_status": False}, run_name="s{seed}")
    assert launch(s, APP).failures == []
    run = expand(s, APP)[0]
    assert json.loads((run.run_dir / "status.json").read_text())["status"] == "completed"
    assert launch(s, APP).launched == []
    # an app with another output directory (e.g. probing a finetuned run): the sweep keeps its own record
    outputs = lambda cfg: tmp_path / "probes" / f"seed{cfg.seed}"  # noqa: E731
    runs = expand(s, APP, run_dir=outputs)
    assert runs[1].status_path == tmp_path / "out" / "sweeps" / "t" / "s1.status.json"
    assert [r.status for r in runs] == ["missing", "missing"]
    assert launch(s, APP, runs).failures == []
    assert [r.status for r in runs] == ["completed", "completed"]
    assert not (tmp_path / "probes").exists()  # nothing written into the app's directories by the sweep


def test_parallel_subprocesses_killed_run_resumes(tmp_path):
    s = sweep(tmp_path, grid={"seed": [0, 1, 2]}, overrides={"steps": 4, "kill_at": 2},
              local={"max_parallel": 2, "gpus": [5, 7]})  # fmt: skip
    first = launch(s, APP)
    assert len(first.failures) == 3
    assert all("killed by signal 9" in f.message for f in first.failures)
    runs = expand(s, APP)
    assert {r.status for r in runs} == {"failed"}
    second = launch(s, APP)
    assert second.failures == [] and len(second.launched) == 3
    for r in runs:
        assert starts(r) == [0, 2]  # resumed from the checkpoint written before the kill
        assert json.loads((r.run_dir / "ckpt.json").read_text())["step"] == 4
        log = (tmp_path / "out" / "sweeps" / (r.log_dir + ".log")).read_text()
        assert log == ""  # the app prints nothing; its console output goes here
    # each concurrent run saw exactly one of the configured GPUs
    cfgs = [yaml.safe_load((tmp_path / "out" / "sweeps" / (r.log_dir + ".yaml")).read_text()) for r in runs]
    assert all(c["log_dir"] == r.log_dir for c, r in zip(cfgs, runs, strict=True))
    assert launch(s, APP).launched == []


def test_gpu_pinning(tmp_path, monkeypatch):
    import threading
    import time

    import vitef.sweep as sw

    lock, running, seen = threading.Lock(), [], []

    def fake_run(cmd, status, log, env=None, *lock_args):
        with lock:
            assert env["CUDA_VISIBLE_DEVICES"] not in running  # one run per GPU at a time
            running.append(env["CUDA_VISIBLE_DEVICES"])
            seen.append((env["CUDA_VISIBLE_DEVICES"], len(running)))
        time.sleep(0.05)
        with lock:
            running.remove(env["CUDA_VISIBLE_DEVICES"])

    monkeypatch.setattr(sw, "run_command", fake_run)
    result = launch(sweep(tmp_path, grid={"seed": [0, 1, 2, 3, 4]}, local={"max_parallel": 2, "gpus": [5, 7]}), APP)
    assert result.failures == [] and len(seen) == 5
    assert {g for g, _ in seen} == {"5", "7"} and max(n for _, n in seen) == 2


@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_submitit_backend(tmp_path, cluster):
    s = sweep(
        tmp_path,
        grid={"fail": [False, True]},
        run_name="fail{fail}",
        backend="slurm",
        slurm={"cluster": cluster, "gpus_per_job": 0, "cpus_per_job": 1, "time_min": 5, "wait": True,
               "partition": "gpu", "array_parallelism": 2},
    )  # fmt: skip
    result = launch(s, APP)
    assert len(result.submitted) == 2 and len(result.failures) == 1
    assert "error: TrainingError" not in result.failures[0].message  # the app's one-line message, not a repr
    assert "fake failure" in result.failures[0].message and "exit status 2" in result.failures[0].message
    assert [r.status for r in expand(s, APP)] == ["completed", "failed"]
    again = launch(s, APP)
    assert len(again.skipped) == 1 and len(again.launched) == 1


def test_finished_run_with_a_changed_config_is_stale_not_reused(tmp_path):
    s = sweep(tmp_path, grid={"seed": [0, 1]}, overrides={"steps": 3}, run_name="s{seed}")
    assert len(launch(s, APP).launched) == 2
    runs = expand(s, APP)
    statuses = [r.status_path.read_bytes() for r in runs]
    changed = sweep(tmp_path, grid={"seed": [0, 1]}, overrides={"steps": 2}, run_name="s{seed}")
    result = launch(changed, APP)
    assert (result.skipped, result.launched, result.failures) == ([], [], [])  # never silently reused
    assert [(st.status, st.differences) for st in result.stale] == [("completed", [("steps", 3, 2)])] * 2
    assert result.stale[0].describe() == "steps: 3 -> 2"
    assert [r.status_path.read_bytes() for r in runs] == statuses and [starts(r) for r in runs] == [[0], [0]]
    # a moved output root is not a change
    moved = sweep(tmp_path, grid={"seed": [0, 1]}, overrides={"steps": 3}, run_name="s{seed}")
    assert launch(dataclasses.replace(moved, root=str(tmp_path / "moved")), APP).stale == []
    # rerun when asked: from scratch (overwrite=true), then the runs are current
    rerun = launch(dataclasses.replace(changed, rerun_stale=True), APP)
    assert (len(rerun.launched), rerun.stale, rerun.failures) == (2, [], [])
    assert [starts(r) for r in runs] == [[0, 0], [0, 0]]
    assert [json.loads((r.run_dir / "ckpt.json").read_text())["step"] for r in runs] == [2, 2]
    again = launch(changed, APP)
    assert (len(again.skipped), again.stale) == (2, [])


def test_unfinished_stale_run_keeps_its_status_and_moved_root_resumes(tmp_path):
    """The real training app: an unfinished run resumes under a moved root; with a changed config it is
    listed as stale and its status.json is left as it was (it used to become 'failed, step null')."""
    overrides = sweep_train_overrides(2, 2, model=SWEEP_MODEL, dataset_name="digits_subset-56789")
    spec = {"name": "m", "app": "train", "root": str(tmp_path / "a"), "overrides": overrides, "grid": {"seed": [0]}}
    first = build_config(SweepConfig, {**spec, "run_name": "s{seed}"})
    assert launch(first, "apps.vit.train").failures == []

    def interrupt(root: Path) -> Path:  # as if killed after its last checkpoint, before the test evaluation
        run = root / "runs" / "m" / "s0"
        (run / "status.json").write_text(json.dumps({"status": "running", "step": 2, "message": "checkpointed"}))
        (run / "eval.json").unlink()
        return run

    interrupt(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    moved = dataclasses.replace(first, root=str(tmp_path / "b"))
    result = launch(moved, "apps.vit.train")
    assert (len(result.launched), result.failures, result.stale) == (1, [], [])
    run = tmp_path / "b" / "runs" / "m" / "s0"
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # resumed, not retrained

    interrupt(tmp_path / "b")
    before = (run / "status.json").read_bytes()
    changed = dataclasses.replace(moved, overrides={**overrides, "steps": 4, "eval_period": 4})
    result = launch(changed, "apps.vit.train")
    assert (result.launched, result.failures) == ([], [])
    assert [st.differences for st in result.stale] == [[("eval_period", 2, 4), ("steps", 2, 4)]]
    assert (run / "status.json").read_bytes() == before


def test_sweep_file_app_is_restricted_to_the_projects_apps(monkeypatch):
    from apps.vit.sweep import TEST_APPS_ENV, app_module

    assert app_module("train") == "apps.vit.train"
    assert app_module("apps.vit.pretrain") == "apps.vit.pretrain"
    for bad in ("os", "sweep_fake_app", "apps.vit.nope", "apps.vit.train; rm", "vitef.utils"):
        with pytest.raises(ConfigError, match=r"is unknown: choose one of train, eval, analysis, linear_probing or a"):
            app_module(bad)
    monkeypatch.setenv(TEST_APPS_ENV, "sweep_fake_app")  # the test suite's hook for its fake app
    assert app_module("sweep_fake_app") == "sweep_fake_app"


def test_config_differences_across_code_versions():
    import importlib

    from vitef.sweep import config_differences

    cfg = build_config(importlib.import_module(APP).CONFIG, {"steps": 2, "log_dir": "x"})
    # saved before most fields existed (they count as their defaults), with a field since removed (ignored)
    saved = {"root": "/elsewhere", "log_dir": "x", "steps": 3, "removed_knob": 1, "optim": {"lr": 0.01, "gone": 0}}
    assert config_differences(saved, cfg) == [("steps", 3, 2)]


def test_a_run_the_app_refused_keeps_the_status_of_whoever_ran_it(tmp_path):
    """An attempt that fails before touching the run (here: before writing any status) leaves the status
    another process wrote; it used to become 'failed, step null'."""
    from vitef.sweep import run_in_process

    s = sweep(tmp_path, grid={"seed": [0]}, overrides={"fail": True, "write_status": False}, run_name="s{seed}")
    (run,) = expand(s, APP)
    run.run_dir.mkdir(parents=True)
    theirs = json.dumps({"status": "running", "step": 5, "message": "another process"})
    run.status_path.write_text(theirs)
    err = run_in_process(APP, run.cfg, run.status_path, run.run_dir, own_status=True)
    assert "fake failure" in err and run.status_path.read_text() == theirs
    # an attempt that runs writes its own status as usual
    ok = dataclasses.replace(run.cfg, write_status=True, fail=False)
    assert run_in_process(APP, ok, run.status_path, run.run_dir) is None
    assert json.loads(run.status_path.read_text())["status"] == "completed"


def _outputs(root: Path) -> dict[str, object]:
    """Every file a sweep wrote under ``root`` (status.json without its time), by relative path."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix == ".log" or path.name == "pid":
            continue  # console logs and pids differ by design
        rel = str(path.relative_to(root))
        if path.name.endswith("status.json"):
            status = json.loads(path.read_text())
            status.pop("time", None)
            out[rel] = status
        elif path.suffix == ".yaml":
            out[rel] = path.read_text().replace(str(root), "<root>")
        else:
            out[rel] = path.read_bytes()
    return out


def test_forked_runs_record_what_in_process_runs_record(tmp_path):
    import os

    grid = {"dataset_name": ["a", "b"], "seed": [0, 1], "fail": [False, True]}
    spec = dict(grid=grid, run_name="{dataset_name}/s{seed}_fail{fail}", overrides={"sleep": 0.01})
    seq = sweep(tmp_path / "seq", **spec)
    forked = sweep(tmp_path / "fork", **spec, local={"max_parallel": 2, "fork": True})
    probes = lambda cfg: Path(cfg.root) / "probes" / cfg.log_dir  # noqa: E731 (the sweep keeps their status)
    results = {}
    for name, s in (("seq", seq), ("fork", forked)):
        results[name] = (launch(s, APP), launch(s, APP, expand(s, APP, run_dir=probes)))
    for a, b in zip(results["seq"], results["fork"], strict=True):
        assert (a.total, len(a.launched), len(a.skipped), a.busy, a.stale) == (8, 8, 0, [], [])
        assert (b.total, len(b.launched), len(b.skipped), b.busy, b.stale) == (8, 8, 0, [], [])
        assert [f.message for f in a.failures] == [f.message for f in b.failures]
        assert len(b.failures) == 4 and all("TrainingError: fake failure in t/" in f.message for f in b.failures)
        assert [f.run_dir.relative_to(tmp_path / "fork") for f in b.failures] == [
            f.run_dir.relative_to(tmp_path / "seq") for f in a.failures
        ]
    seq_files, fork_files = _outputs(tmp_path / "seq"), _outputs(tmp_path / "fork")
    assert fork_files == seq_files
    assert len([k for k in fork_files if k.startswith("out/sweeps/") and k.endswith(".status.json")]) == 8
    # the first run ran in this process (warming it up), each other one in a child of its own
    pids = {str(p.relative_to(tmp_path / "fork")): int(p.read_text()) for p in (tmp_path / "fork").rglob("pid")}
    assert len(pids) == 4  # the 4 runs that do not fail write theirs
    assert pids.pop("out/runs/t/a/s0_failfalse/pid") == os.getpid()
    assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
    assert {int(p.read_text()) for p in (tmp_path / "seq").rglob("pid")} == {os.getpid()}
    again = launch(forked, APP)  # completed runs skipped, failed ones retried
    assert (len(again.skipped), len(again.launched), len(again.failures)) == (4, 4, 4)


def test_forked_child_failures_are_that_runs_failures(tmp_path, monkeypatch):
    """A child that calls sys.exit, exits or is killed is its run's failure, recorded; the others complete."""
    import importlib
    import os

    fake = importlib.import_module(APP)
    real_main = fake.main

    def main(cfg):  # the children are forks of this process: they run this patch
        if cfg.seed in (1, 2):  # started, then ended without a word
            run = Path(cfg.root) / "runs" / cfg.log_dir
            run.mkdir(parents=True)
            fake.atomic_write_json(run / "status.json", {"status": "running", "step": 0, "message": ""})
        if cfg.seed == 1:
            sys.exit("bye")
        if cfg.seed == 2:
            os._exit(3)
        real_main(dataclasses.replace(cfg, kill_at=2) if cfg.seed == 3 else cfg)

    monkeypatch.setattr(fake, "main", main)
    s = sweep(tmp_path, grid={"seed": [0, 1, 2, 3]}, overrides={"steps": 4}, run_name="s{seed}",
              local={"max_parallel": 2, "fork": True})  # fmt: skip
    result = launch(s, APP)
    assert len(result.launched) == 4
    messages = {f.run_dir.name: f.message for f in result.failures}
    assert sorted(messages) == ["s1", "s2", "s3"]
    assert messages["s1"] == "SystemExit: bye"
    assert messages["s2"].startswith("(exit status 3; log: ") and messages["s2"].endswith("s2.log)")
    assert "(killed by signal 9; log: " in messages["s3"]
    runs = expand(s, APP)
    assert [r.status for r in runs] == ["completed", "failed", "failed", "failed"]
    for r in runs[1:]:  # the app wrote 'running', never finished: the sweep recorded the failure
        assert json.loads(r.status_path.read_text())["message"] == messages[r.run_dir.name]
    monkeypatch.setattr(fake, "main", real_main)
    again = launch(s, APP)
    assert (again.failures, len(again.launched)) == ([], 3)
    assert [starts(r) for r in runs] == [[0], [0], [0], [0, 2]]  # s3 resumed from its checkpoint


def test_fork_refuses_gpus_and_falls_back_where_fork_is_missing(tmp_path, monkeypatch, caplog):
    import multiprocessing
    import os

    with pytest.raises(ConfigError, match=r"local.fork=true cannot be used with local.gpus=\[0\]: CUDA cannot"):
        sweep(tmp_path, local={"max_parallel": 2, "fork": True, "gpus": [0]})
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    s = sweep(tmp_path, grid={"seed": [0, 1]}, overrides={"sleep": 0.01}, run_name="s{seed}",
              local={"max_parallel": 2, "fork": True})  # fmt: skip
    with caplog.at_level("WARNING", logger="vitef.sweep"):
        result = launch(s, APP)
    assert "local.fork=true: this platform cannot fork processes; the runs go in sequence" in caplog.text
    assert result.failures == [] and len(result.launched) == 2
    assert {int(p.read_text()) for p in (tmp_path / "out").rglob("pid")} == {os.getpid()}


def test_forked_training_runs_are_bit_identical_to_in_process_ones(tmp_path):
    """The real training app: forked children (one thread each) train exactly as the in-process sweep does
    on one thread (float sums depend on the thread count, so the in-process side runs on one too)."""
    import torch

    overrides = sweep_train_overrides(3, 3, model=SWEEP_MODEL, dataset_name="digits_subset-56789")
    spec = {"name": "m", "app": "train", "overrides": overrides, "grid": {"trainable": [["mha"], ["ln1", "fc2"]]},
            "run_name": "{trainable}"}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = build_config(SweepConfig, {**spec, "root": str(tmp_path / "seq")})
        assert launch(seq, "apps.vit.train").failures == []
    finally:
        torch.set_num_threads(threads)
    forked = build_config(
        SweepConfig, {**spec, "root": str(tmp_path / "fork"), "local": {"max_parallel": 2, "fork": True}}
    )
    result = launch(forked, "apps.vit.train")
    assert (result.failures, len(result.launched)) == ([], 2)
    assert torch.get_num_threads() == threads  # the children's thread setting stayed in the children
    for name in ("mha", "ln1+fc2"):
        a, b = tmp_path / "seq" / "runs" / "m" / name, tmp_path / "fork" / "runs" / "m" / name
        assert untimed(json.loads((b / "eval.json").read_text())) == untimed(json.loads((a / "eval.json").read_text()))
        weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
        assert len(weights) == 2  # best + last
        for rel in weights:
            assert (b / rel).read_bytes() == (a / rel).read_bytes()
        assert json.loads((b / "status.json").read_text())["status"] == "completed"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("fork", [False, True], ids=["subprocesses", "forked"])
def test_a_sweep_killed_with_sigkill_takes_its_running_children_with_it(tmp_path, fork):
    # SIGKILL gives the sweep no chance to stop its children, which sit in their own process groups: the kernel
    # must end them when the sweep dies, or they would go on training unsupervised.
    import os
    import signal
    import subprocess
    import time

    # Seed 0 is quick: the fork backend makes the first run in the sweep's own process, before forking the others.
    grids = [{"seed": [0]}, {"seed": [1, 2], "sleep": [120.0]}]
    s = sweep(tmp_path, grids=grids, local={"max_parallel": 2, "fork": fork})
    script = (
        "import sys, yaml\n"
        "from vitef.config import build_config\n"
        "from vitef.sweep import SweepConfig, launch\n"
        f"launch(build_config(SweepConfig, yaml.safe_load(open(sys.argv[1]))), {APP!r})\n"
    )
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(dataclasses.asdict(s)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    sweeper = subprocess.Popen([sys.executable, "-c", script, str(cfg)], env=env, stderr=subprocess.DEVNULL)
    try:
        pid_files = [r.run_dir / "pid" for r in expand(s, APP) if r.cfg.sleep]
        deadline = time.monotonic() + 60
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert sweeper.poll() is None and time.monotonic() < deadline, "the runs did not start"
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in pid_files]
        assert all(_alive(pid) for pid in pids)
        sweeper.kill()
        sweeper.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids), "children outlived the SIGKILLed sweep"
    finally:
        sweeper.kill()
        for pid_file in tmp_path.rglob("pid"):  # never leave a sleeper behind, whatever failed
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_slurm_task_warned_of_its_time_limit_stops_its_run_and_is_requeued(tmp_path):
    # submitit's warning signal (SIGUSR2, signal_delay_s before the time limit) reaches the task: the task stops its
    # app with SIGTERM (the app saves a checkpoint and exits 143) and submitit requeues it; the requeued task runs
    # the app again, which resumes and completes. submitit's local cluster sends the signal and requeues as SLURM.
    submitit = pytest.importorskip("submitit")
    from vitef.sweep import _ArrayTask, command_for, launch_files

    s = sweep(tmp_path, overrides={"sleep": 120.0, "graceful": True, "steps": 2}, run_name="r")
    (run,) = expand(s, APP)
    _, log = launch_files(s, run)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=1.0, signal_delay_s=50)  # the warning after 10 s
    args = (command_for(s, run, APP), str(run.status_path), str(log), None, str(run.run_dir), True)
    job = executor.submit(_ArrayTask(), *args)
    assert job.result() is None  # requeued once, then completed
    assert (run.run_dir / "stopped").exists() and starts(run) == [0, 0]
    assert json.loads(run.status_path.read_text())["status"] == "completed"
    assert "Caught signal SIGUSR2" in (tmp_path / "submitit" / f"{job.job_id}_0_log.err").read_text()
