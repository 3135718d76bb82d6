"""A run folder: the lock a run holds on it, what --replace removes, the temp files of killed writes, the exported
model and the mark of a finished run."""
import contextlib
import glob
import json
import os
import shutil

from larp.core import dist, locks
from larp.core.errors import FolderBusyError, LarpError
from larp.core.io import atomic_write_text, naming_write_errors, remove_stale_temps
from larp.training import fsdp

LOCK_NAME = ".run.lock"
FINISHED = "finished.json"  # written after the export: {"step", "plan"}; a rerun with the same plan does nothing
RUN_FILES = ("ckpt_*.pth", "log.txt", "metrics.csv", "config.yaml", "wandb_id.txt", "export", "export.next", "best",
             "best.next", "best.prev", "previews", "wandb", FINISHED)


def clean_run_dir(run_dir):
    """--replace: remove what a previous run wrote (the token cache is kept: it is checked before reuse)."""
    for pattern in RUN_FILES:
        for p in glob.glob(os.path.join(run_dir, pattern)):
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def remove_temps(run_dir):
    """Temp files of writes killed half-way (the targets themselves are always whole)."""
    for folder in (run_dir, os.path.join(run_dir, "previews"), os.path.join(run_dir, "export")):
        remove_stale_temps(folder)


def busy_message(run_dir, holder):
    return (f"run folder {run_dir} is in use by {holder.strip()}: another train.py run trains there; wait for it to "
            f"end or choose another --name")


def check_free(run_dir):
    """Raise FolderBusyError when a live process holds the run folder (creates nothing)."""
    holder = locks.holder(os.path.join(run_dir, LOCK_NAME))
    if holder:
        raise FolderBusyError(busy_message(run_dir, holder))


@contextlib.contextmanager
def hold_run_folder(run_dir, info):
    """Rank 0 creates the run folder and holds its lock while the run lives (the OS drops it when the process dies,
    so a killed run never blocks the next one). A run that finds the folder held refuses on every rank with one
    line naming the folder and the holder's pid and host."""
    fd, problem = None, None
    if info.is_main:
        path = os.path.join(run_dir, LOCK_NAME)
        try:
            with naming_write_errors(path):
                os.makedirs(run_dir, exist_ok=True)
                fd, holder = locks.take(path)
            problem = FolderBusyError(busy_message(run_dir, holder)) if holder else None
        except LarpError as e:  # a read-only folder
            problem = e
    problem = dist.all_gather_object(problem)[0]  # every rank stops together
    if problem:
        raise problem
    try:
        yield
    finally:
        if fd is not None:
            locks.release(fd)


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


def mark_finished(run_dir, step, plan, kept=None):
    """The run exported its model at `step`; `plan` is what set its number of steps (loop.step_plan); `kept`: which
    weights the export holds (larp/training/keep_best.py)."""
    mark = {"step": step, "plan": plan, **({"kept": kept} if kept else {})}
    atomic_write_text(os.path.join(run_dir, FINISHED), json.dumps(mark, indent=2) + "\n")


def unmark_finished(run_dir):
    if os.path.exists(os.path.join(run_dir, FINISHED)):
        os.remove(os.path.join(run_dir, FINISHED))


def finished_step(run_dir, plan):
    """The step at which the run finished with the same step `plan`, or None (not finished, or asked to go on)."""
    try:
        with open(os.path.join(run_dir, FINISHED)) as f:
            mark = json.load(f)
    except (OSError, ValueError):
        return None
    exported = os.path.exists(os.path.join(run_dir, "export"))
    return mark.get("step") if exported and mark.get("plan") == plan else None
