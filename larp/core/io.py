"""Small file and tensor plumbing used across the package: atomic file writes, the float-to-uint8 video
conversion and the per-frame resize of video batches. Everything that writes a file a reader may see half-written
goes through `atomic_write`."""
import os
import tempfile

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


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


def resize_video(x, size):
    """(B, 3, T, H, W) -> (B, 3, T, size, size): every frame through torchvision `Resize((size, size))`
    (antialiased bilinear), the reference's frame-prediction resize to 64x64; a no-op at that size."""
    b, c, t, h, w = x.shape
    if (h, w) == (size, size):
        return x
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
    frames = TF.resize(frames, [size, size], antialias=True)
    return frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)
