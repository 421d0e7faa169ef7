"""Process-group setup for `torchrun` (NCCL on CUDA, gloo on CPU) and small collective helpers."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ssbctl.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and run files."""
        return self.rank == 0


def setup(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group that torchrun describes (if any) and pick this process's device.

    A process that joins the group also registers :func:`teardown` to run at exit: a process
    that ends with the group still alive has gloo's worker threads destroyed during interpreter
    finalization, which aborts it ("terminate called without an active exception", SIGABRT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(teardown)
    return DistInfo(rank, world, local), dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flags: torch.Tensor) -> list[bool]:
    """For each boolean in ``flags``, whether it is true on any rank: the same answer on every rank.

    Reading the answer is one host-device synchronisation, so callers pack every per-step
    decision into one call."""
    value = flags.to(torch.float32)
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average gradients over the ranks in one all_reduce per dtype (DDP's job when its forward
    is bypassed, as gradient accumulation does); a no-op in one process."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def in_group() -> bool:
    """Whether this process has joined a process group (that it has not left yet)."""
    return dist.is_available() and dist.is_initialized()


def teardown() -> None:
    """Leave the process group (if any) while the interpreter is fully alive; safe to call twice."""
    if in_group():
        dist.destroy_process_group()
