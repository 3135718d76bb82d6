"""Locks a process holds on a file while it lives: the folder of a training run, the sample range of a sampling
process, a temp file while it is written (larp.core.io).

They are flock locks, so the OS drops them when the holder dies: a killed process never leaves a lock that blocks
the next run. A lock file taken with `take` records its holder (pid, host, start time) for the message of whoever
finds it taken. Forked children (DataLoader workers) close their copies, so a child that outlives a killed parent
for a moment does not keep the parent's locks.
"""
import contextlib
import datetime
import fcntl
import os
import socket
import stat

_HELD = set()  # descriptors of the locks this process holds


def _close_in_child():
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def hold(fd):
    """flock `fd` exclusively without waiting; True when taken (kept until `release`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    _HELD.add(fd)
    return True


def release(fd):
    """Close `fd`, which drops its lock."""
    _HELD.discard(fd)
    os.close(fd)


def is_linked(fd, path):
    """Whether `path` still names the file open as `fd` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def describe_me():
    now = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    return f"pid {os.getpid()} on host {socket.gethostname()} (since {now})"


def _recorded_holder(fd):
    text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    return text or "another process"


def take(path):
    """Take the lock file `path` (created with the umask's mode) without waiting.

    Returns (fd, None) when taken, with this process recorded in the file; (None, holder) when a live process
    holds it, `holder` being what that process recorded. OSErrors (a read-only folder) propagate.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        if not hold(fd):
            holder = _recorded_holder(fd)
            os.close(fd)
            return None, holder
        if is_linked(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (describe_me() + "\n").encode(), 0)
            return fd, None
        release(fd)  # removed as stale between open and lock: open the new one


def holder(path):
    """Who holds the lock file `path`, or None when nobody does (no file, or a holder that died). Creates
    nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return None if hold(fd) else _recorded_holder(fd)
    finally:
        release(fd)


def remove_if_stale(path):
    """Remove the lock file `path` unless a live process holds it; returns that holder, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile, or not a file we may open
        return None
    try:
        if not hold(fd):
            return _recorded_holder(fd)
        if stat.S_ISREG(os.fstat(fd).st_mode) and is_linked(fd, path):
            os.remove(path)
        return None
    finally:
        release(fd)
