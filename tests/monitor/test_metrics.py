"""metrics.jsonl: append, read back, truncate on resume, partial lines, status file."""

from __future__ import annotations

import json

from vitef.monitor import MetricsLogger, RunDir, read_metrics


def test_log_read_truncate(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as m:
        for step in range(1, 6):
            m.log({"step": step, "loss": 1.0 / step})
        m.log({"step": 5, "val_acc": 0.5})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
    m = MetricsLogger(path)
    m.truncate_after(3)
    m.log({"step": 4, "loss": 0.1})
    m.close()
    assert [(r["step"], r.get("loss")) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.1)]


def test_partial_last_line_and_nan_keep_file_valid(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as m:
        m.log({"step": 1, "loss": float("nan")})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a run killed mid-write
    rows = read_metrics(path)
    assert rows == [{"step": 1, "loss": "nan"}]
    for line in path.read_text().splitlines()[:1]:
        json.loads(line)  # strict JSON: no bare NaN


def test_disabled_logger_writes_nothing(tmp_path):
    m = MetricsLogger(tmp_path / "sub" / "metrics.jsonl", enabled=False)
    m.log({"step": 1})
    m.truncate_after(0)
    m.close()
    assert not (tmp_path / "sub").exists()


def test_run_dir_layout_and_status(tmp_path):
    run = RunDir.from_log_dir(tmp_path, "cifar10_mha")
    assert run.path == tmp_path / "runs" / "cifar10_mha"
    assert run.read_status() is None and not run.exists()
    run.write_status("running", 3, "started")
    assert run.read_status()["status"] == "running" and run.read_status()["step"] == 3
    run.config_path.write_text("a: 1\n")
    # An existing run directory may be given directly as log_dir.
    assert RunDir.from_log_dir("elsewhere", str(run.path)).path == run.path
    assert run.eval_result_path("corrupt:fog-5:cifar10", "test").name == "eval_corrupt_fog-5_cifar10_test.json"
    run.remove()
    assert not run.path.exists()
