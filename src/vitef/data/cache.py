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
changed folder is never served stale (its old entry stays on disk until removed: ``python -m apps.vit.cache
cache=<folder>`` lists the entries with their size and when each was last used, and ``prune=true
unused_days=30`` removes those unused for 30 days; a run that needs a removed entry rebuilds it; see *Use
and removal* below). Splits cut from one pool (DomainNet, ``imagefolder``, Pet's trainval) share one entry
whatever the run seed, so every image is decoded once. Checking the key stats every file of the pool each
time a dataset is built (about a second per 100k files on a local disk).

Building
--------
The first process that needs an entry takes an exclusive ``fcntl.flock`` on ``<cache>/.<entry>.lock``,
decodes into a temporary folder ``<cache>/.<entry>.tmp-<pid>-<random>/`` (several threads: Pillow and
torch release the GIL), flushes it to disk and renames it to ``<cache>/<entry>/`` in one atomic step, so a
complete entry is the only thing ever found under that name. Another process needing the same entry waits
on the lock, then finds the finished entry and reads it. A build that is killed leaves a temporary folder,
which the next build of that entry (or a prune) deletes; nothing reads temporary folders. Lock files stay
(they are empty) until a prune removes their entry or its temporary folder. File systems without ``flock``
(some network mounts) build without the lock, with a warning; two builders may then both decode, and the
second rename loses to the first entry, which both use.

Use and removal
---------------
A process that serves an entry touches ``<entry>/last_used`` (once per entry and process; the build writes
it too; a cache that cannot be written is served without) and holds a shared ``flock`` on that file for
the rest of its life (:func:`release_entries` drops it): the cache thus knows when each entry was last used
and whether a running process reads it, which matters because DataLoader workers open the memory map by
its path when they start (and a run starts workers again whenever its data stream restarts).
:func:`list_cache` describes every entry, every temporary folder of a build (``partial``) and every entry
folder with missing or unreadable files (``damaged``); entries built before ``last_used`` existed count as
last used when they were built.
:func:`remove_entry` takes the entry's build lock (without waiting: an entry being built or removed is kept),
keeps an entry that a live process holds and a temporary folder whose build is running, renames the entry
to ``<cache>/.<entry>.del-<pid>-<random>/`` in one step (a process arriving later finds no entry and
rebuilds it; one that was waiting for the use lock notices the rename and does the same), then deletes
that folder and the entry's lock file (a builder waiting on a removed lock file locks the new one).
Memory maps opened before the removal keep reading the deleted files (POSIX). ``python -m apps.vit.cache``
is the command-line side: a table of the entries, and ``prune=true`` (with ``dry_run=true`` to preview).
On file systems without ``flock`` nothing tells that an entry is in use: a prune there removes entries by
their age alone, and keeps temporary folders written to within the last hour.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
import threading
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
# Touched by every process that serves the entry; its shared flock says that a live process reads the entry.
USED_FILE = "last_used"
# Images decoded per batch of the build (bounds the memory held by decoded, not yet written images).
BUILD_CHUNK = 256
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# Folder names in a cache: an entry, and the temporary folder of a build (tmp) or of a removal (del).
ENTRY_NAME = re.compile(r"(?P<dataset>[^/]+)-s(?P<side>\d+)-(?P<digest>[0-9a-f]{20})")
TEMP_NAME = re.compile(r"\.(?P<entry>[^/]+-s\d+-[0-9a-f]{20})\.(?P<what>tmp|del)-\d+-[0-9a-f]+")
# Without flock, a temporary folder written to within this many seconds may belong to a running build.
TEMP_QUIET_S = 3600.0
# A listing probes the use lock for microseconds: a removal retries this long before calling an entry in use.
IN_USE_RETRY_S = 0.2


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
            self.meta, self.offsets, self.heights, self.widths, self.targets = _read_entry(self.folder)
        except _Damage as e:
            raise _damaged(self.folder, str(e)) from e.__cause__
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


class _Damage(Exception):
    """What is wrong with an entry folder (its message: the files missing, unreadable or inconsistent)."""


def _read_entry(folder: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The meta data and index (offsets, heights, widths, targets) of the entry ``folder``, checked against
    each other and the size of its images file; :class:`_Damage` says what is wrong."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        with np.load(folder / INDEX_FILE, allow_pickle=False) as index:
            arrays = [np.asarray(index[key], dtype=np.int64) for key in ("offsets", "heights", "widths", "targets")]
        size = (folder / IMAGES_FILE).stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _Damage(f"{type(e).__name__}: {e}") from e
    offsets, heights, widths, targets = arrays
    n = len(targets)
    ok = len(offsets) == n + 1 and len(heights) == n and len(widths) == n and isinstance(meta, dict)
    if not ok or int(offsets[-1]) != size or meta.get("count") != n:
        raise _Damage(f"index of {n} images does not match {IMAGES_FILE} ({size} bytes)")
    return meta, offsets, heights, widths, targets


def _damaged(folder: Path, why: str) -> DataError:
    return DataError(
        f"decoded-image cache entry '{folder}' is damaged ({why}): delete that folder, the next run rebuilds it"
    )


@contextlib.contextmanager
def _build_lock(path: Path, entry: str, *, wait: bool = True) -> Iterator[bool | None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` of the entry ``entry`` (the build lock).

    Yields ``True`` while held; ``False`` when ``wait`` is false and another process holds it (nothing is
    held then); ``None`` when the file system refuses locks (a warning is logged and the caller goes on
    unlocked). With ``wait``, it waits (with a log line) while another process holds the lock. A removal
    deletes the lock file while holding it: a process that was waiting on that file then locks the new one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held: bool | None = True
            except BlockingIOError:
                if not wait:
                    held = False
                else:
                    logger.info("waiting for another process building the decoded-image cache entry %s", entry)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    held = True
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    raise
                logger.warning(
                    "the file system of %s refuses locks: going on without one (concurrent builds or removals of "
                    "this cache entry are not excluded)",
                    path,
                )
                held = None
            if held and not _same_file(fd, path):
                continue  # the lock file was removed while we waited for it: lock the one now there
            yield held
            return
        finally:
            os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed nor replaced since it was opened)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)


# The entries this process serves: path -> the open last_used file on which it holds a shared flock (None:
# served without one, in a cache where the file could not be opened or a file system without locks).
_HELD: dict[str, int | None] = {}
_HELD_GUARD = threading.Lock()


def _hold_entry(entry: Path) -> bool:
    """Mark the entry ``entry`` as used by this process (once per process): take a shared ``flock`` on its
    ``last_used`` file (kept until :func:`release_entries` or the process ends) and touch the file.

    Returns ``False`` when the entry is gone or was removed while we waited for the lock (the caller then
    builds it again), ``True`` when it may be read, with or without the lock (best effort: a cache that
    cannot be written, or a file system without locks, is served unmarked).
    """
    key = str(entry)
    with _HELD_GUARD:
        if key in _HELD:
            return True
        marker = entry / USED_FILE
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:
            return False  # the entry folder itself is gone
        except OSError as e:  # e.g. a read-only cache holding an entry built before last_used existed
            logger.debug("cache entry %s served without its use mark: %s cannot be opened (%s)", entry, marker, e)
            _HELD[key] = None
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a removal (or, for microseconds, a listing) holds it
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            logger.debug("cache entry %s: the file system refuses locks, served without its use lock", entry)
        if not _same_file(fd, marker):
            os.close(fd)  # removed while we waited: nothing to read there
            return False
        _HELD[key] = fd
        try:
            os.utime(fd)
        except OSError as e:  # a cache shared read-only, or owned by another user
            logger.debug("cache entry %s: cannot update the time of %s (%s)", entry, marker, e)
        return True


def _release(entry: Path) -> None:
    with _HELD_GUARD:
        fd = _HELD.pop(str(entry), None)
        if fd is not None:
            os.close(fd)


def release_entries() -> None:
    """Drop this process's use locks on the cache entries it served (they may then be removed while it lives).

    A later :func:`cache_source` of an entry takes its lock and touches its ``last_used`` again. Only for a
    process that no longer reads those entries (e.g. a notebook done with a dataset): a source still reading
    one would fail to reopen it once removed.
    """
    with _HELD_GUARD:
        fds = [fd for fd in _HELD.values() if fd is not None]
        _HELD.clear()
    for fd in fds:
        os.close(fd)


def _open_entry(entry: Path, paths: list[str]) -> CachedSource | None:
    """The entry ``entry`` as a source, held by this process; ``None`` when it is not there (or went away)."""
    if not (entry / META_FILE).is_file() or not _hold_entry(entry):
        return None
    try:
        return CachedSource(entry, paths)
    except BaseException:
        _release(entry)  # a damaged entry is not in use: a prune may remove it
        raise


def cache_source(source: ImageSource, cache: str | os.PathLike, *, dataset: str, size: int) -> ImageSource:
    """``source`` served from the decoded-image cache in folder ``cache`` (built first when missing).

    The entry served is marked as used by this process (its ``last_used`` file: see the module docstring).

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
    cached = _open_entry(entry, source.paths)
    if cached is None:
        check_cache_dir(cache)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _build_lock(folder / f".{name}.lock", name):
                if not (entry / META_FILE).is_file():  # another process may have built it while we waited
                    _build(source, folder, name, digest, label, side)
                # Under the build lock: a removal (which takes it too) cannot come between the build and the hold.
                cached = _open_entry(entry, source.paths)
        except OSError as e:
            raise ConfigError(
                f"data.cache={str(cache)!r}: cannot write the decoded-image cache entry '{entry}' "
                f"({e.strerror or e}): free space there, choose another data.cache, or data.cache=null"
            ) from e
        if cached is None:
            raise _damaged(entry, "it vanished while this process opened it")
    if cached.meta.get("key") != digest or not np.array_equal(cached.targets, source.targets):
        _release(entry)
        raise _damaged(entry, "its key or labels differ from the dataset's")
    logger.info("%s: %d images from the decoded-image cache %s", dataset, len(cached), entry)
    return cached


def _build(source: Any, folder: Path, name: str, digest: str, label: str, side: int) -> None:
    """Decode ``source`` into ``folder/name`` through a temporary folder renamed at the end (lock held)."""
    for stale in [*folder.glob(f".{name}.tmp-*"), *folder.glob(f".{name}.del-*")]:  # a killed build or removal
        logger.info("removing %s, left by an interrupted cache build or removal", stale)
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
        (tmp / USED_FILE).touch()
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


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One folder of a decoded-image cache, as :func:`list_cache` found it.

    Attributes
    ----------
    name
        The folder's name in the cache (what :func:`remove_entry` takes).
    path
        The folder.
    kind
        ``"entry"`` (complete), ``"partial"`` (the temporary folder of a build, or of a removal, that is running
        or was killed) or ``"damaged"`` (an entry folder whose files are missing, unreadable or inconsistent).
    dataset
        The dataset label (from ``meta.json``, else from the name).
    stored_side
        The stored shorter side ``S`` (from the name).
    images
        The number of images (``None`` unless ``kind == "entry"``).
    bytes
        The space its files take on disk (allocated blocks: what removing them frees).
    built
        When it was built (POSIX time of its ``meta.json``; ``None`` without one).
    last_used
        When a process last served it (POSIX time of its ``last_used`` file; for entries built before that
        file existed, their build time); for partial and damaged folders, the newest change of their files.
    in_use
        An entry (or damaged entry): a live process holds it; a partial folder: its build or removal is
        running. ``None``: unknown (the file system refuses locks, or the lock file cannot be opened).
    problem
        What is wrong with a damaged entry (empty otherwise).
    """

    name: str
    path: Path
    kind: str
    dataset: str
    stored_side: int
    images: int | None
    bytes: int
    built: float | None
    last_used: float
    in_use: bool | None
    problem: str = ""


def list_cache(cache: str | os.PathLike) -> list[CacheEntry]:
    """The entries, damaged entries and temporary folders of builds in the cache folder ``cache``, by name.

    Nothing is changed (the listing probes locks for microseconds and creates no file). Files and folders
    not named as the cache names its folders are left out, and so are folders removed while listed.
    Damaged entries are described, never raised.

    Raises
    ------
    OSError
        When ``cache`` is not a folder that can be read.
    """
    folder = Path(cache).expanduser()
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    found = []
    for name in names:
        item = _describe(folder, name)
        if item is not None and os.path.lexists(item.path):
            found.append(item)
    return found


def _describe(folder: Path, name: str) -> CacheEntry | None:
    path = folder / name
    temp = TEMP_NAME.fullmatch(name)
    entry = None if name.startswith(".") else ENTRY_NAME.fullmatch(name)
    if temp is None and entry is None:
        return None
    stats = _file_stats(path)
    size = sum(_allocated(st) for st in stats.values())
    try:
        newest = max([st.st_mtime for st in stats.values()] + [path.lstat().st_mtime])
    except FileNotFoundError:
        return None  # removed meanwhile
    if temp is not None:
        parts = ENTRY_NAME.fullmatch(temp["entry"])
        assert parts is not None  # TEMP_NAME embeds ENTRY_NAME
        in_use = _probe(folder / f".{temp['entry']}.lock")
        return CacheEntry(name, path, "partial", parts["dataset"], int(parts["side"]), None, size, None, newest, in_use)
    built = stats[META_FILE].st_mtime if META_FILE in stats else None
    in_use = _probe(path / USED_FILE)
    try:
        meta, *_, targets = _read_entry(path)
        if str(meta.get("key", ""))[:20] != entry["digest"] or meta.get("stored_side") != int(entry["side"]):
            raise _Damage(f"its {META_FILE} is not that of this folder's name (another key or stored side)")
    except _Damage as e:
        label = entry["dataset"]
        return CacheEntry(name, path, "damaged", label, int(entry["side"]), None, size, built, newest, in_use, str(e))
    label = str(meta.get("dataset") or entry["dataset"])
    used = stats[USED_FILE].st_mtime if USED_FILE in stats else built
    return CacheEntry(name, path, "entry", label, int(entry["side"]), len(targets), size, built, used, in_use)


def _file_stats(path: Path) -> dict[str, os.stat_result]:
    """``lstat`` of every file under ``path`` by relative path (files removed meanwhile left out)."""
    out = {}
    for parent, _dirs, files in os.walk(path):
        for file in files:
            full = os.path.join(parent, file)
            with contextlib.suppress(FileNotFoundError):
                out[os.path.relpath(full, path)] = os.lstat(full)
    return out


def _allocated(st: os.stat_result) -> int:
    """Bytes a file takes on disk (its allocated blocks; its size where the platform does not say)."""
    blocks = getattr(st, "st_blocks", None)
    return int(blocks) * 512 if blocks is not None else int(st.st_size)


def _probe(path: Path) -> bool | None:
    """Whether some process holds a ``flock`` on the file ``path`` (``False`` when there is no such file;
    ``None``: unknown). Takes and drops an exclusive lock at once when it is free."""
    try:
        fd = os.open(path, os.O_RDWR)  # NFS turns flock into byte-range locks: exclusive ones need write access
    except FileNotFoundError:
        return False
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None  # a file system without locks, or a lock it cannot take through this file
    finally:
        os.close(fd)  # releases the probe's lock
    return False


def remove_entry(cache: str | os.PathLike, name: str) -> int | None:
    """Remove the folder ``name`` of the cache ``cache`` (an entry, damaged entry or temporary folder of a build,
    as :func:`list_cache` names them), safely against the processes using the cache.

    Under the entry's build lock (taken without waiting), an entry that no live process holds is renamed to
    ``.<name>.del-<pid>-<random>`` in one step and that folder deleted, then the entry's lock file; a
    temporary folder is deleted unless its build is running. See the module docstring (*Use and removal*).

    Returns
    -------
    int or None
        The bytes freed; ``None`` when nothing was removed: the entry is in use, a build or removal of it is
        running, or the folder is no longer there (the reason is logged).

    Raises
    ------
    ValueError
        When ``name`` is not the name of a cache entry nor of a build's temporary folder.
    OSError
        When the folder cannot be renamed or deleted (e.g. a cache the process may not write). A removal
        interrupted while deleting leaves a ``.del-`` temporary folder, which a later prune removes.
    """
    folder = Path(cache).expanduser()
    temp = TEMP_NAME.fullmatch(name)
    if temp is None and (name.startswith(".") or ENTRY_NAME.fullmatch(name) is None):
        raise ValueError(f"{name!r} is not the name of a decoded-image cache entry nor of a build's temporary folder")
    entry = temp["entry"] if temp is not None else name
    path = folder / name
    if not path.is_dir() or path.is_symlink():
        return None
    lock = folder / f".{entry}.lock"
    with _build_lock(lock, entry, wait=False) as held:
        if held is False:
            logger.info("keeping %s: a build or removal of the cache entry %s is running", name, entry)
            return None
        if not path.is_dir():
            return None  # removed by another process meanwhile
        if temp is not None:
            if held is None and time.time() - _newest_change(path) < TEMP_QUIET_S:
                logger.info("keeping %s: written to within the last hour, its build may still run", name)
                return None
            freed = _delete(path)
        else:
            freed = _remove_entry_folder(folder, name)
            if freed is None:
                return None
        if held:
            lock.unlink(missing_ok=True)  # while holding it: a process waiting on it then locks a new one
    return freed


def _remove_entry_folder(folder: Path, name: str) -> int | None:
    """Rename the entry ``folder/name`` out of the way and delete it, unless a live process holds it
    (build lock held by the caller)."""
    marker = folder / name / USED_FILE
    fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _lock_exclusive(fd, marker):
            logger.info("keeping the cache entry %s: a running process uses it", name)
            return None
        doomed = folder / f".{name}.del-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(folder / name, doomed)  # from here on, the entry is absent under its name: it is rebuilt if needed
        return _delete(doomed)
    finally:
        os.close(fd)  # a process waiting for its use lock wakes up, sees the rename and rebuilds


def _lock_exclusive(fd: int, path: Path) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting for its holders (retrying for ``IN_USE_RETRY_S``,
    the probe of a listing holds it for microseconds); ``True`` also when the file system refuses locks."""
    deadline = time.monotonic() + IN_USE_RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            logger.warning("the file system of %s refuses locks: cannot tell whether a process uses it", path)
            return True


def _newest_change(path: Path) -> float:
    """The newest modification time of ``path`` and the files under it."""
    times = [st.st_mtime for st in _file_stats(path).values()]
    with contextlib.suppress(FileNotFoundError):
        times.append(path.lstat().st_mtime)
    return max(times, default=0.0)


def _delete(path: Path) -> int:
    """Delete the folder ``path``; the bytes its files took on disk."""
    freed = sum(_allocated(st) for st in _file_stats(path).values())
    shutil.rmtree(path)
    logger.debug("removed %s from the decoded-image cache (%.1f MB)", path, freed / 1e6)
    return freed


def remove_stale_locks(cache: str | os.PathLike) -> int:
    """Delete the lock files of the cache ``cache`` whose entry and temporary folders are all gone (left by
    entries deleted by hand) and that no process holds; the number deleted."""
    folder = Path(cache).expanduser()
    with os.scandir(folder) as it:
        names = {e.name for e in it}
    removed = 0
    for lock_name in sorted(names):
        m = re.fullmatch(r"\.(?P<entry>.+)\.lock", lock_name)
        if m is None or ENTRY_NAME.fullmatch(m["entry"]) is None:
            continue
        entry = m["entry"]
        if entry in names or any(TEMP_NAME.fullmatch(n) and n.startswith(f".{entry}.") for n in names):
            continue
        with _build_lock(folder / lock_name, entry, wait=False) as held:
            if held and not (folder / entry).exists():
                (folder / lock_name).unlink(missing_ok=True)
                removed += 1
    return removed
