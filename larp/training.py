"""The training loop shared by both stages: data order, checkpoints, exact resume, logging, evaluation, export.

Exact resume: the global batch b of epoch e is a fixed slice of a permutation drawn from (seed, e); every
item's random crop/flip is drawn from a seed derived from (seed, e, index) (see SeededItems); the loader has
its own generator; evaluation runs under a forked RNG. A restarted run therefore skips the consumed batches
of its epoch, restores the per-rank RNG states and the optimizer, and repeats the uninterrupted run exactly.
"""
import glob
import os
import random
import shutil
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from larp import dist, engine, fsdp
from larp.ar import generator_from_state
from larp.checkpoint import CheckpointError, atomic_save, atomic_write_text, check_state_dict, strip_prefixes
from larp.config import dump_yaml
from larp.logger import RunLogger
from larp.utils import seed_everything

RUN_FILES = ("ckpt_*.pth", "log.txt", "metrics.csv", "config.yaml", "wandb_id.txt", "export", "previews", "wandb")


# ---------------------------------------------------------------------------------------------- data order
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


def make_loader(dataset, cfg, info, epoch, start_batch):
    sampler = ResumableBatchSampler(len(dataset), cfg["batch_size"], info.rank, info.world_size, cfg["seed"],
                                    epoch, start_batch)
    workers = cfg["data"]["num_workers"]
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=workers,
                      pin_memory=info.device.type == "cuda", generator=torch.Generator().manual_seed(item_seed(cfg["seed"], epoch, 3)),
                      persistent_workers=False, prefetch_factor=4 if workers > 0 else None)


# ---------------------------------------------------------------------------------------------- RNG + checkpoints
def capture_rng():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model):
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def save_checkpoint(path, run, cfg, step, epoch):
    """Collect the per-rank RNG states (and under FSDP the full model / optimizer / EMA state; collective), then
    rank 0 writes the plain-dict checkpoint atomically. Both modes write the same format (see larp/fsdp.py)."""
    rng = dist.all_gather_object(capture_rng())
    raw = run["raw_model"]
    if run.get("fsdp"):
        sd, opt = fsdp.full_model_state(raw), fsdp.full_optimizer_state(raw, run["optimizer"])
        ema = fsdp.full_tensors(run["ema"].state_dict()) if run["ema"] is not None else None
    if not dist.is_main_process():
        return
    if not run.get("fsdp"):
        sd, opt = strip_prefixes(raw.state_dict()), run["optimizer"].state_dict()
        ema = run["ema"].state_dict() if run["ema"] is not None else None
    ckpt = {"model": {"name": run["model_name"], "args": raw.config, "sd": sd},
            "optimizer": opt, "scaler": run["scaler"].state_dict(), "ema": ema,
            "step": step, "epoch": epoch, "cfg": cfg, "rng": rng}
    if "loss_fn" in run:  # tokenizer: discriminator + LeCam EMAs (the frozen LPIPS net is rebuilt, not stored)
        ckpt["loss"] = {k: v for k, v in run["loss_fn"].state_dict().items() if not k.startswith("lpips.")}
        ckpt["disc_optimizer"] = run["disc_optimizer"].state_dict() if run["disc_optimizer"] else None
        ckpt["disc_scaler"] = run["disc_scaler"].state_dict()
    atomic_save(ckpt, path)


def load_checkpoint(path, run, info):
    """Restore model/optimizer/scaler/EMA (+ discriminator) and this rank's RNG; returns (step, saved cfg)."""
    sharded = run.get("fsdp")
    try:  # FSDP: the ranks of a node share one page-cache copy of the file and keep their shards
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=bool(sharded))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume from it ({e}); pass --replace to start fresh") from e
    sd = check_state_dict(run["raw_model"], ckpt["model"]["sd"], source=path)
    if sharded:
        fsdp.load_full_state(run["raw_model"], run["optimizer"], sd, ckpt["optimizer"])
    else:
        run["raw_model"].load_state_dict(sd, strict=True)
        run["optimizer"].load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # empty when saved by a disabled (fp32/bf16) scaler
        run["scaler"].load_state_dict(ckpt["scaler"])
    if run["ema"] is not None:
        if ckpt.get("ema") is None:
            run["ema"] = engine.EMA(run["raw_model"], run["ema"].decay)
        elif sharded:
            fsdp.load_sharded(run["ema"].state_dict(), ckpt["ema"])
        else:
            run["ema"].load_state_dict(ckpt["ema"])
    if "loss_fn" in run:
        missing, unexpected = run["loss_fn"].load_state_dict(ckpt["loss"], strict=False)
        bad = [k for k in missing if not k.startswith("lpips.")] + list(unexpected)
        if bad:
            raise CheckpointError(f"{path}: loss/discriminator state does not match: {bad[:8]}")
        if run["disc_optimizer"] is not None and ckpt.get("disc_optimizer"):
            run["disc_optimizer"].load_state_dict(ckpt["disc_optimizer"])
        if ckpt.get("disc_scaler"):
            run["disc_scaler"].load_state_dict(ckpt["disc_scaler"])
    rng = ckpt.get("rng") or []
    if len(rng) == info.world_size:
        restore_rng(rng[info.rank])
    else:
        seed_everything(ckpt["cfg"]["seed"] + 7919 * (ckpt["step"] + 1) + info.rank)
    return ckpt["step"], ckpt["cfg"]


