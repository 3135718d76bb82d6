"""torch.distributed setup for torchrun (NCCL on CUDA, gloo on CPU); a plain process runs as rank 0 of 1."""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from larp.core.utils import get_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(device=None, timeout_minutes=120):
    """Join the torchrun process group when launched by torchrun; otherwise a single process.

    The timeout is long because rank 0 alone may spend minutes on work the others wait for (token caching).
    """
    device = get_device(device)
    if not launched_by_torchrun():
        return DistInfo(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def dist_info():
    """(rank, world size, local rank) from an initialised process group, else from the torchrun environment:
    ranks that never join a group (sharded sampling) still know their place. A plain process is (0, 1, 0)."""
    if is_dist():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_mean(t):
    """Mean of a tensor over ranks (a copy; the input is unchanged)."""
    t = t.detach().clone()
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def all_reduce_grads(params):
    """Average .grad over ranks for parameters outside DDP (the discriminator); one flat buffer per dtype."""
    if not is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    world = get_world_size()
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in gs:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup():
    if is_dist():
        dist.destroy_process_group()
