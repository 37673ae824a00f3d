"""Run-directory locks (vitef.monitor.lock): one process per run, sweeps skip runs held elsewhere, two real
sweeps racing on one grid train each run once, and a stopped parallel sweep ends its children."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import digits_train_sweep

from vitef.config import build_config
from vitef.errors import ConfigError
from vitef.monitor import RunDir
from vitef.monitor.lock import LOCK_FILE, RunLock, RunLockedError, holder
from vitef.sweep import SweepConfig, launch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
LOCK_PY = ROOT / "src" / "vitef" / "monitor" / "lock.py"
ENV = {"PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "VITEF_SWEEP_TEST_APPS": "sweep_fake_app"}

# Another process holding a run's lock: lock.py loaded by path (no torch import: starts in a blink).
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("vitef_lock", sys.argv[1])
lock = sys.modules["vitef_lock"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)
lock.RunLock(sys.argv[2], purpose="test holder").acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def hold():
    """``hold(run_dir)`` starts another process that holds the run's lock; returns it (killed at teardown)."""
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(LOCK_PY), str(run_dir)], stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout.readline().strip() == b"locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has ended; only its exit status is left


def test_second_process_is_refused_and_a_dead_holders_lock_is_free(tmp_path, hold):
    run = tmp_path / "runs" / "r"
    proc = hold(run)
    with pytest.raises(RunLockedError) as e:
        RunLock(run, wait_s=0.2).acquire()
    message = str(e.value)
    assert f"pid {proc.pid} on host" in message and "test holder" in message and "\n" not in message
    assert holder(run)["pid"] == proc.pid
    assert e.value.holder["purpose"] == "test holder"
    proc.kill()  # SIGKILL: no clean-up ran, the kernel dropped the lock
    proc.wait()
    assert holder(run) is None
    with RunLock(run, purpose="second") as lock:
        assert lock.held and json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert holder(run)["purpose"] == "this process"
    assert (run / LOCK_FILE).read_text() == ""  # released: emptied, left in place


def test_nesting_cleanup_and_errors(tmp_path):
    fresh = tmp_path / "a" / "b" / "c"
    outer = RunLock(fresh).acquire()
    inner = RunLock(fresh).acquire()  # the same process nests
    inner.release()
    assert (fresh / LOCK_FILE).is_file() and holder(fresh) is not None
    outer.release()
    assert not (tmp_path / "a").exists()  # nothing written: the folders it created are gone again
    with RunLock(fresh):
        (fresh / "status.json").write_text("{}")
    assert sorted(p.name for p in fresh.iterdir()) == [LOCK_FILE, "status.json"]
    mine = tmp_path / "mine"  # e.g. log_dir naming a folder that is no run: the app refuses it, no lock file stays
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with RunLock(mine):
        pass
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="'.*file' is a file, not a folder"):
        RunLock(tmp_path / "file" / "runs" / "r").acquire()
    # RunDir: the lock file is part of a run; removing a run's contents keeps it
    run = RunDir(fresh)
    assert run.exists() and run.looks_like_run()
    run.remove()
    assert [p.name for p in fresh.iterdir()] == [LOCK_FILE] and not run.exists()


def test_train_refuses_a_run_held_by_another_process(tmp_path, hold):
    from apps.vit import train as train_app

    run = tmp_path / "runs" / "held"
    proc = hold(run)
    cfg = build_config(train_app.TrainConfig, {"root": str(tmp_path), "log_dir": "held", "device": "cpu"})
    with pytest.raises(RunLockedError, match=f"is in use by another process: pid {proc.pid} on host"):
        train_app.main(cfg)
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]  # nothing of the run was touched


def _fake_sweep(tmp_path: Path, **kw) -> SweepConfig:
    base = {"name": "t", "app": "sweep_fake_app", "root": str(tmp_path / "out"), "run_name": "s{seed}"}
    return build_config(SweepConfig, {**base, **kw})


def test_sweep_skips_and_lists_runs_running_elsewhere(tmp_path, hold, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    s = _fake_sweep(tmp_path, grid={"seed": [0, 1]})
    busy_dir = tmp_path / "out" / "runs" / "t" / "s0"
    proc = hold(busy_dir)
    result = launch(s, "sweep_fake_app")
    assert [b.run.run_dir for b in result.busy] == [busy_dir]
    assert f"pid {proc.pid}" in result.busy[0].holder
    assert [r.run_dir.name for r in result.launched] == ["s1"] and result.failures == []
    assert [p.name for p in busy_dir.iterdir()] == [LOCK_FILE]  # not run, no status written
    proc.kill()
    proc.wait()
    again = launch(s, "sweep_fake_app")
    assert [r.run_dir.name for r in again.launched] == ["s0"] and again.busy == []


def test_two_sweeps_on_one_grid_train_each_run_once(tmp_path):
    path = tmp_path / "race.yaml"
    sweep = digits_train_sweep("race", tmp_path / "out", "{trainable}", steps=2, eval_period=2)
    path.write_text(yaml.safe_dump(sweep))
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "apps.vit.sweep", f"config={path}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for comp in ("mha", "ln1"):
        run = tmp_path / "out" / "runs" / "race" / comp
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # trained once: no duplicated rows
        assert [r["step"] for r in rows if "val_acc" in r] == [2]
        log = (run / "train.log").read_text()
        assert log.count("training ") == 1 and "resumed" not in log


@pytest.mark.parametrize("fork", [False, True], ids=["subprocesses", "forked"])
def test_stopping_a_parallel_sweep_ends_its_children(tmp_path, fork):
    path = tmp_path / "slow.yaml"
    sweep = {
        "name": "slow",
        "app": "sweep_fake_app",
        "root": str(tmp_path / "out"),
        # s0 is quick (the forked backend runs the first run in the sweep's process), s1 and s2 sleep
        # in children, s3 waits for a free slot
        "grids": [{"seed": [0], "sleep": [0.0]}, {"seed": [1, 2, 3], "sleep": [120]}],
        "run_name": "s{seed}",
        "local": {"max_parallel": 2, "fork": fork},
    }
    path.write_text(yaml.safe_dump(sweep))
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    sweep_proc = subprocess.Popen(
        [sys.executable, "-m", "apps.vit.sweep", f"config={path}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    runs = [tmp_path / "out" / "runs" / "slow" / f"s{i}" for i in (1, 2)]
    deadline = time.monotonic() + 120
    while not all((r / "pid").is_file() and (r / "pid").read_text() for r in runs):
        assert sweep_proc.poll() is None and time.monotonic() < deadline, sweep_proc.communicate()
        time.sleep(0.1)
    children = [int((r / "pid").read_text()) for r in runs]
    assert not any(_gone(pid) for pid in children)
    sweep_proc.send_signal(signal.SIGTERM)
    out, err = sweep_proc.communicate(timeout=60)
    assert sweep_proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert all(_gone(pid) for pid in children)
    assert sweep_proc.pid not in children  # each run had a process of its own
    for r in runs:  # recorded as killed, so a relaunch runs them again
        status = json.loads((r / "status.json").read_text())
        assert status["status"] == "failed" and "killed by signal 15" in status["message"]
    assert json.loads((runs[0].parent / "s0" / "status.json").read_text())["status"] == "completed"
    assert not (runs[0].parent / "s3").exists()  # no run started once the sweep was stopped
