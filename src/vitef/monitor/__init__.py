"""Run directories, metrics, checkpoints and resume for the finetuning app (arXiv 2602.06883)."""

from vitef.monitor.checkpoint import (
    capture_rng,
    load_state,
    load_weights,
    read_best,
    restore_rng,
    save_best,
    save_checkpoint,
    save_weights,
    unwrap,
)
from vitef.monitor.metrics import MetricsLogger, read_metrics
from vitef.monitor.run_dir import STATUSES, RunDir

__all__ = [
    "STATUSES",
    "MetricsLogger",
    "RunDir",
    "capture_rng",
    "load_state",
    "load_weights",
    "read_best",
    "read_metrics",
    "restore_rng",
    "save_best",
    "save_checkpoint",
    "save_weights",
    "unwrap",
]
