"""The data pipeline on a JPEG class folder with the decoded-image cache off and on (``data.cache``; issue 13).

    python -m benchmarks.pipeline                                   # small CPU default, about a minute on 2 cores
    python -m benchmarks.pipeline device=cuda tiny=false batch_size=128 steps=50 train_workers=8

Generates a class folder of JPEG images (``classes`` x ``per_class``, sides drawn in [min_side, max_side], random
content with the detail of photographs at JPEG quality ``quality``: about their file size and decode cost) in a
temporary folder, read as ``imagefolder:<folder>``, then measures, cache off and cache on, in the same run:

- the loader's own images/s per worker: ``vitef.data.build_loader``'s train pipeline as the app builds it
  (decode or cached read, RandomResizedCrop(``size``) + flip, uint8 batches: the float normalisation is the
  training loop's, on its device, timed apart), batches of
  ``batch_size``, with ``loader_workers`` workers
  (0: the main process is the one worker), steady state over ``loader_seconds`` (off and on take turns); the
  cache's one-off build time is reported apart;
- the app's own training loop: a short ``apps.vit.train`` run (its ``train_step``, its loaders with
  ``train_workers`` workers, its ``images_per_s`` per step in ``metrics.jsonl``), median and 10th percentile of
  the steps after ``warmup``; the default model is ViT-Tiny shrunk to one block (``tiny``), so that on a CPU
  the step waits for the data, as a full model does on a GPU.

The cache cannot speed up more than decoding: what remains per image is the per-sample augmentation
(RandomResizedCrop from the stored 256-px image + flip + normalise), which stays as it is; the on/off ratio is
about (decode + augmentation of the original) / augmentation of the stored image.

Peak memory is the resident set of this process and of its finished children (the loader workers), or the
CUDA memory allocated by the training run. The machine may be shared: compare figures of one run.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitef.config import cli_main, option
from vitef.errors import ConfigError
from vitef.utils import check_precision


@dataclasses.dataclass
class PipelineConfig:
    """Loader and training-step images/s on a generated JPEG class folder, decoded-image cache off vs on."""

    classes: int = option(10, "class folders of the generated dataset")
    per_class: int = option(40, "JPEG images per class")
    min_side: int = option(300, "smallest image side in pixels")
    max_side: int = option(500, "largest image side in pixels")
    quality: int = option(90, "JPEG quality")
    size: int = option(224, "model input side (RandomResizedCrop output)")
    batch_size: int = option(32, "images per batch (loader and training step)")
    loader_workers: int = option(0, "workers of the loader measurement (0: the main process)")
    loader_seconds: float = option(8.0, "measuring time of each loader setting (in 4 alternating rounds)")
    model: str = option("vit_tiny_patch16_224", "timm ViT architecture of the training loop (random init)")
    tiny: bool = option(True, "shrink that model to 1 block, 64 wide, on 32-px patches: data loading then dominates a "
                        "CPU step (false: the architecture as named)")  # fmt: skip
    steps: int = option(30, "training steps per run (cache off, cache on)")
    warmup: int = option(5, "first steps left out of the step statistics")
    train_workers: int = option(1, "data.num_workers of the training runs")
    device: str = option("cpu", "cpu or cuda")
    precision: str = option("fp32", "precision of the training runs (fp32, tf32, bf16, fp16)")
    compile: bool = option(False, "torch.compile the training runs' model (its compile time falls in the warm-up)")
    train_cache: str = option("both", "which training runs: both (cache off, then on), on, off")
    deferred_checks: bool = option(
        True,
        "the app's default: with a fused optimiser (CUDA) each update's checks are read one update late; false: "
        "the host waits for them before each update (to compare in one session)",
    )
    rates_out: str = option("", "also write the training runs' median images/s to this CSV (vitef.rates columns)")
    workdir: str = option("", "folder for the images, cache and runs (default: a temporary folder, removed)")

    def validate(self) -> None:
        for key in ("classes", "per_class", "min_side", "size", "batch_size", "steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.max_side < self.min_side:
            raise ConfigError(f"max_side={self.max_side} must be >= min_side={self.min_side}")
        if not 0 <= self.warmup < self.steps:
            raise ConfigError(f"warmup={self.warmup} must be in [0, steps={self.steps})")
        if min(self.loader_workers, self.train_workers) < 0 or self.loader_seconds <= 0:
            raise ConfigError("loader_workers and train_workers must be >= 0, loader_seconds > 0")
        if self.train_cache not in ("both", "on", "off"):
            raise ConfigError(f"train_cache={self.train_cache!r} must be both, on or off")
        check_precision(self.precision, key="precision")


CONFIG = PipelineConfig
TINY = {"depth": 1, "embed_dim": 64, "num_heads": 2, "patch_size": 32}


def write_jpeg_folder(cfg: PipelineConfig, folder: Path) -> int:
    """``folder/c<k>/<i>.jpg``: random images with the detail of photographs (an 8-px grid of random colours
    upsampled bicubically, plus noise: about 80 kB at 400 x 400 px and quality 90, ImageNet's JPEGs average
    110 kB at about 400 x 350). One process per class folder (seeded by the class): the same files whatever
    the number of processes. Returns the bytes written."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    args = (cfg.min_side, cfg.max_side, cfg.per_class, cfg.quality)
    jobs = [(*args, folder / f"c{c:03d}", c) for c in range(cfg.classes)]
    procs = min(cfg.classes, max(1, (os.cpu_count() or 1) - 1))
    if procs == 1:
        return sum(_write_class(*job) for job in jobs)
    with ProcessPoolExecutor(procs) as pool:
        return sum(pool.map(_write_class, *zip(*jobs)))


