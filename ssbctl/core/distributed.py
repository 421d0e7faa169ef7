"""Process-group setup for `torchrun` (NCCL on CUDA, gloo on CPU) and every collective ssbctl uses:
the world, the differentiable global-batch gather, barriers, flag and gradient reductions."""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ssbctl.core.device import resolve_device


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
    dev = resolve_device(device, local_rank=local)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(teardown)
    return DistInfo(rank, world, local), dev


def is_distributed() -> bool:
    """Whether this process is one of several in a process group."""
    return world()[1] > 1


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient and returns this rank's
    slice, so each rank's samples get the gradient of every rank's loss (all_reduce: gloo too)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x (B, ...)`` of every rank concatenated in rank order (the global batch), differentiable."""
    return _GatherWithGrad.apply(x) if world()[1] > 1 else x


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated in rank order, without gradient (ids, counts)."""
    size = world()[1]
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def global_offset(rows: int) -> int:
    """Position of this rank's first row in the global batch."""
    return world()[0] * rows


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
