"""Run logging on rank 0: log.txt, metrics.csv, wandb (offline unless asked to upload). Other ranks are silent.

metrics.csv has one row per logged step and one column per metric; a metric that first appears later
rewrites the file with the wider header. On resume, rows past the resumed step (logged by the killed run
after its last checkpoint) are dropped so the file reads like one uninterrupted run.
"""
import csv
import io
import os
import secrets
import time

from larp.core.io import append_text, atomic_write_text
from larp.core.utils import say


def _has_wandb_credentials():
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


class RunLogger:
    def __init__(self, run_dir, enabled=True, resume_step=None):
        self.run_dir, self.enabled = run_dir, enabled
        self.log_path = os.path.join(run_dir, "log.txt")
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.columns, self.rows = [], []
        self.wandb_run = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if r.get("step") not in (None, "") and int(r["step"]) <= resume_step]
            self._rewrite()
        elif os.path.exists(self.csv_path):
            os.remove(self.csv_path)

    def log(self, text):
        """A line to stdout and log.txt (rank 0)."""
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
        say(line)  # never on the same line as the progress bar
        append_text(self.log_path, line + "\n")

    def _rewrite(self):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def metrics(self, step, values):
        """One metrics.csv row (and a wandb log) for `step`; values are floats."""
        if not self.enabled:
            return
        row = {"step": step, **{k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in values.items()}}
        new = [k for k in row if k not in self.columns]
        self.rows.append({k: str(v) for k, v in row.items()})
        if new or not os.path.exists(self.csv_path):
            self.columns = (["step"] if "step" not in self.columns else []) + self.columns
            self.columns += [k for k in new if k not in self.columns]
            self._rewrite()
        else:
            buf = io.StringIO()
            csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore").writerow(self.rows[-1])
            append_text(self.csv_path, buf.getvalue())
        if self.wandb_run is not None:
            self.wandb_run.log(dict(values), step=step)

    def init_wandb(self, cfg, name, mode="offline", project="larp", entity=None, tag=None):
        """Start wandb. `online` without credentials falls back to offline with a note; failures never stop
        training (offline mode never touches the network)."""
        if not self.enabled or mode == "disabled":
            return
        if mode == "online" and not _has_wandb_credentials():
            self.log("wandb: no API key (WANDB_API_KEY or ~/.netrc); logging offline instead")
            mode = "offline"
        try:
            import wandb  # lazy: optional, slow to import, and only for runs that log to wandb
            settings = wandb.Settings(init_timeout=60, silent=True)
            id_file = os.path.join(self.run_dir, "wandb_id.txt")
            if os.path.exists(id_file):
                with open(id_file) as f:
                    run_id = f.read().strip()
            else:
                run_id = secrets.token_hex(4)
                atomic_write_text(id_file, run_id)
            self.wandb_run = wandb.init(project=project, entity=entity, name=name, config=cfg, dir=self.run_dir,
                                        mode=mode, id=run_id, resume="allow", tags=[tag] if tag else None,
                                        settings=settings)
            self.log(f"wandb: {mode} run {run_id} in {self.run_dir}/wandb")
        except Exception as e:  # wandb problems must not stop a training run
            self.log(f"wandb: disabled ({type(e).__name__}: {e})")
            self.wandb_run = None

    def image(self, key, path, step):
        if self.wandb_run is not None:
            try:
                import wandb  # lazy, as in init_wandb
                self.wandb_run.log({key: wandb.Image(path)}, step=step)
            except Exception as e:
                self.log(f"wandb: could not log image {path} ({e})")

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