def _write_class(min_side: int, max_side: int, count: int, quality: int, folder: Path, seed: int) -> int:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        h, w = (int(rng.integers(min_side, max_side + 1)) for _ in range(2))
        coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(image).save(path, quality=quality)
        total += path.stat().st_size
    return total


def loader_rates(cfg: PipelineConfig, name: str, caches: dict[str, str | None], rounds: int = 4) -> dict[str, float]:
    """Steady-state images/s of the training app's train loader per cache setting (first batches, worker start-up
    and prefetch left out): the uint8 batches its workers deliver (the training loop normalises them on its
    device: :func:`normalize_rate`). The settings take turns, ``rounds`` times ``loader_seconds / rounds`` each,
    so that a change of load on a shared machine hits them alike."""
    from vitef.data import build_loader, make_iterable

    iterators = {}
    for label, cache in caches.items():
        loader = build_loader(
            name, "train", batch_size=cfg.batch_size, size=cfg.size, seed=0, num_workers=cfg.loader_workers,
            device="cpu", drop_last=True, cache=cache, output="uint8",
        )  # fmt: skip
        iterators[label] = make_iterable(loader)
        for _ in range(2 if cfg.loader_workers == 0 else 2 * cfg.loader_workers + 1):
            next(iterators[label])
    images = dict.fromkeys(caches, 0)
    seconds = dict.fromkeys(caches, 0.0)
    for _ in range(rounds):
        for label, it in iterators.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < cfg.loader_seconds / rounds:
                images[label] += next(it)[0].shape[0]
            seconds[label] += time.perf_counter() - t0
    iterators.clear()  # ends the workers
    return {label: images[label] / seconds[label] for label in caches}


def normalize_rate(cfg: PipelineConfig, name: str, repeats: int = 20) -> float:
    """Images/s of normalising the train loader's uint8 batches to float on this process's CPU (the step the
    training loop's DevicePrefetcher does after the copy, on the GPU when there is one)."""
    from vitef.data import build_loader, make_iterable

    loader = build_loader(name, "train", batch_size=cfg.batch_size, size=cfg.size, seed=0, device="cpu", output="uint8")
    images = next(make_iterable(loader))[0]
    normalize = loader.dataset.transform.normalizer
    normalize(images)
    t0 = time.perf_counter()
    for _ in range(repeats):
        normalize(images)
    return repeats * images.shape[0] / (time.perf_counter() - t0)


