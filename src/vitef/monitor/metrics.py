"""``metrics.jsonl`` writer and reader, mirrored to TensorBoard event files (arXiv 2602.06883 training logs).

One JSON object per line, each with a ``step``. Rows are appended and flushed one by one, so a killed
run loses at most its last, partial line; :func:`read_metrics` skips such a line, and
:meth:`MetricsLogger.truncate_after` drops the rows a resumed run is about to write again.

With a ``tensorboard_dir``, every number of every row is also a TensorBoard scalar (tag = the row's key, at the
row's step; TensorBoard stores them as float32). ``tensorboard`` is a dependency of vitef; where it is missing,
asking for event files is a :class:`~vitef.errors.ConfigError` up front (:func:`require_tensorboard`), never a
silent run without them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from vitef.errors import ConfigError
from vitef.utils import atomic_write_text

logger = logging.getLogger(__name__)

TENSORBOARD_MISSING = (
    "tensorboard=true needs the tensorboard package: pip install tensorboard, or set tensorboard=false"
)


def require_tensorboard() -> type:
    """torch's ``SummaryWriter`` class, or a :class:`ConfigError` saying how to get it (or turn it off)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError when the tensorboard package is absent or too old
        logger.debug("importing torch.utils.tensorboard failed: %s", e)
        raise ConfigError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete rows of a ``metrics.jsonl`` file (``[]`` when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    # Undecodable bytes (a damaged file) become U+FFFD, so such a line is skipped like a partial one.
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: skipping a malformed line (a run killed while writing it)", path)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Append rows to ``metrics.jsonl``; mirror their numbers to TensorBoard event files.

    Parameters
    ----------
    path
        The ``metrics.jsonl`` file.
    tensorboard_dir
        Where to write TensorBoard events; ``None`` turns them off. Without the tensorboard package this is a
        :class:`ConfigError` (:func:`require_tensorboard`).
    enabled
        ``False`` on non-zero ranks: every method is a no-op.
    """

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._tb_dir = None if tensorboard_dir is None or not enabled else Path(tensorboard_dir)
        # Checked before anything is written: a run asked for event files gets them or does not start.
        self._writer_class = require_tensorboard() if self._tb_dir is not None else None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._writer_class is not None:
            self._tb = self._writer_class(log_dir=str(self._tb_dir))

    def truncate_after(self, step: int) -> None:
        """Keep only rows with ``row["step"] <= step`` (atomically), e.g. when resuming from ``step``."""
        if not self.enabled or not self.path.is_file():
            return
        self._close_file()
        rows = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        if self._tb is not None:
            # The events of the steps after ``step`` (written before a kill) are dropped too: TensorBoard discards
            # every event at or after ``purge_step`` that precedes the writer's first new event.
            self._tb.close()
            self._tb = self._writer_class(log_dir=str(self._tb_dir), purge_step=step + 1)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (must contain ``step``) and flush it."""
        if not self.enabled:
            return
        assert "step" in row, row
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across rows
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
