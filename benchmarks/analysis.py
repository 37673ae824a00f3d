"""Benchmark of the plasticity estimator (arXiv 2602.06883, §3) against a straightforward reference.

    python -m benchmarks.analysis                      # ViT-B/16, batch 32, 224 px, fp32 + bf16, CPU
    python -m benchmarks.analysis batches=5 warmup=1   # longer, steadier run
    python -m benchmarks.analysis model=vit_tiny_patch16_224 img_size=64 batches=2   # quick smoke run

Every variant runs in its own subprocess, so its peak resident memory (``ru_maxrss``; on CUDA also
``torch.cuda.max_memory_allocated``) is its own; the parent prints images/s, peak memory and the ratios
against the reference measured in the same run.

The reference is what one writes first: embed x and y separately, apply each component of each block
separately to each of them, keep every output in host memory until the batch is done, then take the
distances; FC2 gets e zero-padded to the MLP width and goes through the full weight. ``measure``
(:mod:`vitef.plasticity`) streams block by block, sends x and y through in one batched call, and
computes the linear components on the difference only (FC1 through its d × d QR factor, FC2 through
the first d columns of W2).

Achieved GFLOP/s counts the floating-point operations each variant really executes (torch's
``FlopCounterMode`` on 1 and 2 pairs, extrapolated: the count is affine in the number of pairs) and
is compared with the machine's measured matmul GFLOP/s.
The machine may be shared: report the numbers with that caveat.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitef.config import cli_main, option
from vitef.errors import ConfigError
from vitef.models import BLOCK_COMPONENTS, block_module, build_model, embed
from vitef.plasticity import measure
from vitef.utils import autocast_context

VARIANTS = ("reference-fp32", "measure-fp32", "measure-bf16")


@dataclasses.dataclass
class BenchConfig:
    """Images/s and peak memory of vitef.plasticity.measure vs a straightforward reference."""

    model: str = option("vit_base_patch16_224", "timm ViT architecture (random init)")
    img_size: int = option(224, "image side in pixels")
    batch_size: int = option(32, "pairs per batch")
    batches: int = option(2, "timed batches per variant")
    warmup: int = option(1, "untimed warm-up batches per variant")
    variants: list[str] = option(list(VARIANTS), f"variants to run: {', '.join(VARIANTS)}")
    device: str = option("cpu", "cpu or cuda")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    matmul_size: int = option(2048, "side of the square matmul timed for the machine's GFLOP/s")
    chunk_size: int | None = option(None, "measure's chunk_size: pairs per forward pass (None: whole batch)")
    json_out: str | None = option(None, "also write every figure to this JSON file")
    child: str | None = option(None, "internal: run one variant (or 'matmul') and write its result here")
    child_variant: str = option("", "internal: the variant a child runs")

    def validate(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ConfigError(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
        if self.batch_size <= 0 or self.batches <= 0 or self.warmup < 0:
            raise ConfigError("batch_size and batches must be positive and warmup >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device={self.device!r}: use cpu or cuda")


# ---------------------------------------------------------------------------------------------------
# The reference: each component separately, every output kept in host memory
# ---------------------------------------------------------------------------------------------------


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> np.ndarray:
    """Per-pair ratios ``(B, layers, comps)`` computed the obvious way."""
    with torch.no_grad(), autocast_context(x.device, precision):
        ex, ey = embed(model, x), embed(model, y)  # (B, N, D) each
        outputs: dict[tuple[int, str, str], torch.Tensor] = {}
        for layer in range(len(model.blocks)):
            for comp in BLOCK_COMPONENTS:
                f = block_module(model, layer, comp)
                for tag, e in (("x", ex), ("y", ey)):
                    if comp == "fc2":
                        pad = e.new_zeros(*e.shape[:-1], f.in_features - e.shape[-1])
                        e = torch.cat([e, pad], dim=-1)  # (B, N, 4D): [e, 0, 0, 0]
                    outputs[(layer, comp, tag)] = f(e).cpu()
        den = (ex.float() - ey.float()).flatten(1).norm(dim=1).cpu()
        out = np.empty((len(x), len(model.blocks), len(BLOCK_COMPONENTS)))
        for layer in range(len(model.blocks)):
            for j, comp in enumerate(BLOCK_COMPONENTS):
                fx, fy = outputs[(layer, comp, "x")].float(), outputs[(layer, comp, "y")].float()
                out[:, layer, j] = ((fx - fy).flatten(1).norm(dim=1) / den).double().numpy()
    return out


# ---------------------------------------------------------------------------------------------------
# One variant in its own process
# ---------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    if cfg.child_variant == "matmul":
        return time_matmul(cfg.matmul_size, dev)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False, img_size=cfg.img_size, num_classes=0).to(dev).eval()
    gen = torch.Generator().manual_seed(1)
    n = cfg.warmup + cfg.batches
    data = [
        (
            torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen),
            torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, generator=gen) * 0.5 + 0.1,
        )
        for _ in range(n)
    ]
    kind, precision = cfg.child_variant.split("-")

    def run(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
        """Per-pair ratios over ``batches``; ``measure`` is called once for all, as an app does."""
        if kind == "reference":
            return np.concatenate([reference(model, x.to(dev), y.to(dev), precision) for x, y in batches])
        df = measure(
            model,
            [x for x, _ in batches],
            [y for _, y in batches],
            precision=precision,
            keep_samples=True,
            device=dev,
            chunk_size=cfg.chunk_size,
        )
        return df.attrs["samples"]

    # FLOPs are affine in the number of pairs (measure's per-call QR of W1 is the constant): count them
    # on 1 and 2 pairs, so the counting pass (which may take slower, larger code paths) stays small.
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for k in (1, 2):
        counter = FlopCounterMode(display=False)
        with counter:
            run([(data[0][0][:k], data[0][1][:k])])
        counts.append(counter.get_total_flops())
    per_pair, constant = counts[1] - counts[0], 2 * counts[0] - counts[1]
    pairs = cfg.batches * cfg.batch_size
    flops = constant + per_pair * pairs

    gc.collect()
    baseline = rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if cfg.warmup:
        run(data[: cfg.warmup])
    _sync(dev)
    start = time.perf_counter()
    samples = run(data[cfg.warmup :])
    _sync(dev)
    seconds = time.perf_counter() - start
    result = {
        "variant": cfg.child_variant,
        "seconds": seconds,
        "pairs": pairs,
        "images_per_s": 2 * pairs / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "baseline_rss_mb": baseline,
        "flops_per_batch": flops / cfg.batches,
        "gflops_per_s": flops / seconds / 1e9,
        "samples": samples.tolist(),
    }
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def time_matmul(size: int, dev: torch.device) -> dict:
    """Sustained GFLOP/s of a square matmul in fp32 and bf16 (best of a few repeats)."""
    out = {"variant": "matmul"}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=dev).to(dtype)
        b = torch.randn(size, size, device=dev).to(dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(5):
            _sync(dev)
            t = time.perf_counter()
            a @ b
            _sync(dev)
            best = min(best, time.perf_counter() - t)
        out[f"gflops_{name}"] = 2 * size**3 / best / 1e9
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# The parent: spawn the variants, print the comparison
# ---------------------------------------------------------------------------------------------------


def spawn(cfg: BenchConfig, variant: str, tmp: Path) -> dict:
    result = tmp / f"{variant}.json"
    args = [
        f"model={cfg.model}",
        f"img_size={cfg.img_size}",
        f"batch_size={cfg.batch_size}",
        f"batches={cfg.batches}",
        f"warmup={cfg.warmup}",
        f"device={cfg.device}",
        f"threads={cfg.threads}",
        f"matmul_size={cfg.matmul_size}",
        f"chunk_size={'null' if cfg.chunk_size is None else cfg.chunk_size}",
        f"child={result}",
        f"child_variant={variant}",
    ]
    print(f"running {variant} ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.analysis", *args], cwd=Path(__file__).parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed with exit status {proc.returncode}")
    return json.loads(result.read_text())


def max_rel_error(a: list, b: list) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def main(cfg: BenchConfig) -> None:
    if cfg.child is not None:
        result = run_child(cfg)
        Path(cfg.child).write_text(json.dumps(result))
        return
    print(
        f"{cfg.model} random init, {cfg.img_size} px, batch {cfg.batch_size} pairs, {cfg.batches} timed batches "
        f"(+{cfg.warmup} warm-up), device {cfg.device}, torch threads {cfg.threads or torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = {v: spawn(cfg, v, Path(tmp)) for v in cfg.variants}
        machine = spawn(cfg, "matmul", Path(tmp))
    ref = results.get("reference-fp32")
    fp32 = results.get("measure-fp32")
    print()
    print(
        f"machine matmul {cfg.matmul_size}x{cfg.matmul_size}: fp32 {machine['gflops_fp32']:.1f} GFLOP/s, "
        f"bf16 {machine['gflops_bf16']:.1f} GFLOP/s"
    )
    header = f"{'variant':<16}{'images/s':>10}{'peak RSS MiB':>14}{'above base':>12}{'GFLOP/batch':>13}{'GFLOP/s':>9}"
    header += f"{'% of matmul':>12}{'max rel err':>13}"
    print(header)
    summary = {"config": dataclasses.asdict(cfg), "machine": machine, "variants": {}}
    for name, r in results.items():
        peak_matmul = machine["gflops_bf16" if name.endswith("bf16") else "gflops_fp32"]
        err = max_rel_error(r["samples"], ref["samples"]) if ref and name != "reference-fp32" else float("nan")
        gf = r["gflops_per_s"]
        print(
            f"{name:<16}{r['images_per_s']:>10.2f}{r['peak_rss_mb']:>14.0f}"
            f"{r['peak_rss_mb'] - r['baseline_rss_mb']:>12.0f}"
            f"{r['flops_per_batch'] / 1e9:>13.0f}{gf:>9.1f}{100 * gf / peak_matmul:>11.0f}%{err:>13.2e}"
        )
        summary["variants"][name] = {k: v for k, v in r.items() if k != "samples"} | {"max_rel_err_vs_ref": err}
    if ref and fp32:
        speed = fp32["images_per_s"] / ref["images_per_s"]
        mem = fp32["peak_rss_mb"] / ref["peak_rss_mb"]
        mem_above = (fp32["peak_rss_mb"] - fp32["baseline_rss_mb"]) / (ref["peak_rss_mb"] - ref["baseline_rss_mb"])
        err = max_rel_error(fp32["samples"], ref["samples"])
        print()
        print(f"measure-fp32 / reference-fp32: {speed:.2f}x images/s (goal >= 1.5x)")
        print(f"  peak RSS {mem:.2f}x (goal <= 0.25x); above the loaded model and data {mem_above:.2f}x")
        print(f"  max relative difference of per-pair ratios {err:.1e} (goal <= 1e-5)")
        summary["ratios"] = {"speed": speed, "peak_rss": mem, "peak_rss_above_baseline": mem_above, "max_rel_err": err}
    if "measure-bf16" in results and fp32:
        bf = results["measure-bf16"]
        print(
            f"measure-bf16 / measure-fp32: {bf['images_per_s'] / fp32['images_per_s']:.2f}x images/s, "
            f"max relative error vs fp32 reference {max_rel_error(bf['samples'], (ref or fp32)['samples']):.1e}"
        )
    if cfg.device == "cuda":
        for name, r in results.items():
            print(f"{name}: peak CUDA memory {r.get('peak_cuda_mb', float('nan')):.0f} MiB")
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli_main(BenchConfig, main, prog="benchmarks.analysis")
