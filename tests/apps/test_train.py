"""apps.vit.train: learning, freezing, per-component logs, kill/resume equality, DDP equality, failures."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import tiny_train, tiny_vit, untimed

from apps.vit import train as train_app
from vitef.config import build_config, load_config
from vitef.distributed import DistInfo
from vitef.errors import ComponentError, ConfigError, TrainingError
from vitef.models import build_model_from_config, component_of, set_trainable
from vitef.monitor import RunDir, read_metrics
from vitef.utils import set_seed

ROOT = Path(__file__).resolve().parents[2]

# A 2-block, 32-wide ViT on 16 px digits: 5 tokens, a few milliseconds per step.
TINY = tiny_train(optim={"lr": 0.05, "warmup_steps": 2, "scheduler": "cosine"}, steps=8, eval_period=4)


def tiny_cfg(tmp_path: Path, **over) -> train_app.TrainConfig:
    return build_config(train_app.TrainConfig, TINY, {"root": str(tmp_path / "out"), "log_dir": "run", **over})


def write_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def initial_model(cfg: train_app.TrainConfig):
    set_seed(cfg.seed)  # the app seeds then builds: the same initial weights, head included
    return build_model_from_config(cfg.model, num_classes=5)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_train_step_reduces_the_loss(tmp_path, precision):
    # The app's own step function on one fixed batch: a few updates of MHA + head lower its loss.
    cfg = tiny_cfg(tmp_path, trainable=["mha"], optim={"lr": 0.05, "scheduler": "constant", "warmup_steps": 0})
    model = initial_model(cfg)
    set_trainable(model, cfg.trainable)
    stepper = train_app.Stepper.build(model, model, cfg.optim, 10, torch.device("cpu"), precision)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 5, (16,), generator=g))
    losses = [train_app.train_step(stepper, iter([batch]))["loss"] for _ in range(10)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_training_learns_only_the_chosen_component(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=12, eval_period=6, optim={"lr": 0.1, "scheduler": "constant", "warmup_steps": 0})
    train_app.main(cfg)
    run = RunDir(tmp_path / "out" / "runs" / "run")
    rows = read_metrics(run.metrics_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert all(r["lr"] == 0.1 and r["images_per_s"] > 0 for r in train_rows)
    # Per-component gradient norms of exactly the trainable components; total = their quadrature sum.
    for r in train_rows:
        assert {k for k in r if k.startswith("grad_norm/")} == {"grad_norm/mha", "grad_norm/head"}
        assert r["grad_norm"] == pytest.approx((r["grad_norm/mha"] ** 2 + r["grad_norm/head"] ** 2) ** 0.5, rel=1e-5)
    assert [r["step"] for r in rows if "val_acc" in r] == [6, 12]
    # Frozen parameters bit-identical, MHA and head changed.
    before = initial_model(cfg).state_dict()
    after = load_file(run.step_dir(12) / "model.safetensors")
    for name, value in before.items():
        comp = component_of(name).component
        if comp in ("mha", "head") and name.endswith("weight"):
            assert not torch.equal(value, after[name]), name
        elif comp not in ("mha", "head"):
            assert torch.equal(value, after[name]), name
    # Counts per component, in params.json and in the log.
    counts = set_trainable(initial_model(cfg), ["mha"])
    assert json.loads(run.params_path.read_text())["trainable"] == counts
    log = run.log_path.read_text()
    assert any("trainable mha" in line and f"{counts['mha']:,} parameters" in line for line in log.splitlines())
    # Best checkpoint: timm names, loadable by build_model; eval.json matches it.
    result = json.loads(run.eval_path.read_text())
    best = json.loads((run.best_dir / "best.json").read_text())
    assert result["best_step"] == best["step"] and result["best_val_acc"] == best["val_acc"]
    assert set(result) >= {"dataset", "split", "acc", "loss", "n", "best_step", "best_val_acc"}
    assert 0.0 <= result["acc"] <= 1.0 and result["n"] == 180
    assert result["images_per_s"] == statistics.median(r["images_per_s"] for r in train_rows)  # the run's speed
    model = tiny_vit(pretrained=run.best_model_path)
    assert model.head.out_features == 5
    assert json.loads(run.status_path.read_text())["status"] == "completed"
    assert yaml.safe_load(run.config_path.read_text())["optim"]["lr"] == 0.1


def test_completed_run_exits_at_once_and_overwrite_restarts(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, steps=2, eval_period=2)
    train_app.main(cfg)
    run = RunDir(tmp_path / "out" / "runs" / "run")
    stamp = run.eval_path.stat().st_mtime_ns
    capsys.readouterr()
    train_app.main(cfg)
    assert "already complete" in capsys.readouterr().out
    assert run.eval_path.stat().st_mtime_ns == stamp
    # A different config on the same run directory is refused, not silently mixed.
    run.write_status("running", 2, "pretend it was interrupted")  # else it exits as complete
    with pytest.raises(ConfigError, match="different config"):
        train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, optim={"lr": 0.2}))
    train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, optim={"lr": 0.2}, overwrite=True))
    assert yaml.safe_load(run.config_path.read_text())["optim"]["lr"] == 0.2


def fused_on_cpu(monkeypatch) -> None:
    """The fused optimiser kernels CUDA gets, on CPU: the training loop then reads each update's checks one update
    late (Stepper.deferred), as on a GPU."""
    import vitef.optim

    monkeypatch.setattr(vitef.optim, "implementation", lambda params: {"fused": True})


@pytest.mark.parametrize("deferred", [False, True])
def test_nan_loss_stops_with_failed_status_and_keeps_best(tmp_path, monkeypatch, deferred):
    if deferred:
        fused_on_cpu(monkeypatch)
    real = train_app.F.cross_entropy
    calls = {"n": 0}

    class FakeF:
        @staticmethod
        def cross_entropy(logits, labels, **kw):
            calls["n"] += 1
            loss = real(logits, labels, **kw)
            return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(train_app, "F", FakeF)
    cfg = tiny_cfg(tmp_path, steps=6, eval_period=2)
    with pytest.raises(TrainingError, match="diverged"):
        train_app.main(cfg)
    run = RunDir(tmp_path / "out" / "runs" / "run")
    status = json.loads(run.status_path.read_text())
    assert status["status"] == "failed" and status["step"] == 3 and "nan" in status["message"]
    assert run.best_model_path.is_file() and json.loads((run.best_dir / "best.json").read_text())["step"] == 2
    assert not run.eval_path.exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["trainable=[mlp]"], "unknown component 'mlp'"),
        (["lr=-0.01"], "optim.lr"),
        (["eval_period=100"], "eval_period=100 exceeds steps=8"),
        (["precision=fp8"], "precision"),
        (["dataset_name=cifar11"], "dataset_name"),
        (["batch_size=15", "optim.grad_accumulation=2"], "not divisible"),
        (["checkpoint_period=-1"], "checkpoint_period"),
        (["log_dir=../escape"], "log_dir"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, args, match):
    yaml_path = write_yaml(tmp_path)
    with pytest.raises((ConfigError, ComponentError), match=match):
        load_config(train_app.TrainConfig, [f"config={yaml_path}", f"root={tmp_path / 'out'}", *args])
    assert not (tmp_path / "out").exists()


def test_cli_error_exit_code_and_seed_flat_keys(tmp_path, run_app):
    yaml_path = write_yaml(tmp_path)
    r = run_app("apps.vit.train", f"config={yaml_path}", f"root={tmp_path / 'out'}", "trainable=[mlp]")
    assert r.returncode == 2 and r.stderr.startswith("error: trainable: unknown component 'mlp'")
    assert not (tmp_path / "out").exists()
    # The seed's flat keys and the paper's `lr` alias reach the nested config.
    cfg = load_config(
        train_app.TrainConfig,
        ["--dataset_name", "digits", "--model_name", "small", "lr=3e-2", "batch_size=8", "device=cpu", "seed=42"],
    )
    got = (cfg.dataset_name, cfg.model.name, cfg.optim.lr, cfg.batch_size, cfg.seed)
    assert got == ("digits", "small", 3e-2, 8, 42)
    assert cfg.run_name == "digits_small_all_lr0.03_seed42"


def _launch(tmp_path: Path, root: Path, *extra: str, nproc: int = 0) -> subprocess.Popen:
    yaml_path = write_yaml(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [f"config={yaml_path}", f"root={root}", "log_dir=run", "device=cpu", *extra]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "apps.vit.train", *args]
    else:
        cmd = [sys.executable, "-m", "apps.vit.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 240) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _final(root: Path) -> tuple[dict, list[dict]]:
    run = RunDir(root / "runs" / "run")
    steps = run.checkpoint_steps()
    return load_file(run.step_dir(steps[-1]) / "model.safetensors"), read_metrics(run.metrics_path)


KEYS = ("step", "loss", "lr", "grad_norm", "grad_norm/mha", "grad_norm/head", "val_loss", "val_acc")


def test_sigkill_then_relaunch_equals_uninterrupted_run(tmp_path):
    extra = ("steps=40", "eval_period=10", "checkpoint_period=5", "keep_last=2")
    ref = _launch(tmp_path, tmp_path / "ref", *extra)
    _finish(ref)
    proc = _launch(tmp_path, tmp_path / "killed", *extra)
    run = RunDir(tmp_path / "killed" / "runs" / "run")
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None and not run.step_dir(15).is_dir():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    status = json.loads(run.status_path.read_text())["status"]
    assert status == "running", "the run finished before it could be killed"
    assert run.checkpoint_steps()[-1] < 40
    _finish(_launch(tmp_path, tmp_path / "killed", *extra))

    ref_weights, ref_rows = _final(tmp_path / "ref")
    got_weights, got_rows = _final(tmp_path / "killed")
    assert ref_weights.keys() == got_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], got_weights[name]), name
    strip = [[{k: r[k] for k in KEYS if k in r} for r in rows] for rows in (ref_rows, got_rows)]
    assert strip[0] == strip[1]  # same rows, same values, no duplicated steps
    ref_eval = RunDir(tmp_path / "ref" / "runs" / "run").eval_path
    assert untimed(json.loads(run.eval_path.read_text())) == untimed(json.loads(ref_eval.read_text()))


def test_deferred_checks_train_exactly_as_checks_before_each_update(tmp_path, monkeypatch):
    # The same fused optimiser, its checks read one update late or before each update: the same rows, weights and
    # results bit for bit (the deferral moves when the host waits, not what is computed), checkpoints and
    # validations included.
    fused_on_cpu(monkeypatch)
    guarded, real = [], train_app._update_unless_refused
    monkeypatch.setattr(train_app, "_update_unless_refused", lambda *a: guarded.append(1) or real(*a))
    results = {}
    for deferred in (False, True):
        monkeypatch.setattr(train_app, "DEFERRED_CHECKS", deferred)
        guarded.clear()
        root = tmp_path / str(deferred)
        train_app.main(tiny_cfg(tmp_path, root=str(root), steps=7, eval_period=3, checkpoint_period=2))
        run = RunDir(root / "runs" / "run")
        weights = load_file(run.best_model_path)
        rows = [
            {k: v for k, v in r.items() if k not in ("images_per_s", "data_wait_ms")}
            for r in read_metrics(run.metrics_path)
        ]
        results[deferred] = (weights, rows, untimed(json.loads(run.eval_path.read_text())), run.checkpoint_steps())
        assert len(guarded) == (7 if deferred else 0)  # the updates went through the device-side guard
    (w0, rows0, eval0, steps0), (w1, rows1, eval1, steps1) = results[False], results[True]
    assert [r["step"] for r in rows1 if "loss" in r] == list(range(1, 8))
    assert rows0 == rows1 and steps0 == steps1
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert eval0 == eval1


def test_two_process_ddp_matches_one_process(tmp_path):
    extra = ("steps=4", "eval_period=2", "batch_size=16", "trainable=[mha,fc1]")
    _finish(_launch(tmp_path, tmp_path / "one", *extra))
    _finish(_launch(tmp_path, tmp_path / "two", *extra, nproc=2))
    one_w, one_rows = _final(tmp_path / "one")
    two_w, two_rows = _final(tmp_path / "two")
    one_loss = [r["loss"] for r in one_rows if "loss" in r]
    two_loss = [r["loss"] for r in two_rows if "loss" in r]
    assert len(one_loss) == len(two_loss) == 4
    assert two_loss == pytest.approx(one_loss, abs=1e-5)
    for name in one_w:
        assert torch.allclose(one_w[name], two_w[name], atol=1e-5), name
    one_val = [(r["val_acc"], r["val_loss"]) for r in one_rows if "val_acc" in r]
    two_val = [(r["val_acc"], r["val_loss"]) for r in two_rows if "val_acc" in r]
    assert [a for a, _ in one_val] == [a for a, _ in two_val]
    assert [b for _, b in two_val] == pytest.approx([b for _, b in one_val], abs=1e-5)


def test_trainable_alias_is_stored_canonical_and_resumes_either_spelling(tmp_path):
    cfg = tiny_cfg(tmp_path, trainable=["attn"], steps=2, eval_period=2, log_dir="")
    assert cfg.trainable == ["mha"] and cfg.run_name == tiny_cfg(tmp_path, log_dir="").run_name
    run = RunDir(tmp_path / "out" / "runs" / cfg.run_name)
    train_app.main(cfg)
    assert yaml.safe_load(run.config_path.read_text())["trainable"] == ["mha"]
    assert json.loads(run.eval_path.read_text())["trainable"] == ["mha"]
    # Relaunching an interrupted run as [mha] or [attn] is the same config, and so is a run directory written
    # before the config was stored canonical (its config.yaml holds [attn]).
    for saved in (["mha"], ["attn"]):
        config = yaml.safe_load(run.config_path.read_text())
        run.config_path.write_text(yaml.safe_dump({**config, "trainable": saved}, sort_keys=False))
        for typed in (["mha"], ["attn"]):
            train_app._check_same_config(tiny_cfg(tmp_path, trainable=typed, steps=2, eval_period=2, log_dir=""), run)
    with pytest.raises(ConfigError, match="different config.*trainable: \\['mha'\\] -> \\['fc1'\\]"):
        train_app._check_same_config(tiny_cfg(tmp_path, trainable=["fc1"], steps=2, eval_period=2, log_dir=""), run)


def test_compile_traces_once_whatever_the_validations_and_checkpoints_in_between(tmp_path, monkeypatch):
    # torch.compile with a backend that counts the graphs it is handed (no compiler on a CPU test machine; the
    # guards and recompilations are Dynamo's, whatever the backend): the first step compiles, the other steps,
    # around validations (plain model in eval mode) and checkpoints, run what was compiled.
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    real_compile, real_step = torch.compile, train_app.launch_step
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting_backend))
    after_step: list[int] = []

    def step(*args, **kwargs):
        row = real_step(*args, **kwargs)
        after_step.append(len(graphs))
        return row

    monkeypatch.setattr(train_app, "launch_step", step)
    torch._dynamo.reset()
    train_app.main(tiny_cfg(tmp_path, steps=6, eval_period=3, checkpoint_period=2, compile=True))
    torch._dynamo.reset()
    assert after_step == [1] * 6, after_step


def test_a_finished_run_is_not_taken_for_one_of_another_config(tmp_path, capsys):
    train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2))
    run = RunDir(tmp_path / "out" / "runs" / "run")
    results = run.eval_path.read_bytes()
    train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, log_every=7))  # a key that changes nothing: done
    assert "is already complete (step 2)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"exists with a different config \(steps: 2 -> 4\)\. Use overwrite=true"):
        train_app.main(tiny_cfg(tmp_path, steps=4, eval_period=2))
    assert run.eval_path.read_bytes() == results
    # Every process of a distributed run reads the finished run's config: no rank carries on while rank 0 fails.
    other_rank = DistInfo(rank=1, local_rank=1, world_size=2)
    with pytest.raises(ConfigError, match="exists with a different config"):
        train_app._already_complete(tiny_cfg(tmp_path, steps=4, eval_period=2), run, other_rank)
    assert train_app._already_complete(tiny_cfg(tmp_path, steps=2, eval_period=2), run, other_rank)
    assert "already complete" not in capsys.readouterr().out  # said once, by rank 0


def test_compile_cache_holds_the_runs_compilation_and_is_set_back_after_it(tmp_path, monkeypatch):
    # Where Inductor would cache is read from the environment when the graph is compiled (first step): the counting
    # backend records it. Afterwards the caller's setting is back, and runtime.json says which folder was used.
    from vitef.utils import COMPILE_CACHE_ENV

    seen: list[str | None] = []

    def backend(gm, example_inputs):
        seen.append(os.environ.get(COMPILE_CACHE_ENV))
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=backend))
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "callers"))
    cache = tmp_path / "shared" / "compile"
    torch._dynamo.reset()
    train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, compile=True, compile_cache=str(cache)))
    torch._dynamo.reset()
    assert seen == [str(cache)] and cache.is_dir()
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "callers")
    runtime = RunDir(tmp_path / "out" / "runs" / "run").read_runtime()
    assert runtime["compile"] is True and runtime["compile_cache"] == str(cache)
    # The cache folder changes nothing in the results: another one resumes the same run (here: complete).
    train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, compile=True, compile_cache=str(tmp_path / "other")))


def test_compile_cache_needs_compile_and_a_writable_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"compile_cache='c' is set but compile=false: set compile=true"):
        tiny_cfg(tmp_path, compile_cache="c")
    (tmp_path / "file").write_text("in the way")
    cfg = tiny_cfg(tmp_path, compile=True, compile_cache=str(tmp_path / "file" / "cache"))
    with pytest.raises(ConfigError, match="compile_cache"):
        train_app.main(cfg)
    assert not (tmp_path / "out" / "runs").exists()


def test_runtime_json_records_the_effective_precision_and_the_callers_flags_come_back(tmp_path):
    from vitef.utils import precision_flags, precision_scope

    with precision_scope("fp32"):  # e.g. a sweep running apps in-process
        before = precision_flags()
        train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, precision="tf32"))
        assert precision_flags() == before
    run = RunDir(tmp_path / "out" / "runs" / "run")
    runtime = run.read_runtime()
    assert runtime["precision"] == "tf32" and runtime["autocast"] is None
    # The flags in effect while training (TF32 on; on a CPU machine they change nothing, and say so no less).
    assert runtime["float32_matmul_precision"] == "high"
    assert runtime["cuda_matmul_allow_tf32"] is True and runtime["cudnn_allow_tf32"] is True
    assert runtime["device"] == "cpu" and runtime["torch"] == torch.__version__ and runtime["timm"]
    assert (runtime["compile"], runtime["world_size"], runtime["start_step"]) == (False, 1, 0)
    assert "runtime.json" in {p.name for p in run.path.iterdir()} and run.looks_like_run()
    # A resumed run records its own start and keeps the earlier ones.
    run.write_status("running", 2, "pretend it was interrupted")
    train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, precision="tf32"))
    resumed = run.read_runtime()
    assert resumed["start_step"] == 2 and [r["start_step"] for r in resumed["earlier"]] == [0]
    # bf16: autocast dtype and strict float32 flags for what autocast keeps in float32.
    train_app.main(tiny_cfg(tmp_path, steps=2, eval_period=2, precision="bf16", overwrite=True))
    runtime = run.read_runtime()
    assert (runtime["precision"], runtime["autocast"], runtime["float32_matmul_precision"]) == (
        "bf16",
        "bfloat16",
        "highest",
    )
    assert "earlier" not in runtime
