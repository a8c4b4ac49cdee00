"""Process group set-up from whatever launched us; a single process gets a world of one.

Every phase takes a `DistContext`, so the same code runs alone, under torchrun, SLURM or Ray Train.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from iak_dist.errors import UserError

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed() -> DistContext:
    """Join (or create) the default process group: gloo on CPU, NCCL on GPU.

    torchrun and Ray Train set RANK / WORLD_SIZE / MASTER_ADDR; SLURM sets SLURM_PROCID and
    SLURM_NTASKS (MASTER_ADDR / MASTER_PORT must then be exported by the launcher). Without any,
    a single-process group on an in-memory store is created (TorchRec's sharding needs one).
    """
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
            owns = True
        else:
            # The single-process group lives as long as the process: DeepSpeed caches its groups on
            # the first default group, so destroying and re-creating it breaks a later engine.
            os.environ.setdefault("LOCAL_WORLD_SIZE", "1")  # TorchRec's topology reads it
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend(), owns)


def close_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run` starting `nproc` ranks of `python -m module args` on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def collective_device() -> torch.device:
    """Where a tensor must live to go through the default process group's collectives.

    Trap: NCCL takes CUDA tensors only (a CPU tensor fails the collective); gloo takes CPU ones.
    The launcher set the rank's CUDA device (`torch.cuda.set_device`) before any collective.
    """
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_main(ctx: DistContext | None, fn: Callable[[], T], share: bool = False) -> T | None:
    """Run `fn` on rank 0 only; its failure is raised on every rank (else the others would wait
    at the next collective forever). With `share`, every rank gets rank 0's (picklable) result."""
    if ctx is None or ctx.world_size == 1:
        return fn()
    result: Any = None
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised below, after the others know)
            failure = exc
    box = [(result if share else None, None if failure is None else
            (isinstance(failure, UserError), str(failure).splitlines()[0] if str(failure) else type(failure).__name__))]
    dist.broadcast_object_list(box, src=0)
    value, failed = box[0]
    if failure is not None:
        raise failure
    if failed is not None:
        is_user, message = failed
        raise UserError(message) if is_user else RuntimeError(f"rank 0 failed: {message}")
    return result if ctx.is_main else value


def sum_over_ranks(values: np.ndarray) -> np.ndarray:
    """`values` summed over every rank, in their own dtype: int64 for counts, float64 for sums of
    losses (sync point: every rank calls it with the same shape and dtype)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    summed = torch.from_numpy(np.ascontiguousarray(values)).to(collective_device())
    dist.all_reduce(summed)
    return summed.cpu().numpy()


def on_every_rank(action: Callable[..., T], *args: Any, what: str = "") -> T:
    """`action(*args)` on this rank; if it fails on any rank, it fails on every rank.

    Sync point: one all-reduce of a flag when every rank succeeds. Each rank reads or writes its own
    files, so a damaged file or a full disk may hit one rank only; the others would wait in the next
    collective until its timeout (30 min). See `raise_on_every_rank` for what each rank raises.
    """
    result, failure = None, None
    try:
        result = action(*args)
    except Exception as exc:  # noqa: BLE001  (raised below, once every rank knows)
        failure = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([failure is not None], dtype=torch.int64, device=collective_device())
        dist.all_reduce(flag)  # sync point
        if flag.item():
            raise_on_every_rank(failure, what)
    if failure is not None:
        raise failure
    return result  # type: ignore[return-value]


def raise_on_every_rank(failure: BaseException | None, what: str = "") -> NoReturn:
    """Called by every rank once some rank failed: the failing ranks raise their own error, the others
    the first failure's line: as it is for a `UserError`; for a storage fault (`OSError`) a
    `UserError` naming the rank (one line, not retried); else a `RuntimeError` naming the rank.
    `what` says what was being done (e.g. the folder written)."""
    line = None
    if failure is not None:
        text = str(failure).strip().splitlines()
        message = text[0] if text else type(failure).__name__
        kind = "user" if isinstance(failure, UserError) else "storage" if isinstance(failure, OSError) else "other"
        line = (kind, message if kind == "user" else f"{type(failure).__name__}: {message}")
    lines: list = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)  # sync point: a few bytes a rank
    if failure is not None:
        raise failure
    rank, (kind, message) = next((r, f) for r, f in enumerate(lines) if f is not None)
    where = f"{what}: rank {rank}" if what else f"rank {rank}"
    if kind == "user":
        raise UserError(message)
    if kind == "storage":
        raise UserError(f"{where}: {message}")
    raise RuntimeError(f"{where} failed: {message}")


def lockstep(batches: Iterator[T], ctx: DistContext, padding: Callable[[], T],
             what: str = "") -> Iterator[tuple[T, bool]]:
    """`(batch, real)` pairs, as many on every rank as the rank with the most batches has.

    A rank that has run out yields a batch it already yielded (or `padding()` if it had none) with
    `real` False: its forward keeps the collectives matched, its output is dropped. A failure
    reading a batch on any rank is raised on every rank (`what`: what was being read, for the others'
    error line).
    """
    last: T | None = None
    while True:
        batch, failure = None, None
        try:
            batch = next(batches, None)
        except Exception as exc:  # noqa: BLE001  (raised below, on every rank)
            failure = exc
        if ctx.world_size > 1:  # sync point: does any rank still have a batch, did any fail
            flags = torch.tensor([batch is not None, failure is not None], dtype=torch.int32,
                                 device=collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            more, failed = (bool(v) for v in flags.tolist())
            if failed:
                raise_on_every_rank(failure, what)
        else:
            if failure is not None:
                raise failure
            more = batch is not None
        if not more:
            return
        if batch is not None:
            last = batch
            yield batch, True
        else:
            last = last if last is not None else padding()
            yield last, False
