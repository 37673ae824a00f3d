"""Shared test setup: CPU, no network, few threads, deterministic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests never touch the network: the hub libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# At most 2 threads per test process, shared by the pytest-xdist workers (`make test` runs 2): more threads than
# cores only slows every worker down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _WORKERS)))


def run_module(module: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run ``python -m module args`` as users do; returns the CompletedProcess (never raises on failure)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_app():
    return run_module


@pytest.fixture
def run_inprocess(capsys, monkeypatch):
    """``run_app`` without the subprocess (tests/inprocess.py): same cwd, ``env`` set until the test ends."""
    from inprocess import run_cli

    def run(module: str, *args: str, env: dict | None = None):
        monkeypatch.chdir(ROOT)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the study sets it for itself: undone at teardown
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        threads = torch.get_num_threads()  # apps set their own (the study's threads=, the sweep's workers)
        try:
            return run_cli(module, *args, capsys=capsys)
        finally:
            torch.set_num_threads(threads)

    return run
