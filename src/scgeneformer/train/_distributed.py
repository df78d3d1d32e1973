"""``torch.distributed`` plumbing for training: join or start a process group, collectives."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class Distributed:
    """Where this process stands in a (possibly one-process) training job.

    With ``world_size == 1`` every collective is a no-op, so training code calls them
    unconditionally.

    Attributes
    ----------
    rank, world_size, local_rank
        As torchrun sets them (0, 1, 0 without it).
    device
        The device this process trains on (``cuda:LOCAL_RANK`` under a multi-GPU job).
    owns_group
        Whether :func:`setup_distributed` created the process group (and so destroys it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files."""
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Sum a small vector over all processes; returns it as float64 on the CPU."""
        tensor = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if self.world_size == 1:
            return tensor
        tensor = tensor.to(self._comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu()

    def all_ok(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every process; also a barrier."""
        return bool(self.all_reduce_sum([0.0 if ok else 1.0])[0] == 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T], what: str) -> T | None:
        """Run ``fn`` on rank 0 only, then wait for it; a failure there stops every rank.

        Rank 0 re-raises its own exception; the other ranks raise a :class:`RuntimeError`
        that points to it, instead of waiting forever in the next collective.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as err:  # every rank must learn of any failure, then re-raise
                error = err
        if not self.all_ok(error is None):
            if error is not None:
                raise error
            raise RuntimeError(f"Rank 0 failed while {what}; see its error message.")
        return result

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device: torch.device) -> Distributed:
    """Join the running process group, or start one from torchrun's environment.

    An initialised ``torch.distributed`` group is used as it is. Otherwise, when
    ``WORLD_SIZE`` (set by torchrun) is above 1, a group is started from the ``env://``
    variables, with NCCL for CUDA and gloo for the CPU. On CUDA each process takes GPU
    ``LOCAL_RANK``.

    Parameters
    ----------
    device
        The device asked for (``cuda`` means this process's GPU in a multi-GPU job).

    Returns
    -------
    The :class:`Distributed` description of this process.

    Examples
    --------
    >>> ctx = setup_distributed(torch.device("cpu"))  # no torchrun: one process
    >>> ctx.rank, ctx.world_size
    (0, 1)
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    running = dist.is_available() and dist.is_initialized()
    if not running and env_world <= 1:
        return Distributed(0, 1, 0, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    owns = False
    if not running:
        if not dist.is_available():
            raise RuntimeError(
                f"WORLD_SIZE={env_world} asks for distributed training, but this torch build "
                "has no torch.distributed."
            )
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


__all__ = ["Distributed", "setup_distributed"]
