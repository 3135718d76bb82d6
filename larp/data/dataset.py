"""Video CSVs (`id,path,action,label`) and the clip dataset used for training and FVD evaluation.

Training mode: one item per video, a random `frame_num` window at the native frame rate.
Evaluation mode: one item per clip of the FVD protocol (docs/evaluation.md): video paths sorted as the CSVs spell
them, each video gives its non-overlapping clips from frame 0 (`len // T` of them). Counting frames of thousands of
videos is slow, so the per-video frame counts are cached to disk, keyed on the listed paths and their
size/mtime.
"""
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import stat
import sys
import warnings

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from larp.core.io import atomic_write_text
from larp.data.video_io import count_frames, read_clip, read_frames
from larp.core.errors import CSVError, CSVNotFoundError, VideoReadError
from larp.core.utils import progress_bar

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METADATA_DIR = os.path.join(PROJECT_ROOT, "data", "metadata")
CSV_COLUMNS = ("id", "path", "action", "label")
DATASET_HINT = "; the datasets are linked and their CSVs built by `bash set_datasets.sh` (docs/datasets.md)"


def resolve_csv(spec):
    """CSV files named by `spec`: a path, or a name under data/metadata/ (with or without .csv); `a+b` joins."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return [os.path.abspath(spec)]
    paths = []
    for part in spec.split("+"):
        part = part.strip()
        candidates = [part, os.path.join(METADATA_DIR, part)]
        if not part.endswith(".csv"):
            candidates.append(os.path.join(METADATA_DIR, part + ".csv"))
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None and os.path.isdir(part):
            raise CSVNotFoundError(f"'{part}' is a folder, expected a CSV file")
        if found is None:
            where = f"{METADATA_DIR}/{part}" + ("" if part.endswith(".csv") else "[.csv]")
            hint = "" if os.path.dirname(part) else DATASET_HINT
            raise CSVNotFoundError(f"CSV file '{part}' not found (looked for {os.path.abspath(part)} and "
                                   f"{where}){hint}")
        paths.append(os.path.abspath(found))
    return paths


def _absolute(path, csv_dir):
    if os.path.isabs(path):
        return path
    from_root = os.path.join(PROJECT_ROOT, path)
    if os.path.exists(from_root):
        return from_root
    from_csv = os.path.join(csv_dir, path)
    return from_csv if os.path.exists(from_csv) else from_root


def _read_one_csv(csv_path):
    try:
        return pd.read_csv(csv_path, dtype={"id": str, "path": str, "action": str})
    except pd.errors.EmptyDataError:
        raise CSVError(f"{csv_path}: empty file; expected a header {','.join(CSV_COLUMNS)} and one row per "
                       f"video") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise CSVError(f"{csv_path}: not a readable CSV ({' '.join(str(e).split())[:200]})") from None


def read_video_csv(spec):
    """DataFrame with columns id,path,action,label of all CSVs in `spec`, paths made absolute (csv_path: the path
    as the CSV spells it).

    Relative paths are taken relative to the project root where the file exists there, else to the CSV's folder.
    Raises CSVNotFoundError / CSVError naming the file and what is wrong with it.
    """
    frames = []
    for csv_path in resolve_csv(spec):
        df = _read_one_csv(csv_path)
        missing = [c for c in ("path", "label") if c not in df.columns]
        if missing:
            raise CSVError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected columns "
                           f"{','.join(CSV_COLUMNS)} (found {','.join(map(str, df.columns)) or 'none'})")
        if "id" not in df.columns:
            df["id"] = [os.path.splitext(os.path.basename(p))[0] for p in df["path"]]
        if "action" not in df.columns:
            df["action"] = df["label"].astype(str)
        empty = df["label"].isna() | df["path"].isna()
        if empty.any():
            raise CSVError(f"{csv_path}: empty path or label in data row {int(empty.to_numpy().argmax()) + 1}")
        labels = pd.to_numeric(df["label"], errors="coerce")
        bad = labels.isna() | (labels % 1 != 0) | (labels < 0)
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise CSVError(f"{csv_path}: label '{df['label'][row]}' in data row {row + 1} is not a class index "
                           f"(expected an integer >= 0)")
        csv_dir = os.path.dirname(csv_path)
        df["csv_path"] = df["path"].astype(str)  # as spelled: the FVD clip order sorts these
        df["path"] = [_absolute(p, csv_dir) for p in df["path"]]
        df["label"] = labels.astype(int)
        frames.append(df[[*CSV_COLUMNS, "csv_path"]])
    return pd.concat(frames, ignore_index=True)


def check_labels(df, num_classes, csv, what):
    """Every label of `df` must be a class of a model with `num_classes` classes (`what` names that setting)."""
    top = int(df["label"].max()) if len(df) else -1
    if top >= num_classes:
        row = int((df["label"] >= num_classes).to_numpy().argmax())
        raise CSVError(f"{csv}: label {top} (e.g. {df['path'][row]}) is outside the {num_classes} classes of "
                       f"{what} (labels must be 0..{num_classes - 1})")


def _video_file_problem(path):
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "not a file"
    return "empty file" if st.st_size == 0 else None


def check_videos_exist(df, csv):
    """Cheap pre-flight (one stat per file): every listed video exists and is not empty."""
    bad = [(p, why) for p in df["path"] for why in [_video_file_problem(p)] if why]
    if bad:
        hint = DATASET_HINT if len(bad) == len(df) else ""  # none there: the dataset is not set up yet
        raise VideoReadError(f"{csv}: {len(bad)} of {len(df)} listed video(s) missing or empty, e.g. {bad[0][0]} "
                             f"({bad[0][1]}){hint}")


FRAME_TRANSFORM = "short side resized (antialias), centre crop"  # what transform_frames does, as stats record it


def transform_frames(frames, input_size):
    """uint8 (T,H,W,3) -> float32 (3,T,S,S) in [0,1], S = input_size: the reference's torchvision
    `Resize(S, antialias=True)` + `CenterCrop(S)` on the (3,T,H,W) float clip (short side to S, long side
    truncated, e.g. 320x240 -> 170x128; crop offset rounded), so real clips equal the reference's bit for bit."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 255.0  # (3, T, H, W)
    x = TF.center_crop(TF.resize(x, input_size, antialias=True), input_size)
    return x.contiguous()  # (3, T, S, S)


