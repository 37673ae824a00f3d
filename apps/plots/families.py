"""Component plasticity across backbone families (issue 14.3; Odonnat et al., arXiv 2602.06883, §3).

    python -m apps.vit.sweep config=apps/vit/sweeps/families.yaml root=outputs/families   # compute (network)
    python -m apps.plots.families root=outputs/families                                  # draw

Reads only analysis folders written by ``apps.vit.analysis`` (finished ones, through
:class:`vitef.monitor.analysis_dir.AnalysisDir`), groups them by analysed weights (the folder's ``tag``: a
random-init or finetuned copy of an architecture is its own group) and by mode, and gives each group one
value per component: the mean over the group's analyses (its targets) of the analysis's own mean plasticity
over layers (``plasticity.json`` summary, ``mean_over_layers``). Per mode it writes, as PNG and PDF:

    families_<mode>   (a) each family's ranking of LN1, MHA, LN2, FC1, FC2 (1 = most plastic) as a heat map,
                      with the paper's theoretical ranking as a reference row; (b) the mean plasticity of each
                      component per family

and, atomically, the table ``families.csv`` / ``families.json`` (one row per mode and family: the means, the
ranks, Kendall's tau against the theoretical ranking, the targets averaged over). Families are labelled from
the model name (:func:`family_label`); weights that were not pretrained (``model.pretrained=false`` in the
analysis config) are marked "random init", in the row labels and the figure title.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from apps.plots.common import component_color, save_figure  # noqa: E402
from vitef.config import cli_main, option  # noqa: E402
from vitef.data import canonical_name  # noqa: E402
from vitef.errors import ConfigError, VitefError  # noqa: E402
from vitef.models.build import SHORT_NAMES, model_label  # noqa: E402
from vitef.models.components import DISPLAY_NAMES, RANK_ORDER, THEORETICAL_RANK  # noqa: E402
from vitef.monitor.analysis_dir import AnalysisDir, find_analyses  # noqa: E402
from vitef.utils import atomic_path, atomic_write_json, check_writable  # noqa: E402

logger = logging.getLogger("apps.plots.families")

COMPUTE = "python -m apps.vit.sweep config=apps/vit/sweeps/families.yaml root=<root>"
# Components in the paper's theoretical order (MHA, FC1, FC2, LN2, LN1): the columns of the table and figure.
ORDER = list(RANK_ORDER)
THEORY_LABEL = "theoretical (paper)"
RANDOM_MARK = "random init"
RANDOM_TITLE = "random init — not pretrained"
# Family of a timm name, by its tokens (split at anything not a letter or digit); the first rule whose tokens
# all appear wins, so EVA-02 CLIP (eva02 ... clip) is EVA-02 and DINOv2 with registers (reg4_dinov2) DINOv2.
# The supervised ImageNet-21k weights are named by their pretrained tag (augreg_in21k, orig_in21k): a tag with
# more (augreg_in21k_ft_in1k) was finetuned further and is not that family.
FAMILY_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("eva02",), "eva02"),
    (("dinov3",), "dinov3"),
    (("dinov2",), "dinov2"),
    (("siglip",), "siglip"),
    (("siglip2",), "siglip"),
    (("clip",), "clip"),
    (("mae",), "mae"),
    (("beit",), "beit"),
    (("beitv2",), "beit"),
)
SUPERVISED_TAGS = {"augreg_in21k": "supervised in21k", "orig_in21k": "supervised in21k"}
# The order of the families in tables and figures; others (unknown names) follow, alphabetically.
FAMILY_ORDER = ("supervised in21k", "dinov2", "dinov3", "clip", "siglip", "mae", "eva02", "beit")
_TOKEN = re.compile(r"[^a-z0-9]+")


@dataclasses.dataclass
class FamiliesPlotConfig:
    """Compare component plasticity rankings across backbone families, from apps.vit.analysis folders."""

    root: str = option("outputs", "sweep root: the analyses are read from <root>/analysis/*")
    dirs: list[str] = option([], "analysis folders or glob patterns instead of <root>/analysis/*")
    out: str = option("", "folder for the figures and the table (default: <root>/figures/families)")
    modes: list[str] = option([], "modes to draw, e.g. [embedding] (default: every mode found)")
    targets: list[str] = option([], "target datasets to average over (default: every target found)")
    formats: list[str] = option(["png", "pdf"], "figure formats")
    log_scale: str = option("auto", "scale of the plasticity bars: auto (log when they span > 100x), log or linear")

    def validate(self) -> None:
        if not self.root and not self.dirs:
            raise ConfigError("root is empty: give the sweep root, e.g. root=outputs/families")
        bad = [f for f in self.formats if f not in ("png", "pdf", "svg")]
        if bad or not self.formats:
            raise ConfigError(f"formats={self.formats}: choose from png, pdf, svg")
        if self.log_scale not in ("auto", "log", "linear"):
            raise ConfigError(f"log_scale={self.log_scale!r}: choose auto, log or linear")
        try:  # the analyses store canonical dataset names (cifar10_c-contrast-5 is saved in full)
            self.targets = [canonical_name(t) for t in self.targets]
        except VitefError as e:
            raise ConfigError(f"targets={self.targets}: {e}") from None

    @property
    def patterns(self) -> list[str]:
        return list(self.dirs) or [str(Path(self.root) / "analysis" / "*")]

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.root) / "figures" / "families"


@dataclasses.dataclass
class Family:
    """One analysed model in one mode: its per-component means over its analyses, and their ranking.

    Attributes
    ----------
    means
        Component → mean over the analyses (targets) of each analysis's mean plasticity over layers; NaN
        when an analysis lacks the component.
    ranks
        Component → rank of its mean (1 = most plastic; ties share the smallest rank); None for NaN.
    """

    label: str
    model: str
    tag: str
    mode: str
    random_init: bool
    analyses: list[AnalysisDir]
    means: dict[str, float]
    ranks: dict[str, int | None]
    kendall_tau: float

    @property
    def targets(self) -> list[str]:
        return [a.target for a in self.analyses]


def family_label(model: str) -> str:
    """The family of a model name: ``supervised in21k``, ``dinov2``, ``dinov3``, ``clip``, ``siglip``, ``mae``,
    ``eva02``, ``beit``; any other name (a weights file, an unknown architecture) labels itself."""
    name = SHORT_NAMES.get(model, model)
    if Path(name).suffix == ".safetensors" or "/" in name:
        return model_label(name)
    tokens = set(_TOKEN.split(name.lower()))
    for needed, label in FAMILY_RULES:
        if set(needed) <= tokens:
            return label
    tag = name.split(".", 1)[1] if "." in name else ""
    return SUPERVISED_TAGS.get(tag, model_label(name))


def is_random_init(folder: AnalysisDir) -> bool:
    """True when the analysed weights were not pretrained: the analysis config's ``model.pretrained`` is false
    and no ``model.checkpoint`` was loaded (without a config, the ``-random`` tag apps.vit.analysis gives)."""
    model = folder.read_config().get("model")
    if isinstance(model, dict) and "pretrained" in model:
        return not model.get("pretrained") and not model.get("checkpoint")
    return str(folder.read_meta().get("tag", "")).endswith("-random")


def rank_of(means: dict[str, float]) -> dict[str, int | None]:
    """1 + the number of components with a strictly larger mean (ties share a rank, as the analysis's own
    summary ranks them); None for a NaN mean."""
    finite = [v for v in means.values() if not math.isnan(v)]
    return {c: None if math.isnan(v) else 1 + sum(w > v for w in finite) for c, v in means.items()}


def kendall_tau(ranks: dict[str, int | None]) -> float:
    """Kendall's tau between the ranks and the theoretical ranking, over the ranked components (NaN below 2)."""
    from scipy.stats import kendalltau  # an import only this needs

    comps = [c for c in ORDER if ranks.get(c) is not None]
    if len(comps) < 2:
        return math.nan
    return float(kendalltau([ranks[c] for c in comps], [THEORETICAL_RANK[c] for c in comps]).statistic)


