"""Run an entry point in-process exactly as ``python -m`` does, for tests of its exit status and messages.

``python -m apps.x`` runs ``vitef.config.cli_main(CONFIG, main, argv, prog)`` (``apps.study``: its ``run_cli``,
which reads moved study files first); calling that here checks the same exit status, ``error:`` line and
output without the seconds of torch/timm import a subprocess pays. Keep a real subprocess only where the
process itself is the point (a signal, a fresh import, environment read at start-up), one per concern.
"""

from __future__ import annotations

import importlib
import logging
import subprocess

from vitef.config import cli_main


class isolated_logging:
    """Give a run its own console handler (bound to the captured stderr) and drop what the run added."""

    def __enter__(self):
        self.root = logging.getLogger()
        self.saved = (self.root.handlers[:], self.root.level)
        for h in self.saved[0]:
            if getattr(h, "_vitef", False) or isinstance(h, logging.FileHandler):
                self.root.removeHandler(h)
        return self

    def __exit__(self, *exc):
        handlers, level = self.saved
        for h in self.root.handlers[:]:
            if h not in handlers:
                self.root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in self.root.handlers:
                self.root.addHandler(h)
        self.root.setLevel(level)


def run_cli(module: str, *args: str, capsys) -> subprocess.CompletedProcess:
    """``python -m module args`` in this process: exit status (0 when ``main`` returns), stdout and stderr.

    An exception other than the ``SystemExit`` of ``cli_main`` propagates (a subprocess would print its
    traceback and exit 1): a test expecting a clean exit fails on it either way.
    """
    app = importlib.import_module(module)
    capsys.readouterr()
    code: int | str | None = 0
    with isolated_logging():
        try:
            if hasattr(app, "run_cli"):
                app.run_cli(list(args))
            else:
                cli_main(app.CONFIG, app.main, argv=list(args), prog=module)
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    returncode = 0 if code is None else code if isinstance(code, int) else 1
    return subprocess.CompletedProcess([module, *args], returncode, out, err)
