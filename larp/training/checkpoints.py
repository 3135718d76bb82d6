"""Training checkpoints: save, check before resuming, and load, with the per-rank RNG states.

Checkpoints are plain dicts: {"model": {"name", "args", "sd"}, "optimizer", "ema", "step", "epoch", "cfg" (plain
data), "rng" (one state per rank)} plus what the stage adds (`stage.state_dict()`): tensors and plain data only, so
they load with torch.load(weights_only=True) (older ones hold numpy RNG arrays: larp/core/safe_load.py admits those).
Under FSDP the full state is gathered first, so both modes write the same format (see larp/training/fsdp.py). With the data order of
larp/training/loader.py, evaluation under a forked RNG and the restored RNG states, a resumed run repeats the
uninterrupted one exactly.
"""
import random

import numpy as np
import torch

from larp.core import dist
from larp.core.checkpoint import check_state_dict, check_weights_file, strip_prefixes
from larp.core.errors import CheckpointError, UnsafeFileError, one_line
from larp.core.io import atomic_save
from larp.core.safe_load import load_torch
from larp.core.utils import seed_everything
from larp.training import fsdp
from larp.training.optim import EMA

RESUME_HINT = "pass --replace to start fresh (it deletes this run's checkpoints and logs) or choose another --name"


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


def check_optimizer_groups(optimizer, saved, path):
    """The saved optimizer state has as many parameter groups as `optimizer`: a run begun with every parameter in
    one weight-decay group (optimizer.decay all) resumes only with that rule."""
    have, want = len(saved.get("param_groups", [])), len(optimizer.param_groups)
    if have and have != want:
        names = [g.get("name", "?") for g in saved["param_groups"]]
        rule = "all" if have == 1 else "linear"
        raise CheckpointError(f"{path}: its optimizer state has {have} parameter group(s) {names} but this config "
                              f"gives {want}; resume it with --opts optimizer.decay {rule}")


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
    check_optimizer_groups(stage.optimizer, ckpt["optimizer"], path)
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