def collect(cfg: FamiliesPlotConfig) -> list[Family]:
    """The families of the finished analysis folders matching the config, in :data:`FAMILY_ORDER`, per mode.

    Raises
    ------
    ConfigError
        No finished analysis matches, or none is left after the ``modes`` / ``targets`` filters.
    """
    found = find_analyses(cfg.patterns, complete=True)
    unfinished = {a.path for a in find_analyses(cfg.patterns, complete=False)} - {a.path for a in found}
    if unfinished:
        logger.warning("%d unfinished analysis folder(s) (no plasticity.json) skipped", len(unfinished))
    if not found:
        where = f"dirs={cfg.dirs}" if cfg.dirs else f"{Path(cfg.root) / 'analysis'} (root={cfg.root})"
        raise ConfigError(
            f"no finished analysis folder (holding plasticity.json) in {where}: run the analyses first, "
            f"e.g. `{COMPUTE}`, and give that root"
        )
    kept = [a for a in found if (not cfg.modes or a.mode in cfg.modes) and (not cfg.targets or a.target in cfg.targets)]
    if not kept:
        raise ConfigError(
            f"none of the {len(found)} analyses matches modes={cfg.modes} targets={cfg.targets}: they have modes "
            f"{sorted({a.mode for a in found})} and targets {sorted({a.target for a in found})}"
        )
    groups: dict[tuple[str, str], list[AnalysisDir]] = {}
    for a in kept:
        groups.setdefault((a.mode, str(a.read_meta().get("tag", a.model))), []).append(a)

    families = []
    for (mode, tag), analyses in groups.items():
        model = analyses[0].model
        random_init = any(is_random_init(a) for a in analyses)
        label = family_label(model) + (f" ({RANDOM_MARK})" if random_init else "")
        means = {}
        for c in ORDER:
            values = [_summary_mean(a, c) for a in analyses]
            # Every target counts once; a component some analysis did not measure has no family mean.
            means[c] = math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))
        ranks = rank_of(means)
        families.append(Family(label, model, tag, mode, random_init, analyses, means, ranks, kendall_tau(ranks)))
    _disambiguate(families)
    _warn_uneven_targets(families)
    return sorted(families, key=_sort_key)


