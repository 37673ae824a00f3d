"""Checkpoints: bit-exact weights, weights-only state, RNG states, atomic saves, keep-last, best."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from tiny import random_vit

from vitef.errors import CheckpointError
from vitef.models import build_model, save_timm_safetensors
from vitef.monitor import RunDir
from vitef.monitor import checkpoint as ckpt


def tiny(seed: int = 0, num_classes: int = 3) -> VisionTransformer:
    return random_vit(seed, num_classes=num_classes)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_states_roundtrip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    torch.save(ckpt.capture_rng(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_checkpoint_roundtrip_is_bit_exact(tmp_path):
    model = tiny(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    run = RunDir(tmp_path / "run")
    state = {"step": 7, "optimizer": opt.state_dict(), "data": {"epoch": 1, "position": 3}, "rng": ckpt.capture_rng()}
    ckpt.save_checkpoint(run.step_dir(7), model, state)
    assert run.checkpoint_steps() == [7]
    other = tiny(1)
    ckpt.load_weights(other, run.step_dir(7) / "model.safetensors")
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    back = ckpt.load_state(run.step_dir(7))
    assert back["step"] == 7 and back["data"] == {"epoch": 1, "position": 3}
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    for p1, p2 in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(p1["momentum_buffer"], p2["momentum_buffer"])


def test_killed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    model = tiny()

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        ckpt.save_checkpoint(run.step_dir(5), model, {"step": 5})
    assert run.checkpoint_steps() == []
    assert list(run.checkpoints_dir.iterdir()) == []


def test_incomplete_dirs_ignored_and_keep_last(tmp_path):
    run = RunDir(tmp_path / "run")
    model = tiny()
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(run.step_dir(step), model, {"step": step})
    (run.checkpoints_dir / "step_10").mkdir()  # no files: not a checkpoint
    ckpt.save_best(run.best_dir, model, {"step": 4, "val_acc": 0.5})
    assert run.checkpoint_steps() == [2, 4, 6, 8]
    run.prune_checkpoints(keep_last=2)
    assert run.checkpoint_steps() == [6, 8]
    assert run.latest_checkpoint() == run.step_dir(8)
    assert run.best_model_path.is_file() and ckpt.read_best(run.best_dir)["step"] == 4


def test_best_checkpoint_loads_with_build_model(tmp_path):
    model = build_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=5)
    ckpt.save_best(tmp_path / "best", model, {"step": 1})
    again = build_model("vit_tiny_patch16_224", pretrained=tmp_path / "best" / "model.safetensors", img_size=32)
    assert again.head.out_features == 5
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    # Also the same file format as the model package's own exporter.
    save_timm_safetensors(model, tmp_path / "ref.safetensors")
    fresh = build_model("vit_tiny_patch16_224", pretrained=tmp_path / "ref.safetensors", img_size=32, num_classes=7)
    assert fresh.head.out_features == 7


def test_corrupt_or_missing_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_weights(tiny(), tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable"):
        ckpt.load_weights(tiny(), bad)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ckpt.load_state(tmp_path / "ck")
    ckpt.save_best(tmp_path / "b", tiny(num_classes=3), {})
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.load_weights(tiny(num_classes=4), tmp_path / "b" / "model.safetensors")


def test_weights_saved_from_a_state_dict_equal_those_saved_from_the_module(tmp_path):
    # The LoRA runs save a merged state dict built without a model copy: the file must be the module's file.
    model = tiny(seed=4)
    ckpt.save_weights(model, tmp_path / "module.safetensors")
    ckpt.save_weights(dict(model.state_dict()), tmp_path / "mapping.safetensors")
    assert (tmp_path / "module.safetensors").read_bytes() == (tmp_path / "mapping.safetensors").read_bytes()
    other = tiny(seed=5)
    ckpt.load_weights(other, tmp_path / "mapping.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
