"""The training loop shared by both stages: data order, checkpoints, exact resume, logging, evaluation, export.

Exact resume: the global batch b of epoch e is a fixed slice of a permutation drawn from (seed, e); every
item's random crop/flip is drawn from a seed derived from (seed, e, index) (see SeededItems); the loader has
its own generator; evaluation runs under a forked RNG. A restarted run therefore skips the consumed batches
of its epoch, restores the per-rank RNG states and the optimizer, and repeats the uninterrupted run exactly.
"""
import glob
import math
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
from larp.checkpoint import CheckpointError, check_state_dict, check_weights_file, strip_prefixes
from larp.io import atomic_save, atomic_write_text
from larp.config import dump_yaml
from larp.data.video_io import VideoReadError
from larp.errors import one_line
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


def _batches(loader):
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


SKIP_HINT = "set data.skip_bad true to skip unreadable videos (they are counted and reported)"
RESUME_HINT = "pass --replace to start fresh (it deletes this run's checkpoints and logs) or choose another --name"


def check_resume(path, cfg):
    """Cheap check of the checkpoint a run would resume from: readable (mmap: the tensors are not read) and of
    the stage / model this config trains. Raises CheckpointError naming the file; never modifies it."""
    try:
        check_weights_file(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; cannot resume from it: {RESUME_HINT}") from e
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
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


def load_checkpoint(path, run, info):
    """Restore model/optimizer/scaler/EMA (+ discriminator) and this rank's RNG; returns (step, saved cfg)."""
    sharded = run.get("fsdp")
    try:  # FSDP: the ranks of a node share one page-cache copy of the file and keep their shards
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=bool(sharded))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume from it ({one_line(e)}); {RESUME_HINT}") from e
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


def preflight(cfg, run_dir, world_size=1, replace=False):
    """The cheap checks of everything a run needs, so a launch script fails with one line before torchrun starts
    N processes: the batch split, the CSVs (columns, labels, listed videos present), the frozen tokenizer (kind,
    geometry, weights not truncated), the detector and the checkpoint to resume from. Returns lines to print."""
    from larp import fvd
    from larp.checkpoint import checkpoint_kind, describe_checkpoint, peek_checkpoint
    from larp.config import ConfigError
    from larp.data.dataset import check_labels, check_videos_exist, read_video_csv
    from larp.data.video_io import VideoReadError
    from larp.stages import StageError
    notes = []
    if cfg["batch_size"] % world_size:
        raise ConfigError(f"batch_size {cfg['batch_size']} is not divisible by the {world_size} processes")
    d, m = cfg["data"], cfg["model"]
    for key in ("csv", "val_csv"):
        if not d[key]:
            continue
        df = read_video_csv(d[key])
        if cfg["stage"] == "ar" and not m["frame_prediction"]:
            check_labels(df, m["num_classes"], d[key], "model.num_classes")
        try:
            check_videos_exist(df, d[key])
        except VideoReadError as e:
            if not d["skip_bad"]:
                raise VideoReadError(f"{e}; fix the CSV or {SKIP_HINT}") from None
            notes.append(f"data.skip_bad: {e} (they will be skipped)")
        notes.append(f"data.{key}: {len(df)} videos listed in {d[key]}")
    if cfg["stage"] == "ar":
        spec = cfg["vae"]["checkpoint"]
        if not spec:
            raise StageError("vae.checkpoint is not set: pass --opts vae.checkpoint <tokenizer dir, checkpoint or "
                             "hub id>")
        try:
            tok = peek_checkpoint(spec)
        except CheckpointError as e:
            raise CheckpointError(f"vae.checkpoint: {e}") from None
        if checkpoint_kind(tok) != "tokenizer":
            raise CheckpointError(f"vae.checkpoint {spec}: holds {describe_checkpoint(tok) or 'an unknown model'}, "
                                  f"expected a LARP tokenizer")
        geometry = (tok.get("frame_num"), tok.get("input_size"))
        if None not in geometry and geometry != (d["frame_num"], d["input_size"]):
            raise StageError(f"vae.checkpoint {spec} encodes {geometry[0]}-frame {geometry[1]}px clips but "
                             f"data.frame_num/input_size are {d['frame_num']}/{d['input_size']}")
        n = tok.get("bottleneck_token_num")
        if n and math.prod(m["latent_shape"]) != n:
            raise StageError(f"model.latent_shape {m['latent_shape']} has {math.prod(m['latent_shape'])} cells but "
                             f"the tokenizer {spec} gives {n} tokens per clip")
        notes.append(f"vae.checkpoint: {spec} ({describe_checkpoint(tok)})")
        if cfg["eval"]["fvd_videos"]:
            fvd.check_i3d_spec(cfg["eval"]["i3d"])
    latest = os.path.join(run_dir, "ckpt_latest.pth")
    if os.path.exists(latest) and not replace:
        notes.append(f"resumes from {latest} at step {check_resume(latest, cfg)}")
    else:
        notes.append(f"starts fresh in {run_dir}")
    return notes


def train(cfg, run_dir, info, replace=False, wandb_mode=None):
    """Run (or resume) the stage of `cfg` in `run_dir`; returns a summary dict (rank 0; others get None)."""
    from larp import stages
    notes = preflight(cfg, run_dir, info.world_size, replace)  # one clear error before anything is written
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

    logger_pending = [n for n in notes if n.startswith("data.skip_bad")]
    try:
        run = stages.setup(cfg, info, run_dir, logger_pending.append)
    except VideoReadError as e:  # the clip index of the token cache or of the evaluation videos
        raise VideoReadError(f"{e}; {SKIP_HINT}") from e
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
    skipped = torch.zeros((), dtype=torch.long, device=info.device)  # unreadable videos passed over (data.skip_bad)
    reported = 0
    eval_every, ckpt_every = cfg["eval"]["interval"], tc["latest_interval"]
    while step < total:
        epoch, offset = divmod(step, spe)
        for batch in _batches(make_loader(dataset, cfg, info, epoch, offset)):
            lr = engine.lr_at(step, base_lr, total, cfg["lr_schedule"])
            engine.set_lr(run["optimizer"], lr)
            if run.get("disc_optimizer") is not None:
                engine.set_lr(run["disc_optimizer"], lr * run["disc_lr_mult"])
            if "skipped" in batch:
                skipped += batch["skipped"].sum().to(info.device)
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
                if cfg["data"]["skip_bad"]:
                    total_skipped = round(float(dist.all_reduce_mean(skipped.float())) * dist.get_world_size())
                    row["skipped_videos"] = total_skipped
                    if total_skipped > reported:
                        log.log(f"data.skip_bad: an unreadable video was skipped {total_skipped} time(s) so far "
                                f"(all ranks), each time replaced by the next readable one")
                        reported = total_skipped
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
