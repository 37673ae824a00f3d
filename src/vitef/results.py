"""Finetuning results: collect run directories, choose the learning rate, tabulate, test (arXiv 2602.06883, §5).

The paper's table cell for a dataset x component is the mean test accuracy over seeds at the best
learning rate, ± the standard deviation over those seeds. This module computes it from run
directories, explicitly and reproducibly:

- **Learning-rate selection** (``select_on``): ``"val"`` (default, sound) picks, per dataset x
  component, the learning rate with the highest mean over seeds of ``best_val_acc`` (the validation
  accuracy of the selected checkpoint); ``"test"`` picks the highest mean test accuracy, which is what
  the authors did. Ties go to the smallest learning rate.
- **Std over seeds** uses ``ddof=1`` (the sample standard deviation) unless told otherwise.
- **Missing runs are never averaged silently.** The expected grid of a dataset is every learning rate
  x seed seen for it (or the ``lrs`` x ``seeds`` given). A (lr, seed) cell without a completed run is
  listed in the ``missing`` frame; a learning rate with any missing seed cannot be selected; a cell
  with missing runs is ``partial`` (chosen among the complete learning rates) or ``missing`` (none
  complete), and such cells are left out of the averages and tests, whose counts say so.
- **Relative gain over linear probing** of a cell: ``(acc - lp) / lp`` where ``acc`` is the cell's
  best-LR mean test accuracy and ``lp`` the test accuracy of the linear probe on the last block's
  output (``res2`` of the last layer) of the pretrained model on that dataset. A component's average
  gain is the mean over datasets of these per-dataset gains (not the gain of the averages).
- **Tests**: MHA against each other component over the datasets' best-LR means (paired): the
  two-sided paired t-test (:func:`scipy.stats.ttest_rel`) and the one-sided Wilcoxon signed-rank
  test that MHA is greater (:func:`scipy.stats.wilcoxon` with ``alternative="greater"``).

Accuracies are fractions in [0, 1] everywhere here; rendering turns them into percentages.
Everything below the ``collect_*`` readers is a pure function of DataFrames.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vitef.adapters import ADAPTER_METHODS
from vitef.config import read_yaml_file
from vitef.data import table as data_table
from vitef.errors import VitefError
from vitef.models.build import model_label
from vitef.models.components import DISPLAY_NAMES, DISPLAY_ORDER, canonical, display_name, display_order
from vitef.monitor.run_dir import RunDir
from vitef.selection import budget_label

logger = logging.getLogger(__name__)

BASE_COLUMNS = [
    "dataset",
    "trainable",
    "optimizer",
    "lr",
    "seed",
    "model",
    "status",
    "best_val_acc",
    "test_acc",
    "best_step",
    "run_dir",
]
# What tells the finetuning methods apart (issue 12): the method, the selection (criterion, budget, seed of the
# pick), layer decay, the LoRA (or DoRA) rank, and the parameter counts. Runs of the paper's grid hold the defaults
# below.
METHOD_COLUMNS = [
    "method",
    "criterion",
    "budget",
    "select_seed",
    "layer_decay",
    "lora_rank",
    "trainable_params",
    "backbone_params",
    "head_params",
    "images_per_s",
]
METHOD_DEFAULTS = {
    "method": "full",
    "criterion": "",
    "budget": math.nan,
    "select_seed": -1,
    "layer_decay": 1.0,
    "lora_rank": 0,
    "trainable_params": -1,
    "backbone_params": -1,
    "head_params": -1,
    "images_per_s": math.nan,  # the median training throughput of the run (eval.json; runs before it: unknown)
}
FINETUNING_COLUMNS = BASE_COLUMNS + METHOD_COLUMNS
PROBE_COLUMNS = ["dataset", "model", "pool", "seed", "layer", "point", "train_acc", "test_acc", "source"]
# Columns of the paper's table: theoretical plasticity rank (MHA most plastic), then full finetuning; the
# component registry owns the order and the labels.
COMPONENT_ORDER = list(DISPLAY_ORDER)
COMPONENT_LABELS = DISPLAY_NAMES
SELECT_ON = ("val", "test")
TIE_TOL = 1e-12  # selection means closer than this are a tie (float sums of equal fractions)


class ResultsError(VitefError):
    """No runs to aggregate, ambiguous runs, or results files that are missing or malformed."""


# ---------------------------------------------------------------------------------------------------
# Reading run directories
# ---------------------------------------------------------------------------------------------------


def trainable_name(value: object) -> str:
    """``["mha"]`` → ``mha``; ``["fc1", "fc2"]`` → ``fc1+fc2`` (the name used in files and tables).

    Registry aliases become registry names (``[attn]``, saved by runs older than the canonical config, is
    ``mha``); a name the registry does not know is kept as written.
    """
    parts = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for part in parts:
        try:
            out.append(canonical(str(part)))
        except VitefError:
            out.append(str(part))
    return "+".join(out)


def read_run(run_dir: str | Path) -> dict | None:
    """One row of the finetuning CSV from a run directory, or None when it is not a training run.

    ``status`` is the run's ``status.json`` status (``missing`` without one); a completed run without
    ``eval.json`` has status ``no_eval`` (it has no test accuracy to report).
    """
    run = RunDir(run_dir)
    try:
        cfg = run.read_config()
        status = (run.read_status() or {}).get("status", "missing")
        ev = run.read_eval() or {}
    except VitefError as e:  # a damaged config.yaml or eval.json: name the file, say what to do
        raise ResultsError(str(e)) from e
    if "trainable" not in cfg or "dataset_name" not in cfg:
        return None
    optim = cfg.get("optim") or {}
    model = cfg.get("model") or {}
    if status == "completed" and not ev:
        status = "no_eval"
    try:
        params = run.read_params() or {}
    except VitefError as e:
        raise ResultsError(str(e)) from e
    return {
        "dataset": str(cfg["dataset_name"]),
        "trainable": trainable_name(cfg["trainable"]),
        "optimizer": str(optim.get("name", cfg.get("optimizer", ""))),
        "lr": float(optim.get("lr", cfg.get("lr", math.nan))),
        "seed": int(cfg.get("seed", -1)),
        "model": model_label(str(model.get("name", cfg.get("model_name", "")))),
        "status": str(status),
        "best_val_acc": float(ev.get("best_val_acc", math.nan)),
        "test_acc": float(ev.get("acc", math.nan)),
        "best_step": int(ev["best_step"]) if ev.get("best_step") is not None else -1,
        "run_dir": str(run.path),
        **_method_fields(cfg, ev, params),
    }


def _method_fields(cfg: dict, ev: dict, params: dict) -> dict:
    """The :data:`METHOD_COLUMNS` of a run from its config.yaml, eval.json and params.json (defaults when absent).

    The criterion is the selection's label (``plasticity`` in embedding mode, ``plasticity-hidden``, ``rgn``); the
    pick's seed is the run's seed unless ``select.seed`` is set (as ``apps.vit.train`` derives it).
    """
    out = dict(METHOD_DEFAULTS)
    out["method"] = str(cfg.get("method") or "full")
    sel = cfg.get("select") or {}
    if isinstance(sel, dict) and sel.get("criterion"):
        criterion = str(sel["criterion"])
        mode = str(sel.get("mode") or "embedding")
        out["criterion"] = f"plasticity-{mode}" if criterion == "plasticity" and mode != "embedding" else criterion
        out["budget"] = float(sel.get("budget", math.nan))
        seed = int(sel.get("seed", -1))
        out["select_seed"] = int(cfg.get("seed", -1)) if seed < 0 else seed
    optim = cfg.get("optim") or {}
    out["layer_decay"] = float(optim.get("layer_decay", 1.0) or 1.0)
    if out["method"] in ADAPTER_METHODS:
        out["lora_rank"] = int((cfg.get("lora") or {}).get("rank", 8))
    if ev.get("trainable_params") is not None:
        out["trainable_params"] = int(ev["trainable_params"])
    if isinstance(ev.get("images_per_s"), (int, float)):
        out["images_per_s"] = float(ev["images_per_s"])
    total = params.get("total") if isinstance(params, dict) else None
    if isinstance(total, dict) and total:
        head = int(total.get("head", 0))
        out["head_params"] = head
        out["backbone_params"] = int(sum(int(v) for v in total.values())) - head
    return out


def with_method_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every :data:`METHOD_COLUMNS` column (defaults filled in: a CSV written before issue 12)."""
    out = df.copy()
    for col, default in METHOD_DEFAULTS.items():
        if col not in out.columns:
            out[col] = default
        elif col == "criterion":
            out[col] = out[col].fillna("").astype(str)
    return out


