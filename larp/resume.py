"""Exact resume: the data order, the RNG states, the checkpoints and the checks before resuming.

The global batch b of epoch e is a fixed slice of a permutation drawn from (seed, e); every item's random
crop/flip is drawn from a seed derived from (seed, e, index) (see SeededItems); the loader has its own generator;
evaluation runs under a forked RNG. A restarted run therefore skips the consumed batches of its epoch, restores
the per-rank RNG states and the optimizer, and repeats the uninterrupted run exactly.

Checkpoints are plain dicts: {"model": {"name", "args", "sd"}, "optimizer", "ema", "step", "epoch", "cfg" (plain
data), "rng" (one state per rank)} plus what the stage adds (`stage.state_dict()`): tensors and plain data only, so
they load with torch.load(weights_only=True) (older ones hold numpy RNG arrays: larp/safe_load.py admits those).
Under FSDP the full state is gathered first, so both modes write the same format (see larp/fsdp.py).
"""
import glob
import os
import random
import shutil

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from larp import dist, fsdp
from larp.checkpoint import CheckpointError, check_state_dict, check_weights_file, strip_prefixes
from larp.data.video_io import VideoReadError
from larp.errors import one_line
from larp.io import atomic_save
from larp.optim import EMA
from larp.safe_load import UnsafeFileError, load_torch
from larp.utils import seed_everything

RUN_FILES = ("ckpt_*.pth", "log.txt", "metrics.csv", "config.yaml", "wandb_id.txt", "export", "previews", "wandb")
SKIP_HINT = "set data.skip_bad true to skip unreadable videos (they are counted and reported)"
RESUME_HINT = "pass --replace to start fresh (it deletes this run's checkpoints and logs) or choose another --name"


def item_seed(seed, epoch, index):
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2 ** 63)


class SeededItems(Dataset):
    """Wraps a dataset so item `index` of epoch `epoch` draws its randomness from a seed of (seed, epoch, index),
    whatever worker loads it and wherever the epoch was resumed. Keys are (index, item_seed) pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, s = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % (2 ** 32))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableBatchSampler:
    """Per-rank batches of one epoch: global batch b = perm[b*B:(b+1)*B] of a permutation seeded by (seed, epoch),
    rank r takes its contiguous share; the first `start_batch` batches are skipped (already trained on)."""

    def __init__(self, num_items, global_batch, rank, world, seed, epoch, start_batch=0, shuffle=True):
        self.n, self.B, self.rank, self.world = num_items, global_batch, rank, world
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start_batch, shuffle
        self.per_rank = global_batch // world

    def __len__(self):
        return self.n // self.B - self.start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(item_seed(self.seed, self.epoch, 7)))
        else:
            order = torch.arange(self.n)
        for b in range(self.start, self.n // self.B):
            chunk = order[b * self.B + self.rank * self.per_rank: b * self.B + (self.rank + 1) * self.per_rank]
            yield [(int(i), item_seed(self.seed, self.epoch, int(i))) for i in chunk]


def batches(loader):
    """Iterate `loader`; an unreadable video (possibly raised in a worker process) names the file and the way to
    skip such files instead of the worker's traceback."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except VideoReadError as e:
            raise VideoReadError(f"{one_line(e)}; {SKIP_HINT}") from e
        yield batch


def make_loader(dataset, batch_size, num_workers, seed, info, epoch, start_batch):
    """The loader of epoch `epoch` from its batch `start_batch` on, for this rank."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, info.rank, info.world_size, seed, epoch, start_batch)
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda",
                      generator=torch.Generator().manual_seed(item_seed(seed, epoch, 3)),
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)


# ---------------------------------------------------------------------------------------------- RNG + checkpoints
def capture_rng():
    """This process's RNG states as tensors and plain data (numpy's key as an int64 tensor: no numpy pickles)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss,
                                                       cached), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, cached = state["numpy"]  # key: a tensor, or a uint32 array in older checkpoints
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, stage, ema, cfg, step, epoch, sharded=False):
    """Collect the per-rank RNG states (and under FSDP the full model / optimizer / EMA state; collective), then
    rank 0 writes the plain-dict checkpoint atomically. `cfg` is the config as plain data."""
    rng = dist.all_gather_object(capture_rng())
    raw = stage.model
    if sharded:
        sd, opt = fsdp.full_model_state(raw), fsdp.full_optimizer_state(raw, stage.optimizer)
        ema_sd = fsdp.full_tensors(ema.state_dict()) if ema is not None else None
    if not dist.is_main_process():
        return
    if not sharded:
        sd, opt = strip_prefixes(raw.state_dict()), stage.optimizer.state_dict()
        ema_sd = ema.state_dict() if ema is not None else None
    ckpt = {"model": {"name": stage.model_name, "args": raw.config, "sd": sd}, "optimizer": opt, "ema": ema_sd,
            "step": step, "epoch": epoch, "cfg": cfg, "rng": rng, **stage.state_dict()}
    atomic_save(ckpt, path)


