"""Every entry point, fed bad input as a new user would: one ``error:`` line, exit 2, no traceback, nothing written.

Each case runs the app in-process exactly as ``python -m`` does (``vitef.config.cli_main(CONFIG, main, argv)``),
in its own empty working directory holding the files a case refers to:

    {tmp}       the case's working directory (also the cwd, so a default ``root=outputs`` lands here)
    {repo}      the repository (its configs and the bundled model)
    {file}      a regular file, where a folder is expected
    {ro}        a read-only folder (as root, whom permissions do not stop, its write check is made to fail)
    {run}       a copy of a finished tiny training run, {runs_root}/runs/run; {ro_run} the same inside {ro}
    {tiny}      the tiny training config; {bad_yaml}, {binary}, {list_yaml}, {corrupt_st}: broken files
    {bad_sha}, {carded_corrupt}, {corrupt_card}: self-describing weights whose card or weights are wrong
    {sweep}     the case's own sweep file (written from the case's ``sweep`` mapping); {sweep_ok} a valid one

After each case the working directory (and the finished run) must hold exactly the same files as before.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from inprocess import isolated_logging as _isolated_logging
from tiny import tiny_train

import vitef.utils
from vitef.config import build_config, cli_main
from vitef.errors import ConfigError
from vitef.utils import check_writable

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "apps/vit/pretrained/vit_digits.safetensors"

APPS = {
    "train": "apps.vit.train",
    "eval": "apps.vit.eval",
    "analysis": "apps.vit.analysis",
    "probe": "apps.vit.linear_probing",
    "pretrain": "apps.vit.pretrain",
    "sweep": "apps.vit.sweep",
    "study": "apps.study",
    "finetuning": "apps.plots.finetuning",
    "plots_analysis": "apps.plots.analysis",
    "landscape": "apps.vit.loss_landscape",
    "landscape_plot": "apps.plots.loss_landscape",
    "report": "apps.plots.report",
    "components": "apps.vit.components",
    "data_info": "apps.vit.data_info",
    "cache": "apps.vit.cache",
}

TINY = tiny_train(steps=2, device="cpu")
SWEEP = {"name": "s", "app": "train", "base": ["{tiny}"], "grid": {"lr": [0.01, 0.02]}}


@dataclasses.dataclass
class Case:
    id: str
    app: str
    argv: list[str]
    match: str  # a regular expression the error line must contain
    sweep: dict | None = None  # content of {sweep}

    def param(self):
        return pytest.param(self, id=f"{self.app}-{self.id}")


def train_cases() -> list[Case]:
    base = ["config={tiny}", "root={tmp}/out"]
    c = [
        ("unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("typo-key", ["trainabel=[mha]"], "Did you mean 'trainable'"),
        ("nested-unknown", ["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        ("model-unknown-key", ["model.nme=x"], "unknown config key 'model.nme'"),
        ("group-as-value", ["optim=3"], "optim"),
        ("steps-not-int", ["steps=abc"], "'steps' .*expects int"),
        ("batch-float", ["batch_size=1.5"], "batch_size"),
        ("lr-not-float", ["lr=fast"], "optim.lr"),
        ("lr-negative", ["lr=-0.01"], "optim.lr"),
        ("unknown-component", ["trainable=[mlp]"], "unknown component 'mlp'"),
        ("no-component", ["trainable=[]"], "trainable=\\[\\] trains nothing"),
        ("unknown-dataset", ["dataset_name=cifar11"], "dataset_name"),
        ("bad-digit-subset", ["dataset_name=digits_subset-5x"], "dataset_name"),
        ("bad-corruption", ["dataset_name=corrupt:nope-5:digits"], "dataset_name"),
        ("unknown-model", ["model.name=vit_nonexistent_model"], "vit_nonexistent_model"),
        ("missing-weights", ["model.name={tmp}/missing.safetensors", "model.pretrained=true"], "missing"),
        ("weights-without-card", ["model.name={corrupt_st}", "model.pretrained=true"], "has no card 'corrupt.json'"),
        ("card-wrong-sha256", ["model.name={bad_sha}", "model.pretrained=true"], "sha256|SHA-256"),
        ("carded-corrupt-weights", ["model.name={carded_corrupt}", "model.pretrained=true"], "carded.safetensors"),
        ("card-corrupt", ["model.name={corrupt_card}", "model.pretrained=true"], "broken.json"),
        ("missing-checkpoint", ["model.checkpoint={tmp}/none.safetensors"], "model.checkpoint"),
        ("corrupt-checkpoint", ["model.checkpoint={corrupt_st}"], "corrupt"),
        ("weights-file-random", ["model.name={repo}/apps/vit/pretrained/vit_digits.safetensors"], "pretrained"),
        ("img-size-negative", ["model.img_size=-3"], "model.img_size"),
        ("precision", ["precision=fp8"], "precision"),
        ("device", ["device=tpu"], "device"),
        ("steps-zero", ["steps=0"], "steps=0"),
        ("eval-period", ["eval_period=100"], "eval_period=100 exceeds steps=2"),
        ("checkpoint-period", ["checkpoint_period=-1"], "checkpoint_period"),
        ("keep-last-zero", ["keep_last=0"], "keep_last=0"),
        ("keep-steps", ["keep_steps=[100]"], "keep_steps"),
        ("warmup", ["optim.warmup_steps=100"], "warmup_steps"),
        ("optimizer", ["optim.name=adam"], "optim.name"),
        ("scheduler", ["optim.scheduler=steps"], "scheduler"),
        ("accumulation", ["batch_size=15", "optim.grad_accumulation=2"], "not divisible"),
        ("batch-too-large", ["batch_size=100000"], "batch_size=100000 is larger than the train split"),
        ("log-dir-escape", ["log_dir=../escape"], "log_dir"),
        ("root-empty", ["root="], "root is empty"),
        ("root-is-file", ["root={file}"], "is a file"),
        ("root-under-file", ["root={file}/sub"], "is a file"),
        ("root-read-only", ["root={ro}"], "not writable"),
        ("normalize", ["data.normalize=foo"], "normalize"),
        ("seed-not-int", ["seed=abc"], "seed"),
        ("bare-flag-int", ["--steps"], "steps"),
        ("positional", ["foo"], "unexpected argument 'foo'"),
        ("override-typo", ["model.overrides={patch_sise: 8}"], "patch_sise"),
        ("override-zero", ["model.overrides={patch_size: 0}"], "patch_size"),
        (
            "different-config",
            ["root={runs_root}", "log_dir=run", "_running=1", "lr=0.5"],
            "different config \\(optim.lr: 0.05 -> 0.5\\)",
        ),
        (
            "resume-corrupt-config",
            ["root={runs_root}", "log_dir=run", "_running=1", "_corrupt=config.yaml"],
            "not valid YAML",
        ),
        (
            "resume-corrupt-state",
            ["root={runs_root}", "log_dir=run", "_running=1", "_corrupt=checkpoints/step_2/state.pt"],
            "state.pt",
        ),
        (
            "resume-corrupt-weights",
            ["root={runs_root}", "log_dir=run", "_running=1", "_corrupt=checkpoints/step_2/model.safetensors"],
            "model.safetensors",
        ),
    ]
    cases = [Case(i, "train", base + argv, m) for i, argv, m in c]
    cases += [
        Case("config-missing", "train", ["config={tmp}/missing.yaml"], "config file not found"),
        Case("config-syntax", "train", ["config={bad_yaml}"], "not valid YAML"),
        Case("config-binary", "train", ["config={binary}"], "config"),
        Case("config-list", "train", ["config={list_yaml}"], "mapping"),
        Case("config-key-in-file", "train", ["config={sweep}"], "unknown config key 'x'", sweep={"x": 1}),
    ]
    return cases


def eval_cases() -> list[Case]:
    c = [
        ("no-run", ["log_dir={tmp}/nowhere"], "no run at"),
        ("unknown-key", ["log_dir={run}", "foo=1"], "unknown config key 'foo'"),
        ("split", ["log_dir={run}", "split=dev"], "split='dev'"),
        ("checkpoint", ["log_dir={run}", "checkpoint=first"], "checkpoint='first'"),
        ("eval-dataset", ["log_dir={run}", "eval_dataset=cifar11"], "eval_dataset"),
        ("class-mismatch", ["log_dir={run}", "eval_dataset=digits"], "has 10 classes but the run's head has 5"),
        ("run-read-only", ["log_dir={ro_run}"], "not writable"),
        ("precision", ["log_dir={run}", "precision=fp4"], "precision"),
        ("config-missing", ["config={tmp}/missing.yaml"], "config file not found"),
        ("device", ["log_dir={run}", "device=gpu7"], "device"),
    ]
    cases = [Case(i, "eval", argv, m) for i, argv, m in c]
    cases += [
        Case("corrupt-best", "eval", ["log_dir={run}", "_corrupt=checkpoints/best/model.safetensors"], "safetensors"),
        Case("no-best", "eval", ["log_dir={run}", "_delete=checkpoints/best"], "no best checkpoint"),
        Case(
            "no-step-checkpoint", "eval", ["log_dir={run}", "checkpoint=last", "_delete=checkpoints/step_2"], "no step"
        ),
        Case("corrupt-config", "eval", ["log_dir={run}", "_corrupt=config.yaml"], "config.yaml"),
        Case("corrupt-best-json", "eval", ["log_dir={run}", "_corrupt=checkpoints/best/best.json"], "best.json"),
    ]
    return cases


def analysis_cases() -> list[Case]:
    base = ["config={repo}/apps/vit/configs/analysis/digits.yaml", "root={tmp}/out", "steps=1", "batch_size=4"]
    c = [
        ("unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("mode", ["mode=both"], "mode='both'"),
        ("precision", ["precision=fp64"], "precision"),
        ("batch-zero", ["batch_size=0"], "batch_size=0"),
        ("steps-zero", ["steps=0"], "steps=0"),
        ("sigma", ["sigma=0"], "sigma=0"),
        ("component", ["components=[mlp]"], "components"),
        ("source", ["source=cifar11"], "cifar11"),
        ("target", ["dataset_name=cifar11"], "cifar11"),
        ("empty-target", ["dataset_name="], "dataset_name"),
        ("source-offline", ["source=imagenet"], "imagenet"),
        ("target-split", ["target_split=dev"], "dev"),
        ("model-missing", ["model.name={tmp}/none.safetensors", "model.pretrained=true"], "none.safetensors"),
        ("weights-without-card", ["model.name={corrupt_st}", "model.pretrained=true"], "has no card"),
        ("card-wrong-sha256", ["model.name={bad_sha}", "model.pretrained=true"], "sha256|SHA-256"),
        ("model-unknown", ["model.name=vit_nonexistent_model"], "vit_nonexistent_model"),
        ("root-is-file", ["root={file}"], "is a file"),
        ("root-read-only", ["root={ro}"], "not writable"),
        ("chunk-type", ["chunk_size=abc"], "chunk_size"),
        ("override-typo", ["model.overrides={patch_sise: 8}"], "patch_sise"),
        ("override-zero", ["model.overrides={patch_size: 0}"], "patch_size"),
        ("bare-flag-str", ["--dataset_name"], "unknown dataset 'true'"),
    ]
    cases = [Case(i, "analysis", base + argv, m) for i, argv, m in c]
    cases.append(Case("config-syntax", "analysis", ["config={bad_yaml}"], "not valid YAML"))
    cases.append(Case("verb", "analysis", ["walk"], "unexpected argument 'walk'"))
    return cases


def probe_cases() -> list[Case]:
    base = ["config={repo}/apps/vit/configs/linear_probing_digits.yaml", "root={tmp}/out", "max_train_samples=20"]
    c = [
        ("unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("pool", ["pool=max"], "pool='max'"),
        ("points", ["points=[attn]"], "attn"),
        ("train-split", ["train_split=dev"], "train_split='dev'"),
        ("batch-zero", ["batch_size=0"], "batch_size=0"),
        ("precision", ["precision=int8"], "precision"),
        ("max-samples", ["max_train_samples=1"], "max_train_samples=1"),
        ("no-dataset", ["dataset_name=null"], "dataset_name is required"),
        ("unknown-dataset", ["dataset_name=cifar11"], "cifar11"),
        ("layers", ["layers=[99]"], "99"),
        ("solver-key", ["solver.foo=1"], "unknown config key 'solver.foo'"),
        ("root-is-file", ["root={file}"], "is a file"),
        ("root-read-only", ["root={ro}"], "not writable"),
        ("run-missing", ["run_dir={tmp}/nowhere"], "does not exist"),
        ("run-is-file", ["run_dir={file}"], "run_dir"),
        ("run-not-a-run", ["run_dir={tmp}"], "no config.yaml"),
        ("run-read-only", ["run_dir={ro_run}"], "not writable"),
        ("run-no-best", ["run_dir={run}", "_delete=checkpoints/best"], "no best checkpoint"),
        ("run-corrupt-best", ["run_dir={run}", "_corrupt=checkpoints/best/model.safetensors"], "safetensors"),
        ("run-corrupt-config", ["run_dir={run}", "_corrupt=config.yaml"], "config.yaml"),
        ("model-unknown", ["model.name=vit_nonexistent_model"], "vit_nonexistent_model"),
        ("weights-without-card", ["model.name={corrupt_st}", "model.pretrained=true"], "has no card"),
        ("card-wrong-sha256", ["model.name={bad_sha}", "model.pretrained=true"], "sha256|SHA-256"),
        ("weights-file-random", ["model.name={repo}/apps/vit/pretrained/vit_digits.safetensors"], "pretrained"),
        ("override-typo", ["model.overrides={patch_sise: 8}"], "patch_sise"),
    ]
    return [Case(i, "probe", base + argv, m) for i, argv, m in c]


def pretrain_cases() -> list[Case]:
    base = ["config={tiny}", "root={tmp}/out", "export={tmp}/model.safetensors", "trainable=[all]"]
    c = [
        ("export-suffix", ["export={tmp}/model.pt"], "export="),
        ("export-empty", ["export="], "export="),
        ("pretrained", ["model.pretrained=true"], "random weights"),
        ("checkpoint", ["model.checkpoint={corrupt_st}"], "checkpoint"),
        ("export-under-file", ["export={file}/model.safetensors"], "is a file"),
        ("export-read-only", ["export={ro}/model.safetensors"], "not writable"),
        ("root-is-file", ["root={file}"], "is a file"),
        ("root-read-only", ["root={ro}"], "not writable"),
        ("unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("steps", ["steps=-5"], "steps=-5"),
        ("dataset", ["dataset_name=cifar11"], "cifar11"),
        ("batch-too-large", ["batch_size=100000"], "larger than the train split"),
    ]
    return [Case(i, "pretrain", base + argv, m) for i, argv, m in c]


def sweep_cases() -> list[Case]:
    def s(**over):
        out = {**SWEEP, **over}
        return {k: v for k, v in out.items() if v is not None}

    c = [
        ("no-name", s(name=None), "name"),
        ("name-slash", s(name="a/b"), "name"),
        ("backend", s(backend="k8s"), "backend='k8s'"),
        ("grid-scalar", s(grid={"lr": 0.01}), "non-empty list"),
        ("grid-empty", s(grid={"lr": []}), "non-empty list"),
        ("grid-and-grids", s(grids=[{"seed": [0]}]), "either grid"),
        ("grid-unknown-key", s(grid={"lrr": [0.1]}), "lrr"),
        ("grid-bad-value", s(grid={"steps": ["many"]}), "steps"),
        ("grid-invalid-value", s(grid={"trainable": [["mlp"]]}), "mlp"),
        ("overrides-unknown", s(overrides={"stpes": 3}), "stpes"),
        ("overrides-invalid", s(overrides={"eval_period": 100}), "eval_period"),
        ("app-unknown", s(app="trian"), "trian"),
        ("app-outside", s(app="json"), "json"),
        ("app-no-config", s(app="apps.plots.common"), "apps.plots.common"),
        ("base-missing", s(base=["{tmp}/none.yaml"]), "none.yaml"),
        ("base-syntax", s(base=["{bad_yaml}"]), "YAML"),
        ("base-binary", s(base=["{binary}"]), "binary|YAML|config"),
        ("run-name-placeholder", s(run_name="{nope}_{lr}"), "nope"),
        ("grid-config-missing", s(grid={"config": ["{tmp}/none.yaml"]}), "none.yaml"),
        ("top-unknown-key", s(gird={"lr": [1]}), "gird"),
        ("max-parallel", s(local={"max_parallel": 0}), "max_parallel"),
        ("slurm-cluster", s(slurm={"cluster": "pbs"}), "slurm.cluster"),
        ("limit", s(limit=-1), "limit"),
        ("root-is-file", s(root="{file}"), "is a file"),
        ("root-read-only", s(root="{ro}"), "not writable"),
    ]
    cases = [Case(i, "sweep", ["config={sweep}"], m, sweep=sw) for i, sw, m in c]
    cases += [
        Case("missing-file", "sweep", ["config={tmp}/none.yaml"], "config file not found"),
        Case("syntax", "sweep", ["config={bad_yaml}"], "not valid YAML"),
        Case("list-file", "sweep", ["config={list_yaml}"], "mapping"),
        Case("cli-unknown", "sweep", ["config={sweep}", "dry=true"], "unknown config key 'dry'", sweep=SWEEP),
        Case("dry-run-type", "sweep", ["config={sweep}", "dry_run=maybe"], "dry_run", sweep=SWEEP),
    ]
    return cases


def study_cases() -> list[Case]:
    base = ["root={tmp}/study"]
    c = [
        ("unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("sweep-missing", ["sweeps=[{tmp}/none.yaml]"], "none.yaml"),
        ("select-on", ["select_on=train"], "select_on"),
        ("threads", ["threads=-1"], "threads=-1"),
        ("landscape-config", ["landscapes=[mha]", "landscape_config={tmp}/none.yaml"], "none.yaml"),
        ("landscape-component", ["landscapes=[mhaa]"], "mhaa"),
        ("sweep-invalid", ["sweeps=[{sweep}]"], "backend", {**SWEEP, "backend": "k8s"}),
        ("sweeps-second-invalid", ["sweeps=[{sweep_ok},{sweep}]"], "gird", {"gird": 1}),
        ("root-is-file", ["root={file}"], "is a file"),
        ("root-read-only", ["root={ro}"], "not writable"),
        ("sweeps-not-list", ["sweeps=3"], "sweeps"),
        ("config-missing", ["config={tmp}/none.yaml"], "config file not found"),
    ]
    return [Case(i, "study", base + argv, m, sweep=rest[0] if rest else None) for i, argv, m, *rest in c]


def plots_cases() -> list[Case]:
    fin = ["root={tmp}", "results_dir={tmp}/results"]
    pa = ["dirs=[{tmp}/analysis/*]", "out={tmp}/figures"]
    ls = ["config={repo}/apps/vit/configs/loss_landscape_quick.yaml", "root={tmp}/out", f"model.name={BUNDLED}"]
    c = [
        ("finetuning", "command", fin + ["command=draw"], "unknown command 'draw'"),
        ("finetuning", "select-on", fin + ["select_on=train"], "select_on"),
        ("finetuning", "ddof", fin + ["ddof=-1"], "ddof=-1"),
        ("finetuning", "no-runs", fin, "no training runs"),
        ("finetuning", "results-is-file", ["root={tmp}", "results_dir={file}"], "is a file"),
        ("finetuning", "results-read-only", ["root={tmp}", "results_dir={ro}"], "not writable"),
        ("finetuning", "unknown-key", fin + ["foo=1"], "unknown config key 'foo'"),
        ("finetuning", "table-without-csv", fin + ["command=table"], "csv"),
        (
            "finetuning",
            "corrupt-run",
            ["root={runs_root}", "results_dir={tmp}/results", "_corrupt=eval.json"],
            "eval.json",
        ),
        ("plots_analysis", "dirs-empty", ["dirs=[]", "out={tmp}/figures"], "dirs is empty"),
        ("plots_analysis", "formats", pa + ["formats=[gif]"], "gif"),
        ("plots_analysis", "no-folders", pa, "no analysis folder"),
        ("plots_analysis", "out-is-file", ["dirs=[{tmp}]", "out={file}"], "is a file"),
        ("plots_analysis", "out-read-only", ["dirs=[{tmp}]", "out={ro}"], "not writable"),
        ("plots_analysis", "unknown-key", pa + ["foo=1"], "unknown config key 'foo'"),
        ("landscape", "component", ls + ["component=mlp"], "mlp"),
        ("landscape", "component-emb", ls + ["component=emb"], "per-block component"),
        ("landscape", "steps", ls + ["steps=1"], "steps=1"),
        ("landscape", "grid-size", ls + ["grid_size=1"], "grid_size=1"),
        ("landscape", "scale", ls + ["scale=log"], "scale='log'"),
        ("landscape", "center", ls + ["center=origin"], "center='origin'"),
        ("landscape", "eval-split", ls + ["eval_split=dev"], "eval_split='dev'"),
        ("landscape", "image-index", ls + ["image_index=-1"], "image_index=-1"),
        ("landscape", "range", ls + ["grid_range=0"], "grid_range=0"),
        ("landscape", "command", ls + ["command=show"], "command=show: this app only computes"),
        ("landscape", "command-plot", ls + ["command=plot"], "draw with python -m apps.plots.loss_landscape"),
        ("landscape_plot", "nothing", ["root={tmp}/out", "out_dir={tmp}/empty"], "does not exist: compute"),
        ("landscape_plot", "command-run", ["command=run"], "this app only draws"),
        ("landscape_plot", "compute-key", ["steps=1"], "python -m apps.vit.loss_landscape steps="),
        ("landscape_plot", "component", ["component=mlp"], "mlp"),
        ("landscape_plot", "unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("landscape", "out-is-file", ls + ["out_dir={file}"], "is a file"),
        ("landscape", "out-read-only", ls + ["out_dir={ro}"], "not writable"),
        ("landscape", "root-is-file", ls + ["root={file}"], "is a file"),
        ("landscape", "dataset", ls + ["dataset=cifar11"], "cifar11"),
        ("landscape", "layer", ls + ["layer=99"], "layer=99"),
        ("landscape", "weights-without-card", ls + ["model.name={corrupt_st}"], "has no card"),
        ("landscape", "carded-corrupt-weights", ls + ["model.name={carded_corrupt}"], "carded.safetensors"),
        ("landscape", "override-typo", ls + ["model.overrides={patch_sise: 8}"], "patch_sise"),
        ("landscape", "override-zero", ls + ["model.overrides={patch_size: 0}"], "patch_size"),
        ("landscape", "unknown-key", ls + ["foo=1"], "unknown config key 'foo'"),
        ("report", "no-root", ["root={tmp}/nowhere"], "does not exist"),
        ("report", "nothing", ["root={tmp}"], "nothing to report"),
        ("report", "out-is-file", ["root={tmp}", "out={file}"], "is a file"),
        ("report", "out-read-only", ["root={tmp}", "out={ro}"], "not writable"),
        ("report", "root-read-only", ["root={ro}"], "not writable"),
        ("report", "unknown-key", ["root={tmp}", "titel=x"], "Did you mean 'title'"),
        ("report", "select-on", ["root={tmp}", "select_on=tset"], "select_on='tset' must be one of val, test"),
        ("components", "model", ["model.name=vit_nonexistent_model"], "vit_nonexistent_model"),
        ("components", "trainable", ["trainable=[mlp]"], "mlp"),
        ("components", "num-classes", ["num_classes=many"], "num_classes"),
        ("components", "unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("components", "override-typo", ["model.overrides={patch_sise: 8}"], "patch_sise"),
        ("data_info", "name", ["name=cifar11"], "cifar11"),
        ("data_info", "split", ["splits=[dev]"], "dev"),
        ("data_info", "offline", ["name=cifar10", "data.root={tmp}/data", "data.download=false"], "cifar10"),
        ("data_info", "unknown-key", ["foo=1"], "unknown config key 'foo'"),
        ("cache", "no-cache", [], "cache is empty"),
        ("cache", "missing", ["cache={tmp}/nowhere"], "does not exist"),
        ("cache", "is-file", ["cache={file}"], "is not a folder"),
        ("cache", "unused-days", ["cache={tmp}", "prune=true", "unused_days=-1"], "unused_days=-1"),
        ("cache", "unused-days-type", ["cache={tmp}", "unused_days=soon"], "unused_days"),
        ("cache", "dry-run-alone", ["cache={tmp}", "dry_run=true"], "add prune=true"),
        ("cache", "read-only", ["cache={ro}", "prune=true"], "not writable"),
        ("cache", "unknown-key", ["cache={tmp}", "foo=1"], "unknown config key 'foo'"),
    ]
    return [Case(i, app, argv, m) for app, i, argv, m in c]


CASES = [
    *train_cases(),
    *eval_cases(),
    *analysis_cases(),
    *probe_cases(),
    *pretrain_cases(),
    *sweep_cases(),
    *study_cases(),
    *plots_cases(),
]


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny training run, trained once for the module (2 steps): config, checkpoints, eval.json."""
    from apps.vit import train as train_app

    root = tmp_path_factory.mktemp("finished")
    with _isolated_logging():
        train_app.main(build_config(train_app.TrainConfig, TINY, {"root": str(root), "log_dir": "run"}))
    return root / "runs" / "run"


