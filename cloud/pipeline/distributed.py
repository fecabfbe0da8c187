"""Multi-process training under ``torchrun``: who am I, which device, how to agree.

``torchrun`` (or ``python -m torch.distributed.run``) starts one process per
GPU (or per CPU slot) and tells each its place through the environment. The
entry point reads it once (``from_env``); everything below takes the plain
``DistContext``. One process without those variables is simply world size 1:
no process group, the same code path otherwise.

Backends: NCCL when CUDA is present (with mixed precision in the loop), gloo
on CPU. Only rank 0 writes checkpoints, the ONNX file and progress.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import InvalidInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @property
    def backend(self) -> str:
        return "nccl" if torch.cuda.is_available() else "gloo"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DistContext:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them."""
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise InvalidInputError(f"bad torchrun environment: {exc}") from exc
        if world < 1 or not 0 <= rank < world:
            raise InvalidInputError(f"bad torchrun environment: rank {rank} of {world}")
        return cls(rank=rank, world_size=world, local_rank=local)


@contextmanager
def process_group(ctx: DistContext) -> Iterator[None]:
    """Join the process group for the run (world size 1: nothing to join)."""
    if not ctx.distributed:
        yield
        return
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend=ctx.backend)
    logger.info("rank %d/%d joined (%s)", ctx.rank, ctx.world_size, ctx.backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sum_across(ctx: DistContext, total: float, count: int) -> tuple[float, int]:
    """``(sum(total), sum(count))`` over all ranks; a collective: every rank must call it."""
    if not ctx.distributed:
        return total, count
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t[0]), round(float(t[1]))


def mean_across(ctx: DistContext, total: float, count: int) -> float:
    """``sum(total) / sum(count)`` over all ranks (just ``total / count`` alone)."""
    total, count = sum_across(ctx, total, count)
    return total / max(count, 1)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
