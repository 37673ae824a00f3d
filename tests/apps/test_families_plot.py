"""apps.plots.families (issue 14.3) on real analysis folders of small random-init models of several families
(timm ViT, DINOv3 and EVA-02 as Eva, BEiT) and the bundled pretrained digits ViT, offline; and the sweep file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import yaml

from apps.plots import families as fam
from apps.vit.analysis import AnalysisConfig
from apps.vit.analysis import main as analyse
from vitef.config import load_config
from vitef.models.components import RANK_ORDER, THEORETICAL_RANK
from vitef.monitor.analysis_dir import AnalysisDir
from vitef.sweep import SweepConfig, expand

TARGETS = ("digits_subset-56789", "digits_c-corruption-impulse_noise-severity-5")
COMMON = [
    "source=digits_subset-01234",
    "source_split=train",
    "batch_size=4",
    "steps=2",
    "device=cpu",
    "data.num_workers=0",
    "seed=0",
]
# (model arguments, targets, modes): one family on two targets, one in both modes, one pretrained model.
MODELS = [
    (["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.overrides={depth: 2}"], TARGETS, ["embedding"]),
    (
        ["model.name=vit_small_patch16_dinov3", "model.img_size=32", "model.overrides={depth: 2}"],
        TARGETS[:1],
        ["embedding", "hidden"],
    ),
    (
        ["model.name=eva02_tiny_patch14_224", "model.img_size=28", "model.overrides={depth: 2}"],
        TARGETS[:1],
        ["embedding"],
    ),
    (
        [
            "model.name=beit_base_patch16_224",
            "model.img_size=32",
            "model.overrides={depth: 2, embed_dim: 64, num_heads: 2}",
        ],
        TARGETS[:1],
        ["embedding"],
    ),
]
PRETRAINED = ["model.name=apps/vit/pretrained/vit_digits.safetensors"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A sweep root holding finished analyses: 4 random-init families (5 embedding, 1 hidden) + the digits ViT."""
    out = tmp_path_factory.mktemp("families")
    runs = [(m + ["model.pretrained=false"], t, modes) for m, t, modes in MODELS] + [
        (PRETRAINED, TARGETS[:1], ["embedding"])
    ]
    for model, targets, modes in runs:
        for target in targets:
            for mode in modes:
                argv = [*COMMON, *model, f"dataset_name={target}", f"mode={mode}", f"root={out}"]
                analyse(load_config(AnalysisConfig, argv))
    # An unfinished folder (no plasticity.json) is skipped, not read.
    partial = out / "analysis" / "unfinished_x_y_embedding"
    partial.mkdir()
    (partial / "plasticity.csv").write_text("layer,component,mean,std,ci95,n\n0,mha,1,0,0,1\n")
    return out


def _direct_means(folder: AnalysisDir) -> dict[str, float]:
    """A folder's per-component mean over layers, straight from its plasticity.csv."""
    df = pd.read_csv(folder.plasticity_path)
    return df.groupby("component")["mean"].mean().to_dict()