def _read_only(path: Path, monkeypatch) -> None:
    """Make ``path`` read-only; as root (whom modes do not stop) make the write check see it so."""
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:
        real = vitef.utils.write_error

        def fake(directory: Path) -> str | None:
            d = Path(directory).resolve()
            return "Permission denied" if d == path or path in d.parents else real(directory)

        monkeypatch.setattr(vitef.utils, "write_error", fake)


def _workspace(tmp: Path, case: Case, finished_run: Path, monkeypatch) -> dict[str, str]:
    """The files a case refers to, and the placeholder values."""
    values = {"tmp": str(tmp), "repo": str(ROOT)}
    (tmp / "afile").write_text("not a folder\n")
    values["file"] = str(tmp / "afile")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    values["tiny"] = str(tmp / "tiny.yaml")
    (tmp / "bad.yaml").write_text("model: {name: [vit\nsteps: 3\n")
    values["bad_yaml"] = str(tmp / "bad.yaml")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    values["binary"] = str(tmp / "binary.yaml")
    (tmp / "list.yaml").write_text("- steps\n- 3\n")
    values["list_yaml"] = str(tmp / "list.yaml")
    (tmp / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
    values["corrupt_st"] = str(tmp / "corrupt.safetensors")
    ro = tmp / "ro"
    ro.mkdir()
    values["ro"] = str(ro)
    text = " ".join(case.argv) + json.dumps(case.sweep)
    if "{run}" in text or "{runs_root}" in text:
        shutil.copytree(finished_run, tmp / "rr" / "runs" / "run")
        values["run"], values["runs_root"] = str(tmp / "rr" / "runs" / "run"), str(tmp / "rr")
    if "{ro_run}" in text:
        shutil.copytree(finished_run, ro / "run")
        values["ro_run"] = str(ro / "run")
    if "{sweep_ok}" in text:
        (tmp / "sweep_ok.yaml").write_text(yaml.safe_dump(json.loads(_fill(json.dumps(SWEEP), values))))
        values["sweep_ok"] = str(tmp / "sweep_ok.yaml")
    if "{bad_sha}" in text:  # the bundled model, its card claiming another SHA-256
        shutil.copyfile(BUNDLED, tmp / "m.safetensors")
        card = json.loads(BUNDLED.with_suffix(".json").read_text())
        (tmp / "m.json").write_text(json.dumps({**card, "weights": "m.safetensors", "sha256": "0" * 64}))
        values["bad_sha"] = str(tmp / "m.safetensors")
    if "{carded_corrupt}" in text:  # a valid card beside weights that are not safetensors (no sha256 in it)
        (tmp / "carded.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{corrupt")
        card = json.loads(BUNDLED.with_suffix(".json").read_text())
        card.pop("sha256")
        (tmp / "carded.json").write_text(json.dumps({**card, "weights": "carded.safetensors"}))
        values["carded_corrupt"] = str(tmp / "carded.safetensors")
    if "{corrupt_card}" in text:  # real weights beside a card that is not JSON
        shutil.copyfile(BUNDLED, tmp / "broken.safetensors")
        (tmp / "broken.json").write_bytes(b"\xff\xfe{ not json")
        values["corrupt_card"] = str(tmp / "broken.safetensors")
    if case.sweep is not None:
        sweep = json.loads(_fill(json.dumps(case.sweep), values))
        (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
        values["sweep"] = str(tmp / "sweep.yaml")
    _read_only(ro.resolve(), monkeypatch)
    return values


def _fill(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def _snapshot(*folders: Path) -> set[tuple]:
    """Every path under ``folders`` with, for files, size and modification time (folders' own mtimes
    change when a write check creates and deletes its probe file). A run's ``run.lock`` is left out: the
    lock file of an existing run stays, emptied, when its lock is released (vitef.monitor.lock)."""
    out = set()
    for folder in folders:
        for p in folder.rglob("*"):
            if p.name == "run.lock":
                continue
            st = p.lstat()
            out.add((str(p), None) if p.is_dir() else (str(p), st.st_size, st.st_mtime_ns))
    return out


def _prepare_run(run: Path, argv: list[str]) -> list[str]:
    """Apply the ``_corrupt=`` / ``_delete=`` pseudo-arguments to the run copy; return the real argv."""
    real = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "_corrupt":
            (run / value).write_bytes(b"\x00\xff garbage {[ not what was written")
        elif key == "_delete":
            shutil.rmtree(run / value)
        elif key == "_running":  # as if killed before it finished
            status = json.loads((run / "status.json").read_text())
            (run / "status.json").write_text(json.dumps({**status, "status": "running"}))
        else:
            real.append(arg)
    return real


# ---------------------------------------------------------------------------------------------------
# The write check itself
# ---------------------------------------------------------------------------------------------------


def test_check_writable_creates_nothing(tmp_path):
    assert check_writable(tmp_path / "a" / "b", "root") == tmp_path / "a" / "b"
    assert check_writable(tmp_path, "root") == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_check_writable_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError) as err:
        check_writable(tmp_path / "f", "out_dir")
    assert str(err.value) == (
        f"cannot write results to '{tmp_path / 'f'}': it is a file, not a folder; choose another out_dir or move "
        "that file away"
    )
    with pytest.raises(ConfigError) as err:
        check_writable(tmp_path / "f" / "runs" / "x", "root")
    assert str(err.value) == (
        f"cannot write results to '{tmp_path / 'f' / 'runs' / 'x'}': '{tmp_path / 'f'}' is a file, not a folder; "
        "choose another root or move that file away"
    )


def test_check_writable_on_a_really_read_only_folder(tmp_path):
    # Without the simulation of the bad-input pass: mode 0555 for a user, the immutable flag for root.
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a file system without chattr +i: no folder is read-only to root")
    try:
        with pytest.raises(ConfigError) as err:
            check_writable(ro / "out", "root")
        msg = str(err.value)
        assert msg.startswith(f"cannot write results to '{ro / 'out'}': '{ro}' is not writable (") and msg.endswith(
            "); choose another root"
        )
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_setup_logging_follows_a_replaced_stderr(monkeypatch):
    # Entry points run in-process one after another (sweeps, studies, these tests): each must log to the
    # current sys.stderr, not to the stream of the first one (closed by now under pytest's capture).
    first, second = io.StringIO(), io.StringIO()
    with _isolated_logging():
        monkeypatch.setattr(sys, "stderr", first)
        vitef.utils.setup_logging()
        logging.getLogger("vitef.test").warning("one")
        got_first = first.getvalue()
        first.close()
        monkeypatch.setattr(sys, "stderr", second)
        vitef.utils.setup_logging()
        logging.getLogger("vitef.test").warning("two")
        assert sum(getattr(h, "_vitef", False) for h in logging.getLogger().handlers) == 1
    assert got_first.endswith("W vitef.test: one\n")
    assert second.getvalue().endswith("W vitef.test: two\n")


# ---------------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------------


def test_there_are_at_least_150_cases_over_every_entry_point():
    assert len(CASES) >= 150
    assert {c.app for c in CASES} == set(APPS)
    assert len({(c.app, c.id) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, tmp_path, finished_run, monkeypatch, capsys):
    tmp = tmp_path.resolve()
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the study sets it for itself
    values = _workspace(tmp, case, finished_run, monkeypatch)
    argv = [_fill(a, values) for a in case.argv]
    if "run" in values:
        argv = _prepare_run(Path(values["run"]), argv)
    before = _snapshot(tmp, finished_run)
    module = importlib.import_module(APPS[case.app])
    capsys.readouterr()
    with _isolated_logging(), pytest.raises(SystemExit) as exit_:
        cli_main(module.CONFIG, module.main, argv=argv, prog=APPS[case.app])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert "Traceback" not in err + out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert re.search(case.match, errors[0]), errors[0]
    assert _snapshot(tmp, finished_run) == before, "the case wrote or changed files"
