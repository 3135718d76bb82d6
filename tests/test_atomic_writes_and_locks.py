"""The file plumbing behind the fault tests, unit by unit: atomic writes get the umask's mode, stale temp files
are removed but a live writer's are not, a lock names its holder and dies with it, forked children do not keep
their parent's locks."""
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import pytest

from larp.core import io, locks
from tests.conftest import ROOT


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_the_mode_of_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.atomic_write_text(tmp_path / "a.txt", "x")
        io.atomic_save({"x": 1}, tmp_path / "b.pth")
    finally:
        os.umask(old)
    assert [os.stat(tmp_path / n).st_mode & 0o777 for n in ("a.txt", "b.pth")] == [mode, mode]


def test_stale_temps_go_and_a_live_writers_stay(tmp_path):
    (tmp_path / ".tmp_dead.pkl").write_bytes(b"half")  # left by a killed writer: nobody holds its lock
    (tmp_path / "keep.pkl").write_bytes(b"a result")
    started, finish = threading.Event(), threading.Event()

    def slow_write(tmp):
        open(tmp, "wb").write(b"partial")
        started.set()
        finish.wait(30)
    writer = threading.Thread(target=io.atomic_write, args=(tmp_path / "live.pkl", slow_write))
    writer.start()
    started.wait(30)
    live = [n for n in os.listdir(tmp_path) if n.startswith(".tmp_") and n != ".tmp_dead.pkl"]
    assert io.remove_stale_temps(tmp_path) == [str(tmp_path / ".tmp_dead.pkl")]
    assert sorted(os.listdir(tmp_path)) == sorted(live + ["keep.pkl"])  # the live one is still being written
    finish.set()
    writer.join()
    assert sorted(os.listdir(tmp_path)) == ["keep.pkl", "live.pkl"]


def test_a_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = str(tmp_path / ".run.lock")
    code = (f"import sys, time; from larp.core import locks; fd, h = locks.take({path!r}); assert h is None; "
            "print('taken', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "taken"
        fd, holder = locks.take(path)
        assert fd is None and holder.startswith(f"pid {child.pid} on host ")
        assert locks.holder(path) == holder
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert locks.holder(path) is None  # the OS dropped the dead holder's lock; its file stays
    fd, holder = locks.take(path)
    assert holder is None and locks.holder(path).startswith(f"pid {os.getpid()} on host ")
    locks.release(fd)


def _sleep(seconds):
    import time
    time.sleep(seconds)


def test_forked_children_do_not_keep_a_lock(tmp_path):
    """A DataLoader worker forked while the parent held the run folder must not hold it after the parent let go."""
    path = str(tmp_path / ".run.lock")
    fd, _ = locks.take(path)
    child = multiprocessing.get_context("fork").Process(target=_sleep, args=(20,))
    child.start()
    try:
        locks.release(fd)
        probe = subprocess.run([sys.executable, "-c", f"from larp.core import locks; print(locks.holder({path!r}))"],
                               cwd=ROOT, capture_output=True, text=True)
        assert probe.stdout.strip() == "None", probe.stdout + probe.stderr
    finally:
        child.kill()
        child.join()
