"""Old name of :mod:`apps.study`, kept so that commands of before issue 11 keep working (with a warning).

    python -m apps.vit.study config=apps/vit/studies/quickstart.yaml    # runs apps/studies/quickstart.yaml

The study runs apps of both ``apps/vit`` and ``apps/plots``, so it now lives above both folders; this module
only forwards to it (and is the one module of ``apps/vit`` that reaches ``apps/plots``, through it).
"""

from __future__ import annotations

import sys

from apps.study import CONFIG, StudyConfig, main, run_cli

__all__ = ["CONFIG", "StudyConfig", "main"]

if __name__ == "__main__":
    run_cli(sys.argv[1:], prog="apps.vit.study")
