"""Checkpoints that resume a run exactly, without pickle.

A step checkpoint is a directory ``step_<N>/`` holding ``model.safetensors`` (the full state dict,
timm names) and ``state.pt`` (optimizer, scheduler, step, RNG states, data position... — tensors,
numbers, strings, lists and dicts only, read back with ``torch.load(weights_only=True)``). The
directory is written under a temporary name and renamed, so a killed save never leaves a
half-written ``step_<N>/``. The best checkpoint ``best/`` holds ``model.safetensors`` (loadable by
``vitef.models.build_model(name, pretrained=path, num_classes=...)``) and ``best.json``.

A process killed mid-write can still leave hidden temporary files (``.<name>.<random>.tmp``, one of
them possibly a full copy of the weights) and, when killed while pruning old checkpoints, a
``step_<N>/`` holding only one of its two files; :func:`remove_leftovers` deletes both kinds when
the run starts again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vitef.errors import CheckpointError
from vitef.utils import atomic_path, atomic_write_json, current_umask

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
BEST_FILE = "best.json"
# What tempfile.mkstemp / mkdtemp name the temporaries of vitef.utils.atomic_path and save_checkpoint:
# ".<target name>.<8 random characters>.tmp".
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_STEP_DIR = re.compile(r"^step_\d+$")


# ---------------------------------------------------------------------------------------------------
# RNG states as tensors and numbers (weights-only loadable)
# ---------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and CUDA generator states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_state[0],
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore :func:`capture_rng`'s states."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has %d CUDA RNG states for %d GPUs: not restored", len(cuda), len(cuda))


# ---------------------------------------------------------------------------------------------------
# Model weights
# ---------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / ``torch.compile`` wrappers (its state dict has timm names)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def save_weights(model: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Save the full state dict (timm names, head included) as safetensors, atomically.

    ``model`` is a module or an already built state dict (e.g. :func:`vitef.adapters.merged_state_dict`).
    """
    weights = model if isinstance(model, Mapping) else unwrap(model).state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load :func:`save_weights`'s file strictly into ``model`` (in place, bit-exact)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights not found: '{path}'")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = f"'{path}' is not a readable safetensors file ({e}); delete it or use overwrite=true"
        raise CheckpointError(msg) from e
    try:
        unwrap(model).load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        msg = f"'{path}' does not fit the model ({first}); did the config change? use overwrite=true"
        raise CheckpointError(msg) from e


# ---------------------------------------------------------------------------------------------------
# Step and best checkpoints
# ---------------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | Path, model: nn.Module | Mapping[str, torch.Tensor], state: dict[str, Any]
) -> Path:
    """Write ``directory`` (e.g. ``checkpoints/step_100``) with the model and ``state``, atomically.

    ``state`` must be weights-only serialisable: tensors, numbers, strings, lists, tuples, dicts.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        # mkdtemp creates 0700 folders; give the checkpoint the permissions of every other folder of the run
        # (0777 less the umask), so that others on a shared machine can read it when the umask allows.
        os.chmod(tmp, 0o777 & ~current_umask())
        save_weights(model, tmp / MODEL_FILE)
        torch.save(state, tmp / STATE_FILE)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def remove_leftovers(run_path: str | Path) -> list[Path]:
    """Delete what killed writes left in a run directory; returns what was deleted.

    - hidden temporaries ``.<name>.<random>.tmp`` (files of :func:`vitef.utils.atomic_path`, folders of
      :func:`save_checkpoint`) anywhere in the run directory;
    - ``checkpoints/step_<N>/`` folders that lack ``model.safetensors`` or ``state.pt`` (a prune killed
      half-way through deleting them; a complete checkpoint is renamed into place whole, so an
      incomplete one can never be resumed from).

    Only call it while no other process writes to the run (at the start of a run that owns it).
    """
    run_path = Path(run_path)
    removed: list[Path] = []
    if not run_path.is_dir():
        return removed
    for folder, dirs, files in os.walk(run_path):
        for name in [*files, *dirs]:
            if _TEMPORARY.match(name):
                removed.append(Path(folder) / name)
        dirs[:] = [d for d in dirs if not _TEMPORARY.match(d)]
    checkpoints = run_path / "checkpoints"
    if checkpoints.is_dir():
        for child in sorted(checkpoints.iterdir()):
            complete = (child / MODEL_FILE).is_file() and (child / STATE_FILE).is_file()
            if _STEP_DIR.match(child.name) and child.is_dir() and not complete:
                removed.append(child)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if removed:
        logger.info("removed %d leftover(s) of interrupted writes in %s", len(removed), run_path)
    return removed


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``state.pt`` of a checkpoint directory with ``torch.load(weights_only=True)``."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint state not found: '{path}'")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or non-weights-only files
        raise CheckpointError(
            f"'{path}' cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "delete that checkpoint directory or use overwrite=true"
        ) from e


def save_best(directory: str | Path, model: nn.Module | Mapping[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write the best checkpoint: ``model.safetensors`` then ``best.json`` (each atomically)."""
    directory = Path(directory)
    save_weights(model, directory / MODEL_FILE)
    atomic_write_json(directory / BEST_FILE, info)


def read_best(directory: str | Path) -> dict[str, Any]:
    """``best.json`` of a best-checkpoint directory."""
    path = Path(directory) / BEST_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"'{path}' not found: the run has no best checkpoint yet") from e
    except ValueError as e:  # invalid JSON, or not even text
        raise CheckpointError(f"'{path}' is not valid JSON ({e}); retrain the run (overwrite=true)") from e
    if not isinstance(info, dict):
        raise CheckpointError(
            f"'{path}' holds {type(info).__name__}, not the best checkpoint's record; retrain the run"
        )
    return info
