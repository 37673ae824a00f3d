"""Finetuning results of arXiv 2602.06883 (§5): CSVs from run directories, the paper's table, tests, figures.

    python -m apps.plots.finetuning csv                    # outputs/runs/** -> results/finetuning/<dataset>.csv
    python -m apps.plots.finetuning table                  # best-LR mean ± std, lr chosen on validation
    python -m apps.plots.finetuning table select_on=test   # the authors' choice of lr (on test)
    python -m apps.plots.finetuning stat                   # MHA vs each component: paired t-test, Wilcoxon
    python -m apps.plots.finetuning figures                # accuracy, robustness, training curves (PNG + PDF)
    python -m apps.plots.finetuning predictors             # which signal ranks the components as finetuning does
    python -m apps.plots.finetuning methods                # methods table, Pareto figure, criterion vs random

``csv`` reads run directories (``<root>/runs/<runs_glob>/``: config.yaml, status.json, eval.json)
and probe results (``<root>/probes/**/probes.csv``); the other verbs read what ``csv`` wrote, plus the
runs' metrics.jsonl for the training curves. ``predictors`` also reads the analysis folders
(``<root>/analysis/*``) and ranks the components by plasticity, gradient norm and bound against the
finetuning results (:mod:`vitef.predictors`). How the learning rate is chosen, the std (ddof), missing
runs and the relative gain are defined in :mod:`vitef.results`.

``table``, ``stat``, ``figures`` and ``predictors`` read the component-wise runs (``method=full``, no
selection, no layer decay: the paper's grid) and leave the others out. ``methods`` compares every method
(issue 12): full finetuning, layer decay, LoRA, BitFit, components, selections by a criterion and random picks,
each named by :func:`vitef.results.method_label`; it writes ``tables/methods_<tag>.{md,csv}`` (accuracy ± std
and trainable parameters per method and budget, lr chosen per method), ``tables/criterion_vs_random_<tag>.{md,
csv}`` (each criterion's pick against the random picks of its budget) and ``figures/methods/<tag>/pareto``
(accuracy against trainable parameters, front highlighted, one panel per dataset).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from apps.plots.common import STYLE, component_color, grid_shape, save_figure
from vitef import predictors as P
from vitef import results as R
from vitef.config import cli_main, option
from vitef.errors import ConfigError
from vitef.utils import atomic_path, atomic_write_text, check_writable, safe_name

logger = logging.getLogger(__name__)

COMMANDS = ("csv", "table", "stat", "figures", "predictors", "methods")


@dataclasses.dataclass
class FinetuningPlotsConfig:
    """Aggregate finetuning runs into CSVs, the paper's accuracy table, significance tests and figures."""

    command: str = option("csv", "what to do: csv, table, stat, figures, predictors or methods")
    root: str = option("outputs", "output root holding runs/ (finetuning) and probes/ (linear probing)")
    runs_glob: str = option("**", "which run directories under <root>/runs to read (glob), e.g. 'main/**'")
    results_dir: str = option("results", "where CSVs, tables and figures are written")
    select_on: str = option("val", "choose each cell's learning rate on val (mean best_val_acc) or test (authors)")
    ddof: int = option(1, "delta degrees of freedom of the std over seeds (1: sample std)")
    optimizer: str = option(
        "", "optimizer whose runs to tabulate (empty: the only one in the results; methods: every one, labelled)"
    )
    model: str = option("", "model whose runs to tabulate (empty: the only one in the results)")
    datasets: list[str] = option([], "datasets to include (empty: all in the results)")
    lrs: list[float] = option([], "expected learning-rate grid (empty: every lr seen for the dataset)")
    seeds: list[int] = option([], "expected seeds (empty: every seed seen for the dataset)")
    lp_pool: str = option("", "pooling of the linear-probing baseline when several were probed")
    first_steps: int = option(10, "predictors: gradient norms averaged over this many first updates of each run")

    def validate(self) -> None:
        if self.command not in COMMANDS:
            raise ConfigError(f"unknown command '{self.command}': choose one of {', '.join(COMMANDS)}")
        if self.select_on not in R.SELECT_ON:
            raise ConfigError(f"select_on={self.select_on!r} must be one of {', '.join(R.SELECT_ON)}")
        if self.ddof < 0:
            raise ConfigError(f"ddof={self.ddof} must be >= 0")
        if self.first_steps < 1:
            raise ConfigError(f"first_steps={self.first_steps} must be >= 1")


