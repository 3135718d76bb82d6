"""Running the rows of the papers' table (larp.sampling.paper_plan says what each runs) and writing the table.

Each row runs its command as a subprocess (printed first) into <out>/<row>/ and leaves <out>/<row>/paper_row.json
once its result is read: the command, its wall time and the bootstrap interval. A row whose paper_row.json holds
the same command is read, not rerun; a killed row is run again with the same command, and sample.py resumes from
its last finished chunk (eval_larp_tokenizer.py starts over). The interval is a 95 % percentile bootstrap of the
FVD over the per-sample I3D features the commands keep (larp.metrics.fvd.bootstrap_fvd).
"""
import csv
import io
import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Optional

from larp.core.io import atomic_write_text
from larp.core.safe_load import load_npz
from larp.metrics.detectors import ROOT
from larp.metrics.fvd import bootstrap_fvd
from larp.sampling.output_folder import read_csv, read_features
from larp.sampling.paper_plan import data_problem, detector_problem, estimate, executable, format_seconds

COLUMNS = ("row", "model", "paper", "ours", "95% interval", "samples", "protocol", "wall", "GPU-hours", "command")
CSV_COLUMNS = ("row", "model", "paper", "source", "fvd", "ours", "interval_lo", "interval_hi", "samples", "protocol",
               "wall_s", "gpu_hours", "command")
MARKER = "paper_row.json"


@dataclass
class RowResult:
    """What the table shows of a row: its number (None: `note` says why), the metrics beside it, the bootstrap
    interval, the clips scored and the wall time of the run that produced it."""
    plan: object
    value: Optional[float] = None
    beside: str = ""
    interval: Optional[tuple] = None
    samples: Optional[int] = None
    wall_s: Optional[float] = None
    note: str = ""

    def cells(self):
        """{column: text} of the markdown table."""
        p = self.plan
        ours = self.note if self.value is None else f"{self.value:.2f}" + (f" ({self.beside})" if self.beside else "")
        if self.value is not None and p.changed:
            ours += " (not the paper's protocol)"
        card = "; ".join(x for x in (f"not the paper's protocol ({p.changed})" if p.changed else "the paper's protocol",
                                     f"detector: {p.detector}") if x)
        interval = f"[{self.interval[0]:.2f}, {self.interval[1]:.2f}]" if self.interval else \
            ("no per-sample features" if self.value is not None else "")
        wall = format_seconds(self.wall_s) if self.wall_s is not None else ""
        gpu_h = "" if self.wall_s is None else "0 (CPU)" if not p.gpus else f"{self.wall_s * p.gpus / 3600:.2f}"
        return {"row": p.row.name, "model": p.row.model, "paper": p.row.paper, "ours": ours, "95% interval": interval,
                "samples": "" if self.samples is None else str(self.samples), "protocol": card, "wall": wall,
                "GPU-hours": gpu_h, "command": shlex.join(p.argv)}

    def csv_row(self):
        c = self.cells()
        return {**{k: c[k] for k in ("row", "model", "paper", "ours", "samples", "protocol", "command")},
                "source": self.plan.row.source, "fvd": "" if self.value is None else repr(self.value),
                "interval_lo": "" if not self.interval else repr(self.interval[0]),
                "interval_hi": "" if not self.interval else repr(self.interval[1]),
                "wall_s": "" if self.wall_s is None else f"{self.wall_s:.1f}", "gpu_hours": c["GPU-hours"]}


