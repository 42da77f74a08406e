"""The multi-process side of a training stage (SFT, GRPO under torchrun or accelerate launch).

Every worker runs the same stage command. The launcher sets ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`start` joins the process group before anything is
decided (gloo on CPU, NCCL on GPUs; accelerate and DeepSpeed reuse a group that exists), so
that rank 0 alone can take the stage's resume decision and clear old checkpoints while the
others wait, and then hand the decision to them (:func:`decide`). A plain run (one process)
never touches ``torch.distributed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from facial_r1_core.stage import process_count, process_rank

log = logging.getLogger("facial_r1.distributed")


def active() -> bool:
    """True inside a multi-process launch."""
    return process_count() > 1


def start(use_cpu: bool) -> None:
    """Join the launcher's process group (no-op for one process or when already joined)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() and not use_cpu else "gloo"
    dist.init_process_group(backend=backend)
    log.info(
        "joined the process group: rank %d of %d (%s)",
        dist.get_rank(),
        dist.get_world_size(),
        backend,
    )


def world() -> tuple[int, int]:
    """(rank, world size) of the joined group, or (0, 1)."""
    if not active():
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        return process_rank(), process_count()
    return dist.get_rank(), dist.get_world_size()


def decide(on_rank0: Callable[[], Any]) -> Any:
    """Run ``on_rank0`` on rank 0 only and return its value on every rank.

    An exception on rank 0 is re-raised on every rank (the same type when it can be rebuilt
    from its message), so no worker waits for a decision that never comes.
    """
    if not active():
        return on_rank0()
    import torch.distributed as dist

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", on_rank0())
        except Exception as exc:
            box[0] = ("error", (type(exc), str(exc)))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        cls, message = value
        try:
            raise cls(message)
        except TypeError:
            raise RuntimeError(f"rank 0 failed: {message}") from None
    return value
