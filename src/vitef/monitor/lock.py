"""The exclusive lock of a run directory: one process works on a run at a time.

A run directory holds ``run.lock``. The process that works on the run (the training app; a sweep on
behalf of the apps that write into a directory without keeping its ``status.json``) holds an exclusive
``fcntl.flock`` on that file for its whole life. The kernel drops the lock when the process ends in any
way (return, exception, Ctrl-C, SIGKILL, out-of-memory kill), so the lock of a dead process is never
left behind and nothing has to be cleaned up. The holder writes its host, pid, start time and command
into the file, so a second process can say who holds the run (:class:`RunLockedError`).

What holds where
----------------
local file systems (ext4, xfs, btrfs, tmpfs)
    exact: two processes of this machine never hold one run; a lock ends with its process.
NFS (v3 with lockd, v4)
    Linux turns ``flock`` into byte-range locks granted by the server, so processes on different hosts
    exclude each other. The lock of a host that crashed is kept until the server notices: NFSv4 when the
    client's lease expires (about 90 s), NFSv3 when that host reboots. Mounts with ``nolock`` or
    ``local_lock=flock`` only exclude processes of the same host.
Lustre
    across clients only when mounted with ``-o flock``; with ``localflock`` within one client only; with
    ``noflock`` the file system refuses locks.
File systems that refuse locks (Lustre ``noflock``, some FUSE mounts)
    the run goes on unlocked with a warning: nothing then stops a second process.

A process holds a directory's lock at most once: acquiring it again in the same process (a sweep
running an app in-process on a directory it already holds) nests. The lock file stays in the
directory, emptied, when it is released, except when its holder wrote nothing there: then the lock
file it created goes again, with the folders it created (bad input must not leave an empty run
directory behind, nor a lock file in a folder that is not a run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitef.errors import ConfigError, VitefError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# Every RunLockedError message contains this, so a sweep recognises it in a subprocess's error line.
LOCKED_MARK = "is in use by another process"
# flock errors of file systems that do not lock at all (the run goes on unlocked).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# A sweep probing a lock holds it for microseconds: wait this long before calling a run busy.
DEFAULT_WAIT_S = 2.0


class RunLockedError(VitefError):
    """Another process works on this run directory (it holds its ``run.lock``)."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder or {}


@dataclasses.dataclass
class _Held:
    fd: int | None  # None: the file system refused the lock (held in name only)
    count: int
    created: list[Path]  # directories this lock created, deepest first
    before: frozenset[str] | None  # names in the directory when this lock created its file (else None)


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _key(directory: Path) -> str:
    return os.path.realpath(directory / LOCK_FILE)


def _holder_info(purpose: str) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "time": time.time(),
        "purpose": purpose,
        "command": " ".join(sys.argv),
    }


def _read_info(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 123 on host h (apps.vit.train, since ...)`` from a lock file's content."""
    if not info.get("pid"):
        return "a process that has not written its name yet"
    since = f"since {info['started']}" if info.get("started") else ""
    what = ", ".join(str(x) for x in (info.get("purpose"), since) if x)
    text = f"pid {info['pid']} on host {info.get('host', '?')}" + (f" ({what})" if what else "")
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info["pid"])):
        # The kernel drops a dead process's lock at once on local disks; a network file system may keep it
        # until its lock recovery runs.
        text += "; that process is gone but the file system still keeps its lock: retry in a minute"
    return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cannot_write(directory: Path, error: OSError) -> str:
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "it is a file" if existing == directory else f"'{existing}' is a file"
        return (
            f"cannot write results to '{directory}': {where}, not a folder; choose another root or move that file away"
        )
    return f"cannot write results to '{directory}' ({error.strerror or error}): choose another root"


def _locked_error(directory: Path, info: dict[str, Any]) -> RunLockedError:
    return RunLockedError(
        f"run directory {directory} {LOCKED_MARK}: {describe_holder(info)}. Wait for it to finish or stop it "
        f"(its lock ends with it); two processes on one run would overwrite each other",
        info,
    )


