"""List the entries of a decoded-image cache (``data.cache``) and reclaim the space of those no longer used.

    python -m apps.vit.cache cache=~/.cache/vitef                                   # table of entries, total size
    python -m apps.vit.cache cache=~/.cache/vitef prune=true unused_days=30         # remove entries unused 30+ days
    python -m apps.vit.cache cache=~/.cache/vitef prune=true unused_days=30 dry_run=true   # say what would go

Each entry holds one dataset decoded at one stored side (vitef.data.cache); a changed source folder gets a
new entry and the old one stays until pruned. ``prune=true`` also removes the temporary folders of killed
builds and damaged entries. It never removes an entry that a running process reads, nor the temporary folder
of a build that is running; a run that needs a removed entry rebuilds it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from vitef import utils
from vitef.config import cli_main, option
from vitef.data.cache import CacheEntry, list_cache, remove_entry, remove_stale_locks
from vitef.errors import ConfigError, DataError

DAY_S = 86400.0


@dataclasses.dataclass
class CacheConfig:
    """List a decoded-image cache (data.cache) or prune the entries unused for some days."""

    cache: str = option("", "the cache folder: the data.cache of the runs (required)")
    prune: bool = option(False, "remove entries unused for unused_days or more, killed builds' and damaged folders")
    unused_days: float = option(30.0, "with prune=true: remove entries not used for this many days (0: all unused)")
    dry_run: bool = option(False, "with prune=true: print what would be removed, remove nothing")

    def validate(self) -> None:
        example = "e.g. cache=~/.cache/vitef"
        if not str(self.cache).strip():
            raise ConfigError(f"cache is empty: give the decoded-image cache folder (the runs' data.cache), {example}")
        path = Path(self.cache).expanduser()
        if not path.exists():
            raise ConfigError(
                f"cache={self.cache!r} does not exist: give the folder the runs use as data.cache, {example}"
            )
        if not path.is_dir():
            raise ConfigError(f"cache={self.cache!r} is not a folder: give the folder the runs use as data.cache")
        if not self.unused_days >= 0:  # also NaN
            raise ConfigError(f"unused_days={self.unused_days} must be >= 0 (days since an entry was last used)")
        if self.dry_run and not self.prune:
            raise ConfigError("dry_run=true previews a prune: add prune=true (nothing is removed with dry_run=true)")
        if self.prune and not self.dry_run:
            error = utils.write_error(path)  # looked up at call time (tests stand in for it as root)
            if error is not None:
                raise ConfigError(
                    f"cache={self.cache!r} is not writable ({error}): prune as a user who may write there, "
                    "or add dry_run=true to see what would be removed"
                )


def human_size(n: float) -> str:
    """``n`` bytes in decimal units (``12.3 MB``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _note(item: CacheEntry) -> str:
    if item.kind == "damaged":
        return item.problem
    if item.kind == "partial":
        doing = "removal" if ".del-" in item.name else "build"
        return {True: f"{doing} running", False: f"left by a killed {doing}", None: ""}[item.in_use]
    return "in use" if item.in_use else ""


def table(items: list[CacheEntry], folder: Path, now: float) -> str:
    """The listing: one row per folder, oldest use first, then the totals by kind."""
    if not items:
        return f"decoded-image cache {folder}: empty\n"
    rows = [f"decoded-image cache {folder}"]
    rows.append(f"{'kind':<8}{'images':>8}{'size':>11}  {'built':<17} {'last used':<17}{'days':>7}  name")
    for item in sorted(items, key=lambda i: (i.last_used, i.name)):
        images = "-" if item.images is None else f"{item.images:,}"
        days = (now - item.last_used) / DAY_S
        note = _note(item)
        rows.append(
            f"{item.kind:<8}{images:>8}{human_size(item.bytes):>11}  {_when(item.built):<17} "
            f"{_when(item.last_used):<17}{days:>7.1f}  {item.name}" + (f"  ({note})" if note else "")
        )
    parts = []
    for kind, label in (("entry", "entries"), ("partial", "partial folders"), ("damaged", "damaged entries")):
        of_kind = [i for i in items if i.kind == kind]
        if of_kind:
            parts.append(f"{len(of_kind)} {label} ({human_size(sum(i.bytes for i in of_kind))})")
    rows.append(f"total {human_size(sum(i.bytes for i in items))}: {', '.join(parts)}")
    return "\n".join(rows) + "\n"


def _reason(item: CacheEntry, now: float) -> str:
    if item.kind == "entry":
        return f"unused for {(now - item.last_used) / DAY_S:.1f} days"
    if item.kind == "partial":
        return "temporary folder of a killed build" if ".tmp-" in item.name else "left by a killed removal"
    return f"damaged: {item.problem}"


def prune(items: list[CacheEntry], folder: Path, cfg: CacheConfig, now: float) -> None:
    """Remove (or, with ``dry_run``, name) the entries unused for ``unused_days``, partial and damaged folders."""
    doomed = [i for i in items if i.kind != "entry" or now - i.last_used >= cfg.unused_days * DAY_S]
    verb = "would remove" if cfg.dry_run else "removed"
    freed, removed, kept, failed = 0, [], 0, 0
    for item in sorted(doomed, key=lambda i: (i.last_used, i.name)):
        reason = _reason(item, now)
        if cfg.dry_run:
            if item.in_use:
                print(f"would keep {item.name}: {_note(item)}")
                kept += 1
                continue
            size = item.bytes
        else:
            try:
                size = remove_entry(folder, item.name)
            except OSError as e:
                print(f"could not remove {item.name}: {e}")
                failed += 1
                continue
            if size is None:
                print(f"kept {item.name}: in use by a running process, or being built or removed")
                kept += 1
                continue
        print(f"{verb} {item.name} ({reason}, {human_size(size)})")
        freed += size
        removed.append(item)
    left = [i for i in items if i not in removed]
    summary = f"{len(removed)} {'to remove' if cfg.dry_run else 'removed'}" + (f", {kept} kept in use" if kept else "")
    if cfg.dry_run:
        print(f"would reclaim {human_size(freed)} ({summary}; dry run: nothing removed)")
    else:
        remove_stale_locks(folder)
        print(f"reclaimed {human_size(freed)} ({summary}); {folder} now holds {human_size(sum(i.bytes for i in left))}")
    if failed:
        raise DataError(f"{failed} folder(s) of the cache {folder} could not be removed (see above): check their owner")


def main(cfg: CacheConfig) -> None:
    folder = Path(cfg.cache).expanduser()
    now = time.time()
    try:
        items = list_cache(folder)
    except OSError as e:
        raise ConfigError(f"cache={cfg.cache!r} cannot be read ({e.strerror or e}): give a folder you may read") from e
    if cfg.prune:
        prune(items, folder, cfg, now)
    else:
        print(table(items, folder, now), end="")


CONFIG = CacheConfig

if __name__ == "__main__":
    cli_main(CacheConfig, main, prog="apps.vit.cache")
