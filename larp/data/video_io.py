"""Reading frames by index and writing mp4 clips.

Reading uses decord where it is installed (x86 wheels) and PyAV otherwise; set `LARP_VIDEO_BACKEND=pyav` to
force the fallback. Any failure to read a file (missing, empty, corrupt, index past the end) becomes one
`VideoReadError` whose message names the file, so callers can report it or skip the file.
"""
import fractions
import os

import av
import numpy as np
import torch

from larp.core.errors import VideoReadError
from larp.core.io import atomic_write

try:
    import decord
except ImportError:  # non-x86 platforms: PyAV only
    decord = None

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")


def backend():
    """The reader in use: "decord" or "pyav"."""
    if os.environ.get("LARP_VIDEO_BACKEND", "").lower() == "pyav" or decord is None:
        return "pyav"
    return "decord"


def _check_file(path):
    if not os.path.exists(path):
        raise VideoReadError(f"cannot read video {path}: file not found")
    if os.path.isdir(path):
        raise VideoReadError(f"cannot read video {path}: is a directory")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"cannot read video {path}: empty file")


class _DecordReader:
    def __init__(self, path):
        try:
            self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:
            raise VideoReadError(f"cannot read video {path}: {_first_line(e)}") from None
        self.path = path

    def __len__(self):
        return len(self.vr)

    def get(self, indices):
        try:
            return self.vr.get_batch(list(indices)).asnumpy()
        except Exception:
            # decord's batch copy fails on some frame widths (e.g. 48): decode this file with PyAV instead
            return _PyAVReader(self.path).get(indices)


class _PyAVReader:
    """Decodes sequentially (robust for any container); frames are decoded once and kept."""

    def __init__(self, path):
        self.path = path
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoReadError(f"cannot read video {path}: no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                self.frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        except VideoReadError:
            raise
        except Exception as e:
            raise VideoReadError(f"cannot read video {path}: {_first_line(e)}") from None
        if not self.frames:
            raise VideoReadError(f"cannot read video {path}: no decodable frames")

    def __len__(self):
        return len(self.frames)

    def get(self, indices):
        return np.stack([self.frames[i] for i in indices])


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def open_video(path):
    """A reader with `len()` and `get(indices) -> uint8 (T,H,W,3)`; raises VideoReadError."""
    path = os.fspath(path)
    _check_file(path)
    reader = _DecordReader(path) if backend() == "decord" else _PyAVReader(path)
    if len(reader) == 0:
        raise VideoReadError(f"cannot read video {path}: no frames")
    return reader


def count_frames(path):
    """Number of frames of the video at `path`."""
    return len(open_video(path))


def _get_checked(reader, indices):
    n = len(reader)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise VideoReadError(f"cannot read video {reader.path}: frame index {bad[0]} out of range (video has {n} frames)")
    frames = reader.get(indices)  # (T, H, W, 3)
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise VideoReadError(f"cannot read video {reader.path}: decoder returned shape {frames.shape}")
    return np.ascontiguousarray(frames, dtype=np.uint8)


def read_frames(path, indices=None):
    """uint8 (T,H,W,3) RGB frames at `indices` (all frames when None)."""
    reader = open_video(path)
    indices = list(range(len(reader))) if indices is None else [int(i) for i in indices]
    return _get_checked(reader, indices)


def read_clip(path, frame_num, start=None, generator=None):
    """`frame_num` consecutive frames from `start` (random when None), opening the file once.

    Videos shorter than the window are padded by repeating their last frame. Returns (frames (T,H,W,3), start).
    """
    reader = open_video(path)
    n = len(reader)
    if start is None:
        high = max(n - frame_num, 0) + 1
        start = int(torch.randint(high, (1,), generator=generator).item())
    if start >= n:
        raise VideoReadError(f"cannot read video {path}: clip start {start} past the end ({n} frames)")
    indices = [min(start + i, n - 1) for i in range(frame_num)]
    return _get_checked(reader, indices), start


def write_video(path, frames, fps=8, crf=10):
    """Write uint8 (T,H,W,3) RGB frames to an H.264 yuv420p mp4, atomically (temp file + rename).

    H and W must be even (yuv420p). `crf` is the x264 quality (0 = lossless luma, 23 = x264 default).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video expects uint8 (T,H,W,3) frames, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"write_video expects uint8 frames, got {frames.dtype}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_video needs even height and width for yuv420p, got {h}x{w} for {path}")

    def write(tmp):
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            # mbtree=0: x264's macroblock-tree rate control encoded about 1 in 20 of these tiny clips differently
            # from one process to the next (measured on the synthetic set), so the same frames did not always give
            # the same decoded video; without it, 16 processes wrote identical files
            stream.options = {"crf": str(crf), "threads": "1", "x264-params": "mbtree=0"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    atomic_write(path, write)
