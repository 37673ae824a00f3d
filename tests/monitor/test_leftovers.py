"""What killed writes leave behind is removed when the run starts again; run folders get the usual permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from tiny import random_vit, tiny_train

from apps.vit import train as train_app
from vitef.config import build_config
from vitef.monitor import RunDir, read_metrics, save_best, save_checkpoint
from vitef.monitor.checkpoint import remove_leftovers

TINY = tiny_train(keep_last=2, device="cpu")


def tiny_model():
    return random_vit(patch_size=8)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_remove_leftovers_deletes_temporaries_and_incomplete_step_folders_only(tmp_path):
    run = RunDir(tmp_path / "run")
    model = tiny_model()
    save_checkpoint(run.step_dir(4), model, {"step": 4})
    save_best(run.best_dir, model, {"step": 4})
    run.write_status("running", 4)
    # What a SIGKILL leaves: atomic_path temporaries (one a full weights copy), a half-written checkpoint
    # folder, and step folders of a prune killed between its two deletions.
    shutil.copyfile(run.best_model_path, run.best_dir / ".model.safetensors.k3j_9x2a.tmp")
    (run.path / ".status.json.a1b2c3d4.tmp").write_text('{"status": "run')
    (run.path / ".metrics.jsonl.zz99yy88.tmp").write_text("")
    half = run.checkpoints_dir / ".step_6.q1w2e3r4.tmp"
    half.mkdir()
    (half / ".model.safetensors.abcdefgh.tmp").write_bytes(b"\0" * 10)
    run.step_dir(2).mkdir()
    shutil.copyfile(run.step_dir(4) / "state.pt", run.step_dir(2) / "state.pt")
    run.step_dir(3).mkdir()
    shutil.copyfile(run.step_dir(4) / "model.safetensors", run.step_dir(3) / "model.safetensors")
    run.step_dir(1).mkdir()
    # Not leftovers: a user's files that merely look alike.
    (run.path / "notes.tmp").write_text("mine")
    (run.path / ".hidden.tmp").write_text("mine too")
    (run.checkpoints_dir / "step_x").mkdir()

    removed = remove_leftovers(run.path)

    assert sorted(str(p.relative_to(run.path)) for p in removed) == [
        ".metrics.jsonl.zz99yy88.tmp",
        ".status.json.a1b2c3d4.tmp",
        "checkpoints/.step_6.q1w2e3r4.tmp",
        "checkpoints/best/.model.safetensors.k3j_9x2a.tmp",
        "checkpoints/step_1",
        "checkpoints/step_2",
        "checkpoints/step_3",
    ]
    assert listing(run.path) == [
        ".hidden.tmp",
        "checkpoints",
        "checkpoints/best",
        "checkpoints/best/best.json",
        "checkpoints/best/model.safetensors",
        "checkpoints/step_4",
        "checkpoints/step_4/model.safetensors",
        "checkpoints/step_4/state.pt",
        "checkpoints/step_x",
        "notes.tmp",
        "status.json",
    ]
    assert remove_leftovers(run.path) == []
    assert remove_leftovers(tmp_path / "no_such_run") == []


def test_a_resumed_run_removes_the_leftovers_of_the_killed_one(tmp_path):
    cfg = build_config(train_app.TrainConfig, TINY, {"root": str(tmp_path), "log_dir": "run"})
    train_app.main(cfg)
    run = RunDir(tmp_path / "runs" / "run")
    assert run.checkpoint_steps() == [2, 4]
    # Make it the run killed during step 3: last checkpoint at step 2, with leftovers of killed writes.
    shutil.rmtree(run.step_dir(4))
    run.eval_path.unlink()
    run.write_status("running", 2, "checkpointed")
    shutil.copyfile(run.best_model_path, run.best_dir / ".model.safetensors.k3j_9x2a.tmp")
    (run.path / ".eval.json.a1b2c3d4.tmp").write_text("{")
    run.step_dir(1).mkdir()
    shutil.copyfile(run.step_dir(2) / "state.pt", run.step_dir(1) / "state.pt")

    train_app.main(cfg)

    assert json.loads(run.status_path.read_text())["status"] == "completed"
    assert run.checkpoint_steps() == [2, 4]
    assert not [p for p in run.path.rglob("*") if p.name.endswith(".tmp")]
    assert not run.step_dir(1).exists()
    assert [r["step"] for r in read_metrics(run.metrics_path) if "loss" in r] == [1, 2, 3, 4]


def test_checkpoint_folders_get_0777_less_the_umask_like_every_other_folder(tmp_path):
    model = tiny_model()
    old = os.umask(0o002)
    try:
        run = RunDir(tmp_path / "a" / "run")
        save_checkpoint(run.step_dir(1), model, {"step": 1})
        save_best(run.best_dir, model, {"step": 1})
        os.umask(0o027)
        save_checkpoint(run.step_dir(2), model, {"step": 2})
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(run.step_dir(1)) == mode(run.best_dir) == mode(run.checkpoints_dir) == 0o775  # was 0o700
    assert mode(run.step_dir(1) / "model.safetensors") == mode(run.best_model_path) == 0o664
    assert mode(run.step_dir(2)) == 0o750
    assert mode(run.step_dir(2) / "state.pt") == 0o640
