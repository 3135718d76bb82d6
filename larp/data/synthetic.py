"""Synthetic moving-object videos: the offline stand-in for UCF-101.

Each video shows one saturated, soft-edged disk moving in a straight line across a static, low-contrast,
smooth gray texture. The class is (color, direction): colors alone or directions alone never determine it,
so a generator has to get both appearance and motion right. Per video, the disk size, start position, speed,
a small sideways drift, brightness, and the background level, tint and texture are random, so a generator must
learn a distribution. The disk stays inside the frame in every frame and moves at least ~0.5 px/frame at 32 px,
so the class can be read from any 4 consecutive frames (see larp/data/oracle.py).

    python -m larp.data.synthetic --out data/synthetic --classes 8 --videos-per-class 48
"""
import contextlib
import functools
import multiprocessing
import os
import time

import numpy as np
import pandas as pd

from larp.core.cli import parser
from larp.core.io import atomic_write_text, expect_path
from larp.data.video_io import write_video
from larp.core.errors import UsageError, run_cli
from larp.core.utils import progress_bar

# Saturated colors with well separated hues (in the order used to build classes).
COLORS = {
    "red": (225, 35, 35),
    "green": (35, 200, 50),
    "blue": (45, 85, 240),
    "yellow": (235, 215, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 225),
}
# Unit displacement (dx, dy) per direction, image coordinates (y grows downwards).
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "down": (0.0, 1.0), "up": (0.0, -1.0)}
VALID_CLASS_COUNTS = (4, 6, 8, 10, 12, 16, 20, 24)


