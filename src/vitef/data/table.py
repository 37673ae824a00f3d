"""The dataset table: one :class:`DatasetEntry` per dataset family, and everything derived from it.

A dataset name is ``<key>`` (a plain entry, e.g. ``cifar10``) or ``<key><sep><argument>`` (an entry with a
``parse`` function, e.g. ``cifar10_c-corruption-snow-severity-5``, ``domainnet-clipart``,
``imagefolder:/data/x``, ``fewshot-10:cifar100``: a task derived from another name), optionally wrapped as
``corrupt:<type>-<1..5>:<name>``. The table is the one
place that knows which names exist; from it come :func:`parse_name`, :func:`canonical_name`,
:func:`num_classes`, the list of valid names and the "did you mean" guesses of error messages, each
family's loader and download source, the split table of :mod:`vitef.data.datasets`, and the order and
labels of datasets in results tables (:func:`dataset_sort_key`, :func:`dataset_label`).

The built-in entries are the table at the end of :mod:`vitef.data.datasets`; other code adds its own with
:func:`register_dataset` (and removes them with :func:`unregister_dataset`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from vitef.errors import DataError

CORRUPT_PREFIX = "corrupt:"
SEPARATORS = ("-", ":")
_KEY_RE = re.compile(r"[a-z][a-z0-9_]*")
# Fields an entry's ``parse`` may return (the rest of a DatasetSpec is set by the table).
_PARSED_FIELDS = ("variant", "corruption", "severity", "applied", "canonical")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset name.

    ``kind`` is the key of its :class:`DatasetEntry` (which loads it); ``variant`` is the entry's parameter
    (a DomainNet domain, a digit subset, a folder path); ``corruption``/``severity`` pick an official
    corrupted file (CIFAR-C, ImageNet-C); ``applied`` lists corruptions computed on the fly (``corrupt:``,
    ``digits_c``). ``name`` is the name as written, ``canonical`` its one canonical spelling.
    """

    name: str
    kind: str
    variant: str | None = None
    corruption: str | None = None
    severity: int | None = None
    applied: tuple[tuple[str, int], ...] = ()
    canonical: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One dataset family: how its name is written, how it loads, how it is shown.

    Parameters
    ----------
    key
        The name (plain entry) or the name's head before ``sep`` (e.g. ``cifar10_c``): lower case letters,
        digits and ``_``.
    load
        ``load(spec, split, *, root, seed, download, **options)`` → ``(source, split indices, num_classes)``:
        the whole pool as an :class:`~vitef.data.base.ImageSource` and the indices of ``split`` in it.
    classes
        Number of classes, or ``classes(spec, root)`` → int when it depends on the name or the data.
    splits
        The split protocol in one sentence (the split table of :mod:`vitef.data.datasets`).
    layout
        Where the files lie under the dataset root (documentation; the loader's errors say it in full).
    source
        Where to get the data (official address, download notes); empty for bundled or user data.
    label
        Its name in results tables (``CIFAR-10``); empty: the dataset name itself.
    order
        Position in results tables (smaller first); ``None``: after all ordered datasets, alphabetically.
    parse
        ``parse(name, argument)`` → dict of :class:`DatasetSpec` fields (``variant``, ``corruption``,
        ``severity``, ``applied``, and ``canonical``: the canonical argument), raising
        :class:`~vitef.errors.DataError` for a bad argument. ``None``: a plain name without argument.
    sep
        What separates ``key`` from the argument: ``-`` or ``:``.
    usage
        How the name is written, as listed in error messages; default: ``key`` or ``key<sep><argument>``.
    examples
        Valid names of this family (tests parse each one; the first is a "did you mean" candidate).
    aliases
        Other spellings of ``key`` that mean this entry (the canonical name uses ``key``).
    load_options
        Keyword arguments of :func:`~vitef.data.build_dataset` that ``load`` also takes (``digits_size``).
    variant
        ``argument`` → ``(table key, label suffix)`` for results tables (e.g. CIFAR-10-C drops the severity:
        ``snow-5`` → ``("snow", "snow")``); default: the argument for both.
    wraps
        For a family whose tasks derive from another dataset name (``fewshot-<k>:<dataset>``): the canonical
        ``argument`` → ``(prefix, wrapped name, label suffix)`` with ``argument == prefix + wrapped name``
        (``"10:cifar100"`` → ``("10:", "cifar100", "10-shot")``). Results tables then show the task as the
        wrapped dataset's label with the suffix (``CIFAR-100 10-shot``), its key built on the wrapped one's
        (``fewshot-10:cifar10_c-snow``), sorted right after it (by prefix, numbers in numeric order); the
        decoded-image cache stores the wrapped pool under the wrapped name (one copy for all its tasks).
    """

    key: str
    load: Callable[..., tuple[Any, Any, int]]
    classes: int | Callable[[DatasetSpec, Path], int]
    splits: str
    layout: str = ""
    source: str = ""
    label: str = ""
    order: float | None = None
    parse: Callable[[str, str], Mapping[str, Any]] | None = None
    sep: str = "-"
    usage: str = ""
    examples: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    load_options: tuple[str, ...] = ()
    variant: Callable[[str], tuple[str, str]] | None = None
    wraps: Callable[[str], tuple[str, str, str]] | None = None

    @property
    def written(self) -> str:
        """How the name is written (``usage`` or its default)."""
        if self.usage:
            return self.usage
        return self.key if self.parse is None else f"{self.key}{self.sep}<argument>"

    def num_classes(self, spec: DatasetSpec, root: Path) -> int:
        return self.classes if isinstance(self.classes, int) else int(self.classes(spec, root))


_ENTRIES: dict[str, DatasetEntry] = {}  # key → entry, in registration order
_HEADS: dict[str, str] = {}  # key or alias → key
_builtins_loaded = False


def _table() -> dict[str, DatasetEntry]:
    """The registered entries, the built-in ones first (registered when :mod:`vitef.data.datasets` loads)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        import vitef.data.datasets  # noqa: F401  (its table registers itself)
    return _ENTRIES


def register_dataset(entry: DatasetEntry, *, replace: bool = False) -> DatasetEntry:
    """Add ``entry`` to the table (``replace``: overwrite an entry with the same key); returns it.

    Raises ``ValueError`` for a key or alias that is malformed or taken, or an ``order`` already used.
    """
    table = _table()
    if not isinstance(entry, DatasetEntry):
        raise TypeError(f"register_dataset takes a DatasetEntry, not {type(entry).__name__}")
    for head in (entry.key, *entry.aliases):
        if not _KEY_RE.fullmatch(head) or head + ":" == CORRUPT_PREFIX:
            raise ValueError(f"dataset key {head!r}: use lower case letters, digits and '_' (not 'corrupt')")
    if entry.sep not in SEPARATORS:
        raise ValueError(f"dataset {entry.key!r}: sep={entry.sep!r} is not one of {SEPARATORS}")
    if not isinstance(entry.classes, int) and not callable(entry.classes):
        raise ValueError(f"dataset {entry.key!r}: classes must be an int or a function (spec, root) -> int")
    if entry.wraps is not None and entry.parse is None:
        raise ValueError(f"dataset {entry.key!r}: an entry that wraps other names needs a parse function")
    others = {k: e for k, e in table.items() if k != entry.key or not replace}
    if entry.key in others:
        raise ValueError(f"dataset {entry.key!r} is already registered (pass replace=True to overwrite it)")
    taken = {head: key for head, key in _HEADS.items() if key in others}
    for head in (entry.key, *entry.aliases):
        if head in taken:
            raise ValueError(f"dataset {entry.key!r}: the name {head!r} already means dataset {taken[head]!r}")
    if entry.order is not None:
        clash = [k for k, e in others.items() if e.order == entry.order]
        if clash:
            raise ValueError(f"dataset {entry.key!r}: order={entry.order} is already the order of {clash[0]!r}")
    if replace and entry.key in table:
        unregister_dataset(entry.key)
    table[entry.key] = entry
    for head in (entry.key, *entry.aliases):
        _HEADS[head] = entry.key
    return entry


def unregister_dataset(key: str) -> DatasetEntry:
    """Remove the entry ``key`` from the table and return it (``KeyError`` when absent)."""
    entry = _table().pop(key)
    for head in [h for h, k in _HEADS.items() if k == key]:
        del _HEADS[head]
    return entry


def dataset_entries() -> tuple[DatasetEntry, ...]:
    """All registered entries, in registration order (built-ins first)."""
    return tuple(_table().values())


def dataset_entry(key: str) -> DatasetEntry:
    """The entry of ``key`` (or one of its aliases)."""
    table = _table()
    if key not in _HEADS:
        raise DataError(f"no dataset entry {key!r}; registered: {', '.join(table)}")
    return table[_HEADS[key]]


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------


def valid_names() -> tuple[str, ...]:
    """How each registered name is written (the list error messages show), ``corrupt:`` last."""
    return tuple(e.written for e in dataset_entries()) + (f"{CORRUPT_PREFIX}<type>-<1..5>:<any name above>",)


def valid_names_message() -> str:
    return "valid names: " + "; ".join(valid_names())


def _guesses() -> list[str]:
    """Candidates of "did you mean": plain names and aliases, and the first example of the other entries."""
    out: list[str] = []
    for e in dataset_entries():
        if e.parse is None:
            out += [e.key, *e.aliases]
        out += list(e.examples[:1])
    return list(dict.fromkeys(out))


def _unknown(name: str, entry: DatasetEntry | None = None) -> DataError:
    """The unknown-name error; ``entry``: the family whose key ``name`` starts with, written wrongly."""
    if entry is not None and entry.parse is not None:
        hint = f" Write {entry.written}."
    else:
        guess = [entry.key] if entry is not None else difflib.get_close_matches(name, _guesses(), n=1)
        hint = f" Did you mean {guess[0]!r}?" if guess else ""
    return DataError(f"unknown dataset {name!r}.{hint} {valid_names_message()}")


def _split_head(name: str) -> tuple[str, str, str]:
    """``name`` → ``(head, separator, argument)`` at the first ``-`` or ``:`` (keys contain neither)."""
    m = re.match(r"([^-:]*)([-:]?)(.*)", name, re.DOTALL)
    return m.group(1).lower(), m.group(2), m.group(3)


def check_applied(name: str, corruption: str) -> None:
    """Raise unless ``corruption`` has an on-the-fly implementation (:mod:`vitef.data.corruptions`)."""
    from vitef.data.corruptions import CORRUPTIONS

    if corruption not in CORRUPTIONS:
        raise DataError(
            f"dataset name {name!r}: corruption {corruption!r} has no on-the-fly implementation; "
            f"implemented: {', '.join(sorted(CORRUPTIONS))}"
        )


def _check_severity(name: str, severity: int) -> None:
    if not 1 <= severity <= 5:
        raise DataError(f"dataset name {name!r}: severity {severity} is not in 1..5")


def parse_name(name: str) -> DatasetSpec:
    """Parse a dataset name (see :func:`valid_names`) or raise a :class:`DataError` listing the valid ones."""
    if not isinstance(name, str) or not name:
        raise DataError(f"dataset name {name!r} is empty; {valid_names_message()}")
    if name[: len(CORRUPT_PREFIX)].lower() == CORRUPT_PREFIX:
        m = re.fullmatch(r"([a-z_]+)-(\d+):(.+)", name[len(CORRUPT_PREFIX) :], re.IGNORECASE | re.DOTALL)
        if m is None:
            raise DataError(f"dataset name {name!r}: write corrupt:<type>-<1..5>:<name>, e.g. corrupt:snow-5:cifar10")
        corruption, severity = m.group(1).lower(), int(m.group(2))
        _check_severity(name, severity)
        check_applied(name, corruption)
        inner = parse_name(m.group(3))
        canonical = f"{CORRUPT_PREFIX}{corruption}-{severity}:{inner.canonical}"
        applied = inner.applied + ((corruption, severity),)
        return dataclasses.replace(inner, name=name, applied=applied, canonical=canonical)
    head, sep, arg = _split_head(name)
    table = _table()
    entry = table.get(_HEADS.get(head, ""))
    if entry is None:
        raise _unknown(name)
    if (entry.parse is None) != (sep == "") or (sep and sep != entry.sep):
        raise _unknown(name, entry)
    if entry.parse is None:
        return DatasetSpec(name, entry.key, canonical=entry.key)
    fields = dict(entry.parse(name, arg))
    unknown = set(fields) - set(_PARSED_FIELDS)
    if unknown:
        raise TypeError(f"dataset {entry.key!r}: parse returned unknown fields {sorted(unknown)}")
    canonical = f"{entry.key}{entry.sep}{fields.pop('canonical', arg)}"
    return DatasetSpec(name, entry.key, canonical=canonical, **fields)


def canonical_name(name: str) -> str:
    """The one canonical spelling of a dataset name (what apps store), or a :class:`DataError`.

    Keys are matched case-insensitively and through aliases; corrupted files are written
    ``<key>-corruption-<type>-severity-<s>``; digit subsets list their digits in order
    (``digits_subset-97865`` → ``digits_subset-56789``). A canonical name is its own canonical name.
    """
    return parse_name(name).canonical


def num_classes(name: str, root: str | Path | None = None) -> int:
    """Number of classes of the task ``name`` (reads the data only for entries that count folders)."""
    from vitef.data.config import resolve_root

    spec = parse_name(name)
    return dataset_entry(spec.kind).num_classes(spec, resolve_root(root))


# ---------------------------------------------------------------------------------------------------------
# Results tables
# ---------------------------------------------------------------------------------------------------------


def _wrapped(name: str) -> tuple[DatasetEntry, str, str, str] | None:
    """``(entry, prefix, wrapped name, label suffix)`` of a name of a ``wraps`` family, else None (leniently:
    a malformed argument is None too)."""
    head, sep, arg = _split_head(str(name))
    entry = _table().get(_HEADS.get(head, ""))
    if entry is None or entry.wraps is None or sep != entry.sep:
        return None
    try:
        prefix, inner, suffix = entry.wraps(arg)
    except DataError:
        return None
    return entry, prefix, inner, suffix


def _table_parts(name: str) -> tuple[DatasetEntry | None, str, str]:
    """``(entry, table key, label)`` of a dataset name, leniently (results may hold partial names such as
    ``cifar10_c-snow``): the entry is None for names the table does not know."""
    wrapped = _wrapped(name)
    if wrapped is not None:
        entry, prefix, inner, suffix = wrapped
        _, inner_key, inner_label = _table_parts(inner)
        return entry, f"{entry.key}{entry.sep}{prefix}{inner_key}", f"{inner_label} {suffix}"
    head, sep, arg = _split_head(str(name))
    entry = _table().get(_HEADS.get(head, ""))
    if entry is None or (entry.parse is None) != (sep == ""):
        return None, str(name), str(name)
    if entry.parse is None:
        return entry, entry.key, entry.label or str(name)
    key_arg, label_arg = entry.variant(arg) if entry.variant else (arg, arg)
    label = f"{entry.label} {label_arg}" if entry.label else str(name)
    return entry, f"{entry.key}{entry.sep}{key_arg}", label


def dataset_table_key(name: str) -> str:
    """The row identity of ``name`` in tables: ``cifar10_c-corruption-snow-severity-5`` → ``cifar10_c-snow``."""
    return _table_parts(name)[1]


def dataset_label(name: str) -> str:
    """The label of ``name`` in tables (``CIFAR-10``, ``C10-C snow``); the name itself when it has none."""
    return _table_parts(name)[2]


def _natural(text: str) -> tuple:
    """``"10:"`` → ``("", 10, ":")``: numbers compare as numbers (``5`` before ``10``)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def dataset_sort_key(name: str) -> tuple:
    """Sort key of results tables: the entries' ``order`` (then table key, then name), then the rest
    alphabetically; a derived task (``wraps``) right after the dataset it derives from."""
    wrapped = _wrapped(name)
    if wrapped is not None:
        entry, prefix, inner, _ = wrapped
        rank, order, key, _, _ = dataset_sort_key(inner)
        return (rank, order, key, (entry.key, _natural(prefix)), str(name))
    entry, key, _ = _table_parts(name)
    if entry is None or entry.order is None:
        return (1, 0.0, str(name), (), str(name))
    return (0, float(entry.order), key, (), str(name))


def order_datasets(names: Iterable[str]) -> list[str]:
    """Distinct ``names`` in table order (:func:`dataset_sort_key`)."""
    return sorted(set(names), key=dataset_sort_key)


# ---------------------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------------------


def split_table(entries: Iterable[DatasetEntry] | None = None, width: int = 110) -> str:
    """The split protocol and on-disk layout of each entry, as an indented list (for docstrings, apps)."""
    lines = []
    for e in dataset_entries() if entries is None else entries:
        classes = f"{e.classes} classes" if isinstance(e.classes, int) else "classes from the name or data"
        written, _, note = e.written.partition(" (")  # "<syntax> (<note>)": the note joins the class count
        text = f"- ``{written}`` ({note.rstrip(')') + '; ' if note else ''}{classes}): {e.splits}"
        if e.layout:
            text += f" Layout: {e.layout}"
        lines.append(textwrap.fill(text, width, subsequent_indent="  ", break_on_hyphens=False))
    return "\n".join(lines)