def train_rates(
    cfg: PipelineConfig, name: str, cache: str | None, root: Path, waits: dict[str | None, dict[int, float]]
) -> dict[int, float]:
    """``images_per_s`` of each step after ``warmup`` of a short ``apps.vit.train`` run, by step; each step's
    ``data_wait_ms`` (the host's time getting its batch) goes to ``waits[cache]``."""
    from apps.vit.train import TrainConfig
    from apps.vit.train import main as train_main
    from vitef.config import build_config
    from vitef.monitor import RunDir

    log_dir = f"cache_{'on' if cache else 'off'}"
    overrides = TINY if cfg.tiny else {}
    run_cfg = build_config(
        TrainConfig,
        {
            "dataset_name": name,
            "model": {"name": cfg.model, "pretrained": False, "img_size": cfg.size, "overrides": overrides},
            "data": {"num_workers": cfg.train_workers, "cache": cache, "download": False},
            "optim": {"lr": 0.01, "warmup_steps": 0},
            "trainable": ["all"],
            "steps": cfg.steps,
            "eval_period": cfg.steps,
            "batch_size": cfg.batch_size,
            "eval_batch_size": 2 * cfg.batch_size,
            "device": cfg.device,
            "precision": cfg.precision,
            "compile": cfg.compile,
            "root": str(root),
            "log_dir": log_dir,
            "overwrite": True,
            "log_every": cfg.steps,
            "tensorboard": False,
        },
    )
    import apps.vit.train as train_app

    default, train_app.DEFERRED_CHECKS = train_app.DEFERRED_CHECKS, cfg.deferred_checks
    try:
        train_main(run_cfg)
    finally:
        train_app.DEFERRED_CHECKS = default
    rows = RunDir(root / "runs" / log_dir).read_metrics()
    kept = [r for r in rows if "images_per_s" in r and r["step"] > cfg.warmup]
    waits[cache] = {r["step"]: r.get("data_wait_ms", float("nan")) for r in kept}
    return {r["step"]: r["images_per_s"] for r in kept}


def write_measured(cfg: PipelineConfig, steps: dict[str, dict[int, float]], device: torch.device) -> Path:
    """Append the training runs' median step rates to ``cfg.rates_out`` as app rates (the app end to end)."""
    from vitef.rates import measured_rate, write_rates

    model = cfg.model + ("-tiny" if cfg.tiny else "")
    rows = [
        measured_rate(
            model=model,
            img_size=cfg.size,
            precision=cfg.precision,
            compile=cfg.compile,
            trainable="all",
            batch=cfg.batch_size,
            what="app",
            images_per_s=statistics.median(by_step.values()),
            gpu=None if device.type == "cuda" else "cpu",
            source="python -m benchmarks.pipeline",
            notes=(
                f"apps.vit.train end to end on a generated JPEG class folder ({cfg.classes}x{cfg.per_class}, "
                f"{cfg.min_side}-{cfg.max_side} px), cache {label}, {cfg.train_workers} workers"
                f"{'' if cfg.deferred_checks else ', checks before each update'}; median step "
                f"rate of steps {cfg.warmup + 1}-{cfg.steps}, p10 {_p10(list(by_step.values())):.0f}"
            ),
        )  # fmt: skip
        for label, by_step in steps.items()
    ]
    return write_rates(cfg.rates_out, rows)


def _p10(values: list[float]) -> float:
    return float(np.percentile(values, 10))


