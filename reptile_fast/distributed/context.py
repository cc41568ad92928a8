"""Who this process is in a torch.distributed job, and collectives that fail loudly.

``setup_from_env()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and initialises the default process group: gloo for CPU
training, NCCL for CUDA with one GPU per rank (``cuda:LOCAL_RANK``).  Outside torchrun (or with
``WORLD_SIZE=1``) it returns a one-process context and initialises nothing.  An already
initialised default group (or a group passed to ``DistContext.from_group``) is used as it is.

Every collective goes through ``DistContext``, which turns the backend's failures — a peer that
closed its connection because it died, or no answer within the timeout because it hangs — into a
``DistributedError`` naming the rank, the collective and the likely cause.  Nothing waits longer
than ``timeout`` (the process group's): a job never hangs silently.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, List, Optional, Union

import torch

from ..validation import check_device

__all__ = ["DistContext", "DistributedError", "setup_from_env", "DEFAULT_TIMEOUT_S", "TORCHRUN_VARIABLES"]

#: Seconds a collective (or the rendezvous) may wait for the other ranks before the job stops.
#: Long enough for a slow meta-step or a checkpoint write on rank 0, short enough that a dead or
#: hung rank is noticed within minutes.  ``REPTILE_FAST_DIST_TIMEOUT`` (seconds) overrides it.
DEFAULT_TIMEOUT_S = 300.0

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective between ranks failed or timed out: another rank died, hung or stopped early.

    Attributes:
        rank: this process's rank.
        what: the collective that failed (e.g. "all_reduce of meta-step 12's update").
    """

    def __init__(self, message: str, *, rank: int, what: str):
        super().__init__(message)
        self.rank = rank
        self.what = what


def _check_device(device, check_index: bool = True) -> torch.device:
    """``device`` as a ``torch.device``: TypeError/ValueError naming a bad, unavailable or
    non-cpu/cuda one."""
    return check_device(device, allowed=("cpu", "cuda"), job="distributed training", check_index=check_index)


def _env_int(name: str, minimum: int) -> int:
    text = os.environ.get(name)
    if text is None:
        raise ValueError(f"environment variable {name} is not set; launch with torchrun, which sets "
                         f"{', '.join(TORCHRUN_VARIABLES)}")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _timeout(timeout) -> timedelta:
    if timeout is None:
        text = os.environ.get("REPTILE_FAST_DIST_TIMEOUT")
        if text is None:
            return timedelta(seconds=DEFAULT_TIMEOUT_S)
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"REPTILE_FAST_DIST_TIMEOUT={text!r} is not a number of seconds") from None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):  # numpy's numbers too
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds (a number) or a datetime.timedelta, got {type(timeout).__name__}")
    # timedelta keeps whole microseconds: a smaller timeout would become 0 s
    if not seconds >= 1e-6 or seconds == float("inf"):
        raise ValueError(f"timeout must be a finite number of seconds > 0 (at least 1e-6), got {seconds}")
    return timedelta(seconds=seconds)


