"""A study report (markdown + self-contained HTML) from output folders only (arXiv 2602.06883, §4–5).

    python -m apps.plots.report root=outputs/quickstart

Reads what the apps wrote under ``root`` — analysis folders (plasticity and bounds), the result tables of
``apps.plots.finetuning`` (accuracy per component, relative gain over linear probing, significance
tests, missing runs), the methods comparison (methods table, accuracy-vs-trainable-parameters figure,
criterion vs random) and every figure — and writes ``<root>/report/report.md`` (figures linked) and
``report.html`` (figures embedded, one file to send around).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from vitef.config import cli_main, option
from vitef.errors import ConfigError, VitefError
from vitef.models.components import DISPLAY_NAMES, display_name
from vitef.monitor.analysis_dir import find_analyses
from vitef.plasticity import summarize
from vitef.results import SELECT_ON
from vitef.utils import atomic_write_text, check_writable

logger = logging.getLogger("apps.plots.report")


@dataclasses.dataclass
class ReportConfig:
    """Write report.md and report.html from a study's output folders."""

    root: str = option("outputs", "study output root (holding analysis/, runs/, results/, figures/)")
    title: str = option("vitef study", "title of the report")
    select_on: str = option("val", "which result tables to show: lr chosen on val or on test")
    out: str = option("", "report folder (default: <root>/report)")

    def validate(self) -> None:
        if self.select_on not in SELECT_ON:
            raise ConfigError(f"select_on={self.select_on!r} must be one of {', '.join(SELECT_ON)}")


CONFIG = ReportConfig


class Document:
    """Blocks rendered both as markdown and as HTML, so the two reports never disagree."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.blocks: list[tuple[str, object]] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("figure", (path, caption)))

    def markdown(self) -> str:
        parts = []
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                parts.append(f"{'#' * level} {text}")
            elif kind == "text":
                parts.append(str(value))
            elif kind == "table":
                parts.append(_markdown_table(value))
            else:
                path, caption = value
                rel = Path(_relpath(path, self.out_dir))
                parts.append(f"![{caption}]({rel.as_posix()})\n\n*{caption}*")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
            elif kind == "text":
                body.append(_markdown_block_html(str(value)))
            elif kind == "table":
                body.append(value.to_html(index=False, border=0, classes="t", na_rep="—"))
            else:
                path, caption = value
                data = base64.b64encode(Path(path).read_bytes()).decode()
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                )
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
            "table.t{border-collapse:collapse;margin:1em 0;font-size:90%}"
            "table.t td,table.t th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:90%}"
        )
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
        )


def _inline(text: str) -> str:
    """Escape, then the two inline markups the result tables use: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"\*(.+?)\*", r"<i>\1</i>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _markdown_block_html(text: str) -> str:
    """HTML of a markdown block made of paragraphs and pipe tables (what the result tables contain)."""
    out, para, rows = [], [], []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if rows:
            head, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]
            cells = "".join(f"<th>{_inline(c)}</th>" for c in head)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f'<table class="t"><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>')
            rows.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            if para:
                flush()
            rows.append([c.strip() for c in stripped[1:-1].split("|")])
        elif not stripped:
            flush()
        else:
            if rows:
                flush()
            para.append(stripped)
    flush()
    return "".join(out)


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def _markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    rows = [["—" if pd.isna(v) else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in r] for r in df.values]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(cfg: ReportConfig) -> Path:
    root = Path(cfg.root)
    if not root.is_dir():
        raise VitefError(f"root='{cfg.root}' does not exist: run a study first (python -m apps.study ...)")
    out_dir = check_writable(Path(cfg.out) if cfg.out else root / "report", "out" if cfg.out else "root")
    doc = Document(out_dir)
    doc.heading(cfg.title, 1)
    doc.text(
        f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} from `{root}` by vitef "
        "(Odonnat et al., *Vision Transformer Finetuning Benefits from Non-Smooth Components*, arXiv 2602.06883)."
    )
    sections = [
        plasticity_section(doc, root),
        finetuning_section(doc, root, cfg.select_on),
        predictors_section(doc, root, cfg.select_on),
        methods_section(doc, root, cfg.select_on),
        pretraining_section(doc, root),
        figures_section(doc, root, skip=methods_figures(root, cfg.select_on)),
    ]
    if not any(sections):
        raise VitefError(f"nothing to report under {root}: no analysis folders, result tables or figures")
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, doc.markdown())
    atomic_write_text(html_path, doc.html(cfg.title))
    print(f"report: {md_path} and {html_path}")
    return md_path


