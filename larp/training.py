"""The training loop shared by both stages: pre-flight checks, wrapping (DDP / FSDP / compile), EMA, the step loop
with logging, periodic evaluation and checkpoints, resume, export. What differs between the stages lives in their
classes (larp/tokenizer_stage.py, larp/ar_stage.py); exact resume in larp/resume.py.
"""
import dataclasses
import os
import time

import torch
from tqdm import tqdm

from larp import dist, fsdp, fvd
from larp.ar_stage import ARStage, check_frozen_tokenizer
from larp.config import ConfigError, StageError, dump_yaml, from_dict, to_dict
from larp.data.dataset import check_labels, check_videos_exist, read_video_csv
from larp.data.video_io import VideoReadError
from larp.io import atomic_write_text
from larp.logger import RunLogger
from larp.optim import EMA, lr_at
from larp.resume import (SKIP_HINT, batches, check_resume, clean_run_dir, export_model, load_checkpoint,
                         make_loader, remove_stale_temps, save_checkpoint)
from larp.tokenizer_stage import TokenizerStage
from larp.utils import seed_everything

STAGE_FACTORIES = {"tokenizer": TokenizerStage.from_config, "ar": ARStage.from_config}


def wrap_model(raw, train, info):
    """DDP (several processes), or FSDP2 shards of the generator in place (train.parallel fsdp, any number of
    processes); torch.compile outermost-but-DDP. `train` is the config's train section."""
    if train.parallel == "fsdp":
        fsdp.shard_generator(raw, train.amp, info.device)
        return torch.compile(raw) if train.compile else raw
    model = torch.compile(raw) if train.compile else raw
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=train.find_unused_parameters)
    return model


def preflight(cfg, run_dir, world_size=1, replace=False, trust=False):
    """The cheap checks of everything a run needs, so a launch script fails with one line before torchrun starts
    N processes: the batch split, the CSVs (columns, labels, listed videos present), the frozen tokenizer (kind,
    geometry, weights not truncated), the detector and the checkpoint to resume from. Returns lines to print.
    `trust` (--trust_checkpoint) lets those files hold more than tensors and plain data (larp/safe_load.py)."""
    notes = []
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world_size} processes")
    d, ar = cfg.data, cfg.stage == "ar"
    for key in ("csv", "val_csv"):
        csv = getattr(d, key)
        if not csv:
            continue
        df = read_video_csv(csv)
        if ar and not cfg.model.frame_prediction:
            check_labels(df, cfg.model.num_classes, csv, "model.num_classes")
        try:
            check_videos_exist(df, csv)
        except VideoReadError as e:
            if not d.skip_bad:
                raise VideoReadError(f"{e}; fix the CSV or {SKIP_HINT}") from None
            notes.append(f"data.skip_bad: {e} (they will be skipped)")
        notes.append(f"data.{key}: {len(df)} videos listed in {csv}")
    if ar:
        notes.append(check_frozen_tokenizer(cfg.vae.checkpoint, d, cfg.model.latent_shape, trust))
        if cfg.eval.fvd_videos:
            fvd.check_i3d_spec(cfg.eval.i3d, trust)
    latest = os.path.join(run_dir, "ckpt_latest.pth")
    if os.path.exists(latest) and not replace:
        notes.append(f"resumes from {latest} at step {check_resume(latest, to_dict(cfg), trust)}")
    else:
        notes.append(f"starts fresh in {run_dir}")
    return notes


