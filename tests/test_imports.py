"""Imports go one way: the library never imports the apps; importing it does no work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vitef"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_never_imports_apps():
    offenders = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 5
    for path in files:
        for mod in _imported_modules(path):
            if mod == "apps" or mod.startswith("apps."):
                offenders.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not offenders, offenders


def test_no_print_in_library():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_import_does_no_work():
    # Importing every library module must not configure logging, touch the network or write files.
    mods = [
        "vitef." + ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in SRC.rglob("*.py")
        if p.name != "__init__.py"
    ]
    code = (
        "import importlib, logging, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""


def test_every_app_exposes_config_and_main():
    # Sweeps and studies run apps in-process through this convention.
    import dataclasses
    import importlib

    apps = [p for p in sorted((ROOT / "apps").rglob("*.py")) if "cli_main(" in p.read_text()]
    assert len(apps) >= 12
    for path in apps:
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert dataclasses.is_dataclass(getattr(module, "CONFIG", None)), path
        assert callable(getattr(module, "main", None)), path
