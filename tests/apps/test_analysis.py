"""apps.vit.analysis end to end on the bundled digits data, offline, and its failure modes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from apps.vit.analysis import AnalysisConfig, main, output_name
from vitef.config import cli_main, load_config
from vitef.errors import ConfigError
from vitef.models import BLOCK_COMPONENTS
from vitef.utils import safe_name

SMALL = [
    "model.name=vit_tiny_patch16_224",
    "model.pretrained=false",
    "model.img_size=32",
    "model.overrides={depth: 3}",
    "source=digits_subset-01234",
    "dataset_name=digits_subset-56789",
    "batch_size=8",
    "steps=3",
    "device=cpu",
    "data.num_workers=0",
]


def test_end_to_end_on_digits_writes_every_file(run_app, tmp_path):
    r = run_app("apps.vit.analysis", *SMALL, "keep_samples=true", f"root={tmp_path}")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "analysis" / "vit_tiny_patch16_224-random_digits_subset-01234_digits_subset-56789_embedding"
    assert sorted(p.name for p in out.iterdir()) == [
        "bounds.csv",
        "config.yaml",
        "plasticity.csv",
        "plasticity.json",
        "samples.npz",
    ]
    df = pd.read_csv(out / "plasticity.csv")
    assert list(df.columns) == ["layer", "component", "mean", "std", "ci95", "n"]
    assert len(df) == 3 * 5 and set(df["component"]) == set(BLOCK_COMPONENTS)
    assert (df["n"] == 24).all() and (df["mean"] > 0).all()
    np.testing.assert_allclose(df["ci95"], 1.96 * df["std"] / np.sqrt(df["n"]))

    meta = json.loads((out / "plasticity.json").read_text())
    assert meta["n_pairs"] == 24 and meta["mode"] == "embedding" and meta["num_layers"] == 3
    assert pd.DataFrame(meta["rows"])[["layer", "component"]].equals(df[["layer", "component"]])
    assert {s["component"] for s in meta["summary"]} == set(BLOCK_COMPONENTS)
    assert -1 <= meta["kendall_tau"] <= 1 and meta["radius"] > 0

    bounds = pd.read_csv(out / "bounds.csv")
    assert {"layer", "component", "bound", "measured", "ratio"} <= set(bounds.columns)
    np.testing.assert_allclose(bounds["ratio"], bounds["measured"] / bounds["bound"])
    fc = bounds[bounds["component"].isin(["fc1", "fc2"])]
    assert (fc["measured"] <= fc["bound"]).all()

    with np.load(out / "samples.npz", allow_pickle=False) as z:
        assert z["ratios"].shape == (24, 3, 5)
        assert list(z["components"]) == list(BLOCK_COMPONENTS)
        np.testing.assert_allclose(z["ratios"].mean(0).reshape(-1), df["mean"], rtol=1e-9)

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["name"] == "vit_tiny_patch16_224" and cfg["dataset_name"] == "digits_subset-56789"
    # The printed summary: one line per component and Kendall's tau.
    assert "Kendall's tau" in r.stdout and "MHA" in r.stdout and "LN1" in r.stdout
    assert "pair/s" in r.stderr  # the progress bar


def test_hidden_mode_and_config_file(tmp_path):
    argv = [
        "config=apps/vit/configs/analysis/digits.yaml",
        "model.overrides={depth: 2}",
        "steps=2",
        "mode=hidden",
        "keep_samples=false",
        "components=[mha,fc2]",
        f"root={tmp_path}",
    ]
    out = main(load_config(AnalysisConfig, argv))
    assert out.parent == tmp_path / "analysis" and out.name.endswith("_hidden")
    assert not (out / "samples.npz").exists()
    df = pd.read_csv(out / "plasticity.csv")
    assert list(df["component"]) == ["mha", "fc2"] * 2
    assert (df["n"] == 32).all()


def test_bad_model_name_fails_clearly(run_inprocess, tmp_path):
    r = run_inprocess("apps.vit.analysis", *SMALL, "model.name=vit_nonexistent_patch16", f"root={tmp_path}")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown model 'vit_nonexistent_patch16'" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "analysis").exists()


@pytest.mark.parametrize(
    "arg, message",
    [
        ("dataset_name=cifar11", "unknown dataset 'cifar11'. Did you mean 'cifar10'?"),
        ("source=digitz", "unknown dataset 'digitz'"),
        ("components=[ffn]", "unknown component 'ffn'"),
        ("mode=final", "mode='final' is not one of embedding, hidden"),
        ("sigma=0", "sigma=0.0 must be positive"),
    ],
)
def test_bad_names_fail_clearly(capsys, tmp_path, arg, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(AnalysisConfig, main, argv=[*SMALL, arg, f"root={tmp_path}"], prog="apps.vit.analysis")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "analysis").exists()


def test_seed_command_form_and_aliases():
    cfg = load_config(AnalysisConfig, ["run", "--dataset_name", "cifar10"])
    assert cfg.dataset_name == "cifar10" and cfg.source == "imagenet" and cfg.mode == "embedding"
    assert (cfg.batch_size, cfg.steps, cfg.seed) == (64, 200, 42)
    assert cfg.model.name == "base"
    cfg = load_config(AnalysisConfig, ["model_name=google/vit-base-patch16-224-in21k", "target=pet", "root=x"])
    assert cfg.model.name == "google/vit-base-patch16-224-in21k" and cfg.dataset_name == "pet"
    assert output_name(cfg) == "google--vit-base-patch16-224-in21k_imagenet_pet_embedding"
    assert safe_name("corrupt:snow-3:cifar10") == "corrupt-snow-3-cifar10"
    assert "/" not in output_name(load_config(AnalysisConfig, ["target=imagefolder:/data/my set"]))


def test_plots_from_analysis_folders(tmp_path):
    from apps.plots.analysis import PlotConfig
    from apps.plots.analysis import main as plots_main

    for mode in ("embedding", "hidden"):
        argv = [*SMALL, "model.overrides={depth: 2}", "steps=1", f"mode={mode}", f"root={tmp_path}"]
        main(load_config(AnalysisConfig, argv))
    figs = tmp_path / "figs"
    written = plots_main(load_config(PlotConfig, [f"dirs=[{tmp_path}/analysis/*]", f"out={figs}"]))
    stems = ["plasticity_by_rank", "plasticity_by_depth", "bounds_by_depth", "measured_vs_bound"]
    assert sorted(p.name for p in written) == sorted(f"{s}.{f}" for s in stems for f in ("png", "pdf"))
    for p in written:
        head = p.read_bytes()[:8]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else head.startswith(b"%PDF")
    with pytest.raises(ConfigError, match="no analysis folder"):
        plots_main(load_config(PlotConfig, [f"dirs=[{tmp_path}/nothing/*]", f"out={figs}"]))


def test_components_are_stored_canonical():
    # Aliases, case, duplicates and the user's order all name the same measurement: the config says which.
    cfg = load_config(AnalysisConfig, [*SMALL, "components=[FFN_FC1, attn, ln1, mha]"])
    assert cfg.components == ["ln1", "mha", "fc1"]
    assert load_config(AnalysisConfig, [*SMALL, "components=[all]"]).components == list(BLOCK_COMPONENTS)
