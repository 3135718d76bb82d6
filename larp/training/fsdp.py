"""FSDP2 for the generator stage (`train.parallel: fsdp`): `fully_shard` per transformer block, then the root.

Checkpoints stay the single-file format of a DDP run. Every rank takes part in gathering the full model and
optimizer state (torch.distributed.checkpoint.state_dict, full_state_dict + cpu_offload: only rank 0 receives
it), and rank 0 writes `ckpt_latest.pth` atomically as before. The optimizer state is stored with the integer
parameter ids of `optimizer.state_dict()`, so the file has the same layout whichever mode wrote it:
a DDP checkpoint resumes under FSDP and the other way round with no conversion step, `export/` is the same
hub layout, and `sample.py` / `load_generator` read either. The cost is rank 0's CPU memory during a save
(16 bytes per parameter: about 65 GB for NAR-XXXL) and a single writer; per-rank torch.distributed.checkpoint
shards would avoid both but need a conversion before any single-process tool can read a checkpoint.
On resume each rank memory-maps the file (torch.load(mmap=True)), so the ranks of a node share one copy in the
page cache, and keeps only its shard.
Needs torch 2.7: `fully_shard` is public in torch.distributed.fsdp from 2.6 and `load_sharded` uses
distribute_tensor(src_data_rank=None) of 2.7; on an older torch `require` says so in one line.
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from larp.core.errors import LarpError
from larp.core.utils import torch_at_least

try:  # absent before torch 2.5 / 2.6; only train.parallel fsdp needs them (see `require`)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:
    DTensor = None

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, on rank 0's CPU only
SCATTER = StateDictOptions(full_state_dict=True)                   # every rank passes the full dict, keeps its shard


def require():
    """train.parallel fsdp on a torch older than 2.7: one line instead of an ImportError or a late TypeError."""
    if not torch_at_least(2, 7):
        raise LarpError(f"train.parallel: fsdp needs torch>=2.7 (FSDP2); this is torch {torch.__version__}: "
                        "use train.parallel ddp or a newer torch")


def is_shard(tensor):
    """Whether `tensor` is a DTensor, i.e. a shard of a parameter (or its gradient) of a sharded model."""
    return DTensor is not None and isinstance(tensor, DTensor)


def ensure_process_group(device):
    """FSDP needs a process group, also for a single process (plain `python train.py`, torchrun with one rank)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {}
        if backend == "nccl":
            index = device.index if device.index is not None else torch.cuda.current_device()
            kwargs["device_id"] = torch.device("cuda", index)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)


def mixed_precision(amp):
    """train.amp bf16: blocks compute with bf16 weights, gradients are reduced in fp32 (the sharded master
    weights and AdamW moments stay fp32). fp32: no casting. (fp16 is refused by the config check.)"""
    if amp == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_generator(model, amp, device):
    """Shard a larp.models.generator.Generator in place: each transformer block is one FSDP unit (all-gathered just before it
    runs, freed after), the root unit holds the embeddings, position table, norms and heads."""
    require()
    ensure_process_group(device)
    mp = mixed_precision(amp)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


# ---------------------------------------------------------------------------------------------- full state
def full_model_state(model):
    """Full state dict on rank 0 (CPU); {} on the other ranks. Collective."""
    return get_model_state_dict(model, options=GATHER)


def full_optimizer_state(model, optimizer):
    """The optimizer state as `optimizer.state_dict()` of an unsharded model would give it (integer ids in
    param-group order), on rank 0; None elsewhere. Collective."""
    osd = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if dist.get_rank() != 0:
        return None
    ids = {}
    groups = [{**g, "params": [ids.setdefault(name, len(ids)) for name in g["params"]]} for g in osd["param_groups"]]
    return {"state": {ids[name]: s for name, s in osd["state"].items()}, "param_groups": groups}


def load_full_state(model, optimizer, model_sd, optimizer_sd):
    """Load full (unsharded) model and optimizer state dicts, each rank keeping its shard."""
    set_model_state_dict(model, model_sd, options=SCATTER)
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g["params"]]
    fqn = {"state": {order[i]: s for i, s in optimizer_sd["state"].items()},
           "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optimizer_sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, fqn, options=SCATTER)


def full_tensors(sd):
    """{name: full CPU tensor} of a state dict of DTensor shards (e.g. the EMA of a sharded model). Collective:
    every rank gathers each tensor in turn (one full tensor at a time on the device)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in sd.items()}


def load_sharded(shards, full):
    """Copy the full tensors `full` into the matching DTensor shards `shards` (each rank slices its own piece
    of its full copy: no communication)."""
    for k, v in shards.items():
        src = full[k].to(v.device, v.dtype)
        if isinstance(v, DTensor):
            src = distribute_tensor(src, v.device_mesh, v.placements, src_data_rank=None)
        v.copy_(src)
