"""Training across processes and machines on torch.distributed (launched by torchrun).

* ``context``: ``setup_from_env()`` / ``DistContext`` (rank, world size, device, the process
  group; collectives that raise ``DistributedError`` instead of hanging);
* ``sampler``: ``IndexedSampler`` (task j of meta-step t drawn from ``(seed, t, j)``: the same
  tasks whatever the number of ranks);
* ``reducers``: ``MeanReducer`` (default: one all_gather of every rank's flat sum per meta-step,
  added in rank order; ``collective="all_reduce"`` on request) and ``OrderedGather`` (bitwise
  equal to one process given the same per-task updates);
* ``training``: ``distributed_fit`` (``Reptile.fit`` with the sampler, the reducer and the
  ranks' agreement on stopping; rank 0 alone prints and writes).

Importing this package initialises nothing; ``torch.distributed`` is imported only when used.
"""
from .context import DEFAULT_TIMEOUT_S, DistContext, DistributedError, setup_from_env
from .reducers import MeanReducer, OrderedGather, local_mean, make_reducer
from .sampler import DEFAULT_BLOCK_SIZE, IndexedSampler, split_tasks, stream_seed
from .training import distributed_fit

__all__ = ["DistContext", "DistributedError", "setup_from_env", "DEFAULT_TIMEOUT_S", "MeanReducer",
           "OrderedGather", "local_mean", "make_reducer", "IndexedSampler", "split_tasks", "stream_seed",
           "DEFAULT_BLOCK_SIZE", "distributed_fit", "is_main"]


def is_main() -> bool:
    """True unless this is a rank other than 0 of an initialised torch.distributed job (or of a
    torchrun launch, judged from ``RANK``): the process that prints and writes files."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    world = os.environ.get("WORLD_SIZE")
    if world is None or world.strip() == "1":
        # one process, as setup_from_env runs it: a RANK left in the environment (QA82: RANK=3
        # alone) made the CLI print nothing while the job wrote every file
        return True
    return os.environ.get("RANK", "0").strip() in ("", "0")
