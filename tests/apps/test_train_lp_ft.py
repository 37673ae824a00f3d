"""apps.vit.train method=lp_ft (LP-FT, Kumar et al. 2022): the head starts as the linear probe of the pretrained
model on the train split (vitef.adapters.fit_probe_head), then the run finetunes as method=full."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_train, untimed

from apps.vit import train as train_app
from vitef.adapters import fit_probe_head, head_features
from vitef.config import build_config
from vitef.data import build_loader
from vitef.models import build_model_from_config
from vitef.monitor import RunDir
from vitef.probe import SolverConfig, fit_logreg
from vitef.utils import set_seed

TINY = tiny_train(optim={"lr": 0.1, "warmup_steps": 0, "scheduler": "cosine"}, trainable=["all"], steps=4)


def cfg_of(tmp_path: Path, **over) -> train_app.TrainConfig:
    return build_config(train_app.TrainConfig, TINY, {"root": str(tmp_path / "out"), "log_dir": "run", **over})


def pretrained_and_loader(cfg: train_app.TrainConfig):
    """The model as the app builds it (seeded, 5 classes) and the train split with the eval transform."""
    set_seed(cfg.seed)
    model = build_model_from_config(cfg.model, num_classes=5)
    size = model.patch_embed.img_size[0]
    loader = build_loader(cfg.dataset_name, "train", batch_size=64, shuffle=False, augment=False, size=size,
                          model=model, device="cpu", **cfg.data.loader_kwargs())  # fmt: skip
    return model, loader


def test_head_is_the_solvers_solution_and_its_logits_are_the_probes_predictions(tmp_path):
    model, loader = pretrained_and_loader(cfg_of(tmp_path))
    trunk = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    record = fit_probe_head(model, loader, 5)
    # Direct computation: what the head sees (timm's pre-logits of the eval-mode model), fitted by the solver.
    model.eval()
    X, y = [], []
    with torch.no_grad():
        for images, labels in loader:
            X.append(model.forward_head(model.forward_features(images), pre_logits=True))
            y.append(labels)
    X, y = torch.cat(X), torch.cat(y)
    torch.testing.assert_close(head_features(model, loader)[0], X, atol=0, rtol=0)
    fit = fit_logreg(X.unsqueeze(0), y, 5, SolverConfig(device="cpu"))
    assert torch.equal(model.head.weight.detach(), fit.weight[0]) and torch.equal(model.head.bias.detach(), fit.bias[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trunk.items())  # only the head changed
    # The head's logits on images reproduce the probe's predictions, and its recorded train accuracy.
    with torch.no_grad():
        predicted = torch.cat([model(images).argmax(-1) for images, _ in loader])
    assert torch.equal(predicted, fit.predict(X.unsqueeze(0))[0])
    assert record["train_acc"] == pytest.approx(float(fit.accuracy(X.unsqueeze(0), y)[0]))
    assert record["n"] == len(loader.dataset) and record["dim"] == X.shape[1] and record["converged"]


def test_lp_ft_run_starts_from_the_probe_records_it_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path, method="lp_ft", log_dir="", eval_period=2, checkpoint_period=2, keep_last=2)
    assert cfg.run_name == "digits_subset-56789_vit_tiny_patch16_224_lp_ft_all_lr0.1_seed0"
    started = {}

    def spy(model, *args, **kwargs):  # the app's model right after its head was set, before the first step
        record = fit_probe_head(model, *args, **kwargs)
        started.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return record

    monkeypatch.setattr(train_app, "fit_probe_head", spy)
    train_app.main(cfg)
    run = RunDir(tmp_path / "out" / "runs" / cfg.run_name)
    model, loader = pretrained_and_loader(cfg)
    probe = fit_probe_head(model, loader, 5)
    result = json.loads(run.eval_path.read_text())
    assert result["method"] == "lp_ft" and result["probe"] == json.loads((run.path / "lp_ft.json").read_text())
    assert result["probe"]["train_acc"] == pytest.approx(probe["train_acc"]) and result["probe"]["n"] == probe["n"]
    assert result["trainable_params"] == sum(p.numel() for p in model.parameters())  # as method=full, all
    assert "LP-FT: linear probe head fitted" in run.log_path.read_text()
    # The run started from the pretrained trunk and the probe's head (the same solution as a direct fit).
    assert set(started) == set(model.state_dict())
    assert all(torch.equal(v, started[k]) for k, v in model.state_dict().items())

    # Resume equals uninterrupted, without fitting the probe again: the head comes from the checkpoint.
    reference = load_file(run.step_dir(4) / "model.safetensors")

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed lp_ft run takes its head from the checkpoint")

    monkeypatch.setattr(train_app, "fit_probe_head", no_probe)
    last = run.checkpoint_steps()[-1]
    shutil.rmtree(run.step_dir(last))
    run.eval_path.unlink()
    run.write_status("running", last, "pretend it was killed")
    train_app.main(cfg)
    resumed = load_file(run.step_dir(4) / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert untimed(json.loads(run.eval_path.read_text())) == untimed(result)
