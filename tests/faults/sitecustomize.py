"""Fault injection for the tests, in any Python process started with this folder on PYTHONPATH (Python imports
`sitecustomize` at start-up; under torchrun the workers inherit it). Nothing happens unless LARP_FAULT is set:

  LARP_FAULT=replace:<text>@<n>         at the n-th os.replace onto a path containing <text>: the temp file is
                                        written in full, the final name not yet (killed mid-write)
  LARP_FAULT=<module>:<attr>@<n>        at the n-th call of module.attr (a function, or Class.method)
  LARP_FAULT_DO=kill (default)          SIGKILL this process there
  LARP_FAULT_DO=wait:<path>             create <path>.reached and wait there until <path> exists
  LARP_FAULT_RANK=<r>                   only in the process whose RANK is r (torchrun workers)
  LARP_FAULT_ONCE=<path>                only while <path> does not exist; it is created first (a restarted worker
                                        runs clean)
"""
import importlib
import os
import signal
import threading
import time


def _act():
    once = os.environ.get("LARP_FAULT_ONCE")
    if once:
        if os.path.exists(once):
            return
        open(once, "w").close()
    do = os.environ.get("LARP_FAULT_DO", "kill")
    if do == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    path = do.split(":", 1)[1]
    open(path + ".reached", "w").close()
    while not os.path.exists(path):
        time.sleep(0.01)


def _counter(n):
    lock, seen = threading.Lock(), [0]

    def hit():
        with lock:
            seen[0] += 1
            return seen[0] == n
    return hit


def _install(spec):
    where, n = spec.rsplit("@", 1)
    hit = _counter(int(n))
    if where.startswith("replace:"):
        text, real = where.split(":", 1)[1], os.replace

        def replace(src, dst, *args, **kwargs):
            if text in os.fspath(dst) and hit():
                _act()
            return real(src, dst, *args, **kwargs)
        os.replace = replace
        return
    module, attr = where.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    def call(*args, **kwargs):
        if hit():
            _act()
        return real(*args, **kwargs)
    setattr(owner, name, call)


if os.environ.get("LARP_FAULT") and os.environ.get("LARP_FAULT_RANK") in (None, os.environ.get("RANK")):
    _install(os.environ["LARP_FAULT"])
