"""Throughput of the train data pipeline vs the training step rate of ViT-B/16 (arXiv 2602.06883, §3–4).

The paper's heaviest data case: 32-px CIFAR images upscaled to 224 px by RandomResizedCrop + flip, then
normalised. This measures images/s of exactly the pipeline ``vitef.data.build_loader`` runs for ``cifar10``
(uint8 CIFAR-like source images in memory → ``ImageTransform`` → ``EpochSampler`` → ``DataLoader``) with
0, 1 and 2 workers, a classic PIL pipeline (torchvision ``RandomResizedCrop`` on PIL + ``ToTensor`` +
``Normalize``) as a reference, and the training rate (images/s) of a randomly initialised timm ViT-B/16
(fp32 forward + backward + SGD step) on the same machine. Ratio > 1 means the data pipeline is faster than
training, i.e. not the bottleneck.

    python benchmarks/data.py                 # default: < 3 minutes on 2 CPU cores
    python benchmarks/data.py --workers 0 4 8 --device cuda --vit-batch 128
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to measure")
    p.add_argument("--size", type=int, default=224, help="output side (model input size)")
    p.add_argument("--source-size", type=int, default=32, help="side of the source images (CIFAR: 32)")
    p.add_argument("--batch-size", type=int, default=64, help="loader batch size")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per loader setting")
    p.add_argument("--vit-batch", type=int, default=16, help="ViT-B/16 training batch size")
    p.add_argument("--vit-steps", type=int, default=1, help="timed ViT-B/16 training steps (after 1 warm-up step)")
    p.add_argument("--device", default="cpu", help="device of the ViT-B/16 step (cpu or cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the main process (default: torch's)")
    return p.parse_args(argv)


def source_dataset(n: int, args: argparse.Namespace):
    """A CIFAR-like pool: ``n`` random uint8 ``source_size``² RGB images, 10 classes, in the real pipeline."""
    from vitef.data import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, VitefDataset
    from vitef.data.base import ArraySource

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, args.source_size, args.source_size, 3), dtype=np.uint8)
    source = ArraySource(images, rng.integers(0, 10, n))
    transform = ImageTransform(args.size, True, IMAGENET_MEAN, IMAGENET_STD)
    return VitefDataset(source, np.arange(n), 10, transform, name="cifar-like", split="train")


def loader_rate(workers: int, args: argparse.Namespace) -> float:
    """images/s of ``make_loader`` over the train pipeline, steady state (first batches excluded)."""
    from vitef.data.loader import make_iterable, make_loader

    ds = source_dataset(50_000, args)
    loader = make_loader(ds, batch_size=args.batch_size, shuffle=True, seed=0, num_workers=workers, device="cpu")
    it = make_iterable(loader)
    for _ in range(2 if workers == 0 else 2 * workers + 1):  # worker start-up and prefetch fill
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        x, _ = next(it)
        n += x.shape[0]
    rate = n / (time.perf_counter() - t0)
    del it, loader
    return rate


def pil_reference_rate(args: argparse.Namespace) -> float:
    """images/s of the classic torchvision PIL pipeline on the same images, in the main process, 1 thread."""
    from PIL import Image
    from torchvision import transforms as T

    from vitef.data import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.source_size,) * 2 + (3,), dtype=np.uint8)) for _ in range(64)]
    tf = T.Compose(
        [
            T.RandomResizedCrop(args.size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, and as vitef's main-process path does per image
    try:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds / 2:
            torch.stack([tf(im) for im in images[: args.batch_size]])
            n += min(args.batch_size, len(images))
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def vit_rate(args: argparse.Namespace) -> tuple[float, float]:
    """(images/s, peak GPU GiB or 0) of ViT-B/16 fp32 training steps: forward, cross-entropy, backward, SGD."""
    import timm

    device = torch.device(args.device)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=args.size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.vit_batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.vit_batch,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.vit_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = args.vit_steps * args.vit_batch / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return rate, peak


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"data pipeline: {args.source_size}px uint8 source → RandomResizedCrop({args.size}) + flip + normalise; "
          f"batch {args.batch_size}; {torch.get_num_threads()} torch threads; torch {torch.__version__}")  # fmt: skip
    sys.stdout.flush()
    vit, peak = vit_rate(args)
    print(f"ViT-B/16 fp32 train step on {args.device}, batch {args.vit_batch}: {vit:.1f} images/s"
          + (f", peak GPU memory {peak:.1f} GiB" if peak else ""))  # fmt: skip
    pil = pil_reference_rate(args)
    print(f"reference PIL pipeline (0 workers, 1 thread): {pil:.0f} images/s")
    print(f"{'workers':>8} {'images/s':>10} {'vs PIL':>8} {'data/ViT':>9}")
    for w in args.workers:
        rate = loader_rate(w, args)
        print(f"{w:>8} {rate:>10.0f} {rate / pil:>7.2f}x {rate / vit:>8.1f}x")
        sys.stdout.flush()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory of the main process: {rss:.2f} GiB (workers not included)")
    print("data/ViT > 1: the pipeline outpaces training. Shared machine: numbers are noisy.")


if __name__ == "__main__":
    main()
