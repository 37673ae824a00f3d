"""Decoded-image cache of file-backed datasets (``data.cache=<folder>``; arXiv 2602.06883, §3 preprocessing).

Datasets stored as image files (DomainNet, Flowers102, Pet, ImageNet, ImageNet-C, ``imagefolder:``) are
decoded with PIL on every access; decoding a JPEG costs several times more than the seeded augmentation that
follows it. With ``data.cache`` set, the pool of images a loader returns (a
:class:`~vitef.data.datasets.FileSource`) is decoded once into an entry of the cache folder and every run,
process and DataLoader worker then reads the decoded pixels from that entry through a read-only memory map
(the page cache shares them between processes). Augmentation is untouched: it still runs per sample, seeded
by (seed, epoch, index), and resumes exactly.

What is stored
--------------
Each image as uint8 RGB, resized (torchvision's antialiased bilinear ``resize``, the resampling of the
pipeline's own ``Resize``) so that its **shorter side is the stored side** ``S = max(256, ceil(size * 8/7))``
where ``size`` is the model input side: 256 px for the paper's 224-px models (the ratio of the usual
ImageNet evaluation resize 256/224), 439 px for 384-px models. The aspect ratio is kept, so
``RandomResizedCrop(size)`` draws the same field of view as on the original; images whose shorter side is
at most ``S`` are stored exactly as decoded (never upsampled).

What it changes
---------------
- Images with shorter side <= ``S`` (CIFAR-size images, the bundled digits, most small datasets): nothing,
  the pixels served are bit-identical to the uncached decode, and so are the batches and the training.
- Larger images are resampled twice (original → ``S`` once, then the crop → ``size`` per sample) instead of
  once: a random crop is taken from the ``S``-px image, so a small crop (RandomResizedCrop's area scale goes
  down to 0.08) is upsampled from fewer pixels than it would be from a large original; the evaluation
  transform (``Resize(size)`` + ``CenterCrop``) sees a slightly different, but close, image. Accuracies can
  therefore differ in the last digits from an uncached run of the same seed; compare runs with the cache
  either on or off, not mixed (a run's ``config.yaml`` records ``data.cache``).
- On-the-fly corruptions (``corrupt:<type>-<s>:<name>``) are applied to the stored image.
- In-memory datasets (CIFAR, CIFAR-C, digits) are already decoded: the cache does not apply to them.

Disk: about ``3 * S * S * 4/3`` bytes per image of 4:3 aspect (0.26 MB at S = 256): 13 GB for ImageNet's
50k validation images, 150 GB for DomainNet's 586k images.

Entries and their key
---------------------
An entry is a folder ``<cache>/<dataset>-s<S>-<digest>/`` holding ``images.u8`` (the images one after the
other, each ``H x W x 3`` uint8), ``index.npz`` (offsets, heights, widths, labels; read with
``allow_pickle=False``) and ``meta.json``. The digest is a SHA-256 over the dataset's name (without on-the-fly
corruptions), ``S``, the resize policy, the Pillow and torchvision versions (both decide the pixels), and,
in the pool's order, every source file's path relative to the pool's common folder, its size, its
modification time (ns) and its label. A file added, removed, replaced or touched gives another key: a
changed folder is never served stale (its old entry stays on disk until deleted; delete any entry folder
to reclaim its space, the next run that needs it rebuilds it). Splits cut from one pool (DomainNet,
``imagefolder``, Pet's trainval) share one entry whatever the run seed, so every image is decoded once.
Checking the key stats every file of the pool each time a dataset is built (about a second per 100k files
on a local disk).

Building
--------
The first process that needs an entry takes an exclusive ``fcntl.flock`` on ``<cache>/.<entry>.lock``,
decodes into a temporary folder ``<cache>/.<entry>.tmp-<pid>-<random>/`` (several threads: Pillow and
torch release the GIL), flushes it to disk and renames it to ``<cache>/<entry>/`` in one atomic step, so a
complete entry is the only thing ever found under that name. Another process needing the same entry waits
on the lock, then finds the finished entry and reads it. A build that is killed leaves a temporary folder,
which the next build of that entry deletes; nothing reads temporary folders. Lock files stay (they are
empty). File systems without ``flock`` (some network mounts) build without the lock, with a warning; two
builders may then both decode, and the second rename loses to the first entry, which both use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitef.data.base import ImageSource
from vitef.errors import ConfigError, DataError
from vitef.utils import safe_name, write_error

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
MIN_STORED_SIDE = 256
# The shorter side of stored images, relative to the model input: ImageNet's evaluation resize 256/224.
STORED_RATIO = 256 / 224
POLICY = "shorter side > S resized to S, torchvision resize(antialias=True) of uint8; smaller images as decoded"
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.npz"
META_FILE = "meta.json"
# Images decoded per batch of the build (bounds the memory held by decoded, not yet written images).
BUILD_CHUNK = 256
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def stored_side(size: int) -> int:
    """The stored shorter side for model inputs of ``size`` px: ``max(256, ceil(size * 256 / 224))``."""
    return max(MIN_STORED_SIDE, math.ceil(int(size) * STORED_RATIO - 1e-9))


def check_cache_dir(cache: str | os.PathLike, *, writable: bool = True, key: str = "data.cache") -> Path:
    """The cache folder ``cache`` (``~`` expanded), or a :class:`ConfigError` naming ``key`` when it cannot be
    one: a file or under a file, or (``writable``) in a place where no file can be created. Nothing is created.

    A folder that is not writable still serves the entries it holds (e.g. a cache built once and shared
    read-only), so :class:`~vitef.data.DataConfig` checks only its kind, and the build checks that it can write.
    """
    path = Path(cache).expanduser()
    fix = f"give a folder (created when missing) where files can be written, or {key}=null to decode on every access"
    existing = path
    try:
        while not existing.exists():  # ends at "." or "/"
            existing = existing.parent
        is_dir = existing.is_dir()
    except OSError as e:
        raise ConfigError(f"{key}={str(cache)!r} cannot be used ({e.strerror}): {fix}") from None
    if not is_dir:
        where = "is a file" if existing == path else f"is under the file '{existing}'"
        raise ConfigError(f"{key}={str(cache)!r} {where}, not a folder: {fix}")
    error = write_error(existing) if writable else None
    if error is not None:
        raise ConfigError(f"{key}={str(cache)!r}: '{existing}' is not writable ({error}): {fix}")
    return path


def dataset_label(canonical: str) -> str:
    """The dataset part of an entry's name and key: the canonical dataset name without on-the-fly
    corruptions (they are applied after the cache), as one short file-name component."""
    base = re.sub(r"^(?:corrupt:[a-z_]+-\d+:)+", "", canonical)
    return safe_name(base)[:60] or "dataset"


def _fingerprint(paths: list[str], targets: np.ndarray, label: str, side: int) -> str:
    """The SHA-256 key of a pool (see the module docstring: what it covers)."""
    import PIL
    import torchvision

    h = hashlib.sha256()
    header = {
        "version": CACHE_VERSION,
        "dataset": label,
        "stored_side": side,
        "policy": POLICY,
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
        "count": len(paths),
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    for path, target in zip(paths, targets):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DataError(f"image file '{path}' is missing: restore it, or rebuild the dataset's folder") from None
        except OSError as e:
            raise DataError(f"image file '{path}' cannot be read ({e.strerror})") from None
        rel = os.path.relpath(os.path.abspath(path), base)
        h.update(f"\n{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{int(target)}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def decode_stored(path: str, side: int) -> np.ndarray:
    """The image ``path`` as it is stored for the stored side ``side``: ``(H, W, 3)`` uint8, the shorter side
    resized to ``side`` when it is longer (antialiased bilinear), else as decoded."""
    from torchvision.transforms.v2 import functional as TF

    from vitef.data import datasets

    image = datasets.read_image(path)  # (3, H, W) view of an H x W x 3 array, as the uncached source serves it
    if min(image.shape[1:]) > side:
        image = TF.resize(image, side, antialias=True)
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


class CachedSource(ImageSource):
    """A pool of images served from a cache entry (read-only memory map, opened lazily in each process).

    ``image(i)`` returns a uint8 ``(3, H, W)`` tensor laid out as the uncached source's (a channels-last
    view of an ``H x W x 3`` copy), so the transforms run the same kernels on it.
    """

    def __init__(self, folder: str | os.PathLike, paths: list[str] | None = None):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / META_FILE).read_text())
            with np.load(self.folder / INDEX_FILE, allow_pickle=False) as index:
                self.offsets = np.asarray(index["offsets"], dtype=np.int64)
                self.heights = np.asarray(index["heights"], dtype=np.int64)
                self.widths = np.asarray(index["widths"], dtype=np.int64)
                self.targets = np.asarray(index["targets"], dtype=np.int64)
            size = (self.folder / IMAGES_FILE).stat().st_size
        except (OSError, ValueError, KeyError) as e:
            raise _damaged(self.folder, f"{type(e).__name__}: {e}") from e
        n = len(self.targets)
        ok = len(self.offsets) == n + 1 and len(self.heights) == n and len(self.widths) == n
        if not ok or int(self.offsets[-1]) != size or self.meta.get("count") != n:
            raise _damaged(self.folder, f"index of {n} images does not match {IMAGES_FILE} ({size} bytes)")
        self.paths = paths  # the source files (messages only)
        self._images: np.memmap | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn reopen the map themselves instead of receiving its bytes.
        return {**self.__dict__, "_images": None}

    def _buffer(self) -> np.memmap:
        if self._images is None:
            self._images = np.memmap(self.folder / IMAGES_FILE, dtype=np.uint8, mode="r")
        return self._images

    def image(self, index: int) -> torch.Tensor:
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        h, w = int(self.heights[index]), int(self.widths[index])
        pixels = np.array(self._buffer()[lo:hi])  # a private, writable copy of this image only
        return torch.from_numpy(pixels).view(h, w, 3).permute(2, 0, 1)


def _damaged(folder: Path, why: str) -> DataError:
    return DataError(
        f"decoded-image cache entry '{folder}' is damaged ({why}): delete that folder, the next run rebuilds it"
    )


@contextlib.contextmanager
def _build_lock(path: Path, entry: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (waiting, with a log line, while another process holds it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building the decoded-image cache entry %s", entry)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            logger.warning("the file system of %s refuses locks: building the cache entry without one", path)
        yield
    finally:
        os.close(fd)  # releases the lock


def cache_source(source: ImageSource, cache: str | os.PathLike, *, dataset: str, size: int) -> ImageSource:
    """``source`` served from the decoded-image cache in folder ``cache`` (built first when missing).

    Parameters
    ----------
    source
        The pool a dataset loader returned; only a :class:`~vitef.data.datasets.FileSource` is cached, any
        other source (in-memory arrays) is returned unchanged.
    cache
        The cache folder (created when missing).
    dataset
        The canonical dataset name (part of the key and of the entry's name).
    size
        The model input side; the stored side is :func:`stored_side` of it.
    """
    from vitef.data.datasets import FileSource

    if not isinstance(source, FileSource):
        return source
    folder = check_cache_dir(cache, writable=False)
    side = stored_side(size)
    label = dataset_label(dataset)
    digest = _fingerprint(source.paths, source.targets, label, side)
    name = f"{label}-s{side}-{digest[:20]}"
    entry = folder / name
    if not (entry / META_FILE).is_file():
        check_cache_dir(cache)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _build_lock(folder / f".{name}.lock", name):
                if not (entry / META_FILE).is_file():  # another process may have built it while we waited
                    _build(source, folder, name, digest, label, side)
        except OSError as e:
            raise ConfigError(
                f"data.cache={str(cache)!r}: cannot write the decoded-image cache entry '{entry}' "
                f"({e.strerror or e}): free space there, choose another data.cache, or data.cache=null"
            ) from e
    cached = CachedSource(entry, source.paths)
    if cached.meta.get("key") != digest or not np.array_equal(cached.targets, source.targets):
        raise _damaged(entry, "its key or labels differ from the dataset's")
    logger.info("%s: %d images from the decoded-image cache %s", dataset, len(cached), entry)
    return cached


def _build(source: Any, folder: Path, name: str, digest: str, label: str, side: int) -> None:
    """Decode ``source`` into ``folder/name`` through a temporary folder renamed at the end (lock held)."""
    for stale in folder.glob(f".{name}.tmp-*"):  # left by a killed build of this entry
        logger.info("removing %s, left by an interrupted cache build", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    n = len(source.paths)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, min(8, cpus))
    logger.info("decoding %d images of %s into the cache entry %s (once; shorter side <= %d px)", n, label, name, side)
    t0 = last = time.perf_counter()
    offsets = np.zeros(n + 1, dtype=np.int64)
    heights = np.zeros(n, dtype=np.int64)
    widths = np.zeros(n, dtype=np.int64)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the decode threads each resize one image: no intra-op threads on top
    try:
        with open(tmp / IMAGES_FILE, "wb") as out, ThreadPoolExecutor(threads) as pool:
            for lo in range(0, n, BUILD_CHUNK):
                chunk = source.paths[lo : lo + BUILD_CHUNK]
                for i, pixels in enumerate(pool.map(decode_stored, chunk, [side] * len(chunk)), start=lo):
                    heights[i], widths[i] = pixels.shape[:2]
                    offsets[i + 1] = offsets[i] + pixels.size
                    out.write(pixels.data)
                if time.perf_counter() - last > 30:
                    last = time.perf_counter()
                    logger.info("decoded-image cache %s: %d / %d images", name, lo + len(chunk), n)
            out.flush()
            os.fsync(out.fileno())
        with open(tmp / INDEX_FILE, "wb") as f:
            np.savez(f, offsets=offsets, heights=heights, widths=widths, targets=np.asarray(source.targets))
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "version": CACHE_VERSION,
            "key": digest,
            "dataset": label,
            "stored_side": side,
            "policy": POLICY,
            "count": n,
            "bytes": int(offsets[-1]),
            "source_folder": os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in source.paths]),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        with open(tmp / META_FILE, "w") as f:  # last: a folder with meta.json was fully written
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, folder / name)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            logger.info("cache entry %s was built by another process meanwhile: using it", name)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(torch_threads)
    logger.info(
        "decoded-image cache %s: %d images, %.1f MB, built in %.1f s", name, n, offsets[-1] / 1e6, meta["build_seconds"]
    )