def plasticity_section(doc: Document, root: Path) -> bool:
    """Per analysis folder: mean plasticity per component, measured vs theoretical rank, Kendall's tau, bounds."""
    # Analyses of pretraining snapshots have their own section (pretraining_section).
    folders = [f for f in find_analyses([root / "analysis" / "*"], complete=False) if f.step is None]
    if not folders:
        return False
    doc.heading("Plasticity and theoretical bounds")
    doc.text(
        "Plasticity = mean over image pairs (pretraining image, downstream image) of the rate of change "
        "‖f(x) − f(y)‖ / ‖x − y‖ of each component, averaged over blocks. Theory ranks MHA (1) > FC1 > FC2 > LN2 > "
        "LN1 (5); Kendall's τ compares the measured ranking with it (1 = identical). The bound is the mean "
        "over blocks of the component's theoretical upper bound computed from its weights."
    )
    for folder in folders:
        df = folder.read_plasticity()
        per, tau, _ = summarize(df)
        config = folder.read_config()
        bounds = folder.bounds_per_component()
        table = pd.DataFrame(
            {
                "component": [DISPLAY_NAMES.get(c, c) for c in per["component"]],
                "plasticity": per["mean_over_layers"].round(3),
                "measured rank": per["measured_rank"],
                "theoretical rank": per["theoretical_rank"],
                "bound": [round(bounds.get(c, float("nan")), 3) for c in per["component"]],
            }
        )
        source = config.get("source", "?")
        target = config.get("dataset_name", "?")
        mode = config.get("mode", "?")
        doc.heading(f"{target} vs {source} ({mode} mode)", 3)
        doc.table(table)
        doc.text(f"Kendall's τ (measured vs theoretical ranking) = {tau:.2f}; {int(df['n'].max())} pairs per block.")
    return True


def _result_tables(root: Path, kind: str, select_on: str) -> list[Path]:
    """The tables ``<kind>_<tag>.md`` that ``apps.plots.finetuning <kind>`` wrote for lr chosen on ``select_on``."""
    return sorted((root / "results" / "tables").glob(f"{kind}_*select-{select_on}.md"))


def finetuning_section(doc: Document, root: Path, select_on: str) -> bool:
    """The accuracy table (best lr per cell, mean ± std over seeds), gains over linear probing, tests, missing runs."""
    tables = _result_tables(root, "finetuning", select_on)
    if not tables:
        return False
    doc.heading("Component-wise finetuning")
    doc.text(
        f"Test accuracy (%) of the checkpoint with the best validation accuracy, at the learning rate chosen on "
        f"{select_on} for each cell, mean ± std over seeds. The relative gain compares each configuration with the "
        "linear-probing baseline (last block's output) of the same pretrained model."
    )
    for path in tables:
        doc.text(path.read_text().strip())
        tag = path.stem.removeprefix("finetuning_")
        stats = path.parent / f"stats_{tag}.md"
        if stats.is_file():
            doc.heading("Significance tests", 3)
            doc.text(stats.read_text().strip())
        missing = path.parent / f"missing_{tag}.csv"
        if missing.is_file():
            doc.heading("Missing runs", 3)
            df = pd.read_csv(missing)
            if df.empty:
                doc.text("None: every (dataset, component, lr, seed) cell has a completed run.")
            else:
                doc.text(f"{len(df)} runs are missing or unfinished; their cells are marked and left out of averages.")
                if "component" in df.columns:  # the tables' labels: MHA, MHA+FC1 (components trained together)
                    df["component"] = [display_name(c) for c in df["component"].astype(str)]
                doc.table(df)
    return True


def predictors_section(doc: Document, root: Path, select_on: str) -> bool:
    """Which signal ranks the components as finetuning does (apps.plots.finetuning predictors)."""
    tables = _result_tables(root, "predictors", select_on)
    if not tables:
        return False
    doc.heading("Which signal predicts finetuning")
    doc.text(
        "Each signal ranks the five components of every block of the pretrained model: plasticity in the paper's "
        "embedding mode and in hidden mode, the mean gradient norm of the component over the first updates of its "
        "own finetuning runs, and the theoretical bound. Kendall's τ compares each ranking with the ranking by "
        "best-LR test accuracy and by relative gain over linear probing (τ = 1: the signal orders the components "
        "exactly as finetuning does). With five components, τ = 1 has p ≈ 0.017."
    )
    for path in tables:
        doc.text(path.read_text().strip())
    return True