def is_component_run(df: pd.DataFrame) -> pd.Series:
    """Which rows are runs of the paper's grid: full finetuning of ``trainable``, no selection, no layer decay."""
    df = with_method_columns(df)
    return (df["method"].astype(str) == "full") & (df["criterion"] == "") & (df["layer_decay"].astype(float) == 1.0)


def drop_default_method_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The :data:`BASE_COLUMNS` alone when every run is a component run (the CSV files read as before issue 12),
    else every column."""
    if len(df) and not is_component_run(df).all():
        return df
    return df[[c for c in df.columns if c not in METHOD_COLUMNS]]


def method_label(
    method: str = "full",
    trainable: str = "all",
    criterion: str = "",
    budget: float = math.nan,
    select_seed: int = -1,
    layer_decay: float = 1.0,
    lora_rank: int = 0,
    optimizer: str = "sgd",
    pick: bool = True,
) -> str:
    """The one name of a finetuning method in tables and figures.

    ``full:mha``, ``full:all ld0.75``, ``lp-ft``, ``bitfit``, ``bitfit:mha``, ``lora r8``, ``lora r8:mha``,
    ``dora r8``, ``dora r8:mha``,
    ``select rgn 10%``, ``random 10% seed 2`` (``random 10%`` with ``pick=False``: the group of random picks);
    a selection trained with BitFit says ``select rgn 10% bitfit``; an optimizer other than SGD is appended.
    """
    if criterion:
        text = f"{'random' if criterion == 'random' else 'select ' + criterion} {budget_label(float(budget))}"
        if criterion == "random" and pick:
            text += f" seed {int(select_seed)}"
        if method != "full":
            text += f" {method}"
    elif method in ADAPTER_METHODS:
        text = f"{method} r{int(lora_rank)}" + ("" if trainable == "all" else f":{trainable}")
    elif method == "bitfit":
        text = "bitfit" + ("" if trainable == "all" else f":{trainable}")
    elif method == "lp_ft":
        text = "lp-ft" + ("" if trainable == "all" else f":{trainable}")
    else:
        text = f"{method}:{trainable}"
    if layer_decay < 1:
        text += f" ld{layer_decay:g}"
    if optimizer and optimizer != "sgd":
        text += f" {optimizer}"
    return text


def method_labels(df: pd.DataFrame, pick: bool = True) -> pd.Series:
    """:func:`method_label` of every row of a runs frame."""
    df = with_method_columns(df)
    return pd.Series(
        [
            method_label(r.method, r.trainable, r.criterion, r.budget, r.select_seed, r.layer_decay, r.lora_rank,
                         r.optimizer, pick)
            for r in df.itertuples()
        ],
        index=df.index,
        dtype=object,
    )  # fmt: skip


def collect_finetuning(root: str | Path, runs_glob: str = "**") -> pd.DataFrame:
    """One row per training run under ``<root>/runs`` whose directory matches ``runs_glob``."""
    runs = Path(root) / "runs"
    rows = []
    for cfg_path in sorted(runs.glob(f"{runs_glob}/config.yaml")):
        row = read_run(cfg_path.parent)
        if row is not None:
            rows.append(row)
    return pd.DataFrame(rows, columns=FINETUNING_COLUMNS)


def collect_probes(root: str | Path) -> pd.DataFrame:
    """Rows of every ``probes.csv`` under ``<root>/probes`` (pretrained models), tagged from its config.yaml."""
    frames = []
    for path in sorted((Path(root) / "probes").glob("**/probes.csv")):
        cfg_path = path.parent / "config.yaml"
        try:
            found = cfg_path.exists()
            cfg = read_yaml_file(cfg_path, "probe config", damaged="probe that model again") if found else {}
        except VitefError as e:
            raise ResultsError(str(e)) from e
        if "dataset_name" not in cfg:
            raise ResultsError(f"{path}: no config.yaml with dataset_name beside it, so its dataset is unknown")
        df = pd.read_csv(path)
        for col in ("layer", "point", "test_acc"):
            if col not in df.columns:
                raise ResultsError(f"{path} has no '{col}' column (probe results need layer, point, test_acc)")
        model = cfg.get("model") or {}
        df["dataset"] = str(cfg["dataset_name"])
        df["model"] = model_label(str(model.get("name", "")) if isinstance(model, dict) else str(model))
        if "pool" not in df.columns:
            df["pool"] = str(cfg.get("pool", ""))
        df["seed"] = int(cfg.get("seed", -1))
        if "train_acc" not in df.columns:
            df["train_acc"] = math.nan
        df["source"] = str(path.parent)
        frames.append(df[PROBE_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=PROBE_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def lp_baselines(probes: pd.DataFrame, pool: str | None = None, model: str | None = None) -> pd.Series:
    """Linear-probing baseline per dataset: mean test accuracy (over seeds) at the last layer's ``res2``.

    ``pool`` chooses the pooling when several were probed (None: the only one present); ``model`` keeps
    the probes of the finetuned model when they are there (probes of one other model are used with a
    warning, of several other models an error).
    """
    if probes.empty:
        return pd.Series(dtype=float, name="lp")
    models = sorted(probes["model"].astype(str).unique())
    if model and model in models:
        probes = probes[probes["model"].astype(str) == model]
    elif model and len(models) > 1:
        raise ResultsError(f"no probes of model {model!r}; probes hold {models}: probe the finetuned model")
    elif model:
        logger.warning("linear-probing baselines are of model %s, the finetuned runs of %s", models[0], model)
    df = probes[probes["point"] == "res2"].copy()
    pools = sorted(df["pool"].astype(str).unique())
    if pool:
        df = df[df["pool"].astype(str) == pool]
    elif len(pools) > 1:
        raise ResultsError(f"probes were run with several poolings ({', '.join(pools)}): choose one with lp_pool=")
    df["layer"] = pd.to_numeric(df["layer"])
    last = df.groupby(["dataset", "model"])["layer"].transform("max")
    df = df[df["layer"] == last]
    return df.groupby("dataset")["test_acc"].mean().rename("lp")


def dataset_key(name: str) -> str:
    """A dataset's row in tables, from the dataset table: ``cifar10_c-corruption-snow-severity-5``,
    ``cifar10_c-snow-5`` → ``cifar10_c-snow`` (the paper uses severity 5 only)."""
    return data_table.dataset_table_key(name)


def dataset_label(name: str) -> str:
    """``cifar10`` → ``CIFAR-10``, ``cifar10_c-snow-5`` → ``C10-C snow`` (each entry's ``label``)."""
    return data_table.dataset_label(name)


def component_label(name: str) -> str:
    """``mha`` → ``MHA``, ``fc1+fc2`` → ``FC1+FC2`` (the registry's labels)."""
    return display_name(name)


def order_datasets(names: Sequence[str]) -> list[str]:
    """The paper's dataset order (each entry's ``order`` in the dataset table), then the rest alphabetically."""
    return data_table.order_datasets(names)


def order_components(names: Sequence[str]) -> list[str]:
    """MHA, FC1, FC2, LN2, LN1 (theoretical plasticity rank), all, emb, then combinations (the registry's order)."""
    return display_order(names)


# ---------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------


def select_group(df: pd.DataFrame, optimizer: str = "", model: str = "") -> tuple[pd.DataFrame, str, str]:
    """The runs of one (optimizer, model); an empty choice means "the only one present" (else an error)."""
    chosen = []
    for col, want in (("optimizer", optimizer), ("model", model)):
        values = sorted(df[col].astype(str).unique())
        if want:
            if want not in values:
                raise ResultsError(f"no runs with {col}={want!r}; the results hold {col} in {values}")
            df = df[df[col].astype(str) == want]
        elif len(values) > 1:
            raise ResultsError(f"the results mix several {col}s ({', '.join(values)}): choose one with {col}=")
        chosen.append(want or (values[0] if values else ""))
    return df, chosen[0], chosen[1]


def summarize(
    df: pd.DataFrame,
    select_on: str = "val",
    ddof: int = 1,
    lrs: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best-LR cells and missing (lr, seed) cells of the runs of one (optimizer, model).

    Returns
    -------
    cells
        One row per dataset x component: ``dataset, component, status`` (ok | partial | missing),
        ``lr`` (chosen), ``mean``, ``std`` (test accuracy over seeds at that lr, ``ddof``), ``n_seeds``,
        ``select_mean`` (the mean the choice maximised), ``lr_gap`` (max − min over complete learning
        rates of the seed-mean test accuracy), ``n_lrs_complete``.
    missing
        One row per expected (dataset, component, lr, seed) without a completed run, with the status
        of the run found there (``absent`` when there is none).
    """
    if select_on not in SELECT_ON:
        raise ResultsError(f"select_on={select_on!r} must be one of {', '.join(SELECT_ON)}")
    dup = df[df.duplicated(["dataset", "trainable", "optimizer", "model", "lr", "seed"], keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        dirs = dup[(dup["dataset"] == first["dataset"]) & (dup["trainable"] == first["trainable"])]["run_dir"]
        raise ResultsError(
            f"several runs for {first['dataset']} / {first['trainable']} / lr {first['lr']:g} / seed "
            f"{first['seed']}: {', '.join(dirs.head(4))}; restrict them with runs_glob="
        )
    key = "best_val_acc" if select_on == "val" else "test_acc"
    df = df.assign(lr=df["lr"].astype(float).round(12))
    components = order_components(df["trainable"].unique())
    cells, missing = [], []
    for dataset in order_datasets(df["dataset"].unique()):
        d = df[df["dataset"] == dataset]
        grid_lrs = sorted({round(float(x), 12) for x in lrs}) if lrs else sorted(d["lr"].unique())
        grid_seeds = sorted({int(s) for s in seeds}) if seeds else sorted(d["seed"].unique())
        for comp in components:
            c = d[d["trainable"] == comp]
            ok = c[(c["status"] == "completed") & c["test_acc"].notna() & c[key].notna()]
            complete, n_missing = {}, 0
            for lr in grid_lrs:
                at = ok[ok["lr"] == lr]
                have = set(at["seed"].astype(int))
                for seed in grid_seeds:
                    if seed not in have:
                        found = c[(c["lr"] == lr) & (c["seed"] == seed)]["status"]
                        status = found.iloc[0] if len(found) else "absent"
                        missing.append(
                            {"dataset": dataset, "component": comp, "lr": lr, "seed": seed, "status": status}
                        )
                        n_missing += 1
                if have >= set(grid_seeds):
                    complete[lr] = at[at["seed"].isin(grid_seeds)]
            row = {"dataset": dataset, "component": comp, "n_lrs_complete": len(complete)}
            if not complete:
                cells.append({**row, "status": "missing", "lr": math.nan, "mean": math.nan, "std": math.nan,
                              "n_seeds": 0, "select_mean": math.nan, "lr_gap": math.nan})  # fmt: skip
                continue
            select = {lr: runs[key].mean() for lr, runs in complete.items()}
            best = max(select.values())
            lr = min(x for x, v in select.items() if v >= best - TIE_TOL)  # ties: the smallest learning rate
            acc = complete[lr]["test_acc"].to_numpy(dtype=float)
            test_means = [runs["test_acc"].mean() for runs in complete.values()]
            cells.append({
                **row,
                "status": "ok" if n_missing == 0 else "partial",
                "lr": lr,
                "mean": float(acc.mean()),
                "std": float(acc.std(ddof=ddof)) if len(acc) > ddof else math.nan,
                "n_seeds": len(acc),
                "select_mean": float(best),
                "lr_gap": float(max(test_means) - min(test_means)),
            })  # fmt: skip
    cells_df = pd.DataFrame(
        cells,
        columns=["dataset", "component", "status", "lr", "mean", "std", "n_seeds", "select_mean", "lr_gap",
                 "n_lrs_complete"],
    )  # fmt: skip
    missing_df = pd.DataFrame(missing, columns=["dataset", "component", "lr", "seed", "status"])
    return cells_df, missing_df


def add_relative_gain(cells: pd.DataFrame, lp: pd.Series) -> pd.DataFrame:
    """Add ``lp`` (baseline accuracy of the dataset) and ``gain`` = (mean − lp) / lp to each cell."""
    out = cells.copy()
    out["lp"] = out["dataset"].map(lp) if len(lp) else math.nan
    out["gain"] = (out["mean"] - out["lp"]) / out["lp"]
    return out


def averages(cells: pd.DataFrame) -> pd.DataFrame:
    """Per component: mean over datasets of the ``ok`` cells (accuracy and, when present, gain), with counts."""
    rows = []
    n_datasets = cells["dataset"].nunique()
    for comp in order_components(cells["component"].unique()):
        c = cells[(cells["component"] == comp) & (cells["status"] == "ok")]
        row = {"component": comp, "mean": c["mean"].mean() if len(c) else math.nan, "n": len(c), "of": n_datasets}
        if "gain" in cells.columns:
            g = c["gain"].dropna()
            row["gain"] = g.mean() if len(g) else math.nan
            row["n_gain"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


def mha_tests(cells: pd.DataFrame, reference: str = "mha") -> pd.DataFrame:
    """Paired tests of ``reference`` against every other component over the datasets where both are ``ok``.

    Columns: component, n, mean_diff (reference − component), t, p_ttest (two-sided
    :func:`scipy.stats.ttest_rel`), w, p_wilcoxon (one-sided :func:`scipy.stats.wilcoxon`,
    ``alternative="greater"``: the reference is better). NaN where fewer than 2 pairs.
    """
    from scipy import stats

    ok = cells[cells["status"] == "ok"].pivot(index="dataset", columns="component", values="mean")
    if reference not in ok.columns:
        raise ResultsError(f"no complete results for '{reference}': the tests compare it with the other components")
    rows = []
    for comp in order_components(ok.columns):
        if comp == reference:
            continue
        pair = ok[[reference, comp]].dropna()
        x, y = pair[reference].to_numpy(), pair[comp].to_numpy()
        row = {"component": comp, "n": len(pair), "mean_diff": float(np.mean(x - y)) if len(pair) else math.nan}
        if len(pair) >= 2:
            t = stats.ttest_rel(x, y)
            row.update(t=float(t.statistic), p_ttest=float(t.pvalue))
            if np.any(x != y):
                w = stats.wilcoxon(x, y, alternative="greater")
                row.update(w=float(w.statistic), p_wilcoxon=float(w.pvalue))
            else:
                row.update(w=math.nan, p_wilcoxon=math.nan)
        else:
            row.update(t=math.nan, p_ttest=math.nan, w=math.nan, p_wilcoxon=math.nan)
        rows.append(row)
    return pd.DataFrame(rows, columns=["component", "n", "mean_diff", "t", "p_ttest", "w", "p_wilcoxon"])


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


def _pct(x: float, digits: int = 2) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{100 * x:.{digits}f}"


def table_rows(cells: pd.DataFrame) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body rows and notes of the paper's table (percentages), shared by markdown and LaTeX.

    Cells: ``mean ± std``; ``†`` marks a partial cell, ``—`` a missing one; the best mean of a row is
    wrapped in ``**`` (the renderer turns it into bold). Rows: datasets, ``average``, and ``gain vs LP``
    when linear-probing baselines are present.
    """
    comps = order_components(cells["component"].unique())
    has_lp = "lp" in cells.columns and cells["lp"].notna().any()
    header = ["dataset", *[component_label(c) for c in comps]] + (["LP"] if has_lp else [])
    body = []
    for dataset in order_datasets(cells["dataset"].unique()):
        d = cells[cells["dataset"] == dataset].set_index("component")
        okm = d[d["status"] != "missing"]["mean"]
        best = okm.max() if len(okm) else math.nan
        row = [dataset_label(dataset)]
        for comp in comps:
            if comp not in d.index or d.loc[comp, "status"] == "missing":
                row.append("—")
                continue
            r = d.loc[comp]
            text = f"{_pct(r['mean'])} ± {_pct(r['std'])}"
            if r["mean"] == best:
                text = f"**{text}**"
            if r["status"] == "partial":
                text += " †"
            row.append(text)
        if has_lp:
            row.append(_pct(d["lp"].iloc[0]))
        body.append(row)
    avg = averages(cells).set_index("component")
    notes = []
    row = ["average"]
    for comp in comps:
        a = avg.loc[comp]
        text = _pct(a["mean"])
        if a["n"] < a["of"]:
            text += f" ({int(a['n'])}/{int(a['of'])})"
        row.append(text)
    if has_lp:
        lp = cells.drop_duplicates("dataset")["lp"]
        row.append(_pct(lp.mean()) + ("" if lp.notna().all() else f" ({int(lp.notna().sum())}/{len(lp)})"))
    body.append(row)
    if has_lp:
        gain_row = ["gain vs LP (%)"]
        for comp in comps:
            g = avg.loc[comp, "gain"]
            gain_row.append("—" if not np.isfinite(g) else f"{100 * g:+.2f}")
        body.append([*gain_row, ""])
        notes.append("gain vs LP: mean over datasets of (acc − LP) / LP, LP = linear probe on the last block's output")
    if (cells["status"] == "partial").any():
        notes.append("† partial: some lr × seed runs are missing; the lr was chosen among the complete ones")
    if (cells["status"] != "ok").any():
        notes.append("averages use complete cells only; (k/n) = over k of n datasets")
    return header, body, notes


def to_markdown(header: list[str], body: list[list[str]], notes: Sequence[str] = ()) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += [""] + [f"{n}" for n in notes] if notes else []
    return "\n".join(lines) + "\n"


def to_latex(header: list[str], body: list[list[str]], notes: Sequence[str] = ()) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``)."""

    def tex(s: str) -> str:
        bold = s.startswith("**")
        s = s.replace("**", "").replace("%", r"\%").replace("±", r"$\pm$").replace("†", r"$^\dagger$")
        s = s.replace("—", "--").replace("_", r"\_")
        return rf"\textbf{{{s}}}" if bold else s

    lines = [r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule", " & ".join(map(tex, header)) + r" \\"]
    lines.append(r"\midrule")
    for r in body:
        if r[0] == "average":
            lines.append(r"\midrule")
        lines.append(" & ".join(tex(x) for x in r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in notes]
    return "\n".join(lines) + "\n"


def stats_markdown(tests: pd.DataFrame, reference: str = "mha") -> str:
    head = (
        f"| {component_label(reference)} vs | n | mean diff (pts) | t | p (t-test, two-sided) | W | p (Wilcoxon, >) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for _, r in tests.iterrows():
        lines.append(
            f"| {component_label(r['component'])} | {int(r['n'])} | {100 * r['mean_diff']:+.2f} | {r['t']:.3f} | "
            f"{r['p_ttest']:.4g} | {r['w']:.1f} | {r['p_wilcoxon']:.4g} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """The rows of ``<run_dir>/metrics.jsonl`` as a DataFrame (train rows and eval rows share ``step``).

    Read by :meth:`vitef.monitor.RunDir.read_metrics`: a partial line (a run killed while writing) is skipped.
    """
    rows = RunDir(run_dir).read_metrics()
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["step"])


def mean_curve(runs: Sequence[str | Path], column: str) -> pd.DataFrame:
    """``column`` against ``step`` averaged over runs (steps logged by every run): step, mean, min, max."""
    series = []
    for run in runs:
        m = read_metrics(run)
        if column in m.columns:
            s = m[["step", column]].dropna().drop_duplicates("step", keep="last").set_index("step")[column]
            series.append(s.astype(float))
    if not series:
        return pd.DataFrame(columns=["step", "mean", "min", "max"])
    both = pd.concat(series, axis=1, join="inner")
    return pd.DataFrame({"mean": both.mean(axis=1), "min": both.min(axis=1), "max": both.max(axis=1)}).reset_index()


# ---------------------------------------------------------------------------------------------------
# Methods: full, layer decay, LoRA, DoRA, BitFit, components, selections, random picks (issue 12)
# ---------------------------------------------------------------------------------------------------

FAMILIES = ("full", "layer decay", "lp-ft", "lora", "dora", "bitfit", "components", "select", "random")
METHOD_CELL_COLUMNS = [
    "dataset", "label", "group", "family", "method", "criterion", "budget", "select_seed", "status", "lr", "mean",
    "std", "n_seeds", "select_mean", "trainable_params", "backbone_params", "head_params", "backbone_share",
    "images_per_s",
]  # fmt: skip
METHOD_TABLE_COLUMNS = [
    "dataset", "group", "family", "method", "criterion", "budget", "status", "lr", "mean", "std", "n", "n_picks",
    "trainable_params", "backbone_share", "images_per_s", "pareto",
]  # fmt: skip
VS_RANDOM_COLUMNS = [
    "dataset", "budget", "method", "criterion", "acc", "random_mean", "random_std", "n_random", "z", "rank", "of",
    "random_min", "random_max",
]  # fmt: skip


def method_family(row) -> str:
    """The family of a run or cell (one of :data:`FAMILIES`): what the methods table and figure group by."""
    if row.criterion == "random":
        return "random"
    if row.criterion:
        return "select"
    if row.method in (*ADAPTER_METHODS, "bitfit"):
        return str(row.method)
    if row.method == "lp_ft":
        return "lp-ft"
    if float(row.layer_decay) < 1:
        return "layer decay"
    return "full" if row.trainable == "all" else "components"


def method_cells(df: pd.DataFrame, select_on: str = "val", ddof: int = 1) -> pd.DataFrame:
    """One cell per dataset x method label (each random pick its own label), as :func:`summarize` makes them.

    The learning rate of a label is chosen among the learning rates of that label (selections may have fewer
    than the baselines) on ``select_on``; ``mean`` and ``std`` are over the training seeds at that lr. Parameter
    counts are the mean over the runs at the chosen lr (a pick may differ between training seeds);
    ``backbone_share`` is (trainable − head) / backbone parameters (LoRA's and DoRA's adapters counted at their size).
    """
    df = with_method_columns(df)
    if df.empty:
        return pd.DataFrame(columns=METHOD_CELL_COLUMNS)
    df = df.assign(label=method_labels(df), group=method_labels(df, pick=False))
    df["family"] = [method_family(r) for r in df.itertuples()]
    cells = []
    for label, sub in df.groupby("label", sort=False):
        found, _ = summarize(sub.assign(trainable=label), select_on, ddof)
        first = sub.iloc[0]
        for cell in found.itertuples():
            at = sub[(sub["dataset"] == cell.dataset) & (sub["status"] == "completed")]
            at = at[np.isclose(at["lr"].astype(float), cell.lr)] if np.isfinite(cell.lr) else at.iloc[:0]
            counts = {}
            for col in ("trainable_params", "backbone_params", "head_params"):
                values = at[col].astype(float)
                values = values[values >= 0]
                counts[col] = float(values.mean()) if len(values) else math.nan
            share = (counts["trainable_params"] - counts["head_params"]) / counts["backbone_params"]
            rates = at["images_per_s"].astype(float).dropna()
            cells.append({
                "dataset": cell.dataset, "label": label, "group": first["group"], "family": first["family"],
                "method": first["method"], "criterion": first["criterion"], "budget": float(first["budget"]),
                "select_seed": int(first["select_seed"]), "status": cell.status, "lr": cell.lr, "mean": cell.mean,
                "std": cell.std, "n_seeds": cell.n_seeds, "select_mean": cell.select_mean, **counts,
                "backbone_share": share, "images_per_s": float(rates.mean()) if len(rates) else math.nan,
            })  # fmt: skip
    return order_method_rows(pd.DataFrame(cells, columns=METHOD_CELL_COLUMNS), "label")


def order_method_rows(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Datasets in the paper's order; within one: family (:data:`FAMILIES`), budget, criterion, then ``name``."""
    from vitef.selection import CRITERIA

    if df.empty:
        return df.reset_index(drop=True)
    datasets = {d: i for i, d in enumerate(order_datasets(df["dataset"].unique()))}
    crit = {c: i for i, c in enumerate(CRITERIA)}

    def key(r) -> tuple:
        base = str(r["criterion"]).split("-")[0]
        budget = float(r["budget"]) if np.isfinite(float(r["budget"])) else -1.0
        return (datasets[r["dataset"]], FAMILIES.index(r["family"]), budget, crit.get(base, len(crit)), r[name])

    order = sorted(range(len(df)), key=lambda i: key(df.iloc[i]))
    return df.iloc[order].reset_index(drop=True)


def pareto_front(params: Sequence[float], acc: Sequence[float]) -> np.ndarray:
    """Which points no other point beats: none has at most as many parameters and at least the accuracy, one of
    them strictly. NaN points are never on the front."""
    x, y = np.asarray(params, dtype=float), np.asarray(acc, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    front = np.zeros(len(x), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        front[i] = not dominated.any()
    return front


def method_table(cells: pd.DataFrame, ddof: int = 1) -> pd.DataFrame:
    """One row per dataset x method group: a method's cell, or the random picks of one budget together.

    For a group of random picks, ``mean`` and ``std`` are over the picks' cell means (``ddof``), ``n`` the
    training seeds of each pick and ``n_picks`` the picks with results; elsewhere ``n_picks`` is 1. ``pareto``
    marks the groups on the dataset's accuracy-vs-trainable-parameters front.
    """
    rows = []
    for _, g in cells.groupby(["dataset", "group"], sort=False):
        first = g.iloc[0]
        ok = g[g["status"] != "missing"]
        row = {c: first[c] for c in ("dataset", "group", "family", "method", "criterion", "budget")}
        if first["family"] == "random":
            means = ok["mean"].to_numpy(float)
            status = "missing" if ok.empty else ("ok" if (g["status"] == "ok").all() else "partial")
            row.update(
                status=status, lr=float(ok["lr"].iloc[0]) if ok["lr"].nunique() == 1 else math.nan,
                mean=float(means.mean()) if len(means) else math.nan,
                std=float(means.std(ddof=ddof)) if len(means) > ddof else math.nan,
                n=int(ok["n_seeds"].min()) if len(ok) else 0, n_picks=len(ok),
            )  # fmt: skip
        else:
            row.update(status=first["status"], lr=first["lr"], mean=first["mean"], std=first["std"],
                       n=int(first["n_seeds"]), n_picks=1 if first["status"] != "missing" else 0)  # fmt: skip
        row["trainable_params"] = float(ok["trainable_params"].mean()) if len(ok) else math.nan
        row["backbone_share"] = float(ok["backbone_share"].mean()) if len(ok) else math.nan
        rates = ok["images_per_s"].astype(float).dropna()
        row["images_per_s"] = float(rates.mean()) if len(rates) else math.nan
        rows.append(row)
    table = pd.DataFrame(rows, columns=[c for c in METHOD_TABLE_COLUMNS if c != "pareto"])
    table["pareto"] = False
    for dataset in table["dataset"].unique():
        at = table["dataset"] == dataset
        table.loc[at, "pareto"] = pareto_front(table.loc[at, "trainable_params"], table.loc[at, "mean"])
    return order_method_rows(table, "group")


def criterion_vs_random(cells: pd.DataFrame, ddof: int = 1) -> pd.DataFrame:
    """Each criterion's pick against the random picks of the same dataset, budget and method.

    ``acc`` is the criterion's cell mean; ``random_mean`` / ``random_std`` (``ddof``) / ``n_random`` are over the
    random picks' cell means; ``z`` = (acc − random_mean) / random_std (NaN when the std is 0 or undefined);
    ``rank`` is the criterion's place among itself and the random picks, 1 = best (1 + the picks strictly
    better), ``of`` = n_random + 1. Cells without results are left out; a budget without random picks gives rows
    with ``n_random`` 0.
    """
    ok = cells[cells["status"] != "missing"]
    sel = ok[(ok["criterion"] != "") & (ok["criterion"] != "random")]
    rand = ok[ok["criterion"] == "random"]
    rows = []
    for r in sel.itertuples():
        same = rand[(rand["dataset"] == r.dataset) & np.isclose(rand["budget"].astype(float), r.budget)]
        same = same[same["method"] == r.method]["mean"].to_numpy(float)
        n = len(same)
        mean = float(same.mean()) if n else math.nan
        std = float(same.std(ddof=ddof)) if n > ddof else math.nan
        z = (r.mean - mean) / std if np.isfinite(std) and std > 0 else math.nan
        rows.append({
            "dataset": r.dataset, "budget": r.budget, "method": r.method, "criterion": r.criterion, "acc": r.mean,
            "random_mean": mean, "random_std": std, "n_random": n, "z": z, "rank": 1 + int((same > r.mean).sum()),
            "of": n + 1, "random_min": float(same.min()) if n else math.nan,
            "random_max": float(same.max()) if n else math.nan,
        })  # fmt: skip
    out = pd.DataFrame(rows, columns=VS_RANDOM_COLUMNS)
    if out.empty:
        return out
    out = out.assign(family="select", group="")
    out = order_method_rows(out, "criterion")
    return out[VS_RANDOM_COLUMNS]


def _pm(mean: float, std: float) -> str:
    return f"{_pct(mean)} ± {_pct(std)}" if np.isfinite(std) else _pct(mean)


def _count(n: float) -> str:
    if not np.isfinite(n):
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}")


def methods_markdown(table: pd.DataFrame) -> str:
    """The methods table, one block per dataset: accuracy (%) mean ± std, trainable parameters, share, lr."""
    parts = []
    for dataset in order_datasets(table["dataset"].unique()):
        d = table[table["dataset"] == dataset]
        best = d["mean"].max()
        header = ["method", "trainable params", "% of backbone", "images/s", "lr", "test acc. (%)", "n"]
        body = []
        for r in d.itertuples():
            text = "—" if r.status == "missing" else _pm(r.mean, r.std)
            if r.status != "missing" and r.mean == best:
                text = f"**{text}**"
            if r.status == "partial":
                text += " †"
            name = f"{r.group} ◆" if r.pareto else r.group
            n = f"{r.n_picks} picks × {r.n}" if r.family == "random" else str(r.n)
            lr = f"{r.lr:g}" if np.isfinite(r.lr) else "—"
            share = f"{100 * r.backbone_share:.1f}" if np.isfinite(r.backbone_share) else "—"
            speed = f"{r.images_per_s:,.0f}" if np.isfinite(r.images_per_s) else "—"
            body.append([name, _count(r.trainable_params), share, speed, lr, text, n])
        parts.append(f"**{dataset_label(dataset)}**\n\n{to_markdown(header, body).rstrip()}")
    notes = [
        "◆ on the accuracy-vs-trainable-parameters Pareto front; trainable params include the head; % of backbone: "
        "(trainable − head) / backbone parameters; images/s: median training throughput of a run, mean over its "
        "runs (compare runs of one machine and sweep); n: training seeds (random: picks × seeds, ± over the picks)"
    ]
    if (table["status"] == "partial").any():
        notes.append("† partial: some lr × seed runs are missing; the lr was chosen among the complete ones")
    return "\n\n".join(parts) + "\n\n" + "\n".join(notes) + "\n"


def vs_random_markdown(vs: pd.DataFrame) -> str:
    """Criterion vs random, one block per dataset: rows (budget, criterion) with the random picks' summary."""
    parts = []
    for dataset in order_datasets(vs["dataset"].unique()):
        d = vs[vs["dataset"] == dataset]
        header = ["budget", "criterion", "acc. (%)", "random (%) mean ± std", "random min – max", "n random", "z",
                  "rank"]  # fmt: skip
        body = []
        for r in d.itertuples():
            crit = r.criterion + ("" if r.method == "full" else f" ({r.method})")
            spread = f"{_pct(r.random_min)} – {_pct(r.random_max)}" if r.n_random else "—"
            z = f"{r.z:+.2f}" if np.isfinite(r.z) else "—"
            body.append([budget_label(r.budget), crit, _pct(r.acc), _pm(r.random_mean, r.random_std), spread,
                         str(r.n_random), z, f"{r.rank}/{r.of}"])  # fmt: skip
        parts.append(f"**{dataset_label(dataset)}**\n\n{to_markdown(header, body).rstrip()}")
    note = (
        "z = (acc − random mean) / random std; rank: the criterion's place among itself and the random picks of "
        "the same budget (1 = best)"
    )
    return "\n\n".join(parts) + "\n\n" + note + "\n"
