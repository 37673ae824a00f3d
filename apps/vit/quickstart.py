"""The README's main command (offline, CPU).

For now a smoke run: build a small ViT and print its component table. The offline study in
miniature replaces it once the plasticity and finetuning apps land.
"""

from __future__ import annotations

import sys

from apps.vit import components
from vitef.config import cli_main

if __name__ == "__main__":
    cli_main(components.ComponentsConfig, components.main, argv=sys.argv[1:], prog="apps.vit.quickstart")
