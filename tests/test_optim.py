"""vitef.optim: schedules, optimisers, gradient norms and clipping, config validation."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from vitef.config import build_config
from vitef.errors import ConfigError
from vitef.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    grad_norms,
    implementation,
    load_scheduler_state,
    lr_factor,
    scheduler_state,
)


def test_warmup_then_cosine_to_min():
    cfg = OptimConfig(scheduler="cosine", warmup_steps=4, min_factor=0.0)
    total = 12
    f = [lr_factor(s, total, cfg) for s in range(total)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    # After warmup: p = (s - 4) / 8.
    for s in range(4, total):
        p = (s - 4) / 8
        assert f[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * p)))
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    assert lr_factor(total, total, cfg) == pytest.approx(0.0)


def test_linear_constant_and_min_factor():
    lin = OptimConfig(scheduler="linear", warmup_steps=0, min_factor=0.1)
    assert lr_factor(0, 10, lin) == pytest.approx(1.0)
    assert lr_factor(5, 10, lin) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, 10, lin) == pytest.approx(0.1)
    const = OptimConfig(scheduler="constant", warmup_steps=2)
    assert [lr_factor(s, 10, const) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = OptimConfig(scheduler="cosine", warmup_steps=0, min_factor=0.2)
    assert lr_factor(10, 10, cos) == pytest.approx(0.2)


def test_scheduler_drives_optimizer_and_state_roundtrips(tmp_path):
    p = nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(lr=0.1, warmup_steps=2, scheduler="cosine")
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, total_steps=6)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1 * lr_factor(s, 6, cfg) for s in range(4)])
    torch.save(scheduler_state(sched), tmp_path / "s.pt")
    opt2 = build_optimizer([p], cfg)
    sched2 = build_scheduler(opt2, cfg, total_steps=6)
    load_scheduler_state(sched2, torch.load(tmp_path / "s.pt", weights_only=True))
    assert sched2.last_epoch == 4
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


def test_optimizers_get_their_hyperparameters():
    p = nn.Parameter(torch.zeros(2))
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    sgd = build_optimizer([p, frozen], OptimConfig(name="sgd", lr=0.5, momentum=0.8, weight_decay=0.01))
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.5, 0.8, 0.01)
    assert len(g["params"]) == 1  # frozen parameters never reach the optimiser
    adamw = build_optimizer([p], OptimConfig(name="adamw", lr=1e-4, betas=[0.8, 0.99]))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.99)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([frozen], OptimConfig())


def test_cuda_parameters_get_the_fused_optimizer_and_others_torchs_default():
    cpu = [nn.Parameter(torch.zeros(2))]
    assert implementation(cpu) == {}
    for name in ("sgd", "adamw"):
        opt = build_optimizer(cpu, OptimConfig(name=name))
        assert not opt.defaults["fused"] and opt.defaults["foreach"] is None  # CPU results as they always were
    # Without a GPU here, stand-ins say what build_optimizer asks for on CUDA (the GPU benchmark runs it).
    cuda = torch.empty(0, device="meta")
    assert implementation([_OnCuda(cuda), _OnCuda(cuda)]) == {"fused": True}
    assert implementation([_OnCuda(cuda), cpu[0]]) == {}  # mixed devices: torch's default


class _OnCuda:
    """A tensor stand-in that says it lives on CUDA."""

    def __init__(self, tensor: torch.Tensor):
        self.is_cuda = True
        self.is_floating_point = tensor.is_floating_point


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_optimizers_match_foreach_on_cuda():
    torch.manual_seed(0)
    for name in ("sgd", "adamw"):
        weights = [torch.randn(64, 32, device="cuda") for _ in range(3)]
        results = []
        for fused in (True, False):
            params = [nn.Parameter(w.clone()) for w in weights]
            opt = build_optimizer(params, OptimConfig(name=name, lr=0.1, weight_decay=0.01))
            if not fused:
                # Only the constructor's own arguments: torch >= 2.11's AdamW keeps `decoupled_weight_decay` in
                # its defaults but does not take it.
                accepted = inspect.signature(type(opt).__init__).parameters
                kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
                opt = type(opt)(params, **{**kwargs, "fused": None, "foreach": True})
            assert bool(opt.defaults["fused"]) == fused
            for step in range(3):
                for p in params:
                    p.grad = torch.full_like(p, 0.1 * (step + 1))
                opt.step()
            results.append(params)
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_norms_of_interleaved_groups_and_of_many_tensors():
    # Groups need not be contiguous in parameter order (the registry's components interleave block by block).
    torch.manual_seed(1)
    shapes = [(4, 3), (3,), (6,), (2, 2), (5,), (1,)] * 5
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    params[3].grad = None  # skipped, as a frozen parameter
    names = [f"p{i}" for i in range(len(params))]
    groups = {n: ("ln", "mha", "fc1")[i % 3] for i, n in enumerate(names)}
    total, per = grad_norms(list(zip(names, params)), groups)
    assert list(per) == ["ln", "mha", "fc1"]  # the order of first appearance
    for g, norm in per.items():
        grads = [p.grad.flatten() for n, p in zip(names, params) if groups[n] == g and p.grad is not None]
        assert norm.dtype == torch.float32 and norm.shape == ()
        assert norm.item() == pytest.approx(torch.cat(grads).norm().item(), rel=1e-6)
    everything = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    assert total.item() == pytest.approx(everything.norm().item(), rel=1e-6)


def test_grad_norms_and_clipping_match_direct_computation():
    torch.manual_seed(0)
    a, b, c = (nn.Parameter(torch.randn(n)) for n in (5, 7, 3))
    for p in (a, b, c):
        p.grad = torch.randn_like(p) * 3
    named = [("a", a), ("b", b), ("c", c)]
    total, per = grad_norms(named, {"a": "g1", "b": "g1", "c": "g2"})
    expect = torch.cat([a.grad, b.grad, c.grad]).norm()
    assert total.item() == pytest.approx(expect.item(), rel=1e-6)
    assert per["g1"].item() == pytest.approx(torch.cat([a.grad, b.grad]).norm().item(), rel=1e-6)
    assert per["g2"].item() == pytest.approx(c.grad.norm().item(), rel=1e-6)
    clip_gradients([a, b, c], 1.0, total)
    assert torch.cat([a.grad, b.grad, c.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    before = a.grad.clone()
    clip_gradients([a], None, total)  # off: untouched
    assert torch.equal(a.grad, before)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"lr": -1e-2}, "optim.lr"),
        ({"lr": 0.0}, "optim.lr"),
        ({"name": "adam"}, "optim.name"),
        ({"scheduler": "step"}, "optim.scheduler"),
        ({"momentum": 1.5}, "optim.momentum"),
        ({"betas": [0.9]}, "optim.betas"),
        ({"warmup_steps": -1}, "optim.warmup_steps"),
        ({"min_factor": 2.0}, "optim.min_factor"),
        ({"clip_grad": -1.0}, "optim.clip_grad"),
        ({"grad_accumulation": 0}, "optim.grad_accumulation"),
    ],
)
def test_bad_values_fail_clearly(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config(OptimConfig, override)


@pytest.mark.parametrize("trainable", [["all"], ["mha", "fc2"]])
def test_layer_decay_groups_scale_lr_by_depth(trainable):
    # timm's grouping: embedding = layer 0, block i = layer i + 1, head = layer depth + 1; lr × decay^(depth+1-layer).
    from tiny import random_vit

    from vitef.models import component_of, set_trainable

    depth, decay, lr = 3, 0.5, 0.1
    model = random_vit(depth=depth)
    set_trainable(model, trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    cfg = OptimConfig(lr=lr, layer_decay=decay, weight_decay=0.01, warmup_steps=0, scheduler="constant")
    cfg.validate()
    opt = build_optimizer(model.parameters(), cfg, model)
    seen = set()
    for group in opt.param_groups:
        assert group["weight_decay"] == 0.01  # weight decay untouched, 1-D parameters included
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            info = component_of(name)
            if info.layer is not None:
                layer = info.layer + 1
            elif info.component == "emb":
                layer = 0
            elif name.startswith("head."):
                layer = depth + 1
            else:  # the final norm: timm groups it with the last block
                layer = depth
            assert group["lr"] == pytest.approx(lr * decay ** (depth + 1 - layer)), name
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    # The schedule scales every group alike; layer_decay=1 is one group at lr.
    sched = build_scheduler(opt, OptimConfig(lr=lr, warmup_steps=2, scheduler="constant"), total_steps=4)
    assert sched.get_last_lr() == pytest.approx([g["initial_lr"] * 0.5 for g in opt.param_groups])
    assert len(build_optimizer(model.parameters(), OptimConfig(lr=lr), model).param_groups) == 1


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan")])
def test_layer_decay_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match="optim.layer_decay=.*must be in \\(0, 1\\]"):
        OptimConfig(layer_decay=value).validate()
