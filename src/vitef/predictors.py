"""Which signal predicts what finetuning a component achieves? (a question arXiv 2602.06883 raises, §3–5).

The paper ranks the components of a pretrained ViT by their plasticity and finds that the most plastic
one (MHA) is the best one to finetune. This module puts that claim, and its rivals, to a test on any set
of run and analysis directories. For each downstream task, the five per-block components are ranked by
each *signal*:

``plasticity_embedding``
    measured plasticity in the paper's embedding mode (mean over blocks of the per-block means), from the
    analysis folder of the pretrained model on that task;
``plasticity_hidden``
    the same in hidden mode (each component on its real input);
``grad_norm``
    the mean pre-clipping gradient norm of the component over the first ``first_steps`` updates of its
    own finetuning runs (``grad_norm/<component>`` in ``metrics.jsonl``), at the learning rate chosen
    for its accuracy cell, averaged over seeds: how strongly the task pulls on the component at the
    pretrained weights;
``bound``
    the theoretical upper bound on the plasticity (mean over blocks), from the analysis folder's
    ``bounds.csv``;

and each ranking is compared, by Kendall's tau-b with its two-sided p-value (:func:`scipy.stats.kendalltau`),
with two *targets*: the best-LR mean test accuracy (``acc``) and the relative gain over linear probing
(``gain``). Within one task the gain is an increasing function of the accuracy, so both give the same tau;
they differ in the pooled row (``dataset="all"``), which ranks every (task, component) pair at once and
where the gain, unlike raw accuracy, is comparable across tasks.

Missing inputs are never skipped silently: a (task, signal) with no analysis folder, no metrics or
fewer than two components with both a signal and a target gets a row with ``status`` saying what is
missing and a NaN tau.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from vitef.errors import ConfigError
from vitef.models.build import model_label
from vitef.models.components import BLOCK_COMPONENTS
from vitef.monitor.analysis_dir import find_analyses

logger = logging.getLogger(__name__)

SIGNALS: tuple[str, ...] = ("plasticity_embedding", "plasticity_hidden", "grad_norm", "bound")
TARGETS: tuple[str, ...] = ("acc", "gain")
ANALYSIS_COLUMNS = ["dataset", "model", "mode", "component", "plasticity", "bound", "folder"]
SIGNAL_COLUMNS = ["dataset", "component", "signal", "value", "source"]
TAU_COLUMNS = ["dataset", "signal", "target", "tau", "p_value", "n", "signal_ranking", "target_ranking", "status"]


def collect_analyses(root: str | Path) -> pd.DataFrame:
    """One row per (complete analysis folder, component) under ``<root>/analysis``.

    Columns: ``dataset`` (the target dataset), ``model`` (:func:`model_label` of the analysed model),
    ``mode``, ``component``, ``plasticity`` and ``bound`` (means over blocks; ``bound`` NaN without
    ``bounds.csv``), ``folder``. Folders analysing random or finetuned weights (``-random`` or ``@run``
    tags) or pretraining snapshots are left out: the signals are about the pretrained model.
    """
    rows = []
    for folder in find_analyses([Path(root) / "analysis" / "*"]):
        try:
            if not folder.is_pretrained():
                continue
            summary = folder.summary()
        except ConfigError as e:
            logger.warning("%s: that analysis is left out", e)
            continue
        bounds = folder.bounds_per_component()
        for s in summary:
            comp = s.get("component")
            rows.append({
                "dataset": folder.target,
                "model": model_label(folder.model),
                "mode": folder.mode,
                "component": comp,
                "plasticity": s["mean_over_layers"],
                "bound": bounds.get(comp, math.nan),
                "folder": str(folder.path),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=ANALYSIS_COLUMNS)


def analysis_signals(analyses: pd.DataFrame, model: str = "") -> pd.DataFrame:
    """Plasticity (both modes) and bound signals per (dataset, component), in :data:`SIGNAL_COLUMNS` form.

    ``model`` keeps the analyses of that model (the finetuned one) when several models were analysed.
    The bound is taken from the embedding-mode folder when there is one (it does not depend on the mode).
    """
    if analyses.empty:
        return pd.DataFrame(columns=SIGNAL_COLUMNS)
    if model and model in set(analyses["model"]):
        analyses = analyses[analyses["model"] == model]
    rows = []
    for (dataset, mode), g in analyses.groupby(["dataset", "mode"], sort=False):
        for r in g.itertuples():
            rows.append((dataset, r.component, f"plasticity_{mode}", r.plasticity, r.folder))
    by_dataset = analyses.assign(pref=(analyses["mode"] != "embedding").astype(int)).sort_values("pref")
    for (dataset, comp), g in by_dataset.groupby(["dataset", "component"], sort=False):
        rows.append((dataset, comp, "bound", float(g["bound"].iloc[0]), g["folder"].iloc[0]))
    return pd.DataFrame(rows, columns=SIGNAL_COLUMNS)


def grad_norm_signals(runs: pd.DataFrame, cells: pd.DataFrame, first_steps: int = 10) -> pd.DataFrame:
    """Mean ``grad_norm/<component>`` over the first ``first_steps`` updates of each component's own runs.

    ``runs`` are rows of :func:`vitef.results.collect_finetuning`, ``cells`` the best-LR cells of
    :func:`vitef.results.summarize`; the runs used are the completed single-component runs at the cell's
    chosen learning rate (all its seeds).
    """
    from vitef.results import read_metrics

    rows = []
    for cell in cells.itertuples():
        if cell.component not in BLOCK_COMPONENTS or not np.isfinite(cell.lr):
            continue
        sel = runs[
            (runs["dataset"] == cell.dataset)
            & (runs["trainable"] == cell.component)
            & np.isclose(runs["lr"].astype(float), cell.lr)
            & (runs["status"] == "completed")
        ]
        column = f"grad_norm/{cell.component}"
        values = []
        for run_dir in sel["run_dir"]:
            m = read_metrics(run_dir)
            if column in m.columns:
                first = m[["step", column]].dropna().sort_values("step").head(first_steps)
                if len(first):
                    values.append(first[column].astype(float).mean())
        value = float(np.mean(values)) if values else math.nan
        rows.append((cell.dataset, cell.component, "grad_norm", value, f"{len(values)} runs at lr {cell.lr:g}"))
    return pd.DataFrame(rows, columns=SIGNAL_COLUMNS)


def kendall_table(signals: pd.DataFrame, cells: pd.DataFrame, datasets: list[str] | None = None) -> pd.DataFrame:
    """Kendall's tau of every (task, signal) ranking against the ``acc`` and ``gain`` rankings.

    One row per (dataset, signal, target) in :data:`TAU_COLUMNS`, plus pooled rows (``dataset="all"``)
    over every (dataset, component) pair that has both values. ``status`` is ``ok`` or says what is
    missing (and then ``tau`` is NaN). Rankings are listed most-to-least (``MHA > FC1 > ...``).
    """
    block = cells[cells["component"].isin(BLOCK_COMPONENTS) & (cells["status"] == "ok")]
    targets = block.set_index(["dataset", "component"]).rename(columns={"mean": "acc"})
    if "gain" not in targets.columns:
        targets["gain"] = math.nan
    datasets = list(datasets) if datasets is not None else list(dict.fromkeys(cells["dataset"]))
    rows = []
    for signal in SIGNALS:
        s = signals[signals["signal"] == signal].set_index(["dataset", "component"])["value"]
        for target in TARGETS:
            pooled_x, pooled_y = [], []
            for dataset in datasets:
                x = s[s.index.get_level_values(0) == dataset].droplevel(0) if len(s) else pd.Series(dtype=float)
                y = targets[target][targets.index.get_level_values(0) == dataset].droplevel(0)
                status = _missing(x, y, signal, target)
                both = pd.concat([x.rename("x"), y.rename("y")], axis=1, join="inner").dropna()
                if status == "ok" and len(both) < 2:
                    status = f"fewer than 2 components with both {signal} and {target}"
                rows.append(_tau_row(dataset, signal, target, both, status))
                if status == "ok":
                    pooled_x += [f"{dataset}/{c}" for c in both.index]
                    pooled_y.append(both)
            pooled = pd.concat(pooled_y) if pooled_y else pd.DataFrame(columns=["x", "y"])
            status = "ok" if len(pooled) >= 2 else "no task with both inputs"
            if len(pooled_y) < 2 and status == "ok":
                status = "only one task"
            rows.append(_tau_row("all", signal, target, pooled.set_axis(pooled_x) if len(pooled) else pooled, status))
    return pd.DataFrame(rows, columns=TAU_COLUMNS)


def _missing(x: pd.Series, y: pd.Series, signal: str, target: str) -> str:
    if x.dropna().empty:
        where = "metrics.jsonl of its runs" if signal == "grad_norm" else "analysis folder"
        return f"missing {signal} (no {where})"
    if y.dropna().empty:
        return (
            "missing target: no linear-probing baseline" if target == "gain" else "missing target: no finetuning cells"
        )
    return "ok"


def _tau_row(dataset: str, signal: str, target: str, both: pd.DataFrame, status: str) -> dict:
    row = {"dataset": dataset, "signal": signal, "target": target, "tau": math.nan, "p_value": math.nan,
           "n": len(both), "signal_ranking": "", "target_ranking": "", "status": status}  # fmt: skip
    if status != "ok":
        return row
    result = kendalltau(both["x"].to_numpy(float), both["y"].to_numpy(float))
    row["tau"], row["p_value"] = float(result.statistic), float(result.pvalue)
    if dataset != "all":
        row["signal_ranking"] = _ranking(both["x"])
        row["target_ranking"] = _ranking(both["y"])
    return row


def _ranking(values: pd.Series) -> str:
    from vitef.models.components import DISPLAY_NAMES

    order = values.sort_values(ascending=False, kind="stable").index
    return " > ".join(DISPLAY_NAMES.get(c, c) for c in order)
