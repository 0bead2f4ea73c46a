"""Several processes of one training job (``torchrun`` / ``accelerate launch``): who writes, who waits.

A launcher starts one process (rank) per device and says so in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``). Only the main process (rank 0) writes outputs or removes folders; the
others wait for it at a :func:`barrier`. Values one rank decides for all (PIR's weight selection)
travel with :func:`broadcast_object`. Launched without a launcher, every helper here is a no-op
(world size 1, rank 0), and nothing imports torch until a process group is actually needed.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    """Processes in this job (1 unless launched by torchrun / accelerate launch)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    return _env_int("RANK", 0)


def is_main_process() -> bool:
    """Whether this process is the one that writes (global rank 0)."""
    return rank() == 0


def _group_ready() -> bool:
    if world_size() == 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device: str) -> None:
    """Join the launcher's process group now (gloo on the CPU, NCCL on CUDA, as accelerate chooses) and
    bind this rank to its GPU, so a barrier or broadcast can run before the Trainer exists and models
    load on this rank's device. A no-op for a single process or an already joined group.

    accelerate's ``PartialState`` does it so the Trainer, which builds its own state later, finds the
    same group already initialised and reuses it.
    """
    if world_size() == 1 or _group_ready():
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu")


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was asked for FSDP (``distributed_type: FSDP`` in its config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def barrier() -> None:
    """Wait until every rank got here (no-op for a single process)."""
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (pickled; keep tensors on the CPU, or a receiving
    rank would unpickle them onto the sender's GPU). Single process: ``obj`` itself."""
    if not _group_ready():
        return obj
    import torch.distributed as dist

    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
