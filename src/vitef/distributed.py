"""Multi-process training helpers: torchrun detection, process group, rank-0 helpers, reductions.

The finetuning app of arXiv 2602.06883 reproduction runs unchanged as one process or under
``torchrun --nproc_per_node=N``; everything here degrades to the identity when no process group is
initialised, so callers never branch on the world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from vitef.errors import ConfigError
from vitef.utils import resolve_device

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Read the torchrun environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``); single process otherwise."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistInfo()
    try:
        return DistInfo(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    except ValueError as e:
        raise ConfigError(f"malformed torchrun environment (RANK/LOCAL_RANK/WORLD_SIZE): {e}") from e


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun and pick this process's device.

    NCCL on GPU (``cuda:<local_rank>``), gloo on CPU. Without torchrun: no process group, and the
    device is ``resolve_device(device)``.
    """
    info = env_info()
    dev = resolve_device(device)
    if not info.is_distributed:
        return info, dev
    if dev.type == "cuda":
        if torch.cuda.device_count() <= info.local_rank:
            raise ConfigError(
                f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                "lower --nproc_per_node"
            )
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.debug("process group: backend=%s rank=%d/%d device=%s", backend, info.rank, info.world_size, dev)
    return info, dev


def destroy_distributed() -> None:
    """Tear the process group down (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes, in place, and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over processes, in place, and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip: bool) -> Iterator[None]:
    """``model.no_sync()`` when ``skip`` and ``model`` is DDP: accumulate locally, all-reduce on the last
    micro-batch only."""
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
