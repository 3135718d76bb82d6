"""The training loop shared by both stages: pre-flight checks, wrapping (DDP / FSDP / compile), EMA, the step loop
with logging, periodic evaluation and checkpoints, resume, export. What differs between the stages lives in their
classes (larp/training/tokenizer_stage.py, larp/training/ar_stage.py), each with its own pre-flight; the data order
in larp/training/loader.py, checkpoints in larp/training/checkpoints.py.
"""
import dataclasses
import os
import time

import torch

from larp.core import dist
from larp.core.io import atomic_write_text, expect_path
from larp.core.utils import progress_bar, say, seed_everything
from larp.data.dataset import check_videos_exist, read_video_csv
from larp.core.errors import ConfigError, StageError, VideoReadError
from larp.training import fsdp
from larp.training.ar_stage import ARStage
from larp.training.checkpoints import check_resume, load_checkpoint, save_checkpoint
from larp.training.config import dump_yaml, to_dict
from larp.training.config_build import from_dict
from larp.training.loader import SKIP_HINT, batches, make_loader
from larp.training.logger import RunLogger
from larp.training.optim import EMA, describe_groups, lr_at, schedule_args
from larp.training.keep_best import export_kept, update_best
from larp.training.run_folder import (check_free, clean_run_dir, finished_step, hold_run_folder, mark_finished,
                                      remove_temps, unmark_finished)
from larp.training.tokenizer_stage import TokenizerStage