def clip_set_name(paths):
    """How stats record a set of CSVs or a folder: paths relative to the project root when under it, else
    absolute, joined by '+'."""
    names = []
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), PROJECT_ROOT)
        names.append(os.path.abspath(p) if rel.startswith("..") else rel)
    return "+".join(names)


def select_fvd_clips(num_clips, num_samples_total, seed=42):
    """Indices of the clips used for FVD: random.Random(seed).sample(range(num_clips), num_samples_total)."""
    if num_samples_total > num_clips:
        raise ValueError(f"cannot draw {num_samples_total} FVD clips: the evaluation set has only {num_clips} clips")
    return random.Random(seed).sample(range(num_clips), num_samples_total)


def _cache_key(paths):
    h = hashlib.sha1()
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{p}\t{stamp}\n".encode())
    return h.hexdigest()[:16]


def _count_or_none(path, skip_bad):
    try:
        return count_frames(path)
    except VideoReadError:
        if not skip_bad:
            raise
        return None


def frame_counts(paths, cache_dir=None, cache_name="videos", skip_bad=False, workers=None):
    """Frame count of every path (None for unreadable ones when `skip_bad`), cached in `cache_dir` when given."""
    paths = list(paths)
    cache_file = None
    if cache_dir is not None:
        cache_file = os.path.join(cache_dir, f"{cache_name}.frames-{_cache_key(paths)}.cache")
        cached = {}
        with contextlib.suppress(OSError, ValueError):
            with open(cache_file) as f:
                cached = json.load(f)
        if cached.get("paths") == paths:
            counts = cached["counts"]
            if skip_bad or all(c is not None for c in counts):
                return counts
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        counts = list(progress_bar(pool.map(lambda p: _count_or_none(p, skip_bad), paths), total=len(paths),
                                   desc="counting frames", disable=len(paths) < 200, file=sys.stderr))
    if cache_file is not None:
        try:
            atomic_write_text(cache_file, json.dumps({"paths": paths, "counts": counts}))
            for name in os.listdir(cache_dir):  # stale indexes of the same CSVs (videos changed since)
                if name.startswith(f"{cache_name}.frames-") and name.endswith(".cache") and \
                        name != os.path.basename(cache_file):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(cache_dir, name))
        except OSError as e:
            warnings.warn(f"could not write clip index cache {cache_file}: {e}")
    return counts


