"""Which weights a run exports (train.keep).

`last` (the default): the weights after the last step. `best_val`: the weights of the evaluation with the best
validation metric of the stage (`KEEP_METRIC`: the generators' val_loss, lowest; the tokenizer's val_psnr,
highest), the final evaluation included. The best weights so far live in <run_dir>/best/ (the export layout plus
best.json: step, metric, value), written as the run goes, so a resumed run goes on comparing against them. A new
best is written to best.next/ and swapped in by two renames; a kill between them is repaired on the next read.
With EMA on, the metric is that of the trained weights (what the evaluation sees) and best/ holds the EMA weights
of that step, as export/ always does.
"""
import json
import os
import shutil

from larp.core import dist
from larp.core.io import atomic_write_text, naming_write_errors
from larp.training.run_folder import export_model

BEST, NEXT, PREV = "best", "best.next", "best.prev"
MARK = "best.json"


def _mark(folder):
    try:
        with open(os.path.join(folder, MARK)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_best(run_dir):
    """{"step", "metric", "value"} of the weights in <run_dir>/best/, or None. Finishes a swap a kill interrupted:
    a complete best.next/ (its best.json written last) or, failing that, the best.prev/ it was replacing."""
    best = os.path.join(run_dir, BEST)
    mark = _mark(best)
    if mark is not None:
        return mark
    for other in (NEXT, PREV):
        folder = os.path.join(run_dir, other)
        if _mark(folder) is not None and dist.is_main_process():
            with naming_write_errors(best):
                shutil.rmtree(best, ignore_errors=True)
                os.replace(folder, best)
            return _mark(best)
    return None


def better(value, best, mode):
    return best is None or (value < best if mode == "min" else value > best)


def update_best(stage, run, step, result):
    """After an evaluation (every rank calls it: an FSDP export is collective): with train.keep best_val, when
    rank 0's `result` beats the kept metric, export the model into <run_dir>/best/."""
    if run.cfg.train.keep != "best_val":
        return
    name, mode = stage.KEEP_METRIC
    value = dist.all_gather_object((result or {}).get(name))[0]  # rank 0 evaluated
    kept = dist.all_gather_object(read_best(run.run_dir) if dist.is_main_process() else None)[0]
    if value is None or not better(value, kept and kept["value"], mode):
        return
    nxt = os.path.join(run.run_dir, NEXT)
    if dist.is_main_process():
        shutil.rmtree(nxt, ignore_errors=True)
    dist.barrier()
    export_model(stage.model, run.ema, nxt, run.sharded)
    if dist.is_main_process():
        atomic_write_text(os.path.join(nxt, MARK), json.dumps({"step": step, "metric": name, "value": value}) + "\n")
        best, prev = os.path.join(run.run_dir, BEST), os.path.join(run.run_dir, PREV)
        with naming_write_errors(best):
            if os.path.isdir(best):
                shutil.rmtree(prev, ignore_errors=True)
                os.replace(best, prev)
            os.replace(nxt, best)
            shutil.rmtree(prev, ignore_errors=True)
        run.log.log(f"train.keep best_val: step {step} has the best {name} so far ({value:.4g}); saved in {best}/")
    dist.barrier()


def export_kept(stage, run, step, final, export_dir):
    """Export the weights train.keep names into `export_dir`, after the final evaluation `final` (rank 0's dict).
    Returns what was kept: {"rule", "step"[, "metric", "value"]}."""
    if run.cfg.train.keep != "best_val":
        export_model(stage.model, run.ema, export_dir, run.sharded)
        return {"rule": "last", "step": step}
    update_best(stage, run, step, final)
    kept = dist.all_gather_object(read_best(run.run_dir) if dist.is_main_process() else None)[0]
    if kept is None:  # no evaluation measured the metric (preflight asks for them; a bare safety net)
        export_model(stage.model, run.ema, export_dir, run.sharded)
        return {"rule": "last", "step": step, "note": f"no {stage.KEEP_METRIC[0]} was measured"}
    if dist.is_main_process():
        tmp = export_dir.rstrip("/") + ".next"
        with naming_write_errors(export_dir):
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(os.path.join(run.run_dir, BEST), tmp, ignore=shutil.ignore_patterns(MARK))
            shutil.rmtree(export_dir, ignore_errors=True)
            os.replace(tmp, export_dir)
    dist.barrier()
    return {"rule": "best_val", **kept}
