"""Small ``torch.distributed`` helpers shared by every method.

Every function works unchanged in a single plain process (no ``torchrun``, no process group):
rank 0 of world size 1, reductions and gathers return their input, ``barrier`` does nothing.
Under ``torchrun`` call :func:`init_distributed` once; it reads the usual environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and picks the gloo
backend on CPU and nccl on CUDA. Every method's public entry point that shards work or reduces
over ranks calls it on first use, so a library call under ``torchrun`` needs no set-up; code
that shards by itself must call it first (:func:`shard_range` refuses to guess until then).

Work is split with :func:`shard_range` (contiguous blocks whose sizes differ by at most one),
results are combined with :func:`all_reduce_sum` / :func:`all_gather_cat`, and only rank 0
prints (:func:`rank0_print`) or shows progress bars (:func:`progress`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import sys
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from tyche.errors import InputError

__all__ = [
    "all_gather_cat",
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_",
    "default_device",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "mark_failed",
    "progress",
    "rank0_print",
    "shard_range",
]


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``, else 0.

    Reading ``RANK`` before the group is initialised keeps rank-0-only output single under
    torchrun from the first line on.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed() -> None:
    """Initialise the default process group from ``torchrun`` environment variables.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a group already exists (so it is
    safe to call more than once). Uses nccl when CUDA is available, gloo otherwise, and sets
    the current CUDA device to ``LOCAL_RANK``.
    """
    if not dist.is_available() or dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but the environment lacks {missing}; "
            "start the program with `torchrun --nproc_per_node=N ...`."
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    _watch_for_uncaught_errors()
    atexit.register(_destroy_process_group)


#: how long a normal exit waits for the other ranks before tearing the group down anyway
EXIT_BARRIER_SECONDS = 60

# Set when an exception escapes to the top level: the ranks are then not in step, so the exit
# must not wait for them at a barrier.
_exiting_on_error = False


def mark_failed() -> None:
    """Say that this process is ending on an error it has handled itself (e.g. printed and
    turned into an exit code): the exit then does not wait for the other ranks at a barrier.
    Uncaught exceptions are noticed without it."""
    global _exiting_on_error
    _exiting_on_error = True


def _watch_for_uncaught_errors() -> None:
    previous = sys.excepthook

    def hook(*args: Any) -> None:
        mark_failed()
        previous(*args)

    sys.excepthook = hook


def _destroy_process_group() -> None:
    """Tear the group down, in step with the other ranks, before the interpreter exits.

    A gloo group torn down while its peers are still working, or left for the interpreter's
    finalisation, can abort the process from a C++ destructor ("terminate called without an
    active exception", SIGABRT) after all work is done, which ``torchrun`` reports as a failed
    run. So on a normal exit every rank first meets the others at a barrier (bounded by a
    timeout, so a missing rank delays the exit instead of hanging it), frees what still refers
    to the group, and then destroys it. After an error (uncaught, or declared with
    :func:`mark_failed`) the barrier is skipped.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not _exiting_on_error and dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):  # a rank is gone: nothing to keep in step with
            dist.monitored_barrier(timeout=timedelta(seconds=EXIT_BARRIER_SECONDS))
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def shard_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` should handle.

    Blocks of all ranks partition ``range(n)`` in rank order; their sizes differ by at most
    one (the first ``n % world_size`` ranks get one extra item). A rank may get an empty range
    when ``n < world_size``.

    With ``rank`` or ``world_size`` left out, they are the process group's; under ``torchrun``
    (``WORLD_SIZE`` > 1) without a group, a ``RuntimeError`` says to call
    :func:`init_distributed` first (``RANK`` alone would give this process a block of a
    one-process split).
    """
    if rank is None or world_size is None:
        _require_group("shard_range")
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if n < 0:
        raise InputError(f"shard_range needs n >= 0, got {n}")
    if world_size < 1:
        raise InputError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        _require_group("shard_range")  # e.g. get_rank() and get_world_size() before the group
        raise InputError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return range(start, stop)


def _require_group(caller: str) -> None:
    """Raise when the environment says ``torchrun`` started several processes but no process
    group exists yet (rank and world size would disagree)."""
    if dist.is_available() and dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise RuntimeError(
            f"{caller}: WORLD_SIZE={world_size} (RANK={os.environ.get('RANK', 'unset')}) says "
            "this is one of several processes, but no process group exists; call "
            "tyche.distributed.init_distributed() first"
        )


def _comm_device(t: torch.Tensor) -> torch.device:
    """nccl needs CUDA tensors; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return default_device() if t.device.type != "cuda" else t.device
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``t`` over all ranks (a new tensor, same device/dtype as ``t``).

    Every rank must pass a tensor of the same shape and dtype. Single process: a copy of ``t``.
    """
    if not is_distributed():
        return t.clone()
    buf = t.detach().to(_comm_device(t)).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``t`` from every rank along ``dim``, in rank order.

    Sizes along ``dim`` may differ between ranks (including 0); all other dimensions and the
    dtype must match. The sizes are gathered first, every piece is padded to the largest,
    gathered, and trimmed back. Single process: ``t`` itself.
    """
    if not is_distributed():
        return t
    if t.dim() == 0:
        t = t.reshape(1)
    dim = dim % t.dim()
    device = _comm_device(t)
    world = get_world_size()
    size = torch.tensor([t.shape[dim]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    moved = t.detach().to(device).contiguous()
    if moved.shape[dim] < longest:
        pad_shape = list(moved.shape)
        pad_shape[dim] = longest - moved.shape[dim]
        moved = torch.cat([moved, moved.new_zeros(pad_shape)], dim=dim)
    pieces = [torch.empty_like(moved) for _ in range(world)]
    dist.all_gather(pieces, moved)
    trimmed = [p.narrow(dim, 0, c) for p, c in zip(pieces, counts)]
    return torch.cat(trimmed, dim=dim).to(t.device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def rank0_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (``flush=True`` by default)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    disable: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm progress bar shown on rank 0 only (and not at all when ``disable=True``).

    Iterating it yields the items of ``iterable`` on every rank; ``update``/``close`` work as
    in tqdm. Extra keyword arguments go to tqdm.
    """
    return tqdm(iterable, total=total, desc=desc, disable=disable or get_rank() != 0, **kwargs)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s values (no-op in a single process)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(t)).contiguous()
    dist.broadcast(buf, src=src)
    with torch.no_grad():
        t.copy_(buf.to(t.device))
    return t


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's ``.grad`` by its mean over ranks, in one all-reduce.

    Parameters without a gradient are skipped (every rank must have the same ones). A no-op
    in a single process. With equal per-rank batches this equals one process's gradient of
    the mean loss over the whole batch. The sum runs in the widest dtype among the gradients,
    at least float32 (float64 gradients keep their precision; half-precision ones are summed
    in float32 and rounded once).
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    wide = functools.reduce(torch.promote_types, (g.dtype for g in grads), torch.float32)
    flat = torch.cat([g.detach().reshape(-1).to(wide) for g in grads])
    flat = all_reduce_sum(flat) / get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g).to(g.dtype))
        offset += n
