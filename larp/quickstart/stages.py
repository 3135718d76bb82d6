"""The quickstart's stage runner: every stage is one command of this repository with a log file; a stage starts as
soon as the stages it needs have finished and enough CPU threads are free, so the two generators, the evaluations of
the one that finishes first and the tokenizer's evaluations overlap instead of waiting for each other."""
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Union


@dataclasses.dataclass
class Stage:
    name: str
    cmd: Union[list, Callable[[], list]]  # a callable is built when the stage starts (its inputs exist then)
    done_file: str                         # the stage's last output: a stage whose done_file exists is reused
    needs: tuple = ()                      # names of the stages that must finish first
    threads: int = 1                       # CPU threads it gets (OMP_NUM_THREADS)


def _printable(cmd, root):
    return " ".join(os.path.relpath(c, root) if c.startswith(root) else c for c in cmd)


def run_pipeline(stages, times, log_dir, root, threads=2):
    """Run `stages` (in list order of priority), at most `threads` CPU threads busy at once. A stage's output goes to
    log_dir/<name>.log; `times[name]` gets its wall seconds. A failing stage stops the others and the quickstart
    with its log's path."""
    done, running, waiting = set(), [], []
    for s in stages:
        if os.path.exists(s.done_file):
            print(f"[quickstart] {s.name}: reusing {os.path.relpath(s.done_file, root)}", flush=True)
            times.setdefault(s.name, {"seconds": None})["reused"] = True
            done.add(s.name)
        else:
            waiting.append(s)
    while waiting or running:
        free = threads - sum(r[0].threads for r in running)
        for s in [s for s in waiting if set(s.needs) <= done]:
            if s.threads <= free or not running:
                waiting.remove(s)
                running.append(_start(s, log_dir, root))
                free -= s.threads
        if sys.stdout.isatty():  # a status line rewritten in place: on a terminal only, never into a log file
            show_progress(running)
        time.sleep(1)
        for r in [r for r in running if r[3].poll() is not None]:
            running.remove(r)
            stage, log_path, t0, proc = r
            if proc.returncode != 0 or not os.path.exists(stage.done_file):
                for other in running:
                    other[3].terminate()
                sys.exit(f"\n[quickstart] stage '{stage.name}' failed (exit {proc.returncode}); its log: {log_path}")
            times[stage.name] = {"seconds": time.perf_counter() - t0, "reused": False}
            print(f"\n[quickstart] {stage.name}: done in {times[stage.name]['seconds']:.0f} s", flush=True)
            done.add(stage.name)
        if waiting and not running and not any(set(s.needs) <= done for s in waiting):
            sys.exit(f"[quickstart] stages {[s.name for s in waiting]} wait for stages that are not in the list")


def _start(stage, log_dir, root):
    cmd = stage.cmd() if callable(stage.cmd) else stage.cmd
    print(f"\n[quickstart] {stage.name}: {_printable(cmd, root)}", flush=True)
    log_path = os.path.join(log_dir, f"{stage.name}.log")
    env = dict(os.environ, OMP_NUM_THREADS=str(stage.threads))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    return stage, log_path, time.perf_counter(), proc


def show_progress(running):
    """One status line with the last line of every running stage's log."""
    parts = []
    for stage, log_path, _, proc in running:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 400))
            tail = f.read().decode(errors="replace").replace("\n", "\r").split("\r")
        last = next((t.strip() for t in reversed(tail) if t.strip()), "starting")
        parts.append(f"{stage.name}: {'done' if proc.poll() is not None else last[:70]}")
    width = shutil.get_terminal_size((160, 20)).columns
    sys.stdout.write("\r" + " | ".join(parts)[:width - 1].ljust(width - 1))
    sys.stdout.flush()
