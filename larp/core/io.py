"""Small file and tensor plumbing used across the package: atomic file writes, the check of output path arguments, the
float-to-uint8 video conversion and the per-frame resize of video batches.

Everything that writes a file a reader may see half-written goes through `atomic_write`: the file appears whole
under its final name or not at all, with the mode the user's umask gives (like any other tool: 0644 under umask
022, 0664 under 002 for a shared group folder). A write the file system refuses (disk full, quota, read-only or
foreign folder) is a WriteError naming the final path, so the entry points print one line. The temp file of a
write in progress is locked (larp.core.locks): `remove_stale_temps` removes those of killed writers only, never
those of a live process writing into the same folder.
"""
import contextlib
import errno
import os
import secrets

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from larp.core import locks
from larp.core.errors import UsageError, WriteError

TEMP_PREFIX = ".tmp_"
_RETRY = "free some space and run the same command again: finished work is kept"
_ELSEWHERE = "choose a location you can write to"
REFUSALS = {  # errno of a refused write -> what the user reads
    errno.ENOSPC: f"no space left on device ({_RETRY})", errno.EDQUOT: f"disk quota exceeded ({_RETRY})",
    errno.EFBIG: "file too large for this file system", errno.EROFS: f"read-only file system ({_ELSEWHERE})",
    errno.EACCES: f"permission denied ({_ELSEWHERE})", errno.EPERM: f"operation not permitted ({_ELSEWHERE})",
    errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "it is a folder, expected a file",
    errno.EEXIST: "a file is in the way of a folder",
}
FULL_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full


@contextlib.contextmanager
def naming_write_errors(path):
    """Turn an OSError of the file system refusing to write (REFUSALS) into a WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.errno not in REFUSALS:
            raise
        where = f" ({e.filename})" if e.errno == errno.EEXIST and e.filename else ""
        raise WriteError(f"cannot write {path}: {REFUSALS[e.errno]}{where}") from e


def _disk_full(folder):
    """torch.save, np.save and safetensors report a full disk without an errno: look at the disk instead."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BYTES


def _new_temp(folder, suffix):
    """(fd, path) of a new temp file in `folder`, mode 0666 less the umask, locked while it is written."""
    while True:
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(6)}{suffix}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        locks.hold(fd)  # a fresh file: only a cleaner that found it unlocked can hold it, and then removes it
        if locks.is_linked(fd, tmp):
            return fd, tmp
        locks.release(fd)


def atomic_write(path, write):
    """Call write(tmp_path) on a temp file beside `path` (same suffix), then rename it over `path`.

    Readers never see a half-written file, and a failed write leaves the old file untouched and removes the temp
    file (a killed one leaves it to `remove_stale_temps`). Raises WriteError naming `path` when the file system
    refuses the write.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with naming_write_errors(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = _new_temp(folder, os.path.splitext(path)[1])
        try:
            write(tmp)
            os.replace(tmp, path)
        except Exception as e:
            if not isinstance(e, OSError) and _disk_full(folder):
                raise WriteError(f"cannot write {path}: {REFUSALS[errno.ENOSPC]}") from e
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            locks.release(fd)
    return path


def remove_stale_temps(folder):
    """Remove the temp files in `folder` left by killed writes; those of live writers are locked and kept.
    Returns the paths removed."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    stale = [os.path.join(folder, n) for n in names if n.startswith(TEMP_PREFIX)]
    return [p for p in stale if locks.remove_if_stale(p) is None and not os.path.lexists(p)]


def append_text(path, text):
    """Append `text` to `path` (a log); a refused write is a WriteError naming `path`."""
    with naming_write_errors(path), open(path, "a") as f:
        f.write(text)


def expect_path(path, flag, folder=True):
    """`path`, named by `flag`, is a folder to write into (or with folder=False a file to write): one line when it
    is the other kind, or when one of its existing parents is a file."""
    kinds = ("folder", "file") if folder else ("file", "folder")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise UsageError(f"{flag} {path}: is a {kinds[1]}, expected a {kinds[0]}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, expected a folder")


def atomic_save(obj, path):
    """torch.save, atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_savez(path, arrays):
    """{name: array} as an .npz (plain arrays, no pickling), atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)


def to_uint8(videos):
    """Float videos (B, 3, T, H, W) in [0, 1] (tensor or array; clamped) -> uint8 numpy (B, T, H, W, 3)."""
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().float().cpu().numpy()
    v = np.clip(np.nan_to_num(np.asarray(videos, dtype=np.float32)), 0, 1)
    return np.round(v.transpose(0, 2, 3, 4, 1) * 255).astype(np.uint8)


def resize_video(x, size):
    """(B, 3, T, H, W) -> (B, 3, T, size, size): every frame through torchvision `Resize((size, size))`
    (antialiased bilinear), the reference's frame-prediction resize to 64x64; a no-op at that size."""
    b, c, t, h, w = x.shape
    if (h, w) == (size, size):
        return x
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
    frames = TF.resize(frames, [size, size], antialias=True)
    return frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)
