"""The first step of a ``compile=true`` run with torch.compile's cache empty vs filled (``compile_cache``; issue 13).

    python -m benchmarks.compile_cache                      # the bundled digits ViT on CPU, about a minute on 2 cores
    python -m benchmarks.compile_cache device=cuda precision=bf16 batch_size=64 \\
        'train=[model.name=vit_base_patch16_224,model.pretrained=false,dataset_name=imagefolder:<folder>]'

Each run of a study is a new process. With ``compile=true`` its first step compiles the model's forward and
backward graphs; Inductor keeps what it compiled on disk (``TORCHINDUCTOR_CACHE_DIR``: torch's default is a folder
in the machine's temporary directory, so every fresh cluster node starts empty). ``compile_cache=<shared folder>``
lets every run of a study load what the first one compiled.

This benchmark runs ``apps.vit.train`` ``runs`` times, each in a new process, with one new cache folder: the
first run compiles into the empty folder, the later ones read it. It prints, per run, the first step's seconds
(compile included: ``batch_size`` / the step's ``images_per_s`` in ``metrics.jsonl``), the median images/s of
the other steps, the process's wall time and its peak resident memory (peak CUDA memory on a GPU is the run's
own concern; see ``benchmarks.train``), and the ratio of the first step cold vs warm. The machine may be
shared: compare figures of one run.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vitef.config import cli_main, option
from vitef.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class CompileCacheConfig:
    """First-step seconds of compiled training runs, torch.compile's cache empty then filled."""

    train_config: str = option(
        "apps/vit/configs/digits_pretrained.yaml", "the runs' apps.vit.train config (default: the bundled digits ViT)"
    )
    train: list[str] = option([], "more apps.vit.train key=value settings, e.g. [model.name=vit_base_patch16_224]")
    batch_size: int = option(32, "images per step")
    steps: int = option(4, "training steps per run (the first compiles)")
    runs: int = option(2, "runs, each a new process: the first with the cache empty, the others with it filled")
    device: str = option("cpu", "cpu or cuda")
    precision: str = option("fp32", "precision of the runs")
    workdir: str = option("", "folder for the cache and the runs (default: a temporary folder, removed)")

    def validate(self) -> None:
        if self.runs < 2:
            raise ConfigError(f"runs={self.runs}: at least 2 (one with the cache empty, one with it filled)")
        if self.steps < 2:
            raise ConfigError(f"steps={self.steps}: at least 2 (the first compiles, the others run compiled)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")


def one_run(cfg: CompileCacheConfig, work: Path, index: int) -> dict[str, float]:
    """One ``apps.vit.train`` process: its first-step seconds, the later steps' median images/s, its wall seconds.

    A failed run raises with the end of its stderr."""
    log_dir = f"run{index}"
    argv = [
        sys.executable, "-m", "apps.vit.train", f"config={ROOT / cfg.train_config}",
        f"steps={cfg.steps}", f"eval_period={cfg.steps}", f"log_every={cfg.steps}", "optim.warmup_steps=0",
        f"batch_size={cfg.batch_size}", f"eval_batch_size={cfg.batch_size}",
        f"device={cfg.device}", f"precision={cfg.precision}",
        "compile=true", f"compile_cache={work / 'compile_cache'}",
        f"root={work}", f"log_dir={log_dir}", "overwrite=true", "tensorboard=false", "data.num_workers=0",
        *cfg.train,
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"run {index} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    lines = (work / "runs" / log_dir / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "images_per_s" in r]
    return {
        "first_step_s": cfg.batch_size / rows[0]["images_per_s"],
        "images_per_s": statistics.median(r["images_per_s"] for r in rows[1:]),
        "wall_s": wall,
    }


def main(cfg: CompileCacheConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cfg.workdir).expanduser() if cfg.workdir else Path(tmp)
        print(
            f"{cfg.runs} runs of apps.vit.train (config={' '.join([cfg.train_config, *cfg.train])}, "
            f"batch {cfg.batch_size}, {cfg.steps} steps, {cfg.device}, {cfg.precision}, compile=true), "
            f"compile_cache={work / 'compile_cache'}"
        )
        results = []
        for index in range(cfg.runs):
            r = one_run(cfg, work, index)
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux: the largest child
            state = "empty" if index == 0 else "filled"
            print(
                f"run {index} (cache {state:<6}): first step {r['first_step_s']:7.2f} s, then "
                f"{r['images_per_s']:8.1f} images/s, process {r['wall_s']:6.1f} s, peak RSS {rss:6.0f} MB"
            )
            results.append(r)
        warm = statistics.median(r["first_step_s"] for r in results[1:])
        print(
            f"first step, cache empty / filled: {results[0]['first_step_s'] / warm:.1f}x "
            f"({results[0]['first_step_s']:.1f} s -> {warm:.1f} s); process wall time "
            f"{results[0]['wall_s'] / statistics.median(r['wall_s'] for r in results[1:]):.1f}x"
        )


if __name__ == "__main__":
    cli_main(CompileCacheConfig, main, prog="benchmarks.compile_cache")
