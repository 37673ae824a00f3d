"""User-facing errors.

Every error a user can fix (bad config, unknown dataset/model/component, missing or corrupt file,
diverging loss) is a :class:`VitefError`. Entry points catch it, print its one-line message and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VitefError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class ConfigError(VitefError):
    """Unknown config key, wrong type, invalid value, or missing config file."""


class ModelError(VitefError):
    """Unknown model name, unloadable or mismatched checkpoint."""


class ComponentError(VitefError):
    """Unknown component name."""


class DataError(VitefError):
    """Unknown dataset name, missing or corrupt dataset files, or an impossible split/loader request."""


class CheckpointError(VitefError):
    """Missing, unreadable or mismatched checkpoint or run directory."""


class TrainingError(VitefError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class RunStopped(BaseException):  # noqa: N818 (not an error: like KeyboardInterrupt, it stops whatever runs)
    """The run was stopped by a signal after saving a checkpoint (:mod:`vitef.monitor.stop`); launching it again
    resumes it. A ``BaseException``: code that collects the failures of runs must not swallow it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