class VideoDataset(Dataset):
    """Clips of the videos listed in `csv` (see module docstring); items are
    {"video": float (3,T,S,S) in [0,1], "label": int, "index": int}.

    A video shorter than `frame_num` is padded by repeating its last frame in training; in evaluation it gives
    no clip (`len // T`, the FVD protocol).
    `skip_bad=True` replaces an unreadable video by the next readable item, counts it in `num_bad` and warns once.
    The eval-mode clip index is cached in `cache_dir` (default: the folder of the first CSV).
    `window_seed` (training mode): item i's window start is drawn from torch.Generator(window_seed * 1_000_003 + i)
    instead of the global RNG, so a pass over the set (the reference's rFVD protocol) repeats.
    """

    def __init__(self, csv, frame_num=16, input_size=128, train=True, hflip=False, skip_bad=False, cache_dir=None,
                 window_seed=None):
        self.csv, self.frame_num, self.input_size = csv, frame_num, input_size
        self.train, self.hflip, self.skip_bad, self.window_seed = train, hflip, skip_bad, window_seed
        self.df = read_video_csv(csv)
        if len(self.df) == 0:
            raise CSVError(f"{csv}: no videos listed (only a header?)")
        self.num_bad = 0
        self._warned = False
        if train:
            self.items = [(p, None, int(l)) for p, l in zip(self.df["path"], self.df["label"])]
            self.clips = None
        else:
            self.clips = self._enumerate_clips(cache_dir)
            self.items = self.clips
            if not self.clips:
                raise CSVError(f"no {frame_num}-frame clips in {csv}: every video is shorter than {frame_num} frames")

    def _enumerate_clips(self, cache_dir):
        order = sorted(range(len(self.df)), key=lambda i: self.df["csv_path"][i])  # the reference: CSV spelling
        paths = [self.df["path"][i] for i in order]
        labels = [int(self.df["label"][i]) for i in order]
        csv_files = resolve_csv(self.csv)
        cache_dir = cache_dir if cache_dir is not None else os.path.dirname(csv_files[0])
        name = "+".join(os.path.splitext(os.path.basename(c))[0] for c in csv_files)
        name += "-" + hashlib.sha1("\n".join(csv_files).encode()).hexdigest()[:8]  # same-named CSVs elsewhere
        try:
            counts = frame_counts(paths, cache_dir, name, skip_bad=self.skip_bad)
        except VideoReadError as e:
            raise VideoReadError(f"{e} (listed in {self.csv})") from None
        bad = sum(c is None for c in counts)
        if bad:
            self.num_bad += bad
            self._warn(f"{bad} unreadable video(s) in {self.csv} left out of the clip index")
        clips = []
        for path, label, n in zip(paths, labels, counts):
            for k in range((n or 0) // self.frame_num):
                clips.append((path, k * self.frame_num, label))
        return clips

    def _warn(self, message):
        if not self._warned:
            warnings.warn(message + " (further unreadable videos are counted in dataset.num_bad)")
            self._warned = True

    def __len__(self):
        return len(self.items)

    def _load(self, index):
        path, start, label = self.items[index]
        generator = None
        if start is None and self.window_seed is not None:
            generator = torch.Generator().manual_seed(int(self.window_seed) * 1_000_003 + index)
        frames, _ = read_clip(path, self.frame_num, start=start, generator=generator)  # (T, H, W, 3)
        video = transform_frames(frames, self.input_size)  # (3, T, S, S)
        if self.train and self.hflip and torch.rand(()) < 0.5:
            video = video.flip(-1)
        return {"video": video, "label": label, "index": index}

    def __getitem__(self, index):
        """With skip_bad, items also carry "skipped": the unreadable videos passed over to find this one (so a
        loader with worker processes can still count them: the workers' num_bad stays in the workers)."""
        if not self.skip_bad:
            return self._load(index)
        for k in range(len(self.items)):
            j = (index + k) % len(self.items)
            try:
                return {**self._load(j), "skipped": k}
            except VideoReadError as e:
                self.num_bad += 1
                self._warn(f"skipping unreadable video: {e}")
        raise VideoReadError(f"no readable video at all in {self.csv}")


class VideoFolder(Dataset):
    """The first `frame_num` frames of each video in a folder (sorted by name) -> {"video": (3, T, S, S) float in
    [0, 1], "index": int}, frames as transform_frames makes them."""

    EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".gif")

    def __init__(self, folder, frame_num=16, input_size=128):
        self.paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(self.EXTENSIONS))
        if not self.paths:
            raise ValueError(f"no videos ({', '.join(self.EXTENSIONS)}) in folder '{folder}'")
        self.frame_num, self.input_size = frame_num, input_size

    def first_length(self):
        """Frame count of the first video (the length of generated clips, which all have the same)."""
        return count_frames(self.paths[0])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            frames = read_frames(path, range(self.frame_num))  # (T, H, W, 3) uint8
        except VideoReadError:
            if (n := count_frames(path)) < self.frame_num:
                raise VideoReadError(f"{path} has {n} frames, fewer than the {self.frame_num}-frame clips asked "
                                     f"for") from None
            raise
        return {"video": transform_frames(frames, self.input_size), "index": index}
