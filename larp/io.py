"""Small file and tensor plumbing used across the package: atomic file writes and the float-to-uint8 video
conversion. Everything that writes a file a reader may see half-written goes through `atomic_write`."""
import os
import tempfile

import numpy as np
import torch


def atomic_write(path, write):
    """Call write(tmp_path) on a temp file beside `path` (same suffix), then rename it over `path`.

    Readers never see a half-written file, and a failed write leaves the old file untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj, path):
    """torch.save, atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