def clean_run_dir(run_dir):
    """--replace: remove what a previous run wrote (the token cache is kept: it is checked before reuse)."""
    for pattern in RUN_FILES:
        for p in glob.glob(os.path.join(run_dir, pattern)):
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def remove_stale_temps(run_dir):
    """Temp files of writes killed half-way (the targets themselves are always whole)."""
    for p in glob.glob(os.path.join(run_dir, ".tmp_*")):
        os.remove(p)


def export_model(run, directory):
    """Hub-mixin layout (config.json + model.safetensors), with the EMA weights when EMA is on. Called on every
    rank (under FSDP the full weights are gathered first); rank 0 writes."""
    raw = run["raw_model"]
    if run.get("fsdp"):
        own = raw.state_dict()
        sd = fsdp.full_model_state(raw) if run["ema"] is None else \
            {k: v.to(own[k].dtype) for k, v in fsdp.full_tensors(run["ema"].state_dict()).items()}
        if dist.is_main_process():
            raw.save_pretrained(directory, state_dict=sd)
        return
    if not dist.is_main_process():
        return
    if run["ema"] is None:
        raw.save_pretrained(directory)
        return
    backup = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    raw.load_state_dict(run["ema"].weights_like(raw))
    raw.save_pretrained(directory)
    raw.load_state_dict(backup)


# ---------------------------------------------------------------------------------------------- the loop
def wrap_model(raw, cfg, info):
    """DDP (several processes), or FSDP2 shards of the generator in place (train.parallel fsdp, any number of
    processes); torch.compile outermost-but-DDP as before."""
    if cfg["train"]["parallel"] == "fsdp":
        fsdp.shard_generator(raw, cfg["train"]["amp"], info.device)
        return torch.compile(raw) if cfg["train"]["compile"] else raw
    model = raw
    if cfg["train"]["compile"]:
        model = torch.compile(model)
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=cfg["train"]["find_unused_parameters"])
    return model