def _summary_mean(folder: AnalysisDir, component: str) -> float:
    for row in folder.summary():
        if row.get("component") == component:
            return row["mean_over_layers"]
    return math.nan


def _disambiguate(families: list[Family]) -> None:
    """Two analysed models of one family in one mode (two DINOv3 sizes, say) get their tags in their labels."""
    seen: dict[tuple[str, str], int] = {}
    for f in families:
        seen[(f.mode, f.label)] = seen.get((f.mode, f.label), 0) + 1
    for f in families:
        if seen[(f.mode, f.label)] > 1:
            f.label = f"{f.label} [{f.tag}]"


def _warn_uneven_targets(families: list[Family]) -> None:
    """Families averaged over different targets are not compared on equal terms: say so."""
    for mode in sorted({f.mode for f in families}):
        sets = {f.label: sorted(f.targets) for f in families if f.mode == mode}
        if len({tuple(t) for t in sets.values()}) > 1:
            logger.warning("%s mode: the families were analysed on different targets: %s", mode, sets)


def _sort_key(f: Family) -> tuple:
    base = family_label(f.model)
    known = FAMILY_ORDER.index(base) if base in FAMILY_ORDER else len(FAMILY_ORDER)
    return (f.mode, known, base, f.random_init, f.label)


def table(families: list[Family]) -> pd.DataFrame:
    """One row per mode and family: label, model, tag, random_init, n_analyses, targets, then ``mean_<c>`` and
    ``rank_<c>`` for each component in theoretical order, and ``kendall_tau``."""
    rows = []
    for f in families:
        row = {
            "mode": f.mode,
            "family": f.label,
            "model": f.model,
            "tag": f.tag,
            "random_init": f.random_init,
            "n_analyses": len(f.analyses),
            "targets": ";".join(f.targets),
        }
        row.update({f"mean_{c}": f.means[c] for c in ORDER})
        row.update({f"rank_{c}": f.ranks[c] for c in ORDER})
        row["kendall_tau"] = f.kendall_tau
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in ORDER:  # integers, with missing ranks as <NA> rather than floats
        df[f"rank_{c}"] = df[f"rank_{c}"].astype("Int64")
    return df


def title(families: list[Family], mode: str) -> str:
    """The figure title; it says when (some of) the weights were not pretrained."""
    n_targets = len({t for f in families for t in f.targets})
    text = f"Component plasticity across backbone families — {mode} mode, mean over {n_targets} target(s)"
    random = [f.label for f in families if f.random_init]
    if random and len(random) == len(families):
        text += f"\n{RANDOM_TITLE}"
    elif random:
        text += f"\n{RANDOM_TITLE}: {', '.join(random)}"
    return text