@dataclass
class DistContext:
    """This process's place in the job.

    Attributes:
        rank, world_size: as torch.distributed counts them (0 and 1 for one process).
        local_rank: the rank on this machine (picks the GPU with NCCL).
        device: where this rank trains (``cuda:LOCAL_RANK`` with NCCL).
        group: the process group (None for one process: then no collective runs).
        backend: "gloo", "nccl" or None.
        timeout: how long a collective waits for the other ranks.
        owns_group: whether ``close()`` destroys the group (True when ``setup_from_env`` made it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None
    backend: Optional[str] = None
    timeout: timedelta = field(default_factory=lambda: timedelta(seconds=DEFAULT_TIMEOUT_S))
    owns_group: bool = False
    failed: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls, device="cpu") -> "DistContext":
        """One process, no collectives."""
        return cls(device=_check_device(device))

    @classmethod
    def from_group(cls, group=None, *, device=None, timeout=None) -> "DistContext":
        """Use an initialised process group (the default one when ``group`` is None).

        ``device``: where this rank trains; by default, for NCCL, the current CUDA device (the one
        ``torch.cuda.set_device`` chose: ``setup_from_env(device="cuda")`` sets ``cuda:LOCAL_RANK``),
        else the CPU; "cuda" without an index means the current CUDA device too.
        ``timeout`` only labels error messages here: the group's own timeout applies.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("torch.distributed has no initialised default process group; call "
                             "setup_from_env() (under torchrun) or dist.init_process_group first")
        # new_group hands the processes outside it a marker (GroupMember.NON_GROUP_MEMBER), not a group
        outside = group is dist.GroupMember.NON_GROUP_MEMBER
        if not outside and group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup (e.g. from dist.new_group) or None "
                            f"for the default group, got {type(group).__name__}")
        if outside or dist.get_rank(group) < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group: only "
                             f"the group's ranks can train on it")
        backend = str(dist.get_backend(group))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(rank=dist.get_rank(group), world_size=dist.get_world_size(group), local_rank=local_rank,
                   device=torch.device(device), group=group if group is not None else dist.group.WORLD,
                   backend=backend, timeout=_timeout(timeout), owns_group=False)

    # ------------------------------------------------------------------ facts
    @property
    def is_main(self) -> bool:
        """True on rank 0: the one rank that prints and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"rank {self.rank} of {self.world_size}" + (f" ({self.backend}, {self.device})"
                                                             if self.backend else ""))

    # ------------------------------------------------------------------ collectives
    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.failed:
            raise DistributedError(f"{self.describe()}: {what} not attempted: an earlier collective of this "
                                   f"job failed and the process group is unusable", rank=self.rank, what=what)
        try:
            return fn()
        except DistributedError:
            raise
        except (RuntimeError, ConnectionError) as exc:  # DistBackendError is a RuntimeError
            # gloo: "Connection closed by peer" (a rank died) / "Timed out waiting ..." (a rank
            # hangs); NCCL: the watchdog's timeout or a remote error.  Name the situation.
            self.failed = True
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DistributedError(
                f"{self.describe()}: {what} did not complete: another rank died, hung (no answer within "
                f"the {self.timeout.total_seconds():g} s timeout) or stopped early; this rank stops too. "
                f"Rank 0's last checkpoint, if any, is intact. Cause: {cause}",
                rank=self.rank, what=what) from exc

    def all_reduce_(self, tensor: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
        """Sum (or max) ``tensor`` over ranks in place; returns it."""
        if not self.is_distributed:
            return tensor
        import torch.distributed as dist

        red = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self._run(what, lambda: dist.all_reduce(tensor, op=red, group=self.group))
        return tensor

    def all_gather(self, tensor: torch.Tensor, what: str) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if not self.is_distributed:
            return [tensor]
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run(what, lambda: dist.all_gather(out, tensor.contiguous(), group=self.group))
        return out

    def any(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` is true on any rank (the same answer on every rank)."""
        if not self.is_distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_(t, what, op="max").item() > 0)

    def all_gather_object(self, obj: Any, what: str) -> List[Any]:
        """Every rank's ``obj`` (pickled; small things), in rank order."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        self._run(what, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def broadcast_object(self, obj: Any, what: str, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (pickled; use for small things)."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        kwargs = {"device": self.device} if self.backend == "nccl" else {}
        root = self._global_rank(src)
        self._run(what, lambda: dist.broadcast_object_list(box, src=root, group=self.group, **kwargs))
        return box[0]

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module, what: str, src: int = 0) -> None:
        """Copy ``module``'s parameters and buffers from rank ``src`` to every rank, in place."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        tensors = [t for t in list(module.parameters()) + list(module.buffers())]
        if not tensors:
            return
        # One flat buffer per dtype: one collective each, whatever the number of tensors.
        root = self._global_rank(src)
        by_dtype = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self.device)
            self._run(what, lambda: dist.broadcast(flat, src=root, group=self.group))
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view_as(t))
                offset += n

    def _global_rank(self, rank: int) -> int:
        """``rank`` of this context's group as torch.distributed's global rank (what ``src`` of a
        broadcast means): the same number in the default group, another in a subgroup."""
        import torch.distributed as dist

        if self.group is None or self.group is dist.group.WORLD:
            return rank
        return dist.get_global_rank(self.group, rank)

    def barrier(self, what: str) -> None:
        """Wait for every rank.  With gloo, ``monitored_barrier`` names the ranks that did not come."""
        if not self.is_distributed:
            return
        import torch.distributed as dist

        if self.backend == "gloo":
            self._run(what, lambda: dist.monitored_barrier(group=self.group, timeout=self.timeout,
                                                           wait_all_ranks=True))
        else:
            self._run(what, lambda: dist.barrier(group=self.group))

    def close(self) -> None:
        """Destroy the process group if this context made it (safe to call twice, or after a failure)."""
        if not self.owns_group:
            return
        import torch.distributed as dist

        self.owns_group = False
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group must not hide the real error
                pass

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: default groups this process has made (``setup_from_env``): each gets its own store prefix
_GROUPS_MADE = 0