CONFIG = FinetuningPlotsConfig


def main(cfg: FinetuningPlotsConfig) -> None:
    check_writable(cfg.results_dir, "results_dir")
    commands = {
        "csv": write_csvs,
        "table": write_table,
        "stat": write_stats,
        "figures": write_figures,
        "predictors": write_predictors,
        "methods": write_methods,
    }
    commands[cfg.command](cfg)


# ---------------------------------------------------------------------------------------------------
# csv
# ---------------------------------------------------------------------------------------------------


def write_csvs(cfg: FinetuningPlotsConfig) -> None:
    runs = R.collect_finetuning(cfg.root, cfg.runs_glob)
    probes = R.collect_probes(cfg.root)
    if runs.empty and probes.empty:
        raise R.ResultsError(
            f"no training runs under {Path(cfg.root) / 'runs'} matching '{cfg.runs_glob}' and no probes under "
            f"{Path(cfg.root) / 'probes'}: run the sweeps first or set root="
        )
    out = Path(cfg.results_dir)
    # The method columns only when some run is not a component run: the paper's CSVs read as they always did.
    columns = list(R.drop_default_method_columns(runs).columns)
    for dataset, df in runs.groupby("dataset", sort=False):
        df = df.sort_values(["trainable", "optimizer", "model", "lr", "seed"])[columns]
        _write_csv(df, out / "finetuning" / f"{safe_name(dataset)}.csv")
        counts = df["status"].value_counts().to_dict()
        print(f"{dataset}: {len(df)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    for dataset, df in probes.groupby("dataset", sort=False):
        _write_csv(df, out / "linear_probing" / f"{safe_name(dataset)}.csv")
    print(
        f"wrote {runs['dataset'].nunique()} finetuning CSVs to {out / 'finetuning'} "
        f"and {probes['dataset'].nunique()} linear-probing CSVs to {out / 'linear_probing'}"
    )


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def read_csvs(cfg: FinetuningPlotsConfig) -> pd.DataFrame:
    """Every row the ``csv`` command wrote, with the method columns (defaults for CSVs of component runs only)."""
    folder = Path(cfg.results_dir) / "finetuning"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise R.ResultsError(f"no results in {folder}: run `python -m apps.plots.finetuning csv` first")
    dtypes = {"trainable": str, "dataset": str, "criterion": str, "method": str}
    runs = pd.concat([pd.read_csv(f, dtype=dtypes) for f in files], ignore_index=True)
    missing_cols = set(R.BASE_COLUMNS) - set(runs.columns)
    if missing_cols:
        raise R.ResultsError(f"{folder} holds CSVs without columns {sorted(missing_cols)}: rerun the csv command")
    return R.with_method_columns(runs)


def has_paper_grid(results_dir: str | Path) -> bool:
    """Whether the CSVs in ``<results_dir>/finetuning`` hold component runs of MHA (what ``stat`` compares with the
    other components), so that the component-wise tables apply (for the study)."""
    files = sorted((Path(results_dir) / "finetuning").glob("*.csv"))
    if not files:
        return False
    runs = pd.concat(
        [pd.read_csv(f, dtype={"trainable": str, "criterion": str, "method": str}) for f in files], ignore_index=True
    )
    return bool((R.is_component_run(runs) & (runs["trainable"].astype(str) == "mha")).any())


def has_method_runs(results_dir: str | Path) -> bool:
    """Whether the CSVs in ``<results_dir>/finetuning`` hold runs other than component runs (for the study)."""
    files = sorted((Path(results_dir) / "finetuning").glob("*.csv"))
    if not files:
        return False
    runs = pd.concat([pd.read_csv(f, dtype={"criterion": str, "method": str}) for f in files], ignore_index=True)
    return bool(len(runs)) and not R.is_component_run(runs).all()


def load_results(cfg: FinetuningPlotsConfig) -> tuple[pd.DataFrame, pd.Series, str]:
    """The component runs of one (optimizer, model), the LP baselines, and a tag naming the selection.

    Runs of other methods (LoRA, BitFit, selections, layer decay) are left out: the ``methods`` command has them.
    """
    runs = read_csvs(cfg)
    component = R.is_component_run(runs)
    if not component.all():
        logger.info("%d runs of other methods left out of the component tables (see `methods`)", (~component).sum())
        runs = runs[component]
        if runs.empty:
            raise R.ResultsError(
                f"no component-wise runs in {Path(cfg.results_dir) / 'finetuning'} (only LoRA, BitFit, selection "
                "or layer-decay runs): use `python -m apps.plots.finetuning methods`"
            )
    runs = runs[[c for c in runs.columns if c not in R.METHOD_COLUMNS]]
    if cfg.datasets:
        unknown = set(cfg.datasets) - set(runs["dataset"])
        if unknown:
            raise R.ResultsError(f"datasets {sorted(unknown)} are not in the results ({sorted(set(runs['dataset']))})")
        runs = runs[runs["dataset"].isin(cfg.datasets)]
    runs, optimizer, model = R.select_group(runs, cfg.optimizer, cfg.model)
    lp_files = sorted((Path(cfg.results_dir) / "linear_probing").glob("*.csv"))
    probes = pd.concat([pd.read_csv(f) for f in lp_files], ignore_index=True) if lp_files else pd.DataFrame()
    lp = R.lp_baselines(probes, cfg.lp_pool or None, model) if not probes.empty else pd.Series(dtype=float)
    tag = safe_name(f"{model}_{optimizer}_select-{cfg.select_on}")
    return runs, lp, tag


def summarize(cfg: FinetuningPlotsConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series, str]:
    runs, lp, tag = load_results(cfg)
    cells, missing = R.summarize(runs, cfg.select_on, cfg.ddof, cfg.lrs or None, cfg.seeds or None)
    cells = R.add_relative_gain(cells, lp)
    if not missing.empty:
        what = "; ".join(
            f"{d}/{c}: {len(g)} (e.g. lr {g['lr'].iloc[0]:g} seed {g['seed'].iloc[0]}: {g['status'].iloc[0]})"
            for (d, c), g in missing.groupby(["dataset", "component"], sort=False)
        )
        logger.warning("%d lr x seed runs are missing or unfinished, left out of the averages: %s", len(missing), what)
    return cells, missing, lp, tag


# ---------------------------------------------------------------------------------------------------
# table and stat
# ---------------------------------------------------------------------------------------------------


def write_table(cfg: FinetuningPlotsConfig) -> None:
    cells, missing, _, tag = summarize(cfg)
    header, body, notes = R.table_rows(cells)
    title = f"Best-LR test accuracy (%), mean ± std over seeds (ddof={cfg.ddof}); lr chosen on {cfg.select_on}"
    md = f"{title}\n\n{R.to_markdown(header, body, notes)}"
    out = Path(cfg.results_dir) / "tables"
    atomic_write_text(out / f"finetuning_{tag}.md", md)
    atomic_write_text(out / f"finetuning_{tag}.tex", f"% {title}\n{R.to_latex(header, body, notes)}")
    _write_csv(cells, out / f"finetuning_{tag}.csv")
    _write_csv(missing, out / f"missing_{tag}.csv")
    print(md)
    if not missing.empty:
        print(f"{len(missing)} lr x seed runs missing: listed in {out / f'missing_{tag}.csv'}")
    print(f"wrote {out / f'finetuning_{tag}'}.{{md,tex,csv}}")


def write_stats(cfg: FinetuningPlotsConfig) -> None:
    cells, _, _, tag = summarize(cfg)
    tests = R.mha_tests(cells)
    out = Path(cfg.results_dir) / "tables"
    title = (
        f"MHA vs each component over the datasets' best-LR mean test accuracies (lr chosen on {cfg.select_on}): "
        "paired t-test (two-sided), Wilcoxon signed-rank (one-sided, MHA greater)"
    )
    md = f"{title}\n\n{R.stats_markdown(tests)}"
    atomic_write_text(out / f"stats_{tag}.md", md)
    _write_csv(tests, out / f"stats_{tag}.csv")
    print(md)
    print(f"wrote {out / f'stats_{tag}'}.{{md,csv}}")


def write_predictors(cfg: FinetuningPlotsConfig) -> None:
    """Kendall's tau of each signal's component ranking against the finetuning ranking, per task and pooled."""
    cells, _, _, tag = summarize(cfg)
    runs, _, _ = load_results(cfg)
    model = runs["model"].iloc[0] if len(runs) else ""
    signals = pd.concat(
        [
            P.analysis_signals(P.collect_analyses(cfg.root), model),
            P.grad_norm_signals(runs, cells, cfg.first_steps),
        ],
        ignore_index=True,
    )
    taus = P.kendall_table(signals, cells, R.order_datasets(cells["dataset"].unique()))
    out = Path(cfg.results_dir) / "tables"
    _write_csv(signals, out / f"predictor_signals_{tag}.csv")
    _write_csv(taus, out / f"predictors_{tag}.csv")
    md = predictors_markdown(taus, signals, cfg)
    atomic_write_text(out / f"predictors_{tag}.md", md)
    print(md)
    print(f"wrote {out / f'predictors_{tag}'}.{{md,csv}} and {out / f'predictor_signals_{tag}.csv'}")


def predictors_markdown(taus: pd.DataFrame, signals: pd.DataFrame, cfg: FinetuningPlotsConfig) -> str:
    """One table per target: rows (task, signal) with the signal's ranking, the target's, tau and p."""
    labels = {
        "plasticity_embedding": "plasticity (embedding)",
        "plasticity_hidden": "plasticity (hidden)",
        "grad_norm": f"gradient norm (first {cfg.first_steps} steps)",
        "bound": "theoretical bound",
    }
    parts = [
        f"Kendall's tau between each signal's ranking of the five components and the finetuning ranking "
        f"(lr chosen on {cfg.select_on}); p two-sided. `all`: every (task, component) pair pooled."
    ]
    for target, title in (("acc", "best-LR test accuracy"), ("gain", "relative gain over linear probing")):
        t = taus[taus["target"] == target]
        header = ["task", "signal", "signal ranking", f"{title} ranking", "tau", "p", "n"]
        body = []
        for r in t.itertuples():
            ok = r.status == "ok"
            body.append([
                R.dataset_label(r.dataset) if r.dataset != "all" else "all",
                labels[r.signal],
                r.signal_ranking if ok else f"— ({r.status})",
                r.target_ranking if ok else "",
                f"{r.tau:+.2f}" if ok else "—",
                f"{r.p_value:.3f}" if ok else "—",
                str(r.n),
            ])  # fmt: skip
        parts.append(f"**Against the {title}**\n\n{R.to_markdown(header, body)}")
    missing = taus[(taus["status"] != "ok")]
    if len(missing):
        parts.append(
            "Missing inputs: "
            + "; ".join(sorted({f"{r.dataset}: {r.status}" for r in missing.itertuples() if r.dataset != "all"}))
        )
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# methods (issue 12)
# ---------------------------------------------------------------------------------------------------

# One colour and marker per family of methods in the Pareto figure (vitef.results.FAMILIES).
FAMILY_STYLE = {
    "full": ("#7f7f7f", "s"),
    "layer decay": ("#9467bd", "D"),
    "lp-ft": ("#8c564b", "P"),
    "lora": ("#2ca02c", "^"),
    "dora": ("#17becf", "<"),
    "bitfit": ("#e377c2", "v"),
    "components": ("#1f77b4", "o"),
    "select": ("#d62728", "*"),
    "random": ("#bcbd22", "o"),
}


def load_method_runs(cfg: FinetuningPlotsConfig) -> tuple[pd.DataFrame, str]:
    """Every run of one model (all methods, every optimizer unless ``optimizer=``) and the tag of its files."""
    runs = read_csvs(cfg)
    if cfg.datasets:
        unknown = set(cfg.datasets) - set(runs["dataset"])
        if unknown:
            raise R.ResultsError(f"datasets {sorted(unknown)} are not in the results ({sorted(set(runs['dataset']))})")
        runs = runs[runs["dataset"].isin(cfg.datasets)]
    if cfg.optimizer:
        optimizers = sorted(runs["optimizer"].astype(str).unique())
        if cfg.optimizer not in optimizers:
            raise R.ResultsError(
                f"no runs with optimizer={cfg.optimizer!r}; the results hold optimizer in {optimizers}"
            )
        runs = runs[runs["optimizer"].astype(str) == cfg.optimizer]
    # The optimizer is part of each method's label (vitef.results.method_label): only the model must be one.
    models = sorted(runs["model"].astype(str).unique())
    model = cfg.model or (models[0] if len(models) == 1 else "")
    if model not in models:
        what = (
            f"no runs of model={cfg.model!r}" if cfg.model else f"the results mix several models ({', '.join(models)})"
        )
        raise R.ResultsError(f"{what}: choose one with model= among {models}")
    runs = runs[runs["model"].astype(str) == model]
    tag = safe_name(f"{model}_select-{cfg.select_on}")
    return runs, tag


def write_methods(cfg: FinetuningPlotsConfig) -> None:
    """The methods table, criterion vs random and the accuracy-vs-trainable-parameters figure (Pareto front)."""
    import matplotlib.pyplot as plt

    runs, tag = load_method_runs(cfg)
    cells = R.method_cells(runs, cfg.select_on, cfg.ddof)
    if cells.empty:
        raise R.ResultsError(f"no finetuning runs in {Path(cfg.results_dir) / 'finetuning'} to compare")
    table = R.method_table(cells, cfg.ddof)
    vs = R.criterion_vs_random(cells, cfg.ddof)
    out = Path(cfg.results_dir) / "tables"
    title = (
        f"Methods: test accuracy (%) at each method's learning rate chosen on {cfg.select_on}, mean ± std over "
        f"seeds (ddof={cfg.ddof}; random picks: over the picks), and the parameters each trains"
    )
    md = f"{title}\n\n{R.methods_markdown(table)}"
    atomic_write_text(out / f"methods_{tag}.md", md)
    _write_csv(table, out / f"methods_{tag}.csv")
    _write_csv(cells, out / f"methods_cells_{tag}.csv")
    print(md)
    written = [out / f"methods_{tag}.md"]
    if not vs.empty:
        title = (
            "Criterion vs random: each criterion's pick against random picks of the same budget (test accuracy, %, "
            f"lr chosen on {cfg.select_on})"
        )
        md = f"{title}\n\n{R.vs_random_markdown(vs)}"
        atomic_write_text(out / f"criterion_vs_random_{tag}.md", md)
        _write_csv(vs, out / f"criterion_vs_random_{tag}.csv")
        print(md)
        written.append(out / f"criterion_vs_random_{tag}.md")
    with plt.rc_context(STYLE):
        figs = save_figure(plot_pareto(table, cells), Path(cfg.results_dir) / "figures" / "methods" / tag / "pareto")
    print(f"wrote {', '.join(str(p) for p in written)} (+ .csv) and {figs[0]} (+ .pdf)")


def plot_pareto(table: pd.DataFrame, cells: pd.DataFrame):
    """Test accuracy against trainable parameters (log x) per method, one panel per dataset; the front joined.

    Random picks are small dots, their mean a marker with the std over picks; every other method one marker
    (± std over seeds). Methods on the front are labelled.
    """
    datasets = R.order_datasets(table["dataset"].unique())
    fig, panels = _dataset_panels(datasets)
    fig.set_size_inches(4.6 * min(len(datasets), 4), 3.8 * ((len(datasets) + 3) // 4))
    for ax, dataset in panels:
        d = table[(table["dataset"] == dataset) & (table["status"] != "missing")]
        picks = cells[(cells["dataset"] == dataset) & (cells["family"] == "random") & (cells["status"] != "missing")]
        if len(picks):
            ax.scatter(picks["trainable_params"], 100 * picks["mean"], s=8, color=FAMILY_STYLE["random"][0], alpha=0.6,
                       zorder=2, label="random pick")  # fmt: skip
        seen = set()
        for r in d.itertuples():
            color, mark = FAMILY_STYLE.get(r.family, (OTHER_FAMILY_COLOR, "o"))
            label = r.family if r.family not in seen else None
            seen.add(r.family)
            std = 100 * r.std if np.isfinite(r.std) else 0.0
            ax.errorbar(r.trainable_params, 100 * r.mean, yerr=std, fmt=mark, color=color, ms=7 if mark == "*" else 5,
                        mec="k" if r.pareto else color, mew=0.8, capsize=2, zorder=3, label=label)  # fmt: skip
        front = d[d["pareto"]].sort_values("trainable_params")
        if len(front):
            ax.step(front["trainable_params"], 100 * front["mean"], where="post", color="k", lw=1, alpha=0.6,
                    zorder=1, label="Pareto front")  # fmt: skip
            for x, y, names in _front_labels(front):
                ax.annotate("\n".join(names), (x, 100 * y), textcoords="offset points", xytext=(4, 3), fontsize=6,
                            va="bottom")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (head included)")
        ax.set_ylabel("test acc. (%)")
        ax.set_title(R.dataset_label(dataset))
        ax.legend(fontsize=6, frameon=False, loc="lower right")
    fig.suptitle("Accuracy vs trainable parameters per method (lr chosen per method)")
    fig.tight_layout()
    return fig


OTHER_FAMILY_COLOR = "#8c564b"


def _front_labels(front: pd.DataFrame) -> list[tuple[float, float, list[str]]]:
    """The front's points as (params, accuracy, names), points of equal accuracy within 10 % of each other's
    parameters merged into one label (ties of criteria that picked alike would print over each other)."""
    out: list[tuple[float, float, list[str]]] = []
    for r in front.sort_values("trainable_params").itertuples():
        if out and np.isclose(out[-1][1], r.mean) and r.trainable_params <= 1.1 * out[-1][0]:
            out[-1][2].append(r.group)
        else:
            out.append((float(r.trainable_params), float(r.mean), [r.group]))
    return out


# ---------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------


def write_figures(cfg: FinetuningPlotsConfig) -> None:
    import matplotlib.pyplot as plt

    runs, _, tag = load_results(cfg)
    cells, _, _, _ = summarize(cfg)
    out = Path(cfg.results_dir) / "figures" / "finetuning" / tag
    written: list[Path] = []
    with plt.rc_context(STYLE):
        written += save_figure(plot_accuracy(cells), out / "accuracy_per_component")
        written += save_figure(plot_robustness(runs), out / "robustness_lr_seed")
        written += save_figure(plot_lr_gap(cells), out / "lr_gap")
        for dataset in R.order_datasets(cells["dataset"].unique()):
            fig = plot_curves(runs, cells, dataset)
            if fig is not None:
                written += save_figure(fig, out / f"curves_{safe_name(dataset)}")
    for p in written:
        if p.suffix == ".png":
            print(f"wrote {p} (+ .pdf)")


def _components(df: pd.DataFrame, col: str) -> list[str]:
    return R.order_components(df[col].unique())


# Components trained together (trainable=[mha, fc1] → ``mha+fc1``) are their own configuration: each gets its own
# colour (common.py gives every combination the one OTHER_COLOR) and hatched bars / dashed lines, so that
# MHA+FC1 reads apart from MHA, FC1 and from another combination in the same figure.
COMBINATION_COLORS = ("#8c564b", "#2ca02c", "#393b79", "#843c39", "#7b4173", "#637939")
COMBINATION_HATCH = "//"


def is_combination(component: str) -> bool:
    return "+" in str(component)


def component_colors(comps: list[str]) -> dict[str, str]:
    """Colour of each of ``comps``: the shared component colour, or one colour per combination in ``comps``."""
    combos = [c for c in comps if is_combination(c)]
    colors = {c: component_color(c) for c in comps}
    for i, c in enumerate(combos):
        colors[c] = COMBINATION_COLORS[i % len(COMBINATION_COLORS)]
    return colors


def _dataset_panels(datasets: list[str]):
    """A figure with one panel per dataset (at most 4 a row; the spare panels of the last row hidden) and the
    ``(axes, dataset)`` pairs."""
    import matplotlib.pyplot as plt

    rows, cols = grid_shape(len(datasets))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(datasets) :]:
        ax.axis("off")
    return fig, list(zip(axes.flat, datasets, strict=False))


def plot_accuracy(cells: pd.DataFrame):
    """Best-LR test accuracy per component (bars) ± std over seeds (error bars), one panel per dataset."""
    datasets = R.order_datasets(cells["dataset"].unique())
    comps = _components(cells, "component")
    colors = component_colors(comps)
    fig, panels = _dataset_panels(datasets)
    for ax, dataset in panels:
        d = cells[cells["dataset"] == dataset].set_index("component").reindex(comps)
        mean, std = 100 * d["mean"].to_numpy(float), 100 * d["std"].fillna(0).to_numpy(float)
        x = np.arange(len(comps))
        bars = ax.bar(x, np.nan_to_num(mean), yerr=std, color=[colors[c] for c in comps], capsize=3)
        for bar, c in zip(bars, comps, strict=True):
            if is_combination(c):
                bar.set_hatch(COMBINATION_HATCH)  # per bar: a list of hatches needs matplotlib 3.10
        for i, status in enumerate(d["status"]):
            if status != "ok":
                ax.annotate("†" if status == "partial" else "missing", (i, 0), ha="center", va="bottom", fontsize=7)
        finite = mean[np.isfinite(mean)]
        if len(finite):
            lo, hi = np.min(finite - std[np.isfinite(mean)]), np.max(finite + std[np.isfinite(mean)])
            pad = max(0.5, 0.15 * (hi - lo))
            ax.set_ylim(max(0, lo - pad), min(100, hi + pad))
        ax.set_xticks(x, [R.component_label(c) for c in comps], rotation=45)
        ax.set_title(R.dataset_label(dataset))
        ax.set_ylabel("test acc. (%)")
    fig.suptitle("Best-LR test accuracy per finetuned component (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def plot_robustness(runs: pd.DataFrame):
    """Boxplots of test accuracy over every completed lr x seed run, per component and dataset."""
    ok = runs[(runs["status"] == "completed") & runs["test_acc"].notna()]
    datasets = R.order_datasets(runs["dataset"].unique())
    comps = _components(runs, "trainable")
    colors = component_colors(comps)
    fig, panels = _dataset_panels(datasets)
    for ax, dataset in panels:
        d = ok[ok["dataset"] == dataset]
        data = [100 * d[d["trainable"] == c]["test_acc"].to_numpy(float) for c in comps]
        bp = ax.boxplot(data, patch_artist=True, widths=0.6)
        for patch, c in zip(bp["boxes"], comps, strict=True):
            patch.set_facecolor(colors[c])
            patch.set_alpha(0.7)
            if is_combination(c):
                patch.set_hatch(COMBINATION_HATCH)
        for i, values in enumerate(data):
            ax.scatter(np.full(len(values), i + 1.0), values, s=6, color="k", zorder=3)
        ax.set_xticks(np.arange(1, len(comps) + 1), [R.component_label(c) for c in comps], rotation=45)
        ax.set_title(f"{R.dataset_label(dataset)} (n={len(d)})")
        ax.set_ylabel("test acc. (%)")
    fig.suptitle("Robustness to learning rate and seed: test accuracy of every lr × seed run")
    fig.tight_layout()
    return fig


def plot_lr_gap(cells: pd.DataFrame):
    """Max − min over learning rates of the seed-mean test accuracy, per dataset (groups) and component (bars)."""
    import matplotlib.pyplot as plt

    datasets = R.order_datasets(cells["dataset"].unique())
    comps = _components(cells, "component")
    colors = component_colors(comps)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(datasets) * len(comps) / 4), 3.2))
    width = 0.8 / len(comps)
    x = np.arange(len(datasets))
    for j, comp in enumerate(comps):
        c = cells[cells["component"] == comp].set_index("dataset").reindex(datasets)
        gap = 100 * c["lr_gap"].to_numpy(float)
        ax.bar(x + (j - (len(comps) - 1) / 2) * width, gap, width, color=colors[comp],
               hatch=COMBINATION_HATCH if is_combination(comp) else None, label=R.component_label(comp))  # fmt: skip
    ax.set_xticks(x, [R.dataset_label(d) for d in datasets], rotation=30, ha="right")
    ax.set_ylabel("max − min over lr (pts)")
    ax.set_title("Sensitivity to the learning rate (lower is more robust)")
    ax.legend(ncol=min(len(comps), 7), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def plot_curves(runs: pd.DataFrame, cells: pd.DataFrame, dataset: str):
    """Gradient norm and validation loss against step for each component at its chosen lr (mean, min-max band)."""
    import matplotlib.pyplot as plt

    chosen = cells[(cells["dataset"] == dataset) & cells["lr"].notna()]
    if chosen.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    colors = component_colors(R.order_components(chosen["component"].unique()))
    drew = False
    for _, cell in chosen.iterrows():
        sel = runs[
            (runs["dataset"] == dataset)
            & (runs["trainable"] == cell["component"])
            & (np.isclose(runs["lr"].astype(float), cell["lr"]))
            & (runs["status"] == "completed")
        ]
        for ax, column in zip(axes, ("grad_norm", "val_loss"), strict=True):
            curve = R.mean_curve(sel["run_dir"].tolist(), column)
            if curve.empty:
                continue
            drew = True
            color = colors[cell["component"]]
            label = f"{R.component_label(cell['component'])} (lr {cell['lr']:g})"
            style = "--" if is_combination(cell["component"]) else "-"
            ax.plot(curve["step"], curve["mean"], color=color, ls=style, label=label, lw=1.2)
            ax.fill_between(curve["step"], curve["min"], curve["max"], color=color, alpha=0.15, lw=0)
    if not drew:
        plt.close(fig)
        return None
    axes[0].set_title("gradient norm (before clipping)")
    axes[0].set_yscale("log")
    axes[1].set_title("validation loss")
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{R.dataset_label(dataset)}: training curves at each component's chosen lr (mean over seeds)")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    cli_main(FinetuningPlotsConfig, main, prog="apps.plots.finetuning")
