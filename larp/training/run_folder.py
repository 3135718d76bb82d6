"""A run folder: what --replace removes, the temp files of killed writes, the exported model and the mark of a
finished run."""
import glob
import json
import os
import shutil

from larp.core import dist
from larp.core.io import atomic_write_text
from larp.training import fsdp

FINISHED = "finished.json"  # written after the export: {"step", "plan"}; a rerun with the same plan does nothing
RUN_FILES = ("ckpt_*.pth", "log.txt", "metrics.csv", "config.yaml", "wandb_id.txt", "export", "previews", "wandb",
             FINISHED)


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


def mark_finished(run_dir, step, plan):
    """The run exported its model at `step`; `plan` is what set its number of steps (loop.step_plan)."""
    atomic_write_text(os.path.join(run_dir, FINISHED), json.dumps({"step": step, "plan": plan}, indent=2) + "\n")


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
