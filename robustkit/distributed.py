"""Multi-process runs on ``torch.distributed``, as launched by ``torchrun``.

``torchrun --nproc-per-node N -m robustkit attack|run|train …`` starts N copies of the command,
each with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment. :func:`init` notices
the launch, joins the process group (``gloo`` on CPU, ``nccl`` on CUDA, where rank ``r`` of a
node uses ``cuda:LOCAL_RANK``) and returns a :class:`Context`; without such a launch it returns
None and everything runs in one process, exactly as before.

How the work is split:

* **evaluation** (:func:`robustkit.evaluation.evaluate` with ``dist=``): every rank holds the
  whole split; within each (attack, ε) cell the batches the single-process engine would form are
  dealt out in contiguous runs to the ranks (:func:`shard`), and the per-sample outcomes are
  gathered onto every rank after the cell. Every batch is the same batch the one-process run
  attacks, so the results are bitwise equal to it (see ``evaluation.py``); rank 0 writes files.
* **training** (:func:`robustkit.training.train` with ``dist=``): the model is wrapped in
  ``DistributedDataParallel``; each global batch (a slice of the seeded permutation, the same on
  every rank) is cut into ``WORLD_SIZE`` contiguous pieces, one per rank; rank 0 writes
  checkpoints, metrics and resume state.

Nothing here picks a device by itself: the device comes from the usual ``auto|cpu|cuda|cuda:N``
choice (:func:`robustkit.runtime.resolve_device`), mapped to the rank's own GPU under torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from robustkit.errors import RobustkitError
from robustkit.runtime import resolve_device

T = TypeVar("T")

#: Environment variables torchrun sets in every process it starts.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 3600.0  # rank 0 may write reports while the others wait at a collective


@dataclass(frozen=True)
class Context:
    """This process's place in the group: global rank, number of processes, its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for collectives must live: the GPU for nccl, else the CPU."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


_CONTEXT: Context | None = None
_OWNS_GROUP = False


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RobustkitError(f"${name} is not set: start the command with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise RobustkitError(f"${name}={value!r} is not an integer: start with torchrun") from None


def launched() -> bool:
    """True when this process was started by torchrun (or alike) with more than one process."""
    return "RANK" in os.environ and _env_int("WORLD_SIZE", 1) > 1


def current() -> Context | None:
    """The context :func:`init` created, or None in a single-process run."""
    return _CONTEXT


def is_main() -> bool:
    """True in rank 0 and in single-process runs: the process that writes files and prints."""
    return _CONTEXT is None or _CONTEXT.is_main


def rank_device(spec: str | torch.device, local_rank: int, local_world: int) -> torch.device:
    """The device of one process: ``auto``/``cuda`` → ``cuda:LOCAL_RANK``; ``cpu`` stays."""
    text = str(spec).strip().lower()
    base = resolve_device(spec)
    if base.type == "cpu":
        return base
    if base.type != "cuda":
        raise RobustkitError(f"device {spec!r} is not supported with several processes: use "
                             "cpu or cuda")
    if ":" in text:  # an explicit cuda:N
        if local_world > 1:
            raise RobustkitError(
                f"--device {spec} with {local_world} processes per node would put them all on "
                "one GPU: pass --device cuda (or auto) and each process uses cuda:LOCAL_RANK"
            )
        return base
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RobustkitError(
            f"local rank {local_rank} has no GPU: this node has {count} CUDA device(s); start "
            f"at most {count} processes per node (--nproc-per-node {count})"
        )
    return torch.device("cuda", local_rank)


def init(device: str | torch.device = "auto", *, backend: str | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> Context | None:
    """Join the process group when launched by torchrun; return None otherwise.

    The backend is ``nccl`` when the rank's device is a GPU, else ``gloo``. Calling it again
    returns the same context. A process group the caller initialised already is adopted.
    """
    global _CONTEXT, _OWNS_GROUP
    if _CONTEXT is not None:
        return _CONTEXT
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return None
    if not dist.is_available():
        raise RobustkitError("this torch build has no torch.distributed: run one process")
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    target = rank_device(device, local_rank, local_world)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if dist.is_initialized():
        chosen = str(dist.get_backend())
    else:
        chosen = backend or ("nccl" if target.type == "cuda" else "gloo")
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
        _OWNS_GROUP = True
    _CONTEXT = Context(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=local_rank, device=target, backend=chosen)
    return _CONTEXT


def setup(device: str | torch.device = "auto") -> tuple[torch.device, Context | None]:
    """This process's device and context: ``init`` under torchrun, else the plain device."""
    ctx = init(device)
    return (ctx.device, ctx) if ctx is not None else (resolve_device(device), None)


def cleanup() -> None:
    """Leave the process group (if robustkit joined it); safe to call more than once."""
    global _CONTEXT, _OWNS_GROUP
    if _OWNS_GROUP and dist.is_available() and dist.is_initialized():
        # every rank reaches this point before the group goes: tearing gloo down while a peer
        # still has work in flight aborts the process ("terminate called without an exception")
        with contextlib.suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()
    _CONTEXT, _OWNS_GROUP = None, False


# --------------------------------------------------------------------------- splitting work


def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous part of ``range(n)`` that ``rank`` of ``world`` owns.

    Parts differ in length by at most one (the first ``n % world`` ranks get one more), cover
    ``range(n)`` in rank order and depend only on ``(n, rank, world)``.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if n < 0:
        raise ValueError(f"cannot shard {n} items")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def batch_shard(n: int, batch_size: int, rank: int, world: int) -> slice:
    """Like :func:`shard`, but cut only at multiples of ``batch_size``: each rank gets whole
    batches of the single-process batching ``[0, b), [b, 2b), …``, so the batches are the same."""
    n_batches = -(-n // batch_size)
    part = shard(n_batches, rank, world)
    return slice(min(part.start * batch_size, n), min(part.stop * batch_size, n))


# --------------------------------------------------------------------------- collectives


def all_gather_object(obj: T, ctx: Context | None) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a context)."""
    if ctx is None:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: T, ctx: Context | None) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    if ctx is None:
        return [obj]
    if ctx.backend == "nccl":  # gather_object is not supported by every backend: gather to all
        gathered = all_gather_object(obj, ctx)
        return gathered if ctx.is_main else None
    out: list[Any] | None = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: T, ctx: Context | None) -> T:
    """Rank 0's ``obj`` on every rank (tensors inside should be on the CPU)."""
    if ctx is None:
        return obj
    box: list[Any] = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])  # rank 0's obj, pickled across: the type is lost on the way


