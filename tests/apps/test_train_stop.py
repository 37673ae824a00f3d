"""A scheduler's signal (SIGTERM, SIGUSR1/2) stops apps.vit.train after a checkpoint; the relaunch resumes it exactly.

vitef.monitor.stop: the signals only set a flag inside the training loop; the loop finishes the update under way,
saves a step checkpoint, records the run as stopped and raises RunStopped (exit 128 + signal at the command line).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_train, untimed

from apps.vit import train as train_app
from vitef.config import build_config
from vitef.errors import RunStopped
from vitef.monitor import RunDir, read_metrics
from vitef.monitor.stop import STOP_SIGNALS, StopSignals

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_train(optim={"lr": 0.05, "warmup_steps": 2, "scheduler": "cosine"}, steps=9, eval_period=3)
TIMING = ("images_per_s", "data_wait_ms")


def tiny_cfg(root: Path, **over) -> train_app.TrainConfig:
    return build_config(train_app.TrainConfig, TINY, {"root": str(root), "log_dir": "run", **over})


def test_stop_signals_set_a_flag_while_active_and_give_the_handlers_back():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    assert all(h == signal.SIG_DFL for h in before.values())
    with StopSignals() as stop:
        assert not stop.requested and stop.name == ""
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: the first one is the reason, nothing ends
        assert stop.signum == signal.SIGUSR1
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_stop_signals_leave_a_callers_handler_and_other_threads_alone():
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)  # the caller's handler (e.g. a sweep's) keeps the signal
            assert seen == [signal.SIGUSR2] and not stop.requested
    finally:
        signal.signal(signal.SIGUSR2, previous)
    installed: list[object] = []

    def elsewhere() -> None:
        with StopSignals():  # handlers can only be set in the main thread: nothing changes
            installed.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert installed == [signal.SIG_DFL]


def test_data_loader_workers_ignore_the_stop_signals():
    code = (
        "import os, signal, time\n"
        "from vitef.monitor.stop import ignore_stop_signals\n"
        "ignore_stop_signals(0)\n"
        "for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2): os.kill(os.getpid(), sig)\n"
        "time.sleep(0.1)\n"
        "print('alive')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr


def _fused_on_cpu(monkeypatch) -> None:
    import vitef.optim

    monkeypatch.setattr(vitef.optim, "implementation", lambda params: {"fused": True})


def _signal_during_step(monkeypatch, at: int, sig: int = signal.SIGTERM) -> None:
    """Deliver ``sig`` to this process while update ``at`` is being launched (after its forward and backward)."""
    real = train_app.launch_step

    def launch(s, batches, step=None):
        pending = real(s, batches, step)
        if step == at:
            os.kill(os.getpid(), sig)
        return pending

    monkeypatch.setattr(train_app, "launch_step", launch)


def _outcome(root: Path) -> tuple[dict, list[dict], dict]:
    run = RunDir(root / "runs" / "run")
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run.metrics_path)]
    return load_file(run.best_model_path), rows, untimed(json.loads(run.eval_path.read_text()))


@pytest.mark.parametrize("deferred", [False, True], ids=["checks-first", "deferred-checks"])
def test_sigterm_stops_after_a_checkpoint_and_the_relaunch_equals_an_uninterrupted_run(tmp_path, monkeypatch, deferred):
    if deferred:
        _fused_on_cpu(monkeypatch)  # the loop then reads each update's checks one update late, as on a GPU
    train_app.main(tiny_cfg(tmp_path / "ref"))

    cfg = tiny_cfg(tmp_path / "stopped")
    _signal_during_step(monkeypatch, at=4)  # between the periodic checkpoints of steps 3 and 6
    with pytest.raises(RunStopped, match=r"SIGTERM received: stopped after step 4, checkpoint saved") as info:
        train_app.main(cfg)
    assert info.value.signum == signal.SIGTERM
    run = RunDir(tmp_path / "stopped" / "runs" / "run")
    assert run.checkpoint_steps()[-1] == 4
    status = json.loads(run.status_path.read_text())
    assert (status["status"], status["step"]) == ("failed", 4) and "launch the same run again" in status["message"]
    assert [r["step"] for r in read_metrics(run.metrics_path) if "loss" in r] == [1, 2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the loop gave the signal back

    monkeypatch.undo()
    if deferred:
        _fused_on_cpu(monkeypatch)
    train_app.main(cfg)
    assert f"resumed {run.path} from step 4" in run.log_path.read_text()
    ref_weights, ref_rows, ref_eval = _outcome(tmp_path / "ref")
    weights, rows, result = _outcome(tmp_path / "stopped")
    assert rows == ref_rows and result == ref_eval
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_a_signal_on_a_checkpoint_step_saves_it_once(tmp_path, monkeypatch):
    _signal_during_step(monkeypatch, at=3, sig=signal.SIGUSR1)  # step 3 validates and checkpoints anyway
    with pytest.raises(RunStopped, match="SIGUSR1 received: stopped after step 3"):
        train_app.main(tiny_cfg(tmp_path))
    run = RunDir(tmp_path / "runs" / "run")
    assert run.checkpoint_steps() == [3]
    assert [r["step"] for r in read_metrics(run.metrics_path) if "val_acc" in r] == [3]  # validated once


def _wait_for_rows(proc: subprocess.Popen, run: RunDir, rows: int, timeout: float) -> None:
    """Until the running command has logged ``rows`` metrics rows (or has ended, or ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if run.metrics_path.is_file() and len(run.metrics_path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.02)


def test_the_command_exits_143_on_sigterm_with_loader_workers_and_resumes(tmp_path):
    # The real signal path: the whole process group is signalled, as a scheduler does; the DataLoader worker must
    # survive it (it ignores the signal) for the update under way and the checkpoint.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "steps": 3000, "eval_period": 3000}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [f"config={config}", f"root={tmp_path}", "log_dir=run", "device=cpu", "data.num_workers=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "apps.vit.train", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    run = RunDir(tmp_path / "runs" / "run")
    try:
        _wait_for_rows(proc, run, 5, timeout=120)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped: SIGTERM received: stopped after step" in err
    status = json.loads(run.status_path.read_text())
    steps = run.checkpoint_steps()
    assert status["status"] == "failed" and steps == [status["step"]] and 5 <= steps[0] < 3000


def _worker_of_rank(torchrun_pid: int, rank: int) -> int | None:
    """The pid of a torchrun worker process of the given rank (its environment says RANK=<rank>)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun_pid and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_a_signal_to_one_process_of_a_distributed_run_stops_every_process_after_the_same_update(tmp_path):
    # SIGTERM reaches rank 1 only: its flag travels with the loss all-reduce, so rank 0 stops after the same update
    # (a rank going on alone would hang in the next collective), and the relaunch resumes the whole run.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "steps": 300, "eval_period": 300, "batch_size": 16}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [f"config={config}", f"root={tmp_path}", "log_dir=run", "device=cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "apps.vit.train", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir(tmp_path / "runs" / "run")
    try:
        _wait_for_rows(proc, run, 5, timeout=180)
        worker = _worker_of_rank(proc.pid, 1)
        assert proc.poll() is None and worker is not None, "the run ended before it could be signalled"
        os.kill(worker, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    status = json.loads(run.status_path.read_text())
    step = status["step"]
    assert status["status"] == "failed" and 5 <= step < 300, (status, err[-3000:])
    assert status["message"].startswith(f"another process was signalled: stopped after step {step}")
    assert f"stopped: SIGTERM received: stopped after step {step}, checkpoint saved" in err  # rank 1's line
    assert run.checkpoint_steps()[-1] == step
    relaunch = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert json.loads(run.status_path.read_text())["status"] == "completed"
    assert [r["step"] for r in read_metrics(run.metrics_path) if "loss" in r] == list(range(1, 301))