def train(cfg, run_dir, info, replace=False, wandb_mode=None):
    """Run (or resume) the stage of `cfg` in `run_dir`; returns a summary dict (rank 0; others get None)."""
    from larp import stages
    seed_everything(cfg["seed"])  # same init on every rank (DDP also broadcasts rank 0's weights)
    if cfg["train"]["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        if replace:
            clean_run_dir(run_dir)
        remove_stale_temps(run_dir)
    dist.barrier()
    latest = os.path.join(run_dir, "ckpt_latest.pth")
    resuming = os.path.exists(latest)

    logger_pending = []
    run = stages.setup(cfg, info, run_dir, logger_pending.append)
    run["model"] = wrap_model(run["raw_model"], cfg, info)
    run["fsdp"] = cfg["train"]["parallel"] == "fsdp"
    if run["fsdp"]:  # fully_shard replaced the parameters by DTensor shards: the optimizer must hold those
        run["optimizer"] = engine.build_optimizer(run["raw_model"].parameters(), cfg["optimizer"])
    decay = cfg["train"]["ema_decay"]
    run["ema"] = engine.EMA(run["raw_model"], decay) if decay > 0 else None

    step = 0
    if resuming:
        step, saved_cfg = load_checkpoint(latest, run, info)
    else:
        seed_everything(cfg["seed"] + 1000 * info.rank)  # per-rank streams (dropout, VQ sampling)
    log = RunLogger(run_dir, enabled=info.is_main, resume_step=step if resuming else None)
    for line in logger_pending:
        log.log(line)
    if resuming:
        log.log(f"resumed from {latest} at step {step}")
        changed = sorted(k for k in cfg if k != "seed" and cfg.get(k) != saved_cfg.get(k))
        if changed:
            log.log(f"note: config differs from the checkpoint's in section(s) {changed}")
    if info.is_main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), dump_yaml(cfg))
    log.init_wandb(cfg, name=os.path.basename(run_dir), mode=wandb_mode or cfg["wandb"]["mode"],
                   project=cfg["wandb"]["project"], entity=cfg["wandb"]["entity"], tag=cfg["tag"])

    dataset = run["train_set"]
    if len(dataset) < cfg["batch_size"]:
        raise stages.StageError(f"the training set has {len(dataset)} items, fewer than the global batch {cfg['batch_size']}")
    spe = len(dataset) // cfg["batch_size"]
    tc = cfg["train"]
    total = tc["max_steps"] if tc["max_steps"] else tc["epochs"] * spe
    run["total_steps"] = total
    n_params = sum(p.numel() for p in run["raw_model"].parameters())
    log.log(f"stage {cfg['stage']}: {n_params / 1e6:.2f}M params, {len(dataset)} items, global batch "
            f"{cfg['batch_size']} ({cfg['batch_size'] // info.world_size}/rank x {info.world_size}), "
            f"{spe} steps/epoch, {total} steps, device {info.device}")
    base_lr = cfg["optimizer"]["args"]["lr"]
    bar = tqdm(total=total, initial=step, disable=not info.is_main, dynamic_ncols=True, desc=cfg["stage"])
    window, t0, last = [], time.time(), {}
    eval_every, ckpt_every = cfg["eval"]["interval"], tc["latest_interval"]
    while step < total:
        epoch, offset = divmod(step, spe)
        for batch in make_loader(dataset, cfg, info, epoch, offset):
            lr = engine.lr_at(step, base_lr, total, cfg["lr_schedule"])
            engine.set_lr(run["optimizer"], lr)
            if run.get("disc_optimizer") is not None:
                engine.set_lr(run["disc_optimizer"], lr * run["disc_lr_mult"])
            logs = run["step_fn"](run, batch, step)
            step += 1
            if run["ema"] is not None:
                run["ema"].update(run["raw_model"])
            window.append(logs["loss"])
            last = logs
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
            if step % tc["log_interval"] == 0 or step == total:
                dt = time.time() - t0
                row = {**logs, "loss_avg": sum(window) / len(window), "lr": lr, "epoch": epoch,
                       "step_time": dt / len(window)}
                row.update(run["window_metrics"](run))
                log.metrics(step, row)
                window, t0 = [], time.time()
            if eval_every and step % eval_every == 0 and step < total:
                run_eval(run, cfg, info, run_dir, step, log)
            if step % ckpt_every == 0 or step == total:
                save_checkpoint(latest, run, cfg, step, epoch)
                log.log(f"saved checkpoint step {step}")
            end_of_epoch = (step % spe == 0)
            if end_of_epoch and tc["save_epoch"] and (step // spe) % tc["save_epoch"] == 0:
                save_checkpoint(os.path.join(run_dir, f"ckpt_{step // spe}.pth"), run, cfg, step, epoch)
            if step >= total:
                break
    bar.close()
    final = run_eval(run, cfg, info, run_dir, step, log)
    export_dir = os.path.join(run_dir, "export")
    export_model(run, export_dir)
    log.log(f"exported {cfg['stage']} model to {export_dir}")
    dist.barrier()
    log.close()
    if not info.is_main:
        return None
    return {"step": step, "last": last, "eval": final, "run_dir": run_dir, "export": export_dir}


def run_eval(run, cfg, info, run_dir, step, log):
    """Rank 0 evaluates (under a forked RNG so training randomness is unchanged); the others wait."""
    result = {}
    sharded, ev = run["raw_model"], cfg["eval"]
    if run.get("fsdp") and (ev["num_videos"] or ev["fvd_videos"]):
        # sharded forwards need every rank: rank 0 evaluates a gathered, unsharded copy
        sd = fsdp.full_model_state(sharded)
        run["raw_model"] = generator_from_state(sharded.args, sharded.order, sd, info.device) if info.is_main else None
    if info.is_main:
        devices = [info.device] if info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            t = time.time()
            result = run["eval_fn"](run, step, os.path.join(run_dir, "previews"))
        if result:
            log.metrics(step, result)
        png = os.path.join(run_dir, "previews", f"step_{step:07d}.png")
        shown = [f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)]
        if os.path.exists(png):
            shown.append(f"preview {png}")
            log.image("preview", png, step)
        if shown:
            log.log(f"eval step {step}: " + ", ".join(shown) + f" ({time.time() - t:.1f}s)")
    run["raw_model"] = sharded
    dist.barrier()
    return result