def all_gather_tensor(tensor: Tensor, ctx: Context | None) -> list[Tensor]:
    """Every rank's tensor in rank order; lengths along dim 0 may differ (padded in transit)."""
    if ctx is None:
        return [tensor]
    comm = ctx.comm_device
    local = tensor.to(comm)
    length = torch.tensor([local.shape[0]], device=comm, dtype=torch.long)
    lengths = [torch.zeros_like(length) for _ in range(ctx.world)]
    dist.all_gather(lengths, length)
    sizes = [int(s.item()) for s in lengths]
    longest = max(sizes)
    padded = torch.zeros((longest, *local.shape[1:]), device=comm, dtype=local.dtype)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    return [p[:s].to(tensor.device) for p, s in zip(parts, sizes, strict=True)]


def all_reduce_sum(values: Sequence[float], ctx: Context | None) -> list[float]:
    """Element-wise sums over ranks (float64)."""
    if ctx is None:
        return [float(v) for v in values]
    buffer = torch.tensor(list(values), dtype=torch.float64, device=ctx.comm_device)
    dist.all_reduce(buffer)
    return [float(v) for v in buffer.cpu()]


def agree(flag: bool, ctx: Context | None) -> bool:
    """Rank 0's ``flag`` on every rank: for decisions taken on one clock (e.g. "save now")."""
    if ctx is None:
        return flag
    buffer = torch.tensor([int(flag)], dtype=torch.int32, device=ctx.comm_device)
    dist.broadcast(buffer, src=0)
    return bool(buffer.item())


def barrier(ctx: Context | None) -> None:
    if ctx is not None:
        dist.barrier()


def on_main(fn: Callable[[], T], ctx: Context | None) -> T:
    """Run ``fn`` on rank 0 only and hand its result to every rank.

    A :class:`RobustkitError` raised by ``fn`` is raised on every rank, so no rank is left
    waiting at a collective for a rank that stopped.
    """
    if ctx is None:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except RobustkitError as exc:
            outcome = ("error", str(exc))
    kind, value = broadcast_object(outcome, ctx)
    if kind == "error":
        raise RobustkitError(value)
    return cast(T, value)  # fn's result on rank 0 (the outcome's type is lost in broadcast)


def local_first(fn: Callable[[], T], ctx: Context | None) -> T:
    """Run ``fn`` on each node's local rank 0 first, then on the other ranks.

    For work that may fill a per-node cache (the data download): one process per node does it,
    the others find the files in place.
    """
    if ctx is None:
        return fn()
    value = fn() if ctx.local_rank == 0 else None
    dist.barrier()
    return value if ctx.local_rank == 0 else fn()  # type: ignore[return-value]


def wrap(model: nn.Module, ctx: Context | None) -> nn.Module:
    """``DistributedDataParallel(model)`` on the rank's device; the model itself without one."""
    if ctx is None:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


__all__ = [
    "Context", "agree", "all_gather_object", "all_gather_tensor", "all_reduce_sum", "barrier",
    "batch_shard", "broadcast_object", "cleanup", "current", "gather_object", "init", "is_main",
    "launched", "local_first", "on_main", "rank_device", "setup", "shard", "wrap",
]
