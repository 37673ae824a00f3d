"""One strict configuration loader for every app.

Precedence: the app's dataclass defaults < a YAML file given as ``config=path.yaml`` < command-line
``key=value`` pairs (OmegaConf dot-list, e.g. ``optim.lr=1e-2 trainable=[mha,fc1]``). The seed's form
``run --dataset_name cifar10`` is accepted too: a leading ``run`` is the (only) verb and ``--key value``
means ``key=value``.

Config files layer, later wins, merged key by key along the dataclass tree (a list is replaced whole):
``config=[a.yaml,b.yaml]`` merges ``b.yaml`` over ``a.yaml``, and a file may start from others with
``base: paper.yaml`` (or a list), paths relative to that file; a file means its bases merged in order,
then its own keys. Errors name the file a key came from. (Where the app itself has a ``base`` field,
as sweeps do, the key is that field's.)

Every key is checked against the dataclass tree before anything runs: an unknown key names the valid
ones, a wrong type names the key, the expected type and the value. After the merge each dataclass in
the tree that defines ``validate()`` is called once, so value checks (``lr > 0``...) live next to the
fields they check. Fields carry a one-line description in ``metadata["help"]`` (see :func:`option`),
which ``--help`` prints.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vitef.errors import ConfigError, RunStopped, VitefError
from vitef.utils import atomic_write_text, setup_logging

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The seed README's analysis command is `python -m apps.vit.analysis run --dataset_name cifar10`.
SEED_VERBS = ("run",)


class HelpRequested(Exception):
    """Raised by :func:`load_config` when ``-h``/``--help`` is on the command line."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a one-line description shown by ``--help``.

    Mutable defaults (lists, dicts, dataclass instances) are wrapped in a ``default_factory``.
    """
    metadata = {"help": help}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        if dataclasses.is_dataclass(default):
            return dataclasses.field(default_factory=lambda: dataclasses.replace(value), metadata=metadata, **kwargs)
        return dataclasses.field(default_factory=lambda: _copy(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------
# Introspection of the dataclass tree
# ---------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_open_dict(tp: Any) -> bool:
    tp = _strip_optional(tp)
    return tp is dict or typing.get_origin(tp) is dict or tp is Any


def _type_name(tp: Any) -> str:
    tp = _strip_optional(tp)
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check_keys(cls: type, data: Any, prefix: str, source: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``data`` (a nested dict) unknown to ``cls``."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{source}: expected a mapping of keys at {where}, got {type(data).__name__} {data!r}")
    types = _field_types(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types:
            raise ConfigError(_unknown_key_message(full, key, cls, prefix, source))
        tp = _strip_optional(types[key])
        if dataclasses.is_dataclass(tp):
            if value is not None:
                _check_keys(tp, value, f"{full}.", source)


def _unknown_key_message(full: str, key: str, cls: type, prefix: str, source: str) -> str:
    # A key an app used to take: its ``MOVED_KEYS`` says what to write instead.
    moved = getattr(cls, "MOVED_KEYS", {}).get(key) if not prefix else None
    if moved:
        return f"config key '{full}' ({source}) is not an option of this app: {moved}"
    valid = [f.name for f in dataclasses.fields(cls)]
    if not prefix:
        valid += [f"{a} (={t})" for a, t in aliases_of(cls).items()]
    where = f" under '{prefix.rstrip('.')}'" if prefix else ""
    guess = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{guess[0]}'?" if guess else ""
    return f"unknown config key '{full}' ({source}).{hint} Valid keys{where}: {', '.join(valid)}"


def _lookup_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        tp = _strip_optional(tp)
        if not dataclasses.is_dataclass(tp):
            return None
        types = _field_types(tp)
        if part not in types:
            return None
        tp = types[part]
    return tp


def _dotlist_to_nested(pairs: Sequence[tuple[str, str]], cls: type) -> dict:
    """Check CLI keys against ``cls`` and return them as a nested dict of raw (YAML-parsed) values."""
    nested: dict = {}
    for key, raw in pairs:
        parts = key.split(".")
        tp: Any = cls
        for i, part in enumerate(parts):
            tp = _strip_optional(tp)
            if _is_open_dict(tp):
                break
            if not dataclasses.is_dataclass(tp):
                parent = ".".join(parts[:i])
                raise ConfigError(f"config key '{key}' (command line): '{parent}' is a {_type_name(tp)}, not a group")
            types = _field_types(tp)
            if part not in types:
                prefix = ".".join(parts[:i]) + "." if i else ""
                raise ConfigError(_unknown_key_message(key, part, tp, prefix, "command line"))
            tp = types[part]
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # Keep strings that look like other things as strings when the field is a string.
        if _strip_optional(tp) is str and value is not None and not isinstance(value, str):
            value = raw
        # `trainable=mha` means `trainable=[mha]` for list fields.
        if typing.get_origin(_strip_optional(tp)) is list and value is not None and not isinstance(value, list):
            value = [value]
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def split_argv(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], bool]:
    """Split ``argv`` into (``config=`` value as given, [(key, raw value)], help requested).

    The ``config=`` value is one file or a ``[list]`` of them (:func:`parse_config_arg`).

    Accepts ``key=value``, ``config=path``, ``--key value``, ``--key=value`` and a leading seed verb
    (``run``).
    """
    argv = list(argv)
    config_path: str | None = None
    pairs: list[tuple[str, str]] = []
    want_help = False
    i = 0
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        # A leading bare word is a verb: `run` (the seed's analysis form) or the app's `command` field.
        pairs.append(("command", argv[0]))
        i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
            i += 1
            continue
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            else:
                following = argv[i + 1] if i + 1 < len(argv) else None
                if following is None or following.startswith("--") or "=" in following:
                    # A bare flag (`--dry-run`) means true; a non-boolean key rejects it at type checking.
                    key, value = body, "true"
                else:
                    key, value = body, argv[i + 1]
                    i += 1
            key = key.replace("-", "_")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ConfigError(f"unexpected argument '{arg}': arguments are key=value pairs (or config=FILE.yaml)")
        if not key:
            raise ConfigError(f"argument '{arg}' has an empty key")
        if key == "config":
            config_path = value
        else:
            pairs.append((key, value))
        i += 1
    return config_path, pairs, want_help


def read_yaml_file(
    path: str | Path,
    what: str = "config file",
    fix: str = "pass config=PATH to an existing YAML file",
    damaged: str = "",
) -> dict:
    """Read a YAML file that must hold a mapping of keys; every way it can fail is one :class:`ConfigError`.

    Parameters
    ----------
    path
        The file.
    what
        How messages name the file (``"config file"``, ``"base file of sweep 'x'"``).
    fix
        What to do when the file does not exist.
    damaged
        What to do when the file is there but not a readable YAML mapping (a file an app wrote: ``"re-run that
        analysis"``); empty: the messages say what the file must be.

    Raises
    ------
    ConfigError
        Missing, unreadable or binary (not UTF-8 text) file, YAML syntax error, or not a mapping.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} '{path}' is a directory, not a YAML file ({fix})")
    if not p.is_file():
        raise ConfigError(f"{what} not found: '{path}' ({fix})")
    tail = f"; {damaged}" if damaged else ""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        if damaged:  # a file an app wrote, now garbled
            raise ConfigError(f"{what} '{path}' is not valid YAML (not UTF-8 text){tail}") from None
        raise ConfigError(f"{what} '{path}' is not a text file (not UTF-8): give a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{what} '{path}' cannot be read ({e.strerror or e}): check its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())  # one line: PyYAML's message spans several
        raise ConfigError(f"{what} '{path}' is not valid YAML: {detail}{tail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping of keys, got {type(data).__name__}{tail}")
    return data


BASE_KEY = "base"  # in a config file: the file(s) it starts from, relative to it


def parse_config_arg(value: str) -> list[str]:
    """The files of ``config=``: ``a.yaml`` → ``["a.yaml"]``, ``[a.yaml,b.yaml]`` → both, in order.

    Raises
    ------
    ConfigError
        An empty value or a list that is not a list of file names.
    """
    text = value.strip()
    if not text:
        raise ConfigError("config= names no file: write config=FILE.yaml or config=[A.yaml,B.yaml]")
    if not (text.startswith("[") and text.endswith("]")):
        if text.startswith("[") and not Path(text).exists():
            raise ConfigError(f"config={value}: the list is not closed: write config=[A.yaml,B.yaml]")
        return [value]
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise ConfigError(f"config={value} is not a list of YAML files: write config=[A.yaml,B.yaml] (later wins)")
    return [i.strip() for i in items]


def _base_entries(value: Any, path: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and value.strip():
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return [v.strip() for v in value]
    raise ConfigError(
        f"'{BASE_KEY}: {value!r}' in {path} must name a YAML file or a list of them, relative to {path}'s "
        f"folder (e.g. {BASE_KEY}: paper.yaml)"
    )


def takes_base_files(cls: type | None) -> bool:
    """Whether a ``base:`` key in a config file of ``cls`` names files to layer under it.

    It does unless ``cls`` has a field of that name (a sweep's own ``base`` list).
    """
    return cls is None or BASE_KEY not in {f.name for f in dataclasses.fields(cls)}


def config_layers(
    paths: Sequence[str | Path],
    cls: type | None = None,
    *,
    what: str = "config file",
    fix: str = "pass config=PATH to an existing YAML file",
) -> list[tuple[str, dict]]:
    """The ``(source, mapping)`` layers of config files, in merge order (later wins).

    Each file contributes the layers of its ``base:`` files (in order, each resolved the same way), then
    its own keys. The source of a layer names its file and, for a base file, the file that named it, so
    :func:`build_config` names the file an unknown key or a wrong type came from.

    Parameters
    ----------
    paths
        The files, as given (relative to the current directory).
    cls
        The app's config dataclass: when it has a ``base`` field, ``base:`` is that field, not files.
    what, fix
        How messages name a file given in ``paths``, and what to do when it does not exist.

    Raises
    ------
    ConfigError
        A missing or malformed file (named with the file that named it), a bad ``base:`` value, or files
        whose ``base:`` entries form a cycle.
    """
    layered = takes_base_files(cls)
    layers: list[tuple[str, dict]] = []

    def visit(path: str, chain: list[tuple[Path, str]]) -> None:
        key = Path(path).resolve()
        names = [name for k, name in chain]
        if key in [k for k, _ in chain]:
            start = [k for k, _ in chain].index(key)
            cycle = " -> ".join([*names[start:], path])
            raise ConfigError(
                f"config files name each other in a cycle through '{BASE_KEY}': {cycle}: remove one of those "
                f"'{BASE_KEY}' entries"
            )
        if chain:
            parent = names[-1]
            data = read_yaml_file(
                path,
                f"base file of {parent}",
                f"fix '{BASE_KEY}' in {parent}: its paths are relative to that file's folder",
            )
            source = f"in {path}, base of {parent}"
        else:
            data = read_yaml_file(path, what, fix)
            source = f"in {path}"
        if layered and BASE_KEY in data:
            data = dict(data)
            folder = Path(path).parent
            for entry in _base_entries(data.pop(BASE_KEY), path):
                visit(os.path.normpath(folder / Path(entry).expanduser()), [*chain, (key, path)])
        layers.append((source, data))

    for p in paths:
        visit(str(p), [])
    return layers


def _resolve_verb(cls: type, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep a leading verb as ``command=VERB`` when ``cls`` has that field; drop the seed's ``run``."""
    if not pairs or pairs[0][0] != "command":
        return pairs
    has_command = "command" in {f.name for f in dataclasses.fields(cls)}
    verb = pairs[0][1]
    if has_command:
        return pairs
    if verb in SEED_VERBS:
        return pairs[1:]
    raise ConfigError(f"unexpected argument '{verb}': arguments are key=value pairs (or config=FILE.yaml)")


def aliases_of(cls: type) -> dict[str, str]:
    """Short names an app accepts for nested keys, from its ``ALIASES`` class attribute.

    E.g. ``{"lr": "optim.lr", "model_name": "model.name"}`` lets users type the paper's ``lr=1e-2``
    while the value still lives in the sub-config that owns it.
    """
    return dict(getattr(cls, "ALIASES", {}) or {})


def _apply_aliases_pairs(cls: type, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    aliases = aliases_of(cls)
    return [(aliases.get(k, k), v) for k, v in pairs]


def _apply_aliases_dict(cls: type, data: dict) -> dict:
    aliases = aliases_of(cls)
    if not aliases:
        return data
    out: dict = {}
    for key, value in data.items():
        target = aliases.get(key, key)
        parts = target.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' (alias of '{target}') conflicts with another key")
        if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return out


def load_config(cls: type[T], argv: Sequence[str] | None = None, *, prog: str | None = None) -> T:
    """Build an instance of the dataclass ``cls`` from defaults < YAML file(s) < command line.

    ``config=FILE.yaml`` or ``config=[A.yaml,B.yaml]`` (later wins); each file's ``base:`` files come
    under it (:func:`config_layers`).

    Parameters
    ----------
    cls
        The app's config dataclass (sub-configs are nested dataclasses).
    argv
        Command-line arguments (default ``sys.argv[1:]``).
    prog
        Program name for ``--help``.

    Raises
    ------
    HelpRequested
        When ``-h``/``--help`` is present; its ``text`` is the help to print.
    ConfigError
        Unknown key, wrong type, missing or malformed YAML file, a ``base:`` cycle, or a failed
        ``validate()``.
    """
    argv = sys.argv[1:] if argv is None else argv
    config_path, pairs, want_help = split_argv(argv)
    if want_help:
        raise HelpRequested(format_help(cls, prog=prog))
    layers: list[tuple[str, dict]] = []
    if config_path is not None:
        for source, data in config_layers(parse_config_arg(config_path), cls):
            data = _apply_aliases_dict(cls, data)
            _check_keys(cls, data, "", source)
            layers.append((source, data))
    pairs = _resolve_verb(cls, pairs)
    if pairs:
        layers.append(("command line", _dotlist_to_nested(_apply_aliases_pairs(cls, pairs), cls)))
    return build_config(cls, *layers)


def build_config(cls: type[T], *layers: tuple[str, dict] | dict) -> T:
    """Merge plain-dict ``layers`` (later wins) over the defaults of ``cls``, type-check and validate.

    Each layer is a dict or a ``(source description, dict)`` pair; the description is used in errors.
    """
    merged = OmegaConf.structured(cls)
    for layer in layers:
        source, data = layer if isinstance(layer, tuple) else ("overrides", layer)
        data = _apply_aliases_dict(cls, data)
        _check_keys(cls, data, "", source)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        except OmegaConfBaseException as e:
            raise _type_error(cls, e, source) from None
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}' has no value: set it in the YAML file or as {key}=VALUE") from None
    validate(obj)
    return obj  # type: ignore[return-value]


def _type_error(cls: type, e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    tp = _lookup_type(cls, key) if key else None
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    if tp is not None:
        return ConfigError(f"config key '{key}' ({source}) expects {_type_name(tp)}: {msg}")
    return ConfigError(f"invalid config ({source}): {msg}")


def validate(obj: Any) -> None:
    """Call ``validate()`` on every dataclass in the tree, children first."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        validate(getattr(obj, f.name))
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists (for YAML/JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` → ``{"optim.lr": 0.1}``: dotted keys, the form configs are compared in."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def canonical_saved(cls: type, saved: Any) -> Any:
    """A saved ``config.yaml`` mapping as the loader would store it today, to compare with a config built now.

    ``validate()`` stores canonical values (``trainable=[attn]`` is saved as ``[mha]``, a dataset alias as its
    registry name); a run saved before it did, or with another spelling, is the same run. The mapping is
    loaded through ``cls`` (so validated and canonicalised) and dumped back; ``device`` keeps its saved
    value (the machine that reads may lack it). A mapping that no longer loads (a removed key, a value now
    refused) is returned unchanged, so its differences show.
    """
    if not isinstance(saved, dict):
        return saved
    data = {**saved, "device": "auto"} if "device" in saved else saved
    try:
        out = yaml.safe_load(to_yaml(build_config(cls, ("saved config", data))))
    except VitefError:
        return saved
    if "device" in saved:
        out["device"] = saved["device"]
    return out


def to_yaml(cfg: Any) -> str:
    """The config as YAML text, in the same nesting as the dataclass tree."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, to_yaml(cfg))


def format_help(cls: type, prog: str | None = None) -> str:
    """Help text: usage, then every key with its type, default and description."""
    lines = [f"usage: python -m {prog or '<app>'} [config=FILE.yaml | config=[A.yaml,B.yaml]] [key=value ...]", ""]
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc and not doc[0].startswith(cls.__name__ + "("):
        lines += [doc[0].strip(), ""]
    lines.append("Keys (defaults < config=FILE.yaml < key=value; nested keys use dots):")
    rows: list[tuple[str, str]] = []

    def walk(c: type, obj: Any, prefix: str) -> None:
        types = _field_types(c)
        for f in dataclasses.fields(c):
            tp = _strip_optional(types[f.name])
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, value, f"{prefix}{f.name}.")
                continue
            left = f"  {prefix}{f.name}: {_type_name(types[f.name])} = {value!r}"
            rows.append((left, f.metadata.get("help", "")))

    try:
        defaults = cls()
    except TypeError:
        defaults = None
    walk(cls, defaults, "")
    for alias, target in aliases_of(cls).items():
        rows.append((f"  {alias}", f"short for {target}"))
    width = min(max(len(r[0]) for r in rows) + 2, 60)
    for left, desc in rows:
        if len(left) > width - 2:
            lines.append(left)
            lines.append(" " * width + desc)
        else:
            lines.append(left.ljust(width) + desc)
    return "\n".join(lines) + "\n"


def cli_main(
    cls: type[T], main: Callable[[T], Any], argv: Sequence[str] | None = None, prog: str | None = None
) -> None:
    """Entry-point wrapper: parse the config, run ``main(cfg)``, and turn user errors into exit status 2.

    ``--help`` prints the keys and exits 0. A :class:`~vitef.errors.VitefError` prints ``error: <message>``
    on stderr and exits 2; :class:`~vitef.errors.RunStopped` (a run checkpointed and stopped on a signal) prints
    ``stopped: <message>`` and exits ``128 + signal``; any other exception keeps its traceback (it is a bug).
    """
    setup_logging()
    try:
        cfg = load_config(cls, argv, prog=prog)
        main(cfg)
    except HelpRequested as h:
        sys.stdout.write(h.text)
        sys.exit(0)
    except VitefError as e:
        logger.debug("user error", exc_info=True)
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except RunStopped as e:  # a checkpoint is saved: the scheduler sees the signal's conventional exit status
        sys.stderr.write(f"stopped: {e}\n")
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
