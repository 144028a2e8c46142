"""The collectives the training loop takes part in, and the DDP options it wraps the model with.

Each works unchanged without a process group (one process), so the loop and the tests run the same code on one
worker and on many. Every rank must reach each call: they are the points where the ranks wait for one another.
"""

from __future__ import annotations

from typing import Any

import torch


def all_reduce_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (itself when not distributed)."""
    import torch.distributed as dist

    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def ddp_kwargs() -> dict[str, bool]:
    """No buffer sync inside forward: BERT's position_ids buffer would be broadcast there, which raises an
    in-place-modification error on the second forward pass of a step (sentence-transformers turns it off too).
    torch 2.13 renamed the option; all ranks load the same weights, so the sync at wrap time is harmless."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
