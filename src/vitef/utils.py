"""Small shared utilities: atomic writes, output-folder checks, seeding, device selection, precisions, logging setup."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import random
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitef.errors import ConfigError

logger = logging.getLogger(__name__)

# The numeric precisions of every app and library entry point (`precision=`): name -> autocast dtype, or None
# for no autocast (the model's own dtype). This table and TF32_PRECISIONS below are the one place a precision
# is added: validation (check_precision), autocast (autocast_context), the backend flags (precision_scope) and
# the help texts all read them.
#   fp32  strict float32 (the paper's): float32 matmuls and convolutions in full IEEE precision, TF32 off;
#   tf32  float32 weights and activations, float32 matmuls and cuDNN convolutions on TensorFloat-32 tensor cores
#         (CUDA Ampere and later; identical to fp32 on CPU and older GPUs);
#   bf16, fp16  autocast to that dtype (what autocast keeps in float32 stays strict, as under fp32).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# The precisions that let float32 matmuls and convolutions use TensorFloat-32 (the others turn it off).
TF32_PRECISIONS: frozenset[str] = frozenset({"tf32"})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never a half-written file
    (a killed job leaves at most a stray ``.tmp`` file, which is removed on error).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give results the usual permissions (0666 less the umask).
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def check_writable(path: str | os.PathLike, key: str = "root") -> Path:
    """Fail at once, with one clear message, when an app could not write its results under ``path``.

    Apps call this at the start of ``main``, before any compute, so that a read-only output root or a
    file where a folder should be is reported before minutes of work are thrown away. ``path`` is the
    folder the app will create (if needed) and write into. Nothing is created: the first existing
    folder on the way up must accept new files, which is checked by creating and deleting an empty
    probe file there (permission bits alone miss read-only mounts, ACLs and squashed network shares).

    Parameters
    ----------
    path
        The output folder.
    key
        The config key that chose it, named in the message (``root``, ``out_dir``, ...).

    Returns
    -------
    Path
        ``path`` with ``~`` expanded.

    Raises
    ------
    ConfigError
        When ``path`` or one of its ancestors is a file, or the existing ancestor is not writable.
    """
    path = Path(path).expanduser()
    hint = f"choose another {key}"
    existing = path
    try:
        while not existing.exists():  # ends: a relative path reaches ".", an absolute one "/"
            existing = existing.parent
        is_dir = existing.is_dir()
    except OSError as e:  # e.g. a parent folder without search (x) permission
        raise ConfigError(f"cannot write results to '{path}' ({e.strerror}): {hint}") from None
    if not is_dir:
        where = "it is a file" if existing == path else f"'{existing}' is a file"
        raise ConfigError(f"cannot write results to '{path}': {where}, not a folder; {hint} or move that file away")
    error = write_error(existing)
    if error is not None:
        raise ConfigError(f"cannot write results to '{path}': '{existing}' is not writable ({error}); {hint}")
    return path


def write_error(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (``None`` when one can)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".vitef-write-check.", suffix=".tmp", dir=directory)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def safe_name(text: str) -> str:
    """``text`` as one file-name component: ``/`` becomes ``--``, other unsafe characters ``-``."""
    text = str(text).strip().strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._@+=-]", "-", text) or "unnamed"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"`` into ``cuda`` when available (else ``cpu``); validate explicit names."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a valid torch device (use cpu, cuda, cuda:0 or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available on this machine: use device=cpu or device=auto")
    return dev


def check_precision(value: str, key: str = "precision") -> str:
    """``value`` when it names a precision of :data:`PRECISIONS`; else a :class:`ConfigError` naming ``key``.

    Parameters
    ----------
    value
        The precision asked for (``fp32``, ``tf32``, ``bf16``, ``fp16``).
    key
        The config key or argument that holds it, named in the message.
    """
    if value not in PRECISIONS:
        raise ConfigError(f"{key}={value!r} is not a known precision: use one of {', '.join(PRECISIONS)}")
    return value


def autocast_context(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The ``torch.autocast`` context of ``precision`` on ``device`` (a no-op for precisions without autocast).

    Raises :class:`ConfigError` for a precision not in :data:`PRECISIONS`.
    """
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def uses_tf32(precision: str) -> bool:
    """True when ``precision`` lets float32 matmuls and convolutions run on TensorFloat-32 (CUDA only)."""
    return check_precision(precision) in TF32_PRECISIONS