def main(cfg: PipelineConfig) -> None:
    from vitef.data.cache import stored_side
    from vitef.utils import resolve_device

    device = resolve_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cfg.workdir).expanduser() if cfg.workdir else Path(tmp)
        folder, cache = work / "images", str(work / "cache")
        t0 = time.perf_counter()
        nbytes = write_jpeg_folder(cfg, folder)
        n = cfg.classes * cfg.per_class
        print(
            f"{n} JPEGs ({cfg.classes} classes, sides {cfg.min_side}-{cfg.max_side} px, {nbytes / n / 1e3:.0f} kB "
            f"each) written in {time.perf_counter() - t0:.1f} s; RandomResizedCrop({cfg.size}) + flip; batch "
            f"{cfg.batch_size}; {torch.get_num_threads()} torch threads; torch {torch.__version__}"
        )
        name = f"imagefolder:{folder}"
        from vitef.data import build_dataset

        t0 = time.perf_counter()
        build_dataset(name, "train", size=cfg.size, cache=cache)
        build_s = time.perf_counter() - t0
        stored = sum(p.stat().st_size for p in Path(cache).rglob("images.u8"))
        print(
            f"cache build (once, whole pool, shorter side {stored_side(cfg.size)} px): {build_s:.1f} s, "
            f"{stored / 1e6:.0f} MB"
        )
        sys.stdout.flush()
        per = max(1, cfg.loader_workers)
        rates = loader_rates(cfg, name, {"off": None, "on": cache})
        print(f"loader images/s per worker ({cfg.loader_workers} workers; 0 = main process):")
        for label, rate in rates.items():
            print(f"  cache {label:<3} {rate / per:8.1f}")
        print(f"  ratio on/off: {rates['on'] / rates['off']:.1f}x (goal >= 5x)")
        print(
            f"  (uint8 batches; normalising them to float, done by the training loop on its device, runs at "
            f"{normalize_rate(cfg, name):.0f} images/s on this CPU)"
        )
        sys.stdout.flush()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        settings = [(label, c) for label, c in (("off", None), ("on", cache)) if cfg.train_cache in ("both", label)]
        waits: dict[str | None, dict[int, float]] = {}
        steps = {label: train_rates(cfg, name, c, work / "out", waits) for label, c in settings}
        wait_of = {label: waits[c] for label, c in settings}
    print(
        f"training loop (apps.vit.train, {cfg.model}{' shrunk ' + str(TINY) if cfg.tiny else ''}, {device}, "
        f"{cfg.precision}{', compiled' if cfg.compile else ''}, {cfg.train_workers} workers, "
        f"{'deferred checks' if cfg.deferred_checks else 'checks before each update'}), step images/s over "
        f"steps {cfg.warmup + 1}-{cfg.steps}:"
    )
    print(f"  {'cache':<6}{'median':>9}{'p10':>9}{'min':>9}{'p10/median':>12}")
    for label, by_step in steps.items():
        values = list(by_step.values())
        med = statistics.median(values)
        print(f"  {label:<6}{med:>9.1f}{_p10(values):>9.1f}{min(values):>9.1f}{_p10(values) / med:>12.2f}")
    print("  (goal: p10/median >= 0.9, no stalls)")
    for label, by_step in steps.items():
        med = statistics.median(by_step.values())
        slow = [f"{k}:{v:.0f}({wait_of[label][k]:.0f} ms)" for k, v in by_step.items() if v < 0.9 * med]
        print(f"  cache {label}: {len(slow)} steps below 0.9 x median{': ' + ' '.join(slow[:30]) if slow else ''}")
        wait = statistics.median(wait_of[label].values())
        print(f"  cache {label}: median data wait {wait:.1f} ms per step (step:images/s(data wait) above)")
    if cfg.rates_out:
        print(f"rates written to {write_measured(cfg, steps, device)}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory: process RSS {rss:.0f} MB, largest finished child (loader worker) {children:.0f} MB", end="")
    if device.type == "cuda":
        print(f", CUDA allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB", end="")
    print("\nshared machines are noisy: compare the figures of one run")


if __name__ == "__main__":
    cli_main(PipelineConfig, main, argv=sys.argv[1:], prog="benchmarks.pipeline")