class RunLock:
    """The exclusive lock of one run directory (``<directory>/run.lock``).

    Parameters
    ----------
    directory
        The run directory; it is created (with its missing parents) by :meth:`acquire`.
    purpose
        What the holder does (e.g. ``apps.vit.train``), shown to a process that finds the run locked.
    wait_s
        How long :meth:`acquire` retries before giving up (covers the instant a sweep probes the lock).

    Examples
    --------
    >>> with RunLock(run_dir, purpose="apps.vit.train"):  # doctest: +SKIP
    ...     train()
    """

    def __init__(self, directory: str | os.PathLike, purpose: str = "", wait_s: float = DEFAULT_WAIT_S):
        self.directory = Path(directory)
        self.purpose = purpose
        self.wait_s = wait_s
        self._key: str | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory if needed).

        Raises
        ------
        RunLockedError
            Another process holds it (the message names that process).
        ConfigError
            The directory or its lock file cannot be created (e.g. a read-only root, or a file in the way).
        """
        if self._key is not None:
            raise RuntimeError(f"{self.path} is already acquired by this RunLock")
        created = self._make_directory()
        before = None if self.path.exists() else self._names()
        key = _key(self.directory)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:  # this process holds it already: nest
                held.count += 1
                self._key = key
                return self
        deadline = time.monotonic() + self.wait_s
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                if time.monotonic() >= deadline:
                    self._remove_created(created)
                    raise _locked_error(self.directory, info) from None
                time.sleep(0.05)
                continue
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise ConfigError(f"cannot lock {self.path} ({e.strerror})") from e
                logger.warning(
                    "the file system of %s does not support file locks (%s): the run is not protected against a "
                    "second process (see vitef.monitor.lock)",
                    self.directory,
                    e.strerror,
                )
                os.close(fd)
                fd = None
            if fd is not None and not self._is_current(fd):
                # The file was removed (or replaced) between open and lock: our lock guards nothing; retry.
                os.close(fd)
                continue
            break
        if fd is not None:
            self._write_info(fd)
        with _HELD_GUARD:
            _HELD[key] = _Held(fd=fd, count=1, created=created, before=before)
        self._key = key
        return self

    def release(self) -> None:
        """Give the lock back (the last release of a nested lock ends it); a no-op when not held."""
        if self._key is None:
            return
        key, self._key = self._key, None
        with _HELD_GUARD:
            held = _HELD[key]
            held.count -= 1
            if held.count:
                return
            del _HELD[key]
        if held.before is not None and self._names() == held.before:
            # Nothing was written: remove what acquire() created (while still holding the lock; a process
            # waiting for it then finds the file gone and creates a new one, see _is_current).
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._remove_created(held.created)
        elif held.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(held.fd, 0)
        if held.fd is not None:
            os.close(held.fd)  # ends the flock

    # --- helpers -------------------------------------------------------------------------------------
    def _make_directory(self) -> list[Path]:
        missing = []
        p = self.directory
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(_cannot_write(self.directory, e)) from e
        return missing

    def _open(self) -> int:
        for _ in range(10):
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:  # another process removed the empty directory it had created
                self._make_directory()
            except OSError as e:
                raise ConfigError(
                    f"cannot write the lock file {self.path} ({e.strerror}): the run directory must be writable"
                ) from e
        raise ConfigError(f"cannot create the lock file {self.path}: its directory keeps disappearing")

    def _is_current(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_info(self, fd: int) -> None:
        data = json.dumps(_holder_info(self.purpose)).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)  # other hosts of a network file system see it when they find the run locked
        except OSError as e:
            logger.debug("could not write the holder of %s: %s", self.path, e)

    def _names(self) -> frozenset[str] | None:
        try:
            return frozenset(p.name for p in self.directory.iterdir() if p.name != LOCK_FILE)
        except OSError:
            return None

    def _remove_created(self, created: list[Path]) -> None:
        for d in created:  # deepest first; stops at the first that another process has filled
            try:
                d.rmdir()
            except OSError:
                return


def holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds the lock of ``directory``: None when nobody (or no lock file), else the holder's info.

    The info is what the holder wrote (host, pid, started, purpose, command); ``{}`` when it has not
    written it yet. Creates nothing. A lock this process holds is reported without touching the file
    (on NFS, closing a second descriptor of a locked file would drop this process's lock).
    """
    directory = Path(directory)
    path = directory / LOCK_FILE
    if not path.is_file():
        return None
    key = _key(directory)
    with _HELD_GUARD:
        if key in _HELD:
            return _holder_info("this process")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # unreadable: the app will say so when it tries
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd)
        except OSError:
            return None  # no locks on this file system
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, purpose: str = "", enabled: bool = True) -> Iterator[RunLock | None]:
    """``with run_lock(run_dir, "apps.vit.train"):`` hold the run's lock for the block (``enabled=False``: no-op,
    e.g. on the non-main processes of a distributed run, which share the main process's run)."""
    if not enabled:
        yield None
        return
    lock = RunLock(directory, purpose).acquire()
    try:
        yield lock
    finally:
        lock.release()