STAGES = {"tokenizer": TokenizerStage, "ar": ARStage}


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
    N processes: the batch split, the CSVs (columns, listed videos present; the stage checks what it needs of
    them), the stage's own inputs, that no other run holds the folder and the checkpoint to resume from. Returns
    lines to print. `trust` (--trust_checkpoint) lets those files hold more than tensors and plain data
    (larp/core/safe_load.py)."""
    notes = []
    if cfg.train.parallel == "fsdp":
        fsdp.require()
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world_size} processes")
    stage_cls, d = STAGES[cfg.stage], cfg.data
    if d.cache_dir:
        expect_path(d.cache_dir, "data.cache_dir")
    for key in ("csv", "val_csv"):
        csv = getattr(d, key)
        if not csv:
            continue
        df = read_video_csv(csv)
        stage_cls.check_csv(cfg, df, csv)
        try:
            check_videos_exist(df, csv)
        except VideoReadError as e:
            if not d.skip_bad:
                raise VideoReadError(f"{e}; fix the CSV or {SKIP_HINT}") from None
            notes.append(f"data.skip_bad: {e} (they will be skipped)")
        notes.append(f"data.{key}: {len(df)} videos listed in {csv}")
    notes += stage_cls.preflight(cfg, trust)
    if not dist.is_dist():  # a multi-process run learns it in hold_run_folder, on every rank at once
        check_free(run_dir)
    latest = os.path.join(run_dir, "ckpt_latest.pth")
    done = None if replace else finished_step(run_dir, step_plan(cfg))
    if done is not None:
        notes.append(finished_note(run_dir, done))
    elif os.path.exists(latest) and not replace:
        notes.append(f"resumes from {latest} at step {check_resume(latest, to_dict(cfg), trust)}")
    else:
        notes.append(f"starts fresh in {run_dir}")
    return notes


def step_plan(cfg):
    """What sets the number of steps: train.max_steps, else the epochs over the training set at this batch."""
    if cfg.train.max_steps:
        return {"train.max_steps": cfg.train.max_steps}
    return {"train.epochs": cfg.train.epochs, "batch_size": cfg.batch_size, "data.csv": cfg.data.csv}


def finished_note(run_dir, step):
    return (f"{run_dir} finished at step {step} (model in {os.path.join(run_dir, 'export')}): nothing to do; raise "
            f"train.max_steps (or train.epochs) to train on, or pass --replace to start over")


def train(cfg, run_dir, info, replace=False, wandb_mode=None, trust=False):
    """Run (or resume) the stage of `cfg` in `run_dir`; returns a summary dict (rank 0; others get None). A run that
    finished with the same step plan (finished.json) is left as it is: no step, evaluation or export. A second run
    in the same folder refuses while this one lives. `trust`: --trust_checkpoint (see preflight)."""
    done = None if replace else finished_step(run_dir, step_plan(cfg))
    if done is not None:
        if info.is_main:
            say(finished_note(run_dir, done))
        return {"step": done, "last": {}, "eval": {}, "run_dir": run_dir, "export": os.path.join(run_dir, "export"),
                "finished": True} if info.is_main else None
    notes = preflight(cfg, run_dir, info.world_size, replace, trust)  # one clear error before anything is written
    with hold_run_folder(run_dir, info):
        return _train(cfg, run_dir, info, notes, replace, wandb_mode, trust)


def _train(cfg, run_dir, info, notes, replace, wandb_mode, trust=False):
    """The run itself, while this process holds the run folder (see train)."""
    seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    prepare_run_dir(run_dir, info, replace)
    stage, run, step = start(cfg, run_dir, info, notes, wandb_mode, trust)
    step, last = run_steps(stage, run, step)
    final = run_eval(stage, info, run_dir, step, run.log, run.sharded)
    export_dir = os.path.join(run_dir, "export")
    kept = export_kept(stage, run, step, final, export_dir)
    if info.is_main:
        mark_finished(run_dir, step, step_plan(cfg), kept)
    weights = "" if kept["step"] == step else f" (the weights of step {kept['step']}, train.keep {kept['rule']})"
    run.log.log(f"finished at step {step}: {cfg.stage} model in {export_dir}/{weights}; "
                + ", ".join(p for p in (os.path.join(run_dir, n) for n in ("metrics.csv", "log.txt", "previews/"))
                            if os.path.exists(p)))
    dist.barrier()
    run.log.close()
    if not info.is_main:
        return None
    return {"step": step, "last": last, "eval": final, "run_dir": run_dir, "export": export_dir}


def prepare_run_dir(run_dir, info, replace):
    """Rank 0 empties the run folder with --replace and removes temp files of killed writes."""
    if info.is_main:
        if replace:
            clean_run_dir(run_dir)
        remove_temps(run_dir)
        unmark_finished(run_dir)  # it trains on: finished again only once it exports
    dist.barrier()


@dataclasses.dataclass
class Run:
    """What the step loop needs besides the stage: the config (typed, and as plain data for checkpoints), this
    process, the run folder, the logger and the EMA (or None)."""
    cfg: object
    plain: dict
    info: object
    run_dir: str
    log: RunLogger
    ema: EMA | None

    @property
    def sharded(self):
        return self.cfg.train.parallel == "fsdp"


def start(cfg, run_dir, info, notes, wandb_mode, trust=False):
    """Build the stage, wrap its model, resume from ckpt_latest.pth when there is one, open the logs.
    Returns (stage, run, step)."""
    latest = os.path.join(run_dir, "ckpt_latest.pth")
    resuming = os.path.exists(latest)
    pending = [n for n in notes if n.startswith("data.skip_bad")]
    try:
        stage = STAGES[cfg.stage].from_config(cfg, info, run_dir, pending.append, trust)
    except VideoReadError as e:  # the clip index of the token cache or of the evaluation videos
        raise VideoReadError(f"{e}; {SKIP_HINT}") from e
    tc = cfg.train
    stage.wrapped = wrap_model(stage.model, tc, info)
    if tc.parallel == "fsdp":  # fully_shard replaced the parameters by DTensor shards: the optimizer must hold those
        stage.build_optimizer()
    pending.append(describe_groups(stage.optimizer.param_groups))
    ema = EMA(stage.model, tc.ema_decay) if tc.ema_decay > 0 else None
    step = 0
    if resuming:
        step, saved_cfg, ema = load_checkpoint(latest, stage, ema, info, tc.parallel == "fsdp", trust)
    else:
        seed_everything(cfg.seed + 1000 * info.rank)  # per-rank streams (dropout, VQ sampling)
    log = RunLogger(run_dir, enabled=info.is_main, resume_step=step if resuming else None)
    for line in pending:
        log.log(line)
    plain = to_dict(cfg)
    if resuming:
        log.log(f"resumed from {latest} at step {step}")
        changed = changed_keys(_as_stored_now(saved_cfg), {k: v for k, v in plain.items() if k != "seed"})
        if changed:
            log.log(f"note: config differs from the checkpoint's: {'; '.join(changed)}")
    if info.is_main:
        atomic_write_text(os.path.join(run_dir, "config.yaml"), dump_yaml(cfg))
    log.init_wandb(plain, name=os.path.basename(run_dir), mode=wandb_mode or cfg.wandb.mode,
                   project=cfg.wandb.project, entity=cfg.wandb.entity, tag=cfg.tag)
    return stage, Run(cfg, plain, info, run_dir, log, ema), step


def run_steps(stage, run, step):
    """The step loop from `step` to the last step: log lines, evaluations and checkpoints on their intervals.
    Returns (step, the last step's logged values)."""
    cfg, info, log = run.cfg, run.info, run.log
    dataset, B, tc = stage.train_set, cfg.batch_size, cfg.train
    if len(dataset) < B:
        raise StageError(f"the training set has {len(dataset)} items, fewer than the global batch {B}")
    spe = len(dataset) // B
    total = tc.max_steps if tc.max_steps else tc.epochs * spe
    n_params = sum(p.numel() for p in stage.model.parameters())
    log.log(f"stage {cfg.stage}: {n_params / 1e6:.2f}M params, {len(dataset)} items, global batch "
            f"{B} ({B // info.world_size}/rank x {info.world_size}), {spe} steps/epoch, {total} steps, "
            f"device {info.device}")
    base_lr, schedule = cfg.optimizer.args["lr"], schedule_args(dataclasses.asdict(cfg.lr_schedule), spe)
    bar = progress_bar(total=total, initial=step, disable=not info.is_main, dynamic_ncols=True, desc=cfg.stage)
    window, last = StepWindow(cfg, info, log, total), {}
    while step < total:
        epoch, offset = divmod(step, spe)
        for batch in batches(make_loader(dataset, B, cfg.data.num_workers, cfg.seed, info, epoch, offset)):
            lr = lr_at(step, base_lr, total, **schedule)
            stage.set_lr(lr)
            last = stage.step(batch, step, total)
            step += 1
            if run.ema is not None:
                run.ema.update(stage.model)
            window.add(batch, last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            if step % tc.log_interval == 0 or step == total:
                window.flush(stage, step, lr, epoch)
            after_step(stage, run, step, epoch, total, spe)
            if step >= total:
                break
    bar.close()
    return step, last


def after_step(stage, run, step, epoch, total, spe):
    """The evaluation and the checkpoints due after `step`."""
    tc, ev = run.cfg.train, run.cfg.eval
    if ev.interval and step % ev.interval == 0 and step < total:
        update_best(stage, run, step, run_eval(stage, run.info, run.run_dir, step, run.log, run.sharded))
    if step % tc.latest_interval == 0 or step == total:
        save_checkpoint(os.path.join(run.run_dir, "ckpt_latest.pth"), stage, run.ema, run.plain, step, epoch,
                        run.sharded)
        run.log.log(f"saved checkpoint step {step}")
    if step % spe == 0 and tc.save_epoch and (step // spe) % tc.save_epoch == 0:
        save_checkpoint(os.path.join(run.run_dir, f"ckpt_{step // spe}.pth"), stage, run.ema, run.plain, step,
                        epoch, run.sharded)


class StepWindow:
    """The steps since the last log line: their losses, timing and the unreadable videos skipped so far."""

    def __init__(self, cfg, info, log, total):
        self.skip_bad, self.log, self.device, self.total = cfg.data.skip_bad, log, info.device, total
        self.losses, self.t0, self.last, self.reported = [], time.time(), {}, 0
        self.skipped = torch.zeros((), dtype=torch.long, device=info.device)  # (data.skip_bad)

    def add(self, batch, logs):
        if "skipped" in batch:
            self.skipped += batch["skipped"].sum().to(self.device)
        self.losses.append(logs["loss"])
        self.last = logs

    def flush(self, stage, step, lr, epoch):
        """One metrics.csv row and one log line for the window; then a new window starts."""
        dt = time.time() - self.t0
        row = {**self.last, "loss_avg": sum(self.losses) / len(self.losses), "lr": lr, "epoch": epoch,
               "step_time": dt / len(self.losses)}
        row.update(stage.window_metrics())
        if self.skip_bad:
            total_skipped = round(float(dist.all_reduce_mean(self.skipped.float())) * dist.get_world_size())
            row["skipped_videos"] = total_skipped
            if total_skipped > self.reported:
                self.log.log(f"data.skip_bad: an unreadable video was skipped {total_skipped} time(s) so far "
                             f"(all ranks), each time replaced by the next readable one")
                self.reported = total_skipped
        self.log.metrics(step, row)
        self.log.log(f"step {step}/{self.total}: loss {row['loss_avg']:.4f}, lr {lr:.3g}, "
                     f"{row['step_time']:.3f} s/step")
        self.losses, self.t0 = [], time.time()


def changed_keys(old, new, prefix=""):
    """["train.max_steps: 2 -> 3", ...]: every key of `new` (nested dicts as dotted keys) whose value differs."""
    out = []
    for k in sorted(new):
        a, b = old.get(k) if isinstance(old, dict) else None, new[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


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
