"""The bundled digits model: its card is honest, its plasticity is the paper's, and the pretrain command remakes it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apps.vit import analysis, pretrain
from vitef.data import build_loader
from vitef.evaluation import evaluate
from vitef.models import build_model
from vitef.monitor import RunDir

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "apps/vit/pretrained/vit_digits.safetensors"
CARD = json.loads(WEIGHTS.with_suffix(".json").read_text())
RECIPE = "apps/vit/configs/pretrain_digits.yaml"


def test_card_matches_the_shipped_weights():
    assert WEIGHTS.stat().st_size < 5 * 2**20
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == CARD["sha256"]
    m = CARD["model"]
    model = build_model(m["name"], pretrained=str(WEIGHTS), img_size=m["img_size"], **m["overrides"]).eval()
    assert model.num_classes == CARD["num_classes"] == 5
    loader = build_loader(CARD["dataset"], "test", batch_size=256, size=m["img_size"], shuffle=False)
    result = evaluate(model, loader, torch.device("cpu"))
    assert abs(result.acc - CARD["test_acc"]) < 1e-6


@pytest.mark.parametrize("target", sorted(CARD["plasticity"]))
def test_card_plasticity_is_reproduced_and_is_the_papers_ranking(tmp_path, target):
    """Re-running the seeded analysis on the shipped weights gives the card's numbers, and MHA ranks first."""
    for mode, want in CARD["plasticity"][target].items():
        cfg = pretrain.card_analysis_config(CARD["card_analysis"], WEIGHTS, target, mode, tmp_path)
        got = json.loads((analysis.main(cfg) / "plasticity.json").read_text())
        assert got["kendall_tau"] == pytest.approx(want["kendall_tau"], abs=1e-9)
        means = {s["component"]: s["mean_over_layers"] for s in got["summary"]}
        assert means == pytest.approx(want["mean_over_layers"], rel=1e-4)
    emb = CARD["plasticity"][target]["embedding"]
    ranked = sorted(emb["mean_over_layers"], key=emb["mean_over_layers"].get, reverse=True)
    # The paper's qualitative finding (issue: the offline study must show it): MHA most plastic, both
    # LayerNorms below MHA, FC1 and FC2, tau >= 0.6 against the theoretical ranking.
    assert ranked[0] == "mha" and set(ranked[-2:]) == {"ln1", "ln2"}, ranked
    assert emb["kendall_tau"] >= 0.6


def test_pretrain_command_remakes_a_model_with_the_same_properties(run_app, tmp_path):
    """The recipe, run by the pretrain command, on a third of its steps (the full run takes minutes).

    Across platforms the weights differ in the last bits, so check what survives them: accuracy near
    saturation, and MHA above both LayerNorms in embedding mode; and the snapshots are the step checkpoints,
    with cards that load. With 800 steps (its cosine schedule ends there) both hold with a margin: measured
    on CPU, test accuracy 99.4 % (1 error in 181) and MHA 1.14 against LayerNorms 0.41 (600 steps: 98.3 %,
    1.02 vs 0.41; 1,200 steps: README "The bundled model").
    """
    export = tmp_path / "again.safetensors"
    target = "digits_subset-56789"
    r = run_app(
        "apps.vit.pretrain",
        f"config={RECIPE}",
        f"root={tmp_path}",
        f"export={export}",
        "steps=800",
        "keep_steps=[10,800]",
        f"card_targets=[{target}]",
        env={"OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads(export.with_suffix(".json").read_text())
    assert card["test_acc"] >= 0.95
    assert card["model"] == CARD["model"] and card["dataset"] == CARD["dataset"]
    emb = card["plasticity"][target]["embedding"]["mean_over_layers"]
    assert emb["mha"] > max(emb["ln1"], emb["ln2"]), emb
    snapshots = sorted((tmp_path / "again_steps").glob("*.safetensors"))
    steps = [json.loads(p.with_suffix(".json").read_text())["step"] for p in snapshots]
    assert steps == [10, 800] == card["snapshot_steps"]
    run = tmp_path / "runs" / card["log_dir"]
    last = load_file(RunDir(run).step_dir(steps[-1]) / "model.safetensors")
    snap = load_file(snapshots[-1])
    assert snap.keys() == last.keys() and all(torch.equal(snap[k], last[k]) for k in snap)
    model = build_model(str(snapshots[0]))  # a self-describing file: its card gives the architecture
    assert model.num_classes == 5 and len(model.blocks) == CARD["model"]["overrides"]["depth"]
