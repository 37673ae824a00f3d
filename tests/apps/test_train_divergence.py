"""apps.vit.train: a diverging run fails (status, message, exit 2) instead of ending "completed" at chance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from apps.vit import train as train_app
from vitef.config import cli_main
from vitef.errors import TrainingError
from vitef.monitor import RunDir, read_metrics
from vitef.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[2]


class LinearHead(nn.Module):
    """A 4 -> 3 linear classifier named like a ViT's head (so the component registry groups it)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def linear_stepper(clip_grad: float | None = 1.0):
    torch.manual_seed(0)
    model = LinearHead()
    with torch.no_grad():  # tied logits: the loss stays ln 3 whatever the input, only the gradients blow up
        model.head.weight.zero_()
        model.head.bias.zero_()
    cfg = OptimConfig(lr=0.1, warmup_steps=0, scheduler="constant", clip_grad=clip_grad)
    return model, train_app.Stepper.build(model, model, cfg, 10, torch.device("cpu"), "fp32")


def huge_batches():
    # Inputs of 1e20 into a zero head: loss ln 3, gradients ~1e20 per element, their squared sum 1e40 > float32 max.
    x, y = torch.full((8, 4), 1e20), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    while True:
        yield x, y


def test_an_infinite_gradient_norm_fails_the_step_before_any_update():
    model, stepper = linear_stepper()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError) as err:
        train_app.train_step(stepper, huge_batches(), step=7)
    msg = str(err.value)
    assert msg.startswith("step 7: the gradient norm is inf (loss ") and "Lower the learning rate (lr=0.1 now)" in msg
    assert "optim.clip_grad" not in msg  # clipping is on: it cannot help, only a lower lr can
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_huge_finite_loss_fails_the_step_before_any_update(monkeypatch):
    # A diverging run can keep its loss and gradients finite (the tiny ViT at lr=1e6 reaches loss 1e13).
    model, stepper = linear_stepper()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(train_app, "MAX_LOSS", 1.0)  # ln 3 = 1.0986 is above it
    batches = iter([(torch.ones(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))])
    with pytest.raises(TrainingError, match=r"^step 2: the training loss is 1.099: training diverged"):
        train_app.train_step(stepper, batches, step=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def fused_stepper(monkeypatch, name: str = "adamw", device: str = "cpu"):
    """linear_stepper with the fused optimiser CUDA gets (also on CPU here): its checks are deferred."""
    import vitef.optim

    monkeypatch.setattr(vitef.optim, "implementation", lambda params: {"fused": True})
    torch.manual_seed(0)
    model = LinearHead().to(device)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    cfg = OptimConfig(name=name, lr=0.1, warmup_steps=0, scheduler="constant", clip_grad=1.0)
    stepper = train_app.Stepper.build(model, model, cfg, 10, torch.device(device), "fp32")
    assert stepper.deferred and stepper.optimizer.defaults["fused"]
    return model, stepper


def _state(model, optimizer) -> dict:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {f"{i}.{k}": v.clone() for i, st in enumerate(optimizer.state.values()) for k, v in st.items()}
    return {**weights, **moments}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_deferred_checks_skip_the_failing_update_and_every_later_one_on_the_device(monkeypatch, name, device):
    # On CUDA the numbers come back through a pinned copy read after its event, while later work is queued.
    model, stepper = fused_stepper(monkeypatch, name, device)
    good = (torch.ones(8, 4, device=device), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], device=device))
    train_app.train_step(stepper, iter([good]), step=1)  # a normal update first: the moments exist
    before = _state(model, stepper.optimizer)
    bad = tuple(t.to(device) for t in next(huge_batches()))
    # The failing update is launched, then a good one, before the host reads the first: neither reaches the
    # weights or the optimiser state, and reading the first names its step.
    first = train_app.launch_step(stepper, iter([bad]), step=2)
    second = train_app.launch_step(stepper, iter([good]), step=3)
    with pytest.raises(TrainingError, match=r"^step 2: the training loss is [0-9.]+e\+1[89]: training diverged"):
        first.result()
    after = _state(model, stepper.optimizer)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert 0 < second.result()["loss"] < 10  # its own numbers, read as usual


