"""Imports go one way: the library never imports the apps; importing it does no work; the plotting apps
(apps/plots) and the computing apps (apps/vit) never import each other (only the study, above both, does)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vitef"


def _imported_modules(path: Path, text: str | None = None) -> set[str]:
    """Every module ``path`` (or ``text`` as that file) imports, with relative imports made absolute."""
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from apps import vit`
        elif isinstance(node, ast.ImportFrom):  # relative: resolved against the file's package
            package = path.relative_to(ROOT).parent.parts
            base = ".".join(package[: len(package) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def _offenders(folder: str, forbidden: str, allowed: tuple[str, ...] = ()) -> list[str]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert len(files) >= 3, folder
    return [
        f"{path.relative_to(ROOT)} imports {mod}"
        for path in files
        if str(path.relative_to(ROOT)) not in allowed
        for mod in sorted(_imported_modules(path))
        if mod == forbidden or mod.startswith(forbidden + ".")
    ]


def test_plotting_apps_never_import_computing_apps():
    # apps/plots only reads what the apps of apps/vit wrote (run, analysis, landscape folders).
    assert not _offenders("apps/plots", "apps.vit")
    assert not _offenders("apps/plots", "apps.study")


def test_computing_apps_never_import_plotting_apps():
    # apps.study runs both; apps/vit/study.py is only its old name (a forwarder to apps.study).
    old_name = ("apps/vit/study.py",)
    assert not _offenders("apps/vit", "apps.plots", allowed=old_name)
    assert not _offenders("apps/vit", "apps.study", allowed=old_name)


def test_import_checker_sees_every_form():
    # The checks above rely on this parser: absolute, `from apps import x`, and relative imports.
    text = "import apps.vit.train\nfrom apps import study\nfrom ..vit import sweep\nfrom . import common\n"
    found = _imported_modules(ROOT / "apps" / "plots" / "x.py", text)
    assert {"apps.vit.train", "apps.study", "apps.vit.sweep", "apps.plots.common"} <= found


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