# The per-backend float32 settings of torch >= 2.9 (``torch.backends.<path>.fp32_precision``), parents before
# children: setting a parent also sets its children, so they are restored in this order.
_FP32_PRECISION_PATHS = (
    "cuda.matmul",
    "cudnn",
    "cudnn.conv",
    "cudnn.rnn",
    "mkldnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
)


def _backend(path: str) -> Any:
    return functools.reduce(getattr, path.split("."), torch.backends)


def _read(getter: Any) -> Any:
    """``getter()``, or None when torch refuses to answer (see :func:`_tf32_state`)."""
    try:
        return getter()
    except RuntimeError:
        return None


def _tf32_state() -> dict[str, Any]:
    """Every float32 precision setting this module may change, to restore it afterwards.

    torch >= 2.9 has two APIs for the same switches: the legacy one (``allow_tf32``,
    ``set_float32_matmul_precision``) and per-backend ``fp32_precision`` strings. Code that set only the new one
    can leave the legacy readers raising ("mix of the legacy and new APIs"); such values are saved as None and the
    new-API strings, which can always be read, carry the state instead.
    """
    state: dict[str, Any] = {
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
        "cuda_matmul_allow_tf32": _read(lambda: torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": _read(lambda: torch.backends.cudnn.allow_tf32),
    }
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        state["fp32_precision"] = {path: _backend(path).fp32_precision for path in _FP32_PRECISION_PATHS}
    return state


def _restore_tf32_state(state: dict[str, Any]) -> None:
    """Put back what :func:`_tf32_state` saved: the legacy settings first, then the per-backend strings."""
    if state["float32_matmul_precision"] is not None:
        torch.set_float32_matmul_precision(state["float32_matmul_precision"])
    elif state["cuda_matmul_allow_tf32"] is not None:
        torch.backends.cuda.matmul.allow_tf32 = state["cuda_matmul_allow_tf32"]
    if state["cudnn_allow_tf32"] is not None:
        torch.backends.cudnn.allow_tf32 = state["cudnn_allow_tf32"]
    for path, value in state.get("fp32_precision", {}).items():
        _backend(path).fp32_precision = value


def set_precision_flags(precision: str) -> None:
    """Set the float32 matmul and cuDNN convolution flags of ``precision`` for the whole process.

    ``tf32`` turns TensorFloat-32 on for CUDA matmuls (``torch.get_float32_matmul_precision()`` becomes
    ``"high"``) and cuDNN convolutions; every other precision turns both off (``"highest"``), so ``fp32`` is the
    strict float32 of the paper whatever the process had set before. Only the CUDA switches change: CPU matmuls
    are float32 either way. Prefer :func:`precision_scope`, which restores the previous flags.

    The legacy setters are used on purpose: they keep the legacy readers (``torch.get_float32_matmul_precision``,
    torch.compile's guards) and torch >= 2.9's per-backend ``fp32_precision`` strings in agreement.
    """
    tf32 = uses_tf32(precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        # The legacy cuDNN setter leaves the convolution string at "none" (inherit), which a process-wide
        # torch.backends.fp32_precision = "tf32" would still turn into TF32: name the precision of each op.
        value = "tf32" if tf32 else "ieee"
        for path in ("cuda.matmul", "cudnn.conv", "cudnn.rnn"):
            _backend(path).fp32_precision = value


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[None]:
    """Inside the block, the float32 backend flags of ``precision`` (:func:`set_precision_flags`); the previous
    flags are restored on exit, also on error, so a library call never changes the caller's settings.

    Scopes nest (the inner one wins inside it). Autocast is separate (:func:`autocast_context`): wrap a whole
    training step or evaluation in this scope (the backward pass too), and only the forward in autocast.

    Raises :class:`ConfigError` for a precision not in :data:`PRECISIONS`.
    """
    check_precision(precision)
    saved = _tf32_state()
    try:
        set_precision_flags(precision)
        yield
    finally:
        _restore_tf32_state(saved)


# torch.compile's on-disk cache (Inductor's compiled graphs, and the Triton kernels under it unless
# TRITON_CACHE_DIR says otherwise); read by torch each time it looks for the folder.
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def compile_cache_scope(directory: str | os.PathLike | None, key: str = "compile_cache") -> Iterator[Path | None]:
    """Inside the block, ``torch.compile`` keeps its caches under ``directory`` (nothing changes when empty).

    Torch's default is a folder under the machine's temporary directory, so on a cluster each run that lands on a
    fresh node compiles its graphs from scratch. Pointed at shared storage, the first run of a study compiles and
    the others load its kernels: on this project's 2-core CPU the first step of a compiled 4-block ViT-Tiny took
    38 s with an empty cache and 2.7 s with a filled one. The variable is set back (or removed) on exit, so a
    sweep running apps in-process does not leak it into the next run.

    Raises :class:`ConfigError` (naming ``key``) when the folder cannot be written.
    """
    if not directory:
        yield None
        return
    path = check_writable(directory, key).resolve()
    path.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(COMPILE_CACHE_ENV)
    os.environ[COMPILE_CACHE_ENV] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop(COMPILE_CACHE_ENV, None)
        else:
            os.environ[COMPILE_CACHE_ENV] = saved


def compile_cache_dir() -> str:
    """The folder torch.compile caches into now: :data:`COMPILE_CACHE_ENV`, or torch's default."""
    chosen = os.environ.get(COMPILE_CACHE_ENV)  # read first: importing Inductor sets the variable when unset
    if chosen:
        return chosen
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # torch's own rule, not a copy

    return default_cache_dir()


def precision_flags() -> dict[str, Any]:
    """The float32 backend flags in effect now, as recorded in a run directory (``runtime.json``)."""
    return {
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
        "cuda_matmul_allow_tf32": _read(lambda: torch.backends.cuda.matmul.allow_tf32),
        "cudnn_allow_tf32": _read(lambda: torch.backends.cudnn.allow_tf32),
    }


def runtime_info(device: torch.device | str, precision: str) -> dict[str, Any]:
    """What computes, as recorded beside results: the precision, the float32 flags in effect now (call it inside
    :func:`precision_scope`), the device and the library versions.

    Parameters
    ----------
    device
        The device the computation runs on (``cuda`` without an index: the current CUDA device).
    precision
        A name of :data:`PRECISIONS`.
    """
    import timm  # here, not at module level: utils is imported by everything, timm only by model code

    dtype = PRECISIONS[check_precision(precision)]
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
    else:
        name = platform.processor() or platform.machine()
    return {
        "precision": precision,
        "autocast": str(dtype).removeprefix("torch.") if dtype is not None else None,
        **precision_flags(),
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
    }


def set_console_level(level: int) -> None:
    """Filter what the console handler of :func:`setup_logging` shows; log files are not affected."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_vitef", False):
            handler.setLevel(level)


def setup_logging(level: int = logging.INFO, log_file: str | os.PathLike | None = None) -> None:
    """Configure the root logger once for an entry point: stderr, plus ``log_file`` when given."""
    root = logging.getLogger()
    fmt = logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    console = [h for h in root.handlers if getattr(h, "_vitef", False)]
    if not console:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        handler._vitef = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in console:
        # An entry point run again in-process after sys.stderr was replaced (pytest's capture, a notebook's
        # redirect) logs to the current stream, not to one that may be closed by now.
        if isinstance(handler, logging.StreamHandler) and handler.stream is not sys.stderr:
            with handler.lock:  # not setStream: it flushes the old stream, which raises once that is closed
                handler.stream = sys.stderr
    if log_file is not None:
        log_file = Path(log_file)
        if not any(getattr(h, "baseFilename", None) == str(log_file.resolve()) for h in root.handlers):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
            fh.setFormatter(fmt)
            root.addHandler(fh)
    root.setLevel(level)


class ScheduledGC:
    """Python's garbage collector run every ``period`` steps instead of whenever allocations trigger it.

    An automatic full collection walks every tracked object (tens of milliseconds in a process holding a model,
    a loader and their bookkeeping) at a moment nobody chose; in a training loop it lands inside a step and
    shows as a stall. Inside ``with ScheduledGC(period) as gc_step:`` automatic collection is off, the
    objects alive at entry are moved out of the collector's sight (``gc.freeze``), and ``gc_step(step)``
    collects the young generation every ``period`` steps. On exit the previous state comes back (enabled,
    unfrozen) and one full collection runs. Reference counting still frees almost everything at once; only
    reference cycles wait for the next scheduled collection.
    """

    def __init__(self, period: int = 50):
        if period < 1:
            raise ValueError(f"period={period} must be >= 1")
        self.period = period
        self._was_enabled = True

    def __enter__(self) -> ScheduledGC:
        import gc

        self._was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        return self

    def __call__(self, step: int) -> None:
        if step % self.period == 0:
            import gc

            gc.collect(1)

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        gc.collect()