def methods_figures(root: Path, select_on: str) -> list[Path]:
    """The Pareto figures of ``apps.plots.finetuning methods`` for lr chosen on ``select_on`` (one per tag)."""
    return sorted((root / "results" / "figures" / "methods").glob(f"*select-{select_on}/pareto.png"))


def methods_section(doc: Document, root: Path, select_on: str) -> bool:
    """Which parameters to finetune: the methods table, the Pareto figure, criterion vs random (issue 12)."""
    tables = _result_tables(root, "methods", select_on)
    if not tables:
        return False
    doc.heading("Which parameters to finetune: methods, budgets and selection criteria")
    doc.text(
        "Every method in the same harness (data, schedule, evaluation): full finetuning, layer-wise lr decay, LoRA, "
        "BitFit, LayerNorm tuning, the units picked by each criterion within a budget (a share of the backbone's "
        f"parameters) and random picks of the same budget. Each method's learning rate is chosen on {select_on}; "
        "accuracy is the test accuracy of the best-validation checkpoint."
    )
    for path in tables:
        tag = path.stem.removeprefix("methods_")
        doc.text(path.read_text().strip())
        pareto = root / "results" / "figures" / "methods" / tag / "pareto.png"
        if pareto.is_file():
            doc.figure(pareto, "Accuracy vs trainable parameters per method; the Pareto front joined and labelled")
        vs = path.parent / f"criterion_vs_random_{tag}.md"
        if vs.is_file():
            doc.heading("Criterion vs random", 3)
            doc.text(vs.read_text().strip())
    return True


def pretraining_section(doc: Document, root: Path) -> bool:
    """Plasticity through pretraining: Kendall's tau and token radius per snapshot (apps.plots.pretraining)."""
    path = root / "figures" / "pretraining" / "pretraining_dynamics.csv"
    if not path.is_file():
        return False
    df = pd.read_csv(path)
    doc.heading("Plasticity through pretraining")
    doc.text(
        "The same plasticity, measured on snapshots of the model at log-spaced steps of its pretraining. Early on "
        "the linear maps are still close to their small initialisation and the LayerNorms change fastest; the "
        "paper's ranking (MHA first, LayerNorms last) emerges as pretraining goes on. Kendall's τ of the measured "
        "vs theoretical ranking per snapshot (rows: target and mode), and the token radius r of the target data:"
    )
    per = df.drop_duplicates(["target", "mode", "step"])
    tau = per.pivot_table(index=["target", "mode"], columns="step", values="tau").round(2)
    tau.columns = [f"step {c}" for c in tau.columns]
    doc.table(tau.reset_index())
    radius = per[per["mode"] == per["mode"].iloc[0]].pivot_table(index="target", columns="step", values="radius")
    radius.columns = [f"step {c}" for c in radius.columns]
    doc.table(radius.round(2).reset_index().rename(columns={"target": "token radius r"}))
    return True


FIGURE_ORDER = ("analysis", "pretraining", "finetuning", "loss_landscape")


def figures_section(doc: Document, root: Path, skip: Sequence[Path] = ()) -> bool:
    """Every PNG the figure apps wrote, grouped by kind, but those of ``skip`` (shown in their own section)."""
    pngs = sorted(set((root / "figures").glob("**/*.png")) | set((root / "results" / "figures").glob("**/*.png")))
    pngs = [p for p in pngs if p not in set(skip)]
    if not pngs:
        return False
    doc.heading("Figures")
    for kind in FIGURE_ORDER:
        group = [p for p in pngs if kind in p.parts]
        if group:
            doc.heading(kind.replace("_", " ").capitalize(), 3)
        for path in group:
            doc.figure(path, f"{kind}: {path.stem.replace('_', ' ')} ({path.parent.name})")
    others = [p for p in pngs if not any(kind in p.parts for kind in FIGURE_ORDER)]
    for path in others:
        doc.figure(path, path.stem.replace("_", " "))
    return True


if __name__ == "__main__":
    cli_main(ReportConfig, main, argv=sys.argv[1:], prog="apps.plots.report")
