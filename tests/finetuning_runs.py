"""Generated run directories in the run-directory contract (docs/ARCHITECTURE.md), for the results tests.

Hand-picked numbers (fractions), two datasets, components mha / fc1 / ln1, lrs 1e-3 / 1e-2, seeds 0 / 1:
``VALUES[dataset][component][lr] = ([best_val_acc per seed], [test acc per seed])``.
Expected best-LR cells are computed by hand in the tests from these numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

SEEDS = (0, 1)
VALUES = {
    "cifar10": {
        # val picks 1e-2 (0.85 > 0.81); test picks 1e-3 (0.91 > 0.87)
        "mha": {1e-3: ([0.80, 0.82], [0.90, 0.92]), 1e-2: ([0.85, 0.85], [0.88, 0.86])},
        # both pick 1e-3
        "fc1": {1e-3: ([0.90, 0.88], [0.89, 0.85]), 1e-2: ([0.70, 0.72], [0.71, 0.69])},
        # val tie (0.80 = 0.80): the smaller lr 1e-3
        "ln1": {1e-3: ([0.79, 0.81], [0.80, 0.78]), 1e-2: ([0.80, 0.80], [0.84, 0.84])},
    },
    "pet": {
        "mha": {1e-3: ([0.60, 0.64], [0.61, 0.65]), 1e-2: ([0.70, 0.66], [0.72, 0.70])},
        "fc1": {1e-3: ([0.50, 0.52], [0.55, 0.53]), 1e-2: ([0.62, 0.60], [0.60, 0.58])},
        "ln1": {1e-3: ([0.40, 0.42], [0.45, 0.43]), 1e-2: ([0.30, 0.32], [0.35, 0.33])},
    },
}


def write_run(
    root: Path,
    dataset: str,
    component: str,
    lr: float,
    seed: int,
    val: float | None,
    test: float | None,
    status: str = "completed",
    optimizer: str = "sgd",
    model: str = "vit_base_patch16_224.orig_in21k",
    steps: int = 20,
) -> Path:
    """One run directory: config.yaml, status.json, eval.json (when ``test`` is given), metrics.jsonl."""
    run = root / "runs" / "main" / dataset / component / f"{optimizer}_lr{lr:g}_seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    cfg = {
        "dataset_name": dataset,
        "trainable": [component],
        "seed": seed,
        "log_dir": str(run.relative_to(root / "runs")),
        "root": str(root),
        "model": {"name": model, "pretrained": True},
        "optim": {"name": optimizer, "lr": lr, "momentum": 0.9},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "status.json").write_text(json.dumps({"status": status, "step": steps, "message": ""}))
    if test is not None:
        ev = {"dataset": dataset, "split": "test", "acc": test, "loss": 0.5, "n": 100, "best_step": steps,
              "best_val_acc": val}  # fmt: skip
        (run / "eval.json").write_text(json.dumps(ev))
    rows = []
    for step in range(1, steps + 1):
        rows.append({"step": step, "loss": 2.0 / step, "lr": lr, "grad_norm": 1.0 + seed + 0.1 * step})
        if step % 5 == 0:
            rows.append({"step": step, "val_loss": 1.0 / step + lr, "val_acc": val if val is not None else 0.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def write_all(root: Path, values: dict = VALUES, skip: set = frozenset()) -> None:
    """Every run of ``values``; ``skip`` holds (dataset, component, lr, seed) cells not to write."""
    for dataset, comps in values.items():
        for comp, lrs in comps.items():
            for lr, (vals, tests) in lrs.items():
                for seed, val, test in zip(SEEDS, vals, tests, strict=True):
                    if (dataset, comp, lr, seed) not in skip:
                        write_run(root, dataset, comp, lr, seed, val, test)


def write_probe(root: Path, dataset: str, last_res2: float, model: str = "vit_base_patch16_224.orig_in21k") -> Path:
    """A pretrained-model probes.csv with two blocks; the baseline is block 1's res2 (``last_res2``)."""
    out = root / "probes" / f"base_{dataset}_mean"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"dataset_name": dataset, "model": {"name": model}, "seed": 0}))
    lines = ["layer,point,pool,train_acc,test_acc"]
    for layer in (0, 1):
        for point in ("ln1", "mha", "res1", "ln2", "fc1", "act", "fc2", "res2"):
            acc = last_res2 if (layer, point) == (1, "res2") else 0.1 + 0.01 * layer
            lines.append(f"{layer},{point},mean,0.99,{acc}")
    (out / "probes.csv").write_text("\n".join(lines) + "\n")
    return out