def train(cfg, run_dir, info, replace=False, wandb_mode=None, trust=False):
    """Run (or resume) the stage of `cfg` in `run_dir`; returns a summary dict (rank 0; others get None).
    `trust`: --trust_checkpoint (see preflight)."""
    notes = preflight(cfg, run_dir, info.world_size, replace, trust)  # one clear error before anything is written
    plain = to_dict(cfg)  # what checkpoints and config.yaml store
    tc, ev = cfg.train, cfg.eval
    seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    if tc.deterministic:
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

    pending = [n for n in notes if n.startswith("data.skip_bad")]
    try:
        stage = STAGE_FACTORIES[cfg.stage](cfg, info, run_dir, pending.append, trust)
    except VideoReadError as e:  # the clip index of the token cache or of the evaluation videos
        raise VideoReadError(f"{e}; {SKIP_HINT}") from e
    raw, sharded = stage.model, tc.parallel == "fsdp"
    stage.wrapped = wrap_model(raw, tc, info)
    if sharded:  # fully_shard replaced the parameters by DTensor shards: the optimizer must hold those
        stage.build_optimizer()
    ema = EMA(raw, tc.ema_decay) if tc.ema_decay > 0 else None

    step = 0
    if resuming:
        step, saved_cfg, ema = load_checkpoint(latest, stage, ema, info, sharded, trust)
    else:
        seed_everything(cfg.seed + 1000 * info.rank)  # per-rank streams (dropout, VQ sampling)
    log = RunLogger(run_dir, enabled=info.is_main, resume_step=step if resuming else None)
    for line in pending:
        log.log(line)
    if resuming:
        log.log(f"resumed from {latest} at step {step}")
        saved_cfg = _as_stored_now(saved_cfg)
        changed = sorted(k for k in plain if k != "seed" and plain.get(k) != saved_cfg.get(k))
        if changed:
            log.log(f"note: config differs from the checkpoint's in section(s) {changed}")
    if info.is_main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), dump_yaml(cfg))
    log.init_wandb(plain, name=os.path.basename(run_dir), mode=wandb_mode or cfg.wandb.mode,
                   project=cfg.wandb.project, entity=cfg.wandb.entity, tag=cfg.tag)

    dataset, B = stage.train_set, cfg.batch_size
    if len(dataset) < B:
        raise StageError(f"the training set has {len(dataset)} items, fewer than the global batch {B}")
    spe = len(dataset) // B
    total = tc.max_steps if tc.max_steps else tc.epochs * spe
    n_params = sum(p.numel() for p in raw.parameters())
    log.log(f"stage {cfg.stage}: {n_params / 1e6:.2f}M params, {len(dataset)} items, global batch "
            f"{B} ({B // info.world_size}/rank x {info.world_size}), {spe} steps/epoch, {total} steps, "
            f"device {info.device}")
    base_lr, schedule = cfg.optimizer.args["lr"], dataclasses.asdict(cfg.lr_schedule)
    bar = tqdm(total=total, initial=step, disable=not info.is_main, dynamic_ncols=True, desc=cfg.stage)
    window, t0, last = [], time.time(), {}
    skipped = torch.zeros((), dtype=torch.long, device=info.device)  # unreadable videos passed over (data.skip_bad)
    reported = 0
    while step < total:
        epoch, offset = divmod(step, spe)
        for batch in batches(make_loader(dataset, B, cfg.data.num_workers, cfg.seed, info, epoch, offset)):
            lr = lr_at(step, base_lr, total, **schedule)
            stage.set_lr(lr)
            if "skipped" in batch:
                skipped += batch["skipped"].sum().to(info.device)
            logs = stage.step(batch, step, total)
            step += 1
            if ema is not None:
                ema.update(raw)
            window.append(logs["loss"])
            last = logs
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
            if step % tc.log_interval == 0 or step == total:
                dt = time.time() - t0
                row = {**logs, "loss_avg": sum(window) / len(window), "lr": lr, "epoch": epoch,
                       "step_time": dt / len(window)}
                row.update(stage.window_metrics())
                if cfg.data.skip_bad:
                    total_skipped = round(float(dist.all_reduce_mean(skipped.float())) * dist.get_world_size())
                    row["skipped_videos"] = total_skipped
                    if total_skipped > reported:
                        log.log(f"data.skip_bad: an unreadable video was skipped {total_skipped} time(s) so far "
                                f"(all ranks), each time replaced by the next readable one")
                        reported = total_skipped
                log.metrics(step, row)
                window, t0 = [], time.time()
            if ev.interval and step % ev.interval == 0 and step < total:
                run_eval(stage, info, run_dir, step, log, sharded)
            if step % tc.latest_interval == 0 or step == total:
                save_checkpoint(latest, stage, ema, plain, step, epoch, sharded)
                log.log(f"saved checkpoint step {step}")
            end_of_epoch = (step % spe == 0)
            if end_of_epoch and tc.save_epoch and (step // spe) % tc.save_epoch == 0:
                save_checkpoint(os.path.join(run_dir, f"ckpt_{step // spe}.pth"), stage, ema, plain, step, epoch,
                                sharded)
            if step >= total:
                break
    bar.close()
    final = run_eval(stage, info, run_dir, step, log, sharded)
    export_dir = os.path.join(run_dir, "export")
    export_model(raw, ema, export_dir, sharded)
    log.log(f"exported {cfg.stage} model to {export_dir}")
    dist.barrier()
    log.close()
    if not info.is_main:
        return None
    return {"step": step, "last": last, "eval": final, "run_dir": run_dir, "export": export_dir}


def _as_stored_now(saved):
    """A checkpoint's config as this version stores it (older ones kept the tokenizer geometry in `model` too)."""
    try:
        return to_dict(from_dict(saved))
    except ConfigError:
        return saved


def run_eval(stage, info, run_dir, step, log, sharded=False):
    """Rank 0 evaluates (under a forked RNG so training randomness is unchanged); the others wait. Under FSDP the
    forwards of a sharded model need every rank, so rank 0 evaluates a gathered, unsharded copy."""
    result, model = {}, stage.model
    if sharded and stage.evaluates:  # the same on every rank (from the config)
        sd = fsdp.full_model_state(model)  # collective
        model = stage.unsharded_copy(sd) if info.is_main else None
    if info.is_main:
        devices = [info.device] if info.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            t = time.time()
            result = stage.evaluate(model, step, os.path.join(run_dir, "previews"))
        if result:
            log.metrics(step, result)
        png = os.path.join(run_dir, "previews", f"step_{step:07d}.png")
        shown = [f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)]
        if os.path.exists(png):
            shown.append(f"preview {png}")
            log.image("preview", png, step)
        if shown:
            log.log(f"eval step {step}: " + ", ".join(shown) + f" ({time.time() - t:.1f}s)")
    dist.barrier()
    return result
