"""Synthetic set (classes, files, CSVs, geometry) and the analytic oracle (accurate, reads the videos, robust)."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from larp.data import oracle, synthetic
from larp.data.dataset import read_video_csv
from larp.data.video_io import read_frames


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    train_csv, val_csv = synthetic.make_synthetic_dataset(str(out), classes=8, videos_per_class=6, frames=16,
                                                          size=32, seed=3, progress=False)
    return out, train_csv, val_csv


def test_class_names():
    assert synthetic.class_names(8) == ["red_right", "red_left", "green_right", "green_left", "blue_right",
                                        "blue_left", "yellow_right", "yellow_left"]
    assert synthetic.class_names(16)[:4] == ["red_right", "red_left", "red_down", "red_up"]
    for n in synthetic.VALID_CLASS_COUNTS:  # every color appears with >= 2 directions and vice versa
        colors = [c.split("_")[0] for c in synthetic.class_names(n)]
        dirs = [c.split("_")[1] for c in synthetic.class_names(n)]
        assert len(set(zip(colors, dirs))) == n and len(set(colors)) >= 2 and len(set(dirs)) >= 2
        assert all(colors.count(c) >= 2 for c in colors) and all(dirs.count(d) >= 2 for d in dirs)
    with pytest.raises(ValueError, match="classes"):
        synthetic.class_names(7)


def test_files_and_csvs(small_set):
    out, train_csv, val_csv = small_set
    train, val = pd.read_csv(train_csv), pd.read_csv(val_csv)
    assert list(train.columns) == ["id", "path", "action", "label"]
    assert len(train) == 8 * 4 and len(val) == 8 * 2  # round(25% of 6) = 2 val videos per class
    assert set(train.id).isdisjoint(val.id)
    names = synthetic.class_names(8)
    assert all(names[l] == a for l, a in zip(train.label, train.action))
    assert all(not p.startswith("/") for p in train.path)  # relative to the CSV folder
    df = read_video_csv(f"{train_csv}+{val_csv}")
    frames = read_frames(df.path[0])
    assert frames.shape == (16, 32, 32, 3) and frames.dtype == np.uint8


def test_geometry_and_randomness():
    rng = np.random.default_rng(0)
    speeds, starts = [], []
    for label in range(16):
        for _ in range(20):
            p = synthetic.sample_params(label, 16, 16, 32, rng)
            r = p["diameter"] / 2
            for t in (0, 15):
                cx, cy = p["cx"] + p["vx"] * t, p["cy"] + p["vy"] * t
                assert r <= cx <= 32 - r and r <= cy <= 32 - r  # inside the frame in every frame
            dx, dy = synthetic.DIRECTIONS[synthetic.class_names(16)[label].split("_")[1]]
            along = p["vx"] * dx + p["vy"] * dy
            assert along >= 0.5 and abs(p["vx"] * dy - p["vy"] * dx) < 0.2 * along
            speeds.append(along)
            starts.append(p["cx"])
    assert np.std(speeds) > 0.05 and np.std(starts) > 2
    a = synthetic.render_video(3, 8, 16, 32, np.random.default_rng(5))
    b = synthetic.render_video(3, 8, 16, 32, np.random.default_rng(5))
    c = synthetic.render_video(3, 8, 16, 32, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_oracle_accuracy_and_shuffled(small_set):
    _, train_csv, val_csv = small_set
    df = read_video_csv(f"{train_csv}+{val_csv}")
    preds, labels, num_classes = oracle.oracle_predictions(df)
    assert num_classes == 8 and (preds == labels).mean() >= 0.99
    shuffled = np.random.default_rng(0).permutation(labels)
    assert (shuffled != labels).mean() > 0.7
    assert (preds == shuffled).mean() <= 0.5
    val = read_video_csv(val_csv)
    assert oracle.oracle_accuracy(val) >= 0.99
    assert oracle.oracle_accuracy(val.assign(label=(val.label + 1) % 8), num_classes=8) <= 0.5


def _blur(x):
    """Separable [1,4,6,4,1]/16 blur of (T,H,W,3) frames (edge padding)."""
    k = np.array([1, 4, 6, 4, 1]) / 16
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (2, 2)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(k[i] * np.take(p, range(i, i + n), axis=axis) for i in range(5))
    return x


def _degrade(frames, rng):
    """Blur, 32->16->32 resampling, desaturation, color shift and noise: a stand-in for a small tokenizer."""
    x = _blur(frames.astype(np.float64) / 255)  # (T, H, W, 3)
    t, h, w, _ = x.shape
    x = x.reshape(t, h // 2, 2, w // 2, 2, 3).mean((2, 4)).repeat(2, 1).repeat(2, 2)  # 2x2 average, back to 32
    x = _blur(x)
    gray = x.mean(-1, keepdims=True)
    x = gray + 0.6 * (x - gray) + rng.uniform(-0.06, 0.06, 3)
    x = x + 0.05 * rng.standard_normal(x.shape)
    return np.clip(x, 0, 1)  # float (T, H, W, 3)


def test_oracle_robust_on_short_degraded_windows(small_set):
    _, train_csv, _ = small_set
    df = read_video_csv(train_csv)
    rng = np.random.default_rng(1)
    correct = []
    for path, label in zip(df.path, df.label):
        video = read_frames(path)
        for t in (8, 4):
            s = int(rng.integers(0, 16 - t + 1))
            correct.append(oracle.predict_class(_degrade(video[s:s + t], rng), 8) == label)
    assert np.mean(correct) >= 0.95


def test_oracle_input_layouts(small_set):
    _, _, val_csv = small_set
    df = read_video_csv(val_csv)
    video = read_frames(df.path[2])
    as_float = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 255  # (3, T, H, W)
    big = F.interpolate(as_float.permute(1, 0, 2, 3), size=(96, 96), mode="nearest").permute(1, 0, 2, 3)
    assert oracle.predict_class(video, 8) == oracle.predict_class(as_float, 8) == df.label[2]
    assert oracle.predict_class(big, 8) == df.label[2]
    with pytest.raises(ValueError, match="2 frames"):
        oracle.predict_class(video[:1], 8)


def test_oracle_cli(small_set, capsys):
    _, _, val_csv = small_set
    oracle.main(oracle.parse_args([val_csv]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("oracle_accuracy=") and float(lines[-1].split("=")[1]) >= 0.99
    assert any("red_right" in line for line in lines)


def test_worker_processes_write_the_same_set(tmp_path):
    one = synthetic.make_synthetic_dataset(str(tmp_path / "one"), classes=4, videos_per_class=4, frames=8, progress=False)
    two = synthetic.make_synthetic_dataset(str(tmp_path / "two"), classes=4, videos_per_class=4, frames=8, progress=False,
                                 workers=2)
    for a, b in zip(one, two):
        assert open(a).read() == open(b).read()
    names = sorted(os.listdir(tmp_path / "one" / "videos"))
    assert names == sorted(os.listdir(tmp_path / "two" / "videos")) and len(names) == 16
    for n in names:
        assert (tmp_path / "one" / "videos" / n).read_bytes() == (tmp_path / "two" / "videos" / n).read_bytes()
