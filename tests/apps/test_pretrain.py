"""The bundled digits model: its card is honest and the pretrain command reproduces it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vitef.data import build_loader
from vitef.evaluation import evaluate
from vitef.models import build_model

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "apps/vit/pretrained/vit_digits.safetensors"
CARD = json.loads(WEIGHTS.with_suffix(".json").read_text())


def test_card_matches_the_shipped_weights():
    assert WEIGHTS.stat().st_size < 5 * 2**20
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == CARD["sha256"]
    m = CARD["model"]
    model = build_model(m["name"], pretrained=str(WEIGHTS), img_size=m["img_size"], **m["overrides"]).eval()
    assert model.num_classes == CARD["num_classes"] == 5
    loader = build_loader(CARD["dataset"], "test", batch_size=256, size=m["img_size"], shuffle=False)
    result = evaluate(model, loader, torch.device("cpu"))
    assert abs(result.acc - CARD["test_acc"]) < 1e-6


def test_pretrain_command_reproduces_the_bundled_model(run_app, tmp_path):
    export = tmp_path / "again.safetensors"
    r = run_app(
        "apps.vit.pretrain",
        "config=apps/vit/configs/pretrain_digits.yaml",
        f"root={tmp_path}",
        f"export={export}",
        env={"OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads(export.with_suffix(".json").read_text())
    assert abs(card["test_acc"] - CARD["test_acc"]) <= 0.01
    assert card["model"] == CARD["model"] and card["dataset"] == CARD["dataset"]