def test_deferred_checks_refuse_a_huge_loss_with_the_same_message(monkeypatch):
    model, stepper = fused_stepper(monkeypatch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(train_app, "MAX_LOSS", 1.0)
    batches = iter([(torch.ones(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))])
    with pytest.raises(TrainingError, match=r"^step 2: the training loss is 1.099: training diverged"):
        train_app.train_step(stepper, batches, step=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_without_clipping_the_message_suggests_it():
    _, stepper = linear_stepper(clip_grad=None)
    with pytest.raises(TrainingError, match=r"lr=0.1 now\), enable gradient clipping \(optim.clip_grad=1.0\)$"):
        train_app.train_step(stepper, huge_batches(), step=1)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_fp16_overflow_is_skipped_while_the_scaler_can_lower_its_scale():
    # Two layers: x = 1e3 and W1 = 1e-6 keep the fp16 forward and the loss finite, W2 = ±1e3 makes the first
    # layer's gradient ~1e6, past fp16's 65504 at any loss scale >= 1. GradScaler skips the overflowing updates
    # and halves its scale (4 -> 2 -> 1); at scale 1 the gradients overflow on their own: the run fails there.
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1e-6)
        model[1].weight.copy_(torch.tensor([[1e3], [-1e3], [0.0]]).expand(3, 4))  # logits (16, -16, 0)
    named = list(model.named_parameters())
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.1)
    stepper = train_app.Stepper(
        model=model,
        named_params=named,
        groups={n: "head" for n, _ in named},
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", init_scale=4.0),
        device=torch.device("cpu"),
        precision="fp16",
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.full((8, 4), 1e3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    batches = iter([(x, y)] * 3)
    rows = [train_app.train_step(stepper, batches, step=i) for i in (1, 2)]
    assert [r["grad_norm"] for r in rows] == [float("inf")] * 2
    assert all(0 < r["loss"] < 100 for r in rows)
    assert stepper.scaler.get_scale() == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # both updates skipped
    with pytest.raises(TrainingError, match=r"^step 3: the gradient norm is inf even at loss scale 1 \(loss "):
        train_app.train_step(stepper, batches, step=3)


def test_mha_at_lr_1e6_fails_the_run_with_exit_2(tmp_path, capsys):
    # The case on the bundled model: the loss climbs past 1e9 at step 2 (MAX_LOSS) and the gradient norm
    # overflows a few steps later; before, clipping by an infinite norm zeroed every update and the run
    # "completed" at chance.
    argv = [
        f"config={ROOT / 'apps/vit/configs/digits_pretrained.yaml'}",
        f"model.name={ROOT / 'apps/vit/pretrained/vit_digits.safetensors'}",
        f"root={tmp_path}",
        "log_dir=run",
        "trainable=[mha]",
        "lr=1e6",
        "steps=20",
        "eval_period=20",
        "batch_size=16",
        "optim.warmup_steps=0",
        "device=cpu",
    ]
    with pytest.raises(SystemExit) as exit_:
        cli_main(train_app.TrainConfig, train_app.main, argv=argv, prog="apps.vit.train")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    run = RunDir(tmp_path / "runs" / "run")
    status = json.loads(run.status_path.read_text())
    # Whichever comes first (the step where the norm overflows depends on float summation order, i.e. threads).
    m = re.fullmatch(
        r"step (\d+): the training loss is [0-9.]+e\+\d+: training diverged\. Lower the learning rate .*"
        r"|step (\d+): the gradient norm is inf \(loss [0-9.]+e\+\d+\): training diverged\. "
        r"Lower the learning rate \(lr=\d+ now\)",
        status["message"],
    )
    assert m, status
    failed_at = int(m.group(1) or m.group(2))
    assert 2 <= failed_at < 20 and status["status"] == "failed" and status["step"] == failed_at - 1
    assert f"error: {status['message']}\n" in err
    assert [r["step"] for r in read_metrics(run.metrics_path)] == list(range(1, failed_at))
    assert not run.eval_path.exists()
