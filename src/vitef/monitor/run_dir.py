"""The run directory: the one interface between the training app and everything that reads runs.

Layout (docs/ARCHITECTURE.md, "Run directory")::

    <root>/runs/<log_dir>/
      config.yaml     resolved config
      metrics.jsonl   one JSON object per line (train and eval rows)
      train.log       the log
      status.json     {"status": "running" | "completed" | "failed", "step": int, "message": str}
      params.json     parameters per component: total and trainable
      runtime.json    what computed it: precision, effective TF32 flags, device, torch/timm versions (per start)
      selection.json  with select.criterion: the scores of every unit and the pick trained (vitef.selection)
      lp_ft.json      with method=lp_ft: the linear probe that initialised the head (train accuracy, iterations)
      checkpoints/    step_<N>/ (model.safetensors + state.pt) and best/ (model.safetensors + best.json)
      eval.json       test metrics of the best checkpoint
      run.lock        held (flock) by the process working on the run: see vitef.monitor.lock

The writing side belongs to the training app; the reading side (:meth:`RunDir.read_config`,
:meth:`RunDir.load_config`, :meth:`RunDir.weights`, :meth:`RunDir.read_eval`, :meth:`RunDir.read_metrics`)
is what every other app, the results tables and the sweeps go through, so that a run is read one way.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from vitef.config import build_config, read_yaml_file
from vitef.errors import CheckpointError, ConfigError
from vitef.monitor.checkpoint import read_best
from vitef.monitor.lock import LOCK_FILE
from vitef.monitor.metrics import read_metrics
from vitef.utils import atomic_write_json

logger = logging.getLogger(__name__)

STATUSES = ("running", "completed", "failed")
# Everything a run may write (a folder holding anything else is not deleted by ``remove``).
RUN_FILES = frozenset(
    {"config.yaml", "metrics.jsonl", "train.log", "status.json", "params.json", "runtime.json", "checkpoints"}
    | {"eval.json", "selection.json", "lp_ft.json"}  # the pick of select.criterion; the probe of method=lp_ft
    | {"tensorboard", LOCK_FILE}
)
_STEP_DIR = re.compile(r"^step_(\d+)$")
CHECKPOINTS = ("best", "last")  # the checkpoints a reader may ask for (RunDir.weights)
T = TypeVar("T")


class RunDir:
    """Paths and small state files of one run directory.

    Parameters
    ----------
    path
        The run directory itself (``<root>/runs/<log_dir>``); see :meth:`from_log_dir`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def from_log_dir(cls, root: str | Path, log_dir: str) -> RunDir:
        """``<root>/runs/<log_dir>``; ``log_dir`` may itself be a path to an existing run directory."""
        as_path = Path(log_dir).expanduser()
        if as_path.is_dir() and (as_path / "config.yaml").is_file():
            return cls(as_path)
        return cls(Path(root) / "runs" / log_dir)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- paths -------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def params_path(self) -> Path:
        return self.path / "params.json"

    @property
    def runtime_path(self) -> Path:
        return self.path / "runtime.json"

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_dir(self) -> Path:
        return self.checkpoints_dir / "best"

    @property
    def best_model_path(self) -> Path:
        return self.best_dir / "model.safetensors"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def step_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step}"

    def eval_result_path(self, dataset: str, split: str) -> Path:
        """Where the eval app writes a result: ``eval_<dataset>_<split>.json`` (name made file-safe)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}_{split}")
        return self.path / f"eval_{safe}.json"

    # --- state -------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """True when the directory holds anything besides its lock file."""
        return self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir())

    def read_status(self) -> dict[str, Any] | None:
        """The parsed ``status.json``, or ``None`` when there is none (or it is unreadable)."""
        try:
            data = json.loads(self.status_path.read_text())
        except (OSError, ValueError):  # JSONDecodeError, or bytes that are not text
            return None
        return data if isinstance(data, dict) else None

    def write_status(self, status: str, step: int, message: str = "", **extra: Any) -> None:
        """Write ``status.json`` atomically."""
        assert status in STATUSES, status
        payload = {"status": status, "step": int(step), "message": message, "time": time.time(), **extra}
        atomic_write_json(self.status_path, payload)

    # --- reading (every reader of runs goes through these) ------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """The saved ``config.yaml`` as a plain dict.

        Raises
        ------
        ConfigError
            No ``config.yaml`` (not a run, or not started), or one that is not a YAML mapping.
        """
        if not self.config_path.is_file():
            raise ConfigError(f"no run at {self.path} (config.yaml missing): train it first or fix log_dir/root")
        return read_yaml_file(self.config_path, "run config", damaged="the run directory is damaged")

    def load_config(self, cls: type[T]) -> T:
        """The saved config as the app's dataclass ``cls``, checked by the one strict loader.

        ``device`` is reset to ``auto`` when ``cls`` has one: the run may have trained on a device this
        machine lacks, and reading a run must not need it.
        """
        saved = self.read_config()
        if "device" in saved:
            saved["device"] = "auto"
        return build_config(cls, (str(self.config_path), saved))

    def weights(self, which: str = "best") -> tuple[Path, int | None]:
        """The weights file of the ``best`` (validation) or ``last`` (newest step) checkpoint, and its step.

        Raises
        ------
        CheckpointError
            The run has no such checkpoint yet (the message says what to do instead).
        """
        if which not in CHECKPOINTS:
            raise ConfigError(f"checkpoint={which!r} must be one of {', '.join(CHECKPOINTS)}")
        if which == "best":
            if not self.best_model_path.is_file():
                raise CheckpointError(
                    f"{self.best_model_path} not found: the run has no best checkpoint yet (it saves one at its "
                    "first validation); train longer or use checkpoint=last"
                )
            step = read_best(self.best_dir).get("step")
            return self.best_model_path, int(step) if step is not None else None
        last = self.latest_checkpoint()
        if last is None:
            raise CheckpointError(f"{self.checkpoints_dir} has no step checkpoint: train the run first")
        return last / "model.safetensors", int(_STEP_DIR.match(last.name).group(1))

    def read_eval(self, path: Path | None = None) -> dict[str, Any] | None:
        """``eval.json`` (or another result file of the run) as a dict; ``None`` when it does not exist.

        Raises
        ------
        CheckpointError
            The file exists but is not a JSON object (a damaged run: evaluate it again).
        """
        path = self.eval_path if path is None else path
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}): rerun or evaluate that run again") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is not a JSON object: rerun or evaluate that run again")
        return data

    def read_params(self) -> dict[str, Any] | None:
        """``params.json`` (parameters per component, total and trainable), or ``None`` without one."""
        return self.read_eval(self.params_path)

    def read_runtime(self) -> dict[str, Any] | None:
        """``runtime.json`` (precision, TF32 flags, device and versions of the latest start), or ``None``."""
        return self.read_eval(self.runtime_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The complete rows of ``metrics.jsonl`` (a partial last line of a killed run is skipped)."""
        return read_metrics(self.metrics_path)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete ``step_<N>`` checkpoints, ascending (a complete one has both files)."""
        if not self.checkpoints_dir.is_dir():
            return []
        steps = []
        for child in self.checkpoints_dir.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "model.safetensors").is_file() and (child / "state.pt").is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.step_dir(steps[-1]) if steps else None

    def prune_checkpoints(self, keep_last: int, keep: Iterable[int] = ()) -> None:
        """Delete all but the newest ``keep_last`` step checkpoints, and those of the steps in ``keep``.

        ``best/`` is never touched; ``keep`` holds steps kept for good (e.g. the log-spaced snapshots of a
        pretraining run), which do not count towards ``keep_last``.
        """
        kept = set(keep)
        steps = [s for s in self.checkpoint_steps() if s not in kept]
        for step in steps[: max(len(steps) - keep_last, 0)]:
            shutil.rmtree(self.step_dir(step), ignore_errors=True)
        # Leftovers of a save that was killed half-way.
        if self.checkpoints_dir.is_dir():
            for child in self.checkpoints_dir.iterdir():
                if child.name.startswith(".") and child.name.endswith(".tmp"):
                    shutil.rmtree(child, ignore_errors=True)

    def looks_like_run(self) -> bool:
        """True when the directory is empty or holds only what a run writes (safe to delete)."""
        if not self.path.is_dir():
            return False
        names = {p.name for p in self.path.iterdir()}
        return not names or "config.yaml" in names or names <= RUN_FILES

    def remove(self) -> None:
        """Delete the run directory's contents (``overwrite=true``); refuses folders that are not runs.

        The lock file stays: the process that removes a run holds its lock, and a new lock file would let
        a second process lock the run while this one starts it afresh.
        """
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ConfigError(f"run directory '{self.path}' is a file: remove it or choose another log_dir")
        if not self.looks_like_run():
            raise ConfigError(
                f"'{self.path}' is not a run directory (no config.yaml) and is not empty: refusing to delete it; "
                "choose another log_dir or root"
            )
        if not (self.path / LOCK_FILE).exists():
            shutil.rmtree(self.path)
            return
        for child in self.path.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
