"""The decoded-image cache (``data.cache``, vitef.data.cache): build once and reuse, invalidation by the source
files, atomicity under failed and killed builds, concurrent builders, pixels vs the uncached decode, exact resume,
identical training below the stored size, and bad folders."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vitef.config import build_config
from vitef.data import DataConfig, build_dataset, build_loader, make_iterable
from vitef.data import cache as cache_mod
from vitef.data import datasets as datasets_mod
from vitef.data.base import ArraySource
from vitef.data.cache import CachedSource, stored_side
from vitef.errors import ConfigError


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking (smooth) random RGB image: bicubic upsampling of a coarse grid, plus mild noise."""
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    return np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)


def write_folder(base: Path, classes: int = 3, per_class: int = 4, sides=(40, 60), ext: str = ".jpg", seed=0):
    """``base/c<k>/<i><ext>`` images of random size in ``sides`` (each side drawn independently)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (base / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(rng.integers(sides[0], sides[1] + 1)) for _ in range(2))
            Image.fromarray(smooth_image(rng, h, w)).save(base / f"c{c}" / f"{i:03d}{ext}")
    return base


@pytest.fixture
def decodes(monkeypatch):
    """Counts image decodes (cached builds and uncached accesses both go through datasets.read_image)."""
    calls = []
    real = datasets_mod.read_image

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(datasets_mod, "read_image", counting)
    return calls


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def temps(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if ".tmp-" in p.name)


def all_pixels(ds) -> list[torch.Tensor]:
    return [ds.raw_image(i) for i in range(len(ds))]


def test_stored_side():
    assert stored_side(224) == 256 and stored_side(16) == 256 and stored_side(256) == 293 and stored_side(384) == 439


def test_build_once_then_reuse_across_splits_and_processes_views(tmp_path, decodes):
    folder = write_folder(tmp_path / "img", classes=3, per_class=5)
    name, cache = f"imagefolder:{folder}", tmp_path / "cache"
    train = build_dataset(name, "train", size=16, cache=cache)
    assert isinstance(train.source, CachedSource) and len(decodes) == 15  # the whole pool, once
    test = build_dataset(name, "test", size=16, cache=cache)
    again = build_dataset(name, "train", size=16, cache=str(cache))
    for ds in (train, test, again):
        all_pixels(ds)
        ds[0], ds[(1, 123)]
    assert len(decodes) == 15  # no decode after the build: other splits, a rebuilt dataset and items reuse it
    assert len(entries(cache)) == 1 and not temps(cache)
    meta = json.loads((entries(cache)[0] / "meta.json").read_text())
    assert meta["count"] == 15 and meta["stored_side"] == 256 and len(meta["key"]) == 64
    # A spawned worker receives the source without its memory map and reopens it.
    assert train.source.__getstate__()["_images"] is None and train.source._images is not None
    # Other sizes below 224 share the entry; a larger input size has its own stored side, hence its own entry.
    build_dataset(name, "val", size=224, cache=cache)
    assert len(entries(cache)) == 1
    build_dataset(name, "val", size=384, cache=cache)
    assert len(entries(cache)) == 2 and len(decodes) == 30


def test_in_memory_datasets_ignore_the_cache(tmp_path):
    source = ArraySource(np.zeros((3, 8, 8, 3), dtype=np.uint8), [0, 1, 2])  # digits, CIFAR: already decoded
    assert cache_mod.cache_source(source, tmp_path / "cache", dataset="digits", size=16) is source
    assert not (tmp_path / "cache").exists()


def test_pixels_bit_identical_below_the_stored_side_and_close_above(tmp_path):
    small = write_folder(tmp_path / "small", sides=(20, 250), ext=".png")
    big = write_folder(tmp_path / "big", sides=(300, 420), ext=".jpg", seed=1)
    cache = tmp_path / "cache"
    for folder in (small, big):
        name = f"imagefolder:{folder}"
        plain = build_dataset(name, "train", size=224)
        cached = build_dataset(name, "train", size=224, cache=cache)
        ev_plain = build_dataset(name, "test", size=224)
        ev_cached = build_dataset(name, "test", size=224, cache=cache)
        for i in range(len(plain)):
            a, b = plain.raw_image(i), cached.raw_image(i)
            if folder is small:
                # Same pixels and the same memory layout (the transforms pick their kernels by it).
                assert torch.equal(a, b) and a.stride() == b.stride()
                assert torch.equal(plain[(i, 7)][0], cached[(i, 7)][0])
            else:
                assert min(b.shape[1:]) == 256 < min(a.shape[1:])
                assert torch.equal(b, TF.resize(a, 256, antialias=True))  # exactly the documented resize
                ratio = (a.shape[2] / a.shape[1]) / (b.shape[2] / b.shape[1])
                assert abs(ratio - 1) < 0.01  # the aspect ratio (hence RandomResizedCrop's field of view) is kept
        for i in range(len(ev_plain)):
            x, y = ev_plain[i][0], ev_cached[i][0]
            if folder is small:
                assert torch.equal(x, y)
            else:  # Resize(224) from 256 px instead of from the original (and the centre crop may move by a
                # pixel as the long side rounds differently): close (a few levels of 255 on average), not equal
                assert (x - y).abs().mean() < 0.1 and not torch.equal(x, y)


def test_a_changed_folder_is_never_served_stale(tmp_path, decodes):
    folder = write_folder(tmp_path / "img", classes=2, per_class=4)
    name, cache = f"imagefolder:{folder}", tmp_path / "cache"

    def served():
        ds = build_dataset(name, "test", size=16, cache=cache)
        plain = build_dataset(name, "test", size=16)
        assert len(ds.source) == len(plain.source)
        for i in range(len(ds.source)):
            assert torch.equal(ds.source.image(i), plain.source.image(i))
        return ds.source.folder

    first = served()
    write_folder(tmp_path / "extra", classes=1, per_class=1, seed=5)
    os.replace(tmp_path / "extra" / "c0" / "000.jpg", folder / "c1" / "new.jpg")  # a file added
    added = served()
    Image.fromarray(smooth_image(np.random.default_rng(9), 50, 50)).save(folder / "c0" / "001.jpg")  # replaced
    replaced = served()
    st = os.stat(folder / "c0" / "002.jpg")
    os.utime(folder / "c0" / "002.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    touched = served()
    (folder / "c1" / "003.jpg").unlink()  # removed
    removed = served()
    assert len({first, added, replaced, touched, removed}) == 5
    assert len(entries(cache)) == 5  # old entries stay on disk (delete them to reclaim space), never served
    assert served() == removed  # unchanged folder: the same entry again


def test_a_failed_build_leaves_nothing_that_is_served(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "img", classes=2, per_class=6)
    name, cache = f"imagefolder:{folder}", tmp_path / "cache"
    real, count = cache_mod.decode_stored, []

    def failing(path, side):
        count.append(path)
        if len(count) > 5:
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the build
        return real(path, side)

    monkeypatch.setattr(cache_mod, "decode_stored", failing)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(name, "train", size=16, cache=cache)
    assert not entries(cache) and not temps(cache)
    monkeypatch.setattr(cache_mod, "decode_stored", real)
    ds = build_dataset(name, "train", size=16, cache=cache)
    assert isinstance(ds.source, CachedSource) and len(entries(cache)) == 1


def _builder(folder: Path, cache: Path, delay: float, out: Path, go: Path | None = None) -> None:
    """A builder process (forked: no start-up cost): every decode takes ``delay`` seconds, so builds overlap or
    can be killed midway; with ``go`` it writes ``<out>.ready`` and waits for the file ``go`` before building.
    Writes its cache log lines, then one JSON line: images it decoded, the entry it read, a checksum of the
    pixels it was served."""
    import hashlib
    import logging

    log = open(out, "w")  # noqa: SIM115 (open until the process exits)
    handler = logging.StreamHandler(log)
    logging.getLogger("vitef.data.cache").addHandler(handler)
    logging.getLogger("vitef.data.cache").setLevel(logging.INFO)
    real, count = datasets_mod.read_image, []

    def slow(path):
        count.append(path)
        time.sleep(delay)
        return real(path)

    datasets_mod.read_image = slow
    if go is not None:
        out.with_suffix(".ready").touch()
        while not go.exists():
            time.sleep(0.005)
    ds = build_dataset(f"imagefolder:{folder}", "train", size=16, cache=cache)
    h = hashlib.sha256()
    for i in range(len(ds.source)):
        h.update(ds.source.image(i).numpy().tobytes())
    log.write(json.dumps({"decoded": len(count), "entry": str(ds.source.folder), "sha": h.hexdigest()}) + "\n")
    log.close()


def _fork(*args) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=_builder, args=args)
    proc.start()
    return proc


def test_two_processes_building_the_same_entry_build_it_once(tmp_path):
    folder = write_folder(tmp_path / "img", classes=2, per_class=5)
    cache, go, outs = tmp_path / "cache", tmp_path / "go", [tmp_path / "b0.log", tmp_path / "b1.log"]
    procs = [_fork(folder, cache, 0.05, out, go) for out in outs]
    deadline = time.monotonic() + 60
    while not all(out.with_suffix(".ready").exists() for out in outs) and time.monotonic() < deadline:
        time.sleep(0.005)
    go.touch()  # both start building within milliseconds; a build takes half a second
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    logs = [out.read_text() for out in outs]
    results = sorted((json.loads(text.splitlines()[-1]) for text in logs), key=lambda r: r["decoded"])
    assert [r["decoded"] for r in results] == [0, 10]  # one built, the other waited for it and reused it
    assert results[0]["entry"] == results[1]["entry"] and results[0]["sha"] == results[1]["sha"]
    waited = [text for text in logs if "waiting for another process building" in text]
    assert len(waited) == 1 and "decoding 10 images" not in waited[0]
    assert len(entries(cache)) == 1 and not temps(cache)


def test_a_killed_build_is_cleaned_up_by_the_next(tmp_path):
    folder = write_folder(tmp_path / "img", classes=2, per_class=10)
    cache = tmp_path / "cache"
    proc = _fork(folder, cache, 0.2, tmp_path / "killed.log")
    deadline = time.monotonic() + 60
    while not (cache.is_dir() and temps(cache)) and time.monotonic() < deadline:
        assert proc.is_alive()
        time.sleep(0.01)
    time.sleep(0.5)  # inside the build, images half written
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert temps(cache) and not entries(cache)  # only the temporary folder is left, and nothing reads it
    ds = build_dataset(f"imagefolder:{folder}", "train", size=16, cache=cache)
    assert len(entries(cache)) == 1 and not temps(cache)
    plain = build_dataset(f"imagefolder:{folder}", "train", size=16)
    assert all(torch.equal(ds.source.image(i), plain.source.image(i)) for i in range(len(plain.source)))


def test_damaged_entry_is_a_clear_error(tmp_path):
    folder = write_folder(tmp_path / "img", classes=2, per_class=3)
    name, cache = f"imagefolder:{folder}", tmp_path / "cache"
    build_dataset(name, "train", size=16, cache=cache)
    images = entries(cache)[0] / "images.u8"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(Exception, match="is damaged .*delete that folder"):
        build_dataset(name, "train", size=16, cache=cache)


def _batches(loader, n, state=None):
    it = make_iterable(loader, seed=3)
    if state is not None:
        it.load_state_dict(state)
    out = [next(it) for _ in range(n)]
    return out, it.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_with_the_cache(tmp_path, workers):
    folder = write_folder(tmp_path / "img", classes=3, per_class=6, sides=(20, 300))
    kw = {"batch_size": 4, "size": 32, "seed": 3, "device": "cpu", "num_workers": workers}
    name = f"imagefolder:{folder}"
    full, _ = _batches(build_loader(name, "train", cache=tmp_path / "cache", **kw), 7)
    head, state = _batches(build_loader(name, "train", cache=tmp_path / "cache", **kw), 2)
    assert state == {"epoch": 0, "batch": 2, "seed": 3}
    tail, _ = _batches(build_loader(name, "train", cache=tmp_path / "cache", **kw), 5, state)
    for (x, y), (a, b) in zip(full, head + tail, strict=True):  # 7 batches over 2 epochs of 11 images
        assert torch.equal(x, a) and torch.equal(y, b)
    # Workers serve what the main process serves, whatever their number.
    main_process, _ = _batches(build_loader(name, "train", cache=tmp_path / "cache", **{**kw, "num_workers": 0}), 7)
    assert all(torch.equal(x, a) for (x, _), (a, _) in zip(full, main_process, strict=True))


def test_digits_scale_training_is_identical_with_and_without_the_cache(tmp_path):
    """Images below the stored side are served bit-identically, so a run is the same with the cache on or off."""
    from tiny import tiny_train

    from apps.vit.train import TrainConfig, main
    from vitef.data.digits import digits_source

    source = digits_source(16, [5, 6, 7, 8, 9])
    folder = tmp_path / "digits"
    for i in range(len(source)):
        path = folder / f"d{source.targets[i]}" / f"{i:04d}.png"  # PNG: lossless, the 16-px pixels exactly
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source.image(i).permute(1, 2, 0).numpy()).save(path)
    results = []
    for cache in (None, str(tmp_path / "cache")):
        over = tiny_train(dataset_name=f"imagefolder:{folder}", device="cpu", root=str(tmp_path / "out"))
        over["data"] = {**over["data"], "cache": cache, "hflip": False, "crop_scale": [0.5, 1.0]}
        over["log_dir"] = f"run_{cache is not None}"
        main(build_config(TrainConfig, over))
        run = tmp_path / "out" / "runs" / over["log_dir"]
        losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
        results.append((json.loads((run / "eval.json").read_text())["acc"], losses))
    assert results[0] == results[1]
    assert entries(tmp_path / "cache")


def test_bad_cache_folders_are_config_errors(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("x")
    for value, message in [
        (str(file), "data.cache='.*a_file' is a file, not a folder"),
        (str(file / "sub"), "is under the file '.*a_file'"),
        ("", "data.cache is empty"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DataConfig(cache=value).validate()
    DataConfig(cache=str(tmp_path / "new" / "cache")).validate()  # created when needed
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="data.cache=.* is a file"):
        from apps.vit.train import TrainConfig

        build_config(TrainConfig, {"dataset_name": "digits", "data": {"cache": str(file)}})
    folder = write_folder(tmp_path / "img", classes=2, per_class=2)
    with pytest.raises(ConfigError, match="data.cache=.* is a file"):
        build_dataset(f"imagefolder:{folder}", "train", size=16, cache=file)
    assert DataConfig(cache="~/c").loader_kwargs()["cache"] == "~/c"


def test_read_only_cache_folder_serves_its_entries(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "img", classes=2, per_class=2)
    name, cache = f"imagefolder:{folder}", tmp_path / "cache"
    build_dataset(name, "train", size=16, cache=cache)
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kw):  # as on a read-only mount (root ignores permission bits)
        if Path(dir) == cache:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    DataConfig(cache=str(cache)).validate()
    assert isinstance(build_dataset(name, "train", size=16, cache=cache).source, CachedSource)
    with pytest.raises(ConfigError, match="data.cache=.*cache' is not writable \\(Permission denied\\)"):
        build_dataset(name, "train", size=384, cache=cache)  # a new entry would have to be written