def setup_from_env(*, device: Union[str, torch.device, None] = None, timeout=None,
                   backend: Optional[str] = None) -> DistContext:
    """The context of this process, from torchrun's environment.

    * a default process group already initialised: use it;
    * ``WORLD_SIZE`` > 1 in the environment (torchrun): initialise the default group with
      ``backend`` (default: "nccl" when ``device`` is CUDA, else "gloo") and ``timeout``
      (seconds or timedelta; default ``DEFAULT_TIMEOUT_S`` or ``REPTILE_FAST_DIST_TIMEOUT``).
      With CUDA, rank ``r`` trains on ``cuda:LOCAL_RANK``;
    * otherwise: one process (``world_size`` 1), nothing initialised.

    ``device``: "cpu" or "cuda" (a CUDA index is replaced by ``LOCAL_RANK`` under torchrun).
    Raises ``ValueError`` naming a missing or malformed variable, or a ``LOCAL_RANK`` without a GPU.
    """
    import torch.distributed as dist

    # under torchrun a CUDA index is replaced by LOCAL_RANK: only the type must be available here
    dev = _check_device(device, check_index=False) if device is not None else torch.device("cpu")
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if dist.is_available() and dist.is_initialized():
        ctx = DistContext.from_group(None, device=None if device is None else dev, timeout=timeout)
        return ctx
    world = os.environ.get("WORLD_SIZE")
    if world is None or world.strip() == "1":
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", 0)
        return DistContext(device=dev, timeout=_timeout(timeout))
    if not dist.is_available():
        raise ValueError("WORLD_SIZE is set but this torch build has no torch.distributed")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if rank >= world_size:
        raise ValueError(f"RANK={rank} must be < WORLD_SIZE={world_size}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"environment variable {name} is not set; launch with torchrun")
    td = _timeout(timeout)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                             f"start at most that many processes per node (--nproc_per_node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif backend == "nccl":
        raise ValueError("the NCCL backend needs device cuda; use gloo for CPU training")
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    global _GROUPS_MADE
    try:
        # The rendezvous store of torchrun's environment, under a prefix of its own for each group
        # this process makes: torch names every new default group alike, so a second job in the
        # same processes (a group made again after the first job's close) read the first group's
        # stale addresses from the store when one rank got there first, and hung or failed
        # (QA45).  Every rank makes its groups in the same order, so the prefixes agree.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=td))
        store = dist.PrefixStore(f"reptile_fast/group{_GROUPS_MADE}/", store)
        _GROUPS_MADE += 1
        dist.init_process_group(backend=backend, timeout=td, rank=rank, world_size=world_size, store=store,
                                **kwargs)
    except (RuntimeError, ConnectionError) as exc:  # DistStoreError, DistNetworkError: RuntimeErrors
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(
            f"rank {rank} of {world_size}: could not join the job at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} ({backend}) within {td.total_seconds():g} s: another process did not "
            f"start, or the address is wrong. Cause: {cause}", rank=rank, what="init_process_group") from exc
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                       group=dist.group.WORLD, backend=backend, timeout=td, owns_group=True)