def run_command(plan, log_path, log=print):
    """Run the row's command, its output echoed and kept in `log_path`. Returns (exit status, last lines)."""
    log(f"$ {shlex.join(plan.argv)}")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    tail = []
    with open(log_path, "w") as f:
        proc = subprocess.Popen(executable(plan.argv), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            f.write(line)
            print(line, end="", flush=True)
            tail = (tail + [line.strip()])[-20:]
        proc.wait()
    return proc.returncode, [t for t in tail if t]


def read_metrics(plan):
    """(FVD, metrics beside it, samples) from the report the row's command wrote; None when absent."""
    if plan.row.entry == "sample.py":
        rows = read_csv(os.path.join(plan.folder, "fvd_report.csv"))
        if not rows:
            return None
        card = json.loads(rows[-1]["protocol"])
        return float(rows[-1]["fvd"]), "", int(card["num_samples"])
    path = os.path.join(plan.folder, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = json.load(f)
    beside = ", ".join(f"{name} {m[k]:{fmt}}" for k, name, fmt in (("psnr", "PSNR", ".2f"), ("ssim", "SSIM", ".4f"),
                                                                     ("lpips", "LPIPS", ".4f")) if k in m)
    if "lpips" not in m:
        beside += ", LPIPS not computed (no VGG weights)"
    return m.get("fvd"), beside, int(m["num_clips"])


def features_of(plan):
    """(real, fake) per-sample features the row's command kept, or None."""
    if plan.row.entry == "sample.py":
        return read_features(plan.folder)
    path = os.path.join(plan.folder, "features.npz")
    if not os.path.exists(path):
        return None
    d = load_npz(path)
    return d["real"], d["fake"]


def finished(plan):
    """The marker of a finished row run with this same command, or None."""
    path = os.path.join(plan.folder, MARKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        marker = json.load(f)
    return marker if marker.get("argv") == list(plan.argv) and read_metrics(plan) is not None else None


def interval_of(plan, num):
    feats = features_of(plan) if num > 0 else None
    if feats is None or min(len(feats[0]), len(feats[1])) < 2:
        return None
    b = bootstrap_fvd(feats[0], feats[1], num=num, seed=0)
    return b["lo"], b["hi"]


def run_row(plan, opts, log=print):
    """The RowResult of one row: read when finished with the same command, else run (then read)."""
    if plan.missing:
        return RowResult(plan, note=plan.missing)
    marker = finished(plan)
    if marker is not None:
        log(f"row {plan.row.name}: finished result in {plan.folder}, read (not rerun)")
    else:
        log(f"row {plan.row.name}: {plan.row.model}, paper {plan.row.paper}")
        t0 = time.perf_counter()
        rc, tail = run_command(plan, os.path.join(opts.out, "logs", f"{plan.row.name}.log"), log)
        wall = time.perf_counter() - t0
        if rc != 0 or read_metrics(plan) is None:
            why = next((t for t in reversed(tail) if "error" in t.lower()), tail[-1] if tail else "")
            return RowResult(plan, note=f"failed (exit {rc}): {why[:200]}", wall_s=wall)
        interval = interval_of(plan, opts.bootstrap)
        marker = {"argv": list(plan.argv), "wall_s": wall, "gpus": plan.gpus,
                  "interval": list(interval) if interval else None, "bootstrap": opts.bootstrap}
        atomic_write_text(os.path.join(plan.folder, MARKER), json.dumps(marker, indent=2) + "\n")
    value, beside, samples = read_metrics(plan)
    return RowResult(plan, value=value, beside=beside, interval=tuple(marker["interval"] or ()) or None,
                     samples=samples, wall_s=marker["wall_s"])


def markdown(results):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        c = r.cells()
        lines.append("| " + " | ".join(c[k].replace("|", "\\|") if k != "command" else f"`{c[k]}`"
                                       for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_table(out, results):
    """<out>/paper_table.md and <out>/paper_table.csv, atomically. Returns the markdown."""
    text = markdown(results)
    atomic_write_text(os.path.join(out, "paper_table.md"), "# The papers' table\n\n" + text)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    w.writerows(r.csv_row() for r in results)
    atomic_write_text(os.path.join(out, "paper_table.csv"), buf.getvalue())
    return text


def run_table(plans, opts, log=print):
    """Every row in order (a row that cannot run or fails does not stop the others), then the table."""
    results = [run_row(p, opts, log) for p in plans]
    text = write_table(opts.out, results)
    log(f"\nThe papers' table ({os.path.join(opts.out, 'paper_table.md')}, .csv):\n\n{text}")
    return results


def checkpoint_status(spec):
    """Where a checkpoint is: a local path, the local hub cache, or neither (fetched on first use)."""
    if os.path.exists(spec):
        return f"{spec} (local)"
    from huggingface_hub import try_to_load_from_cache  # lazy: only hub ids need it
    repo, _, revision = spec.partition("@")
    pin = f"pinned to {revision}" if revision else "unpinned: the newest revision"
    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision or None), str):
        return f"{spec} (in the local hub cache; {pin})"
    return f"{spec}: MISSING from the local hub cache (fetched on first use; {pin})"


def dry_run_lines(plans, opts, detector, figures):
    """What a run would do, row by row: paper number, command, checkpoints and data (what is missing named) and
    the wall-time estimate from measured throughputs."""
    device = f"{opts.gpus} x {opts.device_name}" if opts.gpus else "CPU (no GPU)"
    problem = detector_problem(detector)
    lines = [f"papers' table: {len(plans)} row(s) into {opts.out}; devices: {device}",
             f"detector: {detector.label}" + (f" (MISSING: {problem})" if problem else "")]
    for p in plans:
        num = opts.num_samples or p.row.num_samples
        csv_path = p.argv[p.argv.index("--dataset_csv") + 1]
        data = data_problem(csv_path) or f"{csv_path}: every video on disk"
        models = [p.missing or checkpoint_status(p.generator)] if p.row.needs_generator else []
        lines += [f"{p.row.name}: {p.row.model}; paper {p.row.paper}; {p.row.source}",
                  f"  command: {shlex.join(p.argv)}",
                  f"  checkpoints: {'; '.join(models + [checkpoint_status(opts.tokenizer)])}",
                  f"  data: {data}"
                  + (f"\n  finished: {p.folder} holds its result (read, not rerun)" if finished(p) else ""),
                  f"  estimate: {estimate(p, num, opts.device_name if opts.gpus else 'CPU', figures)}"
                  + (f"; not the paper's protocol ({p.changed})" if p.changed else "")]
    return lines