def class_grid(num_classes):
    """(color names, direction names) of a `num_classes` set; label = color_index * len(directions) + dir_index."""
    if num_classes not in VALID_CLASS_COUNTS:
        raise UsageError(f"synthetic set supports {list(VALID_CLASS_COUNTS)} classes "
                         f"(2-6 colors x 2 or 4 directions), got {num_classes}")
    num_dirs = 2 if num_classes <= 12 else 4
    return list(COLORS)[:num_classes // num_dirs], list(DIRECTIONS)[:num_dirs]


def class_names(num_classes):
    """Class names `<color>_<direction>` indexed by label, e.g. class_names(8)[0] == "red_right"."""
    colors, dirs = class_grid(num_classes)
    return [f"{c}_{d}" for c in colors for d in dirs]


def _background(size, rng):
    """Static smooth texture: gray level + faint tint + a few low-frequency sinusoids. float (S,S,3) in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    level = rng.uniform(95, 160)
    texture = np.zeros((size, size))
    for _ in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        freq = rng.uniform(0.7, 2.5)  # cycles per frame width
        phase = rng.uniform(0, 2 * np.pi)
        texture += rng.uniform(4, 8) * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    tint = rng.normal(size=3)
    tint = (tint - tint.mean()) / (np.linalg.norm(tint - tint.mean()) + 1e-8) * rng.uniform(0, 8)
    return level + texture[..., None] + tint


def sample_params(label, num_classes, frames, size, rng):
    """Random trajectory and appearance of one video of class `label` (a dict of plain floats)."""
    colors, dirs = class_grid(num_classes)
    color = colors[label // len(dirs)]
    dx, dy = DIRECTIONS[dirs[label % len(dirs)]]
    diameter = rng.uniform(0.28, 0.38) * size
    margin = 1.0
    travel = size - diameter - 2 * margin  # room for the center along the motion axis
    steps = max(frames - 1, 1)
    speed = rng.uniform(0.55, 0.95) * travel / steps
    drift = rng.uniform(-0.15, 0.15) * speed  # sideways px/frame
    lo, hi = margin + diameter / 2, size - margin - diameter / 2
    along = rng.uniform(lo, hi - speed * steps)  # start, for motion towards +axis
    across = rng.uniform(lo - min(0.0, drift * steps), hi - max(0.0, drift * steps))
    sign = dx + dy  # +1 right/down, -1 left/up
    if sign < 0:
        along = size - along  # mirrored start so the disk ends inside the frame
    horizontal = dx != 0
    cx, cy = (along, across) if horizontal else (across, along)
    vx, vy = (sign * speed, drift) if horizontal else (drift, sign * speed)
    rgb = np.array(COLORS[color], dtype=np.float64) * rng.uniform(0.85, 1.05) + rng.uniform(-10, 10, size=3)
    return {"cx": cx, "cy": cy, "vx": vx, "vy": vy, "diameter": diameter, "rgb": rgb.tolist()}


def render_video(label, num_classes=8, frames=16, size=32, rng=None, params=None):
    """uint8 (T,S,S,3) video of class `label`; `params` (from sample_params) fixes the randomness."""
    rng = rng if rng is not None else np.random.default_rng()
    params = params or sample_params(label, num_classes, frames, size, rng)
    background = _background(size, rng)  # (S, S, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centers
    radius = params["diameter"] / 2
    rgb = np.array(params["rgb"])
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        cx, cy = params["cx"] + params["vx"] * t, params["cy"] + params["vy"] * t
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        alpha = np.clip(radius + 0.5 - dist, 0, 1)[..., None]  # anti-aliased edge
        shade = 1.0 - 0.15 * np.clip(dist / radius, 0, 1)[..., None] ** 2
        frame = alpha * rgb * shade + (1 - alpha) * background
        out[t] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    return out


def _write_one(out, classes, frames, size, seed, fps, job):
    """Render and write video k of class `label` (job: label, k, name) under out/videos/."""
    label, k, vid = job
    video = render_video(label, classes, frames, size, np.random.default_rng([seed, label, k]))
    write_video(os.path.join(out, "videos", vid + ".mp4"), video, fps=fps)


def make_synthetic_dataset(out, classes=8, videos_per_class=48, frames=16, size=32, seed=0, fps=8,
                           val_fraction=0.25, progress=True, workers=1):
    """Write `videos_per_class` videos of each class under out/videos/ and out/train.csv, out/val.csv (`workers`
    processes render and encode them; video k of class c depends only on (seed, c, k)).

    CSV paths are relative to `out` (read_video_csv resolves them). Returns (train_csv, val_csv).
    """
    if size % 2 or size < 16:
        raise UsageError(f"--size must be even and >= 16 (H.264 yuv420p), got {size}")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if frames < 2:
        raise UsageError(f"--frames must be >= 2 (motion is part of the class), got {frames}")
    names = class_names(classes)
    num_val = int(round(videos_per_class * val_fraction))
    if not 0 < num_val < videos_per_class:
        raise UsageError(f"--videos-per-class {videos_per_class} with val fraction {val_fraction} leaves an empty split")
    rows = {"train": [], "val": []}
    jobs = [(label, k, f"{names[label]}_{k:03d}") for label in range(classes) for k in range(videos_per_class)]
    write = functools.partial(_write_one, out, classes, frames, size, seed, fps)
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        written = pool.imap(write, jobs, chunksize=64) if pool else map(write, jobs)
        for (label, k, vid), _ in zip(jobs, progress_bar(written, total=len(jobs), desc="synthetic videos",
                                                         disable=not progress)):
            split = "val" if k >= videos_per_class - num_val else "train"
            rows[split].append({"id": vid, "path": f"videos/{vid}.mp4", "action": names[label], "label": label})
    paths = []
    for split in ("train", "val"):
        path = os.path.join(out, f"{split}.csv")
        atomic_write_text(path, pd.DataFrame(rows[split]).to_csv(index=False))
        paths.append(path)
    return tuple(paths)


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="output folder (videos/, train.csv, val.csv)")
    p.add_argument("--classes", type=int, default=8, choices=VALID_CLASS_COUNTS, help="number of classes (colours x "
                   "directions)")
    p.add_argument("--videos-per-class", type=int, default=48, help="videos of each class")
    p.add_argument("--frames", type=int, default=16, help="frames per video")
    p.add_argument("--size", type=int, default=32, help="frame height = width (pixels)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the whole set")
    p.add_argument("--fps", type=int, default=8, help="frame rate written into the mp4s")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of each class's videos in val.csv")
    p.add_argument("--workers", type=int, default=1, help="processes that render and encode the videos")
    return p.parse_args(argv)


def main(args):
    expect_path(args.out, "--out")
    start = time.time()
    train_csv, val_csv = make_synthetic_dataset(args.out, args.classes, args.videos_per_class, args.frames,
                                                args.size, args.seed, args.fps, args.val_fraction,
                                                workers=args.workers)
    print(f"wrote {train_csv} and {val_csv} ({args.classes} classes x {args.videos_per_class} videos, "
          f"{args.frames} frames, {args.size}px) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    run_cli(main, parse_args())