def check_resume(path, cfg, trust=False):
    """Cheap check of the checkpoint a run would resume from: readable (mmap: the tensors are not read) and of
    the stage / model the config `cfg` (plain data) trains. Raises CheckpointError naming the file (UnsafeFileError
    when it needs more than tensors and plain data, unless `trust`: --trust_checkpoint); never modifies it. Returns
    the checkpoint's step."""
    try:
        check_weights_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; cannot resume from it: {RESUME_HINT}") from e
    try:
        ckpt = load_torch(path, trust, mmap=True)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume from it ({one_line(e)}); {RESUME_HINT}") from e
    saved = ckpt.get("cfg") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict) or not isinstance(ckpt.get("model"), dict) or "step" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (expected the keys model, "
                              f"optimizer, step, cfg); {RESUME_HINT}")
    want, have = _trains(cfg), _trains(saved)
    if want != have:
        raise CheckpointError(f"{path}: holds {have} but the config trains {want}; {RESUME_HINT}")
    return ckpt["step"]


def _trains(cfg):
    """'a LARP tokenizer', 'a class-conditional NAR generator (llama-abs-L)', ... for a training config."""
    if cfg.get("stage") == "tokenizer":
        return "a LARP tokenizer"
    m = cfg.get("model", {})
    return (f"a {'frame-prediction' if m.get('frame_prediction') else 'class-conditional'} "
            f"{'NAR' if m.get('order') == 'nar' else m.get('order')} generator ({m.get('name')})")


def load_checkpoint(path, stage, ema, info, sharded=False, trust=False):
    """Restore the model, its optimizer, the EMA, the stage's own state and this rank's RNG (`trust`: see
    check_resume).
    Returns (step, saved cfg, ema): a checkpoint written without EMA starts a new one from the loaded weights."""
    try:  # FSDP: the ranks of a node share one page-cache copy of the file and keep their shards
        ckpt = load_torch(path, trust, mmap=sharded)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume from it ({one_line(e)}); {RESUME_HINT}") from e
    raw = stage.model
    sd = check_state_dict(raw, ckpt["model"]["sd"], source=path)
    if sharded:
        fsdp.load_full_state(raw, stage.optimizer, sd, ckpt["optimizer"])
    else:
        raw.load_state_dict(sd, strict=True)
        stage.optimizer.load_state_dict(ckpt["optimizer"])
    stage.load_state_dict(ckpt, source=path)
    if ema is not None:
        if ckpt.get("ema") is None:
            ema = EMA(raw, ema.decay)
        elif sharded:
            fsdp.load_sharded(ema.state_dict(), ckpt["ema"])
        else:
            ema.load_state_dict(ckpt["ema"])
    rng = ckpt.get("rng") or []
    if len(rng) == info.world_size:
        restore_rng(rng[info.rank])
    else:
        seed_everything(ckpt["cfg"]["seed"] + 7919 * (ckpt["step"] + 1) + info.rank)
    return ckpt["step"], ckpt["cfg"], ema


def clean_run_dir(run_dir):
    """--replace: remove what a previous run wrote (the token cache is kept: it is checked before reuse)."""
    for pattern in RUN_FILES:
        for p in glob.glob(os.path.join(run_dir, pattern)):
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def remove_stale_temps(run_dir):
    """Temp files of writes killed half-way (the targets themselves are always whole)."""
    for p in glob.glob(os.path.join(run_dir, ".tmp_*")):
        os.remove(p)


def export_model(raw, ema, directory, sharded=False):
    """Hub-mixin layout (config.json + model.safetensors), with the EMA weights when EMA is on. Called on every
    rank (under FSDP the full weights are gathered first); rank 0 writes."""
    if sharded:
        own = raw.state_dict()
        sd = fsdp.full_model_state(raw) if ema is None else \
            {k: v.to(own[k].dtype) for k, v in fsdp.full_tensors(ema.state_dict()).items()}
        if dist.is_main_process():
            raw.save_pretrained(directory, state_dict=sd)
        return
    if not dist.is_main_process():
        return
    if ema is None:
        raw.save_pretrained(directory)
        return
    backup = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    raw.load_state_dict(ema.weights_like(raw))
    raw.save_pretrained(directory)
    raw.load_state_dict(backup)