def family_figure(families: list[Family], mode: str, log_scale: str = "auto") -> plt.Figure:
    """(a) rank heat map of the families of ``mode`` with the theoretical row; (b) mean plasticity bars."""
    fams = [f for f in families if f.mode == mode]
    n = len(fams)
    # Constrained layout keeps the rotated family names, the legend and the titles apart.
    fig, (ax_rank, ax_bar) = plt.subplots(
        1, 2, figsize=(12.5, max(4.2, 2.4 + 0.45 * (n + 1))), gridspec_kw={"width_ratios": [1, 1.5]},
        layout="constrained",
    )  # fmt: skip

    # (a) ranks: the theoretical row on top, then each family; colour = rank (1, most plastic, brightest).
    ranks = np.array(
        [[THEORETICAL_RANK[c] for c in ORDER]]
        + [[np.nan if f.ranks[c] is None else f.ranks[c] for c in ORDER] for f in fams],
        dtype=float,
    )  # (1 + families, components)
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="#dddddd")  # grey: a component not measured
    ax_rank.imshow(np.ma.masked_invalid(ranks), cmap=cmap, norm=Normalize(1, len(ORDER)), aspect="auto")
    for i in range(ranks.shape[0]):
        for j in range(ranks.shape[1]):
            value = ranks[i, j]
            text = "–" if np.isnan(value) else str(int(value))
            color = "white" if value > (len(ORDER) + 1) / 2 else "black"  # dark cells (low ranks) get white
            ax_rank.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax_rank.axhline(0.5, color="white", lw=3)  # the reference row apart from the measured ones
    ax_rank.set_xticks(range(len(ORDER)))
    ax_rank.set_xticklabels([DISPLAY_NAMES[c] for c in ORDER])
    ax_rank.set_yticks(range(n + 1))
    ax_rank.set_yticklabels([THEORY_LABEL] + [f"{f.label}  τ={f.kendall_tau:+.2f}" for f in fams], fontsize=8)
    ax_rank.set_title("(a) rank of each component (1 = most plastic)")
    ax_rank.grid(False)

    # (b) the means themselves, one group of bars per family, one colour per component.
    width = 0.8 / len(ORDER)
    x = np.arange(n)
    values = np.array([[f.means[c] for c in ORDER] for f in fams])  # (families, components)
    for j, c in enumerate(ORDER):
        ax_bar.bar(
            x + (j - (len(ORDER) - 1) / 2) * width,
            values[:, j],
            width,
            color=component_color(c),
            label=DISPLAY_NAMES[c],
        )
    positive = values[np.isfinite(values) & (values > 0)]
    log = log_scale == "log" or (log_scale == "auto" and positive.size and positive.max() > 100 * positive.min())
    if log and positive.size:
        ax_bar.set_yscale("log")
    ax_bar.set_xticks(x)
    ax_bar.set_xticklabels([f.label for f in fams], rotation=25, ha="right", fontsize=8)
    ax_bar.set_ylabel("mean plasticity" + (" (log scale)" if log else ""), fontsize=9)
    ax_bar.set_title("(b) mean plasticity per component (over layers, then targets)")
    ax_bar.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax_bar.grid(axis="y", alpha=0.3)

    fig.suptitle(title(fams, mode), fontsize=10)
    return fig


def write_table(families: list[Family], out: Path) -> list[Path]:
    """``families.csv`` and ``families.json`` (with the theoretical ranking), each atomically."""
    df = table(families)
    csv_path, json_path = out / "families.csv", out / "families.json"
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)  # full float precision: the values read back exactly
    rows = [
        {k: (None if _missing(v) else v) for k, v in row.items()} for row in df.astype(object).to_dict(orient="records")
    ]
    atomic_write_json(
        json_path,
        {
            "components": ORDER,
            "theoretical_rank": {c: THEORETICAL_RANK[c] for c in ORDER},
            "random_init": any(f.random_init for f in families),
            "rows": rows,
        },
    )
    return [csv_path, json_path]


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def main(cfg: FamiliesPlotConfig) -> list[Path]:
    """Draw one figure per mode and write the table; returns the written files."""
    families = collect(cfg)
    out = check_writable(cfg.out_dir, "out")
    written = []
    for mode in sorted({f.mode for f in families}):
        fig = family_figure(families, mode, cfg.log_scale)
        written += save_figure(fig, out / f"families_{mode}", cfg.formats)
    written += write_table(families, out)
    for path in written:
        print(path)
    return written


CONFIG = FamiliesPlotConfig

if __name__ == "__main__":
    cli_main(FamiliesPlotConfig, main, prog="apps.plots.families")
