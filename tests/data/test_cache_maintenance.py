"""Maintenance of the decoded-image cache (vitef.data.cache: list_cache, remove_entry; apps.vit.cache): the
listing of entries, damaged and partial folders, the use mark and lock of entries served, pruning by age, dry
runs, folders kept while a process uses them, removals racing with readers and builders, and the app's output
and errors."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_decoded_cache import entries, temps, write_folder

from apps.vit.cache import human_size
from vitef.data import build_dataset
from vitef.data import cache as cache_mod
from vitef.data.cache import CachedSource, dataset_label, list_cache, release_entries, remove_entry

DAY = 86400.0


@pytest.fixture(autouse=True)
def released():
    """Each test starts and ends holding no entry (this process serves entries of earlier tests)."""
    release_entries()
    yield
    release_entries()


def build(folder: Path, cache: Path, size: int = 16):
    return build_dataset(f"imagefolder:{folder}", "train", size=size, cache=cache)


def pixels(ds) -> list[torch.Tensor]:
    return [ds.source.image(i) for i in range(len(ds.source))]


def disk_bytes(folder: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def age(path: Path, days: float) -> float:
    """Set the modification time of ``path`` to ``days`` ago; that time."""
    t = time.time() - days * DAY
    os.utime(path, (t, t))
    return t


def test_a_built_entry_is_listed_with_its_dataset_side_images_and_bytes(tmp_path):
    folder, cache = write_folder(tmp_path / "img", classes=2, per_class=3), tmp_path / "cache"
    t0 = time.time()
    ds = build(folder, cache, size=16)
    [item] = list_cache(cache)
    entry = ds.source.folder
    assert (item.name, item.path, item.kind, item.problem) == (entry.name, entry, "entry", "")
    meta = json.loads((entry / "meta.json").read_text())
    assert item.dataset == dataset_label(f"imagefolder:{folder}") == meta["dataset"]
    assert (item.stored_side, item.images) == (256, 6)
    stored = sum(image.numel() for image in pixels(ds))  # 40-60 px images are stored as decoded: H * W * 3 bytes
    assert (entry / "images.u8").stat().st_size == stored and item.bytes == disk_bytes(entry) >= stored
    assert item.built == (entry / "meta.json").stat().st_mtime and t0 - 1 < item.built <= time.time()
    assert item.last_used == (entry / "last_used").stat().st_mtime >= item.built  # the build marks it used
    assert item.in_use is True  # this process holds it
    release_entries()
    assert list_cache(cache)[0].in_use is False


def test_reuse_moves_last_used_once_per_process_and_old_entries_fall_back_to_their_build_time(tmp_path):
    folder, cache = write_folder(tmp_path / "img", classes=2, per_class=2), tmp_path / "cache"
    entry = build(folder, cache).source.folder
    release_entries()  # as if that run ended
    marker = entry / "last_used"
    old = age(marker, 40)
    assert list_cache(cache)[0].last_used == old
    before = time.time()
    build(folder, cache)  # a new run reuses the entry
    assert marker.stat().st_mtime >= before - 1 and list_cache(cache)[0].last_used == marker.stat().st_mtime
    old = age(marker, 40)
    build_dataset(f"imagefolder:{folder}", "test", size=16, cache=cache)  # the same process again: no new write
    assert marker.stat().st_mtime == old
    # An entry built before last_used existed counts as used when it was built.
    release_entries()
    marker.unlink()
    built = age(entry / "meta.json", 50)
    [item] = list_cache(cache)
    assert (item.kind, item.built, item.last_used) == ("entry", built, built)
    build(folder, cache)  # serving it creates the mark
    assert marker.is_file() and list_cache(cache)[0].last_used >= before


def test_damaged_and_partial_folders_are_listed_as_such(tmp_path):
    cache = tmp_path / "cache"
    names = []
    for k in range(5):
        names.append(build(write_folder(tmp_path / f"img{k}", classes=2, per_class=2, seed=k), cache).source.folder)
    release_entries()
    truncated, no_index, bad_json, pickled, foreign = names
    (truncated / "images.u8").write_bytes((truncated / "images.u8").read_bytes()[:-5])
    (no_index / "index.npz").unlink()
    (bad_json / "meta.json").write_text("{not json")
    with open(pickled / "index.npz", "wb") as f:  # object arrays: never unpickled (allow_pickle=False)
        np.savez(f, offsets=np.array([{"x": 1}], dtype=object), heights=[1], widths=[1], targets=[0])
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "key": "0" * 64}))  # another entry's meta
    partial = cache / f".{truncated.name}.tmp-4242-0badcafe"
    partial.mkdir()
    (partial / "images.u8").write_bytes(b"\1" * 5000)
    written = age(partial / "images.u8", 2)
    os.utime(partial, (written, written))
    (cache / "notes").mkdir()  # not the cache's: never listed (hence never pruned)
    (cache / "readme.txt").write_text("x")
    items = {item.name: item for item in list_cache(cache)}
    assert sorted(items) == sorted([n.name for n in names] + [partial.name])
    problems = {name: items[name.name].problem for name in names}
    assert all(items[n.name].kind == "damaged" and items[n.name].images is None for n in names)
    assert "index of 4 images does not match images.u8 (" in problems[truncated]
    assert "FileNotFoundError" in problems[no_index] and "index.npz" in problems[no_index]
    assert "JSONDecodeError" in problems[bad_json]
    assert "ValueError" in problems[pickled] and "allow_pickle=False" in problems[pickled]
    assert "meta.json is not that of this folder's name" in problems[foreign]
    p = items[partial.name]
    assert (p.kind, p.dataset, p.stored_side, p.images, p.built, p.in_use) == (
        "partial", dataset_label(f"imagefolder:{tmp_path / 'img0'}"), 256, None, None, False)  # fmt: skip
    assert p.bytes == disk_bytes(partial) and p.last_used == written


def _old_cache(tmp_path: Path) -> tuple[Path, dict[str, Path], list]:
    """A cache with an entry unused for 40 days, one for 5 days, one built 50 days ago before last_used
    existed, the temporary folder of a killed build and a damaged entry; the pixels of the first."""
    cache = tmp_path / "cache"
    folders = {k: write_folder(tmp_path / k, classes=2, per_class=2, seed=i) for i, k in enumerate("abcd")}
    ds = build(folders["a"], cache)
    old_pixels = pixels(ds)
    paths = {k: build(f, cache).source.folder for k, f in folders.items()}
    release_entries()
    age(paths["a"] / "last_used", 40)
    age(paths["b"] / "last_used", 5)
    (paths["c"] / "last_used").unlink()
    age(paths["c"] / "meta.json", 50)
    (paths["d"] / "index.npz").unlink()
    partial = cache / f".{paths['b'].name}.tmp-4242-0badcafe"
    partial.mkdir()
    (partial / "images.u8").write_bytes(b"\1" * 3000)
    paths["partial"] = partial
    return cache, paths, old_pixels


def test_prune_removes_old_partial_and_damaged_folders_keeps_recent_and_rebuilds_the_same_pixels(
    tmp_path, run_inprocess
):
    cache, paths, old_pixels = _old_cache(tmp_path)
    listed = list_cache(cache)
    gone = {paths[k].name for k in ("a", "c", "d", "partial")}
    freed = sum(item.bytes for item in listed if item.name in gone)
    args = [f"cache={cache}", "prune=true", "unused_days=30"]
    r = run_inprocess("apps.vit.cache", *args, "dry_run=true")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sorted(line.split()[2] for line in lines[:-1]) == sorted(gone) and len(lines) == 5
    assert f"would remove {paths['a'].name} (unused for 40.0 days, " in r.stdout
    assert f"would remove {paths['c'].name} (unused for 50.0 days" in r.stdout
    assert f"would remove {paths['partial'].name} (temporary folder of a killed build, 4.1 kB)" in r.stdout
    assert f"would remove {paths['d'].name} (damaged: FileNotFoundError" in r.stdout
    assert lines[-1] == f"would reclaim {human_size(freed)} (4 to remove; dry run: nothing removed)"
    assert list_cache(cache) == listed  # nothing changed
    r = run_inprocess("apps.vit.cache", *args)
    assert r.returncode == 0, r.stderr
    assert sorted(line.split()[1] for line in r.stdout.splitlines()[:-1]) == sorted(gone)
    kept_bytes = sum(item.bytes for item in listed if item.name not in gone)
    assert r.stdout.splitlines()[-1] == (
        f"reclaimed {human_size(freed)} (4 removed); {cache} now holds {human_size(kept_bytes)}"
    )
    assert [item.name for item in list_cache(cache)] == [paths["b"].name]
    # Nothing else is left of the removed folders: no temporary folder, no lock file.
    # (b's lock file went with the temporary folder of its build: the next build creates it again.)
    assert [p.name for p in cache.iterdir()] == [paths["b"].name]
    # A run that needs a removed entry builds it again, with the same pixels.
    again = build(tmp_path / "a", cache)
    assert again.source.folder == paths["a"] and len(entries(cache)) == 2 and not temps(cache)
    assert all(torch.equal(x, y) for x, y in zip(pixels(again), old_pixels, strict=True))


def test_an_entry_a_running_process_reads_is_kept(tmp_path, run_inprocess):
    folder, cache = write_folder(tmp_path / "img", classes=2, per_class=2), tmp_path / "cache"
    entry = build(folder, cache).source.folder
    release_entries()
    age(entry / "last_used", 99)
    ready, go = tmp_path / "ready", tmp_path / "go"

    def reader():  # a run that serves the entry, then trains for a while
        build(folder, cache)
        ready.touch()
        while not go.exists():
            time.sleep(0.01)

    proc = multiprocessing.get_context("fork").Process(target=reader)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        [item] = list_cache(cache)
        assert item.in_use is True and item.last_used > time.time() - 60  # it touched the entry too
        age(entry / "last_used", 99)
        r = run_inprocess("apps.vit.cache", f"cache={cache}", "prune=true", "unused_days=30")
        assert r.returncode == 0, r.stderr
        assert f"kept {entry.name}: in use by a running process" in r.stdout
        assert "reclaimed 0 B (0 removed, 1 kept in use)" in r.stdout and entry.is_dir()
        r = run_inprocess("apps.vit.cache", f"cache={cache}", "prune=true", "unused_days=30", "dry_run=true")
        assert f"would keep {entry.name}: in use" in r.stdout
        assert remove_entry(cache, entry.name) is None and entry.is_dir()
    finally:
        go.touch()
        proc.join(30)
    assert proc.exitcode == 0
    assert list_cache(cache)[0].in_use is False
    assert remove_entry(cache, entry.name) > 0 and not entry.exists()


def test_this_process_keeps_its_own_entries_until_it_releases_them(tmp_path):
    folder, cache = write_folder(tmp_path / "img", classes=2, per_class=2), tmp_path / "cache"
    entry = build(folder, cache).source.folder
    assert remove_entry(cache, entry.name) is None and entry.is_dir()  # its sources may still open the map
    release_entries()
    [item] = list_cache(cache)
    assert remove_entry(cache, entry.name) == item.bytes > 0
    assert not entry.exists() and not (cache / f".{entry.name}.lock").exists() and not temps(cache)
    assert remove_entry(cache, entry.name) is None  # already gone
    for bad in ["..", "notes", f"../{entry.name}", f".{entry.name}.lock", ""]:
        with pytest.raises(ValueError, match="is not the name of a decoded-image cache entry"):
            remove_entry(cache, bad)


def test_a_partial_folder_whose_build_runs_is_kept(tmp_path, run_inprocess):
    folder, cache = write_folder(tmp_path / "img", classes=2, per_class=2), tmp_path / "cache"
    entry = build(folder, cache).source.folder
    release_entries()
    shutil.rmtree(entry)  # a run rebuilds it: its build holds the lock and writes a temporary folder
    partial = cache / f".{entry.name}.tmp-77-00c0ffee"
    partial.mkdir()
    (partial / "images.u8").write_bytes(b"\0" * 100)
    builder = os.open(cache / f".{entry.name}.lock", os.O_RDWR)  # another open file description: a builder
    try:
        fcntl.flock(builder, fcntl.LOCK_EX)
        [item] = list_cache(cache)
        assert (item.kind, item.in_use) == ("partial", True)
        r = run_inprocess("apps.vit.cache", f"cache={cache}", "prune=true", "unused_days=0")
        assert r.returncode == 0, r.stderr
        assert f"kept {partial.name}: in use by a running process, or being built" in r.stdout and partial.is_dir()
        r = run_inprocess("apps.vit.cache", f"cache={cache}")
        assert f"{partial.name}  (build running)" in r.stdout
    finally:
        os.close(builder)  # the build was killed
    r = run_inprocess("apps.vit.cache", f"cache={cache}")
    assert f"{partial.name}  (left by a killed build)" in r.stdout
    r = run_inprocess("apps.vit.cache", f"cache={cache}", "prune=true", "unused_days=0")
    assert f"removed {partial.name} (temporary folder of a killed build" in r.stdout and not partial.exists()
    assert not list(cache.iterdir())  # its lock file went too (no entry of that name is left)


def test_a_reader_waiting_on_a_removal_rebuilds_the_entry(tmp_path, monkeypatch):
    """A process that found the entry just as a removal took its use lock waits, sees it gone and rebuilds."""
    folder, cache = write_folder(tmp_path / "img", classes=2, per_class=3), tmp_path / "cache"
    ds = build(folder, cache)
    entry, expected = ds.source.folder, pixels(ds)
    release_entries()
    remover = os.open(entry / "last_used", os.O_RDWR)
    fcntl.flock(remover, fcntl.LOCK_EX)  # what remove_entry holds while it renames and deletes
    waiting, real_flock = threading.Event(), fcntl.flock

    def flock(fd, op):
        if op == fcntl.LOCK_SH:
            waiting.set()
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    out = {}
    reader = threading.Thread(target=lambda: out.update(ds=build(folder, cache)))
    reader.start()
    assert waiting.wait(30)
    time.sleep(0.1)
    assert reader.is_alive()  # waiting for the use lock
    doomed = cache / f".{entry.name}.del-1-00000000"
    os.rename(entry, doomed)
    shutil.rmtree(doomed)
    os.close(remover)
    reader.join(60)
    assert isinstance(out["ds"].source, CachedSource) and out["ds"].source.folder == entry
    assert all(torch.equal(x, y) for x, y in zip(pixels(out["ds"]), expected, strict=True))
    assert (entry / "meta.json").is_file()


def test_a_builder_waiting_on_a_removed_lock_file_locks_the_new_one(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / ".x-s256-0123456789abcdef0123.lock"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a removal holds it
    inside, leave = threading.Event(), threading.Event()

    def build_under_lock():
        with cache_mod._build_lock(lock, "x") as held:
            out["held"] = held
            inside.set()
            leave.wait(30)

    out = {}
    thread = threading.Thread(target=build_under_lock)
    thread.start()
    time.sleep(0.2)
    assert not inside.is_set()
    lock.unlink()  # the removal deletes the lock file, then releases it
    os.close(holder)
    assert inside.wait(30) and out["held"] is True
    assert cache_mod._probe(lock) is True  # the builder holds the file now at that path, not the deleted one
    with cache_mod._build_lock(lock, "x", wait=False) as held:
        assert held is False
    leave.set()
    thread.join(30)
    assert cache_mod._probe(lock) is False


def test_the_app_lists_the_cache(tmp_path, run_inprocess):
    cache, paths, _ = _old_cache(tmp_path)
    r = run_inprocess("apps.vit.cache", f"cache={cache}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"decoded-image cache {cache}"
    assert lines[1].split() == ["kind", "images", "size", "built", "last", "used", "days", "name"]
    rows = lines[2:-1]
    # Oldest use first: the partial folder was just written, so it comes last.
    assert [row.split()[-1] if "(" not in row else row.split("  (")[0].split()[-1] for row in rows] == [
        paths["c"].name, paths["a"].name, paths["b"].name, paths["d"].name, paths["partial"].name]  # fmt: skip
    items = {item.name: item for item in list_cache(cache)}
    a = items[paths["a"].name]
    assert rows[1].split()[:3] == ["entry", "4", *human_size(a.bytes).split()[:1]] and " 40.0  " in rows[1]
    assert rows[3].startswith("damaged") and "(FileNotFoundError" in rows[3]
    assert rows[4].startswith("partial") and rows[4].endswith("(left by a killed build)")
    total = human_size(sum(i.bytes for i in items.values()))
    by_kind = [human_size(sum(i.bytes for i in items.values() if i.kind == k)) for k in ("entry", "partial", "damaged")]
    assert lines[-1] == (
        f"total {total}: 3 entries ({by_kind[0]}), 1 partial folders ({by_kind[1]}), 1 damaged entries ({by_kind[2]})"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_inprocess("apps.vit.cache", f"cache={empty}")
    assert (r.returncode, r.stdout) == (0, f"decoded-image cache {empty}: empty\n")


def test_the_app_rejects_bad_input(tmp_path, run_inprocess):
    """Exit status 2 and one ``error:`` line naming the key and the fix (cli_main, as ``python -m`` runs it)."""
    file = tmp_path / "a_file"
    file.write_text("x")
    for args, message in [
        ([f"cache={tmp_path / 'none'}"], f"cache='{tmp_path / 'none'}' does not exist: give the folder the runs use"),
        ([f"cache={file}"], f"cache='{file}' is not a folder"),
        ([], "cache is empty: give the decoded-image cache folder"),
        ([f"cache={tmp_path}", "unused_days=-1"], "unused_days=-1.0 must be >= 0"),
        ([f"cache={tmp_path}", "dry_run=true"], "dry_run=true previews a prune: add prune=true"),
        ([f"cache={tmp_path}", "unused_days=soon"], "unused_days"),
        ([f"cache={tmp_path}", "prun=true"], "Did you mean 'prune'"),
    ]:
        r = run_inprocess("apps.vit.cache", *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)
        assert r.stdout == ""
    assert list(tmp_path.iterdir()) == [file]  # nothing created


def test_the_app_help(run_inprocess):
    r = run_inprocess("apps.vit.cache", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m apps.vit.cache")
    assert "List a decoded-image cache (data.cache) or prune the entries unused for some days." in r.stdout
    for key in ("cache: str = ''", "prune: bool = False", "unused_days: float = 30.0", "dry_run: bool = False"):
        assert key in r.stdout


def test_lock_files_of_entries_deleted_by_hand_go_unless_held(tmp_path):
    cache = tmp_path / "cache"
    gone = [
        build(write_folder(tmp_path / f"img{k}", classes=2, per_class=2, seed=k), cache).source.folder for k in (0, 1)
    ]
    kept = build(write_folder(tmp_path / "img2", classes=2, per_class=2, seed=2), cache).source.folder
    release_entries()
    for entry in gone:
        shutil.rmtree(entry)  # the old advice: delete the entry folder
    builder = os.open(cache / f".{gone[1].name}.lock", os.O_RDWR)
    fcntl.flock(builder, fcntl.LOCK_EX)  # a run building that entry again
    try:
        assert cache_mod.remove_stale_locks(cache) == 1
    finally:
        os.close(builder)
    assert sorted(p.name for p in cache.iterdir()) == sorted([kept.name, f".{kept.name}.lock", f".{gone[1].name}.lock"])


def test_the_app_reports_what_it_cannot_remove(tmp_path, run_inprocess, monkeypatch):
    import apps.vit.cache as app

    cache, paths, _ = _old_cache(tmp_path)
    monkeypatch.setattr(app.utils, "write_error", lambda folder: "Permission denied")  # another user's cache
    r = run_inprocess("apps.vit.cache", f"cache={cache}", "prune=true")
    assert r.returncode == 2 and f"error: cache='{cache}' is not writable (Permission denied): prune as" in r.stderr
    r = run_inprocess("apps.vit.cache", f"cache={cache}", "prune=true", "dry_run=true")
    assert r.returncode == 0 and "would reclaim" in r.stdout
    monkeypatch.undo()
    real = app.remove_entry

    def refusing(folder, name):
        if name == paths["a"].name:
            raise PermissionError(13, "Permission denied", str(folder / name))
        return real(folder, name)

    monkeypatch.setattr(app, "remove_entry", refusing)
    r = run_inprocess("apps.vit.cache", f"cache={cache}", "prune=true")
    assert r.returncode == 2
    assert f"could not remove {paths['a'].name}: [Errno 13] Permission denied" in r.stdout
    assert f"removed {paths['c'].name}" in r.stdout  # the others still go
    assert r.stderr.startswith(f"error: 1 folder(s) of the cache {cache} could not be removed (see above)")
    assert [item.name for item in list_cache(cache)] == sorted([paths["a"].name, paths["b"].name])