def test_table_and_figures_from_analysis_folders(root, run_inprocess):
    out = root / "figures"
    r = run_inprocess("apps.plots.families", f"root={root}", f"out={out}")
    assert r.returncode == 0, r.stderr
    for name in ("families_embedding", "families_hidden"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000
    assert "1 unfinished analysis folder" in r.stderr

    table = pd.read_csv(out / "families.csv")
    assert list(zip(table["mode"], table["family"])) == [
        ("embedding", "dinov3 (random init)"),
        ("embedding", "eva02 (random init)"),
        ("embedding", "beit (random init)"),
        ("embedding", "vit_digits"),
        ("embedding", "vit_tiny_patch16_224 (random init)"),
        ("hidden", "dinov3 (random init)"),
    ]
    folders = {a.path.name: a for a in map(AnalysisDir, (root / "analysis").iterdir()) if a.is_complete()}
    assert len(folders) == 7
    for row in table.itertuples():
        mine = [a for a in folders.values() if a.read_meta()["tag"] == row.tag and a.mode == row.mode]
        assert row.n_analyses == len(mine) and sorted(row.targets.split(";")) == sorted(a.target for a in mine)
        assert row.random_init == row.tag.endswith("-random")
        # Each value is the mean over the family's targets of the analysis's own mean over layers: exactly.
        direct = {c: float(np.mean([_direct_means(a)[c] for a in mine])) for c in RANK_ORDER}
        for c in RANK_ORDER:
            assert getattr(row, f"mean_{c}") == direct[c], (row.family, c)
            if len(mine) == 1:
                summary = {s["component"]: s["mean_over_layers"] for s in mine[0].read_meta()["summary"]}
                assert direct[c] == summary[c]
            # Rank 1 = most plastic; ties share the smaller rank.
            assert getattr(row, f"rank_{c}") == 1 + sum(direct[d] > direct[c] for d in RANK_ORDER)
    assert table.loc[table["family"] == "vit_tiny_patch16_224 (random init)", "n_analyses"].item() == 2

    data = json.loads((out / "families.json").read_text())
    assert data["theoretical_rank"] == THEORETICAL_RANK and data["components"] == list(RANK_ORDER)
    assert data["random_init"] is True
    assert [r["mean_mha"] for r in data["rows"]] == table["mean_mha"].tolist()


def test_titles_say_random_init(root):
    cfg = load_config(fam.FamiliesPlotConfig, [f"root={root}"])
    families = fam.collect(cfg)
    # Hidden mode: only random-init weights, said in the title.
    fig = fam.family_figure(families, "hidden")
    assert fig.get_suptitle().splitlines()[-1] == "random init — not pretrained"
    # Embedding mode: the pretrained digits ViT among random ones: the random ones are named.
    fig = fam.family_figure(families, "embedding")
    last = fig.get_suptitle().splitlines()[-1]
    assert last.startswith("random init — not pretrained: ") and "vit_digits" not in last
    assert "dinov3 (random init)" in last and "beit (random init)" in last
    # Filters: one target, one mode.
    only = fam.collect(
        load_config(fam.FamiliesPlotConfig, [f"root={root}", "modes=[embedding]", "targets=[digits_c-impulse_noise-5]"])
    )
    assert [f.label for f in only] == ["vit_tiny_patch16_224 (random init)"] and only[0].targets == [TARGETS[1]]


def test_bad_root_exits_2_with_one_message(tmp_path, run_inprocess):
    r = run_inprocess("apps.plots.families", f"root={tmp_path / 'empty'}")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no finished analysis folder" in errors[0] and str(tmp_path / "empty") in errors[0]
    assert "apps/vit/sweeps/families.yaml" in errors[0]
    assert not (tmp_path / "empty").exists()  # nothing written
    assert run_inprocess("apps.plots.families", "--help").returncode == 0


@pytest.mark.parametrize(
    "name, label",
    [
        ("vit_base_patch16_224.augreg_in21k", "supervised in21k"),
        ("base", "supervised in21k"),
        ("vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k"),
        ("vit_base_patch14_dinov2.lvd142m", "dinov2"),
        ("vit_base_patch14_reg4_dinov2.lvd142m", "dinov2"),
        ("vit_base_patch16_dinov3.lvd1689m", "dinov3"),
        ("vit_base_patch16_clip_224.openai", "clip"),
        ("vit_base_patch16_siglip_224.webli", "siglip"),
        ("vit_base_patch16_224.mae", "mae"),
        ("eva02_base_patch14_224.mim_in22k", "eva02"),
        ("eva02_base_patch16_clip_224.merged2b", "eva02"),
        ("beit_base_patch16_224.in22k_ft_in22k", "beit"),
        ("vit_tiny_patch16_224", "vit_tiny_patch16_224"),
        ("apps/vit/pretrained/vit_digits.safetensors", "vit_digits"),
    ],
)
def test_family_label(name, label):
    assert fam.family_label(name) == label


def test_families_sweep_lists_its_runs_offline(tmp_path):
    sweep = load_config(SweepConfig, ["config=apps/vit/sweeps/families.yaml", f"root={tmp_path}"])
    runs = expand(sweep, "apps.vit.analysis")
    paper = yaml.safe_load(open("apps/vit/sweeps/plasticity.yaml"))["grids"][0]["dataset_name"]
    models = sorted({r.cfg.model.name for r in runs})
    assert len(runs) == len(models) * len(paper) * 2 == 154
    assert all(timm.list_pretrained(m) == [m] for m in models)  # exact timm pretrained tags
    assert {fam.family_label(m) for m in models} == {
        "supervised in21k",
        "dinov2",
        "dinov3",
        "clip",
        "siglip",
        "mae",
        "eva02",
    }
    assert all(r.cfg.model.img_size == 224 and r.cfg.model.pretrained and r.cfg.data.normalize == "model" for r in runs)
    assert {r.cfg.mode for r in runs} == {"embedding", "hidden"} and not any(p.exists() for p in tmp_path.iterdir())


def test_digits_families_sweep_is_the_offline_version(tmp_path):
    sweep = load_config(SweepConfig, ["config=apps/vit/sweeps/digits_families.yaml", f"root={tmp_path}"])
    runs = expand(sweep, "apps.vit.analysis")
    assert len(runs) == 10 and {r.cfg.mode for r in runs} == {"embedding", "hidden"}
    random = {r.cfg.model.name for r in runs if not r.cfg.model.pretrained}
    assert random == {
        "vit_tiny_patch16_224",
        "vit_small_patch16_dinov3",
        "eva02_tiny_patch14_224",
        "beit_base_patch16_224",
    }
    assert {r.cfg.model.name for r in runs if r.cfg.model.pretrained} == {"apps/vit/pretrained/vit_digits.safetensors"}
