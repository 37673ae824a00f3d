"""The analysis folder: what ``apps.vit.analysis`` writes, and the one reader of it (arXiv 2602.06883, §3).

Layout (docs/ARCHITECTURE.md, "Analysis directory")::

    <root>/analysis/<model>_<source>_<target>_<mode>/
      config.yaml       the resolved analysis config
      plasticity.csv    layer, component, mean, std, ci95, n
      bounds.csv        layer, component, bound, ..., measured, ratio
      samples.npz       per-pair ratios (only with keep_samples)
      plasticity.json   written last: its presence marks a complete folder; model, tag, source, target,
                        mode, summary (per component: mean over blocks, rank), Kendall's tau, radius, rows

The plots, the report, the predictors and the pretraining-dynamics figures read analysis folders through
:class:`AnalysisDir` only.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from vitef.config import read_yaml_file
from vitef.errors import ConfigError
from vitef.models.build import model_label, pretraining_step

PLASTICITY_COLUMNS = ("layer", "component", "mean", "ci95")  # the columns every reader relies on


class AnalysisDir:
    """Paths of one analysis folder and the reading of its files.

    Parameters
    ----------
    path
        The folder (``<root>/analysis/<name>``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._meta: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"AnalysisDir({str(self.path)!r})"

    # --- paths -------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def plasticity_path(self) -> Path:
        return self.path / "plasticity.csv"

    @property
    def bounds_path(self) -> Path:
        return self.path / "bounds.csv"

    @property
    def samples_path(self) -> Path:
        return self.path / "samples.npz"

    @property
    def meta_path(self) -> Path:
        return self.path / "plasticity.json"

    def is_complete(self) -> bool:
        """True once ``plasticity.json``, written last, exists."""
        return self.meta_path.is_file()

    # --- reading -----------------------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any]:
        """``plasticity.json`` (cached): model, tag, target, mode, summary, kendall_tau, radius, ...

        Raises
        ------
        ConfigError
            Missing (an unfinished analysis) or not a JSON object.
        """
        if self._meta is None:
            if not self.meta_path.is_file():
                raise ConfigError(f"{self.meta_path} not found: the analysis is unfinished; run apps.vit.analysis")
            try:
                meta = json.loads(self.meta_path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"{self.meta_path} is not valid JSON ({e}): re-run that analysis") from e
            if not isinstance(meta, dict):
                raise ConfigError(f"{self.meta_path} is not a JSON object: re-run that analysis")
            self._meta = meta
        return self._meta

    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` as a dict (``{}`` without one)."""
        if not self.config_path.is_file():
            return {}
        return read_yaml_file(self.config_path, "analysis config", damaged="re-run that analysis")

    def read_plasticity(self) -> pd.DataFrame:
        """``plasticity.csv``: one row per (layer, component), with at least :data:`PLASTICITY_COLUMNS`."""
        try:
            df = pd.read_csv(self.plasticity_path)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise ConfigError(f"analysis folder {self.path} is unreadable ({e}); re-run apps.vit.analysis") from e
        missing = set(PLASTICITY_COLUMNS) - set(df.columns)
        if missing:
            raise ConfigError(f"{self.plasticity_path} lacks columns {sorted(missing)}; re-run apps.vit.analysis")
        return df

    def read_bounds(self) -> pd.DataFrame | None:
        """``bounds.csv``, or ``None`` without one."""
        if not self.bounds_path.is_file():
            return None
        try:
            return pd.read_csv(self.bounds_path)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise ConfigError(f"{self.bounds_path} is unreadable ({e}); re-run apps.vit.analysis") from e

    def bounds_per_component(self) -> dict[str, float]:
        """Mean over blocks of each component's bound (``{}`` without ``bounds.csv`` or its columns)."""
        df = self.read_bounds()
        if df is None or not {"component", "bound"} <= set(df.columns):
            return {}
        return df.groupby("component")["bound"].mean().to_dict()

    # --- what was analysed (from plasticity.json) --------------------------------------------------
    @property
    def model(self) -> str:
        """The analysed weights as given to the app (timm name, file, hub id)."""
        return str(self.read_meta().get("model", ""))

    @property
    def target(self) -> str:
        """The target dataset, without its split."""
        return str(self.read_meta().get("target", "")).rsplit("/", 1)[0]

    @property
    def mode(self) -> str:
        return str(self.read_meta().get("mode", ""))

    @property
    def step(self) -> int | None:
        """The pretraining step of the analysed weights (their card's ``step``); ``None`` unless a snapshot.

        ``None`` too for an unfinished folder (no ``plasticity.json``), which names no weights.
        """
        return pretraining_step(self.model) if self.is_complete() else None

    def is_pretrained(self) -> bool:
        """True for the pretrained model itself: not random or finetuned weights (``-random``/``@run`` tags), not a
        pretraining snapshot."""
        label = model_label(self.model)
        return str(self.read_meta().get("tag", label)) == label and self.step is None

    def summary(self) -> list[dict[str, Any]]:
        """Per component: ``component``, ``mean_over_layers`` (NaN when missing), and the rest of the summary row."""
        rows = []
        for s in self.read_meta().get("summary", []):
            value = s.get("mean_over_layers")
            rows.append({**s, "mean_over_layers": math.nan if value is None else float(value)})
        return rows


def find_analyses(patterns: Iterable[str | Path], complete: bool = True) -> list[AnalysisDir]:
    """Analysis folders matching glob ``patterns`` (or naming folders): pattern by pattern, each sorted, no duplicates.

    With ``complete``, only folders holding ``plasticity.json`` (a finished analysis); otherwise those
    holding ``plasticity.csv``.
    """
    found: dict[Path, AnalysisDir] = {}
    for pattern in patterns:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).exists() else [])
        for m in matches:
            folder = AnalysisDir(m)
            marker = folder.meta_path if complete else folder.plasticity_path
            if marker.is_file() and folder.path not in found:
                found[folder.path] = folder
    return list(found.values())
