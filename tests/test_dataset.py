"""CSV resolution, clip enumeration (FVD protocol), train-mode items, skip mode, `+` joins, caching."""
import os
import random
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision import transforms

from larp.data import dataset as ds_mod
from larp.data.dataset import (VideoDataset, read_video_csv, resolve_csv, select_fvd_clips, transform_frames)
from larp.core.io import resize_video
from larp.data.video_io import write_video
from larp.core.errors import VideoReadError

STEP = 6  # frame k of a test video has gray level STEP * k (+ an offset per video)


def counter_video(path, num_frames, offset=0, size=(32, 48)):
    frames = np.zeros((num_frames, *size, 3), np.uint8)
    for k in range(num_frames):
        frames[k] = offset + STEP * k
    write_video(path, frames)


def frame_levels(video):
    """Mean gray level (0..255) of each frame of a (3,T,H,W) [0,1] tensor."""
    return (video.mean(dim=(0, 2, 3)) * 255).numpy()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    # name -> frames; listed in the CSV out of path order on purpose
    lengths = {"c.mp4": 40, "a.mp4": 33, "b.mp4": 5, "d.mp4": 16}
    for i, (name, n) in enumerate(lengths.items()):
        counter_video(d / name, n, offset=i)
    rows = [{"id": n[:-4], "path": n, "action": f"act{i}", "label": i} for i, n in enumerate(lengths)]
    pd.DataFrame(rows).to_csv(d / "all.csv", index=False)
    return d, lengths


def test_resolve_and_join(tmp_path, monkeypatch, video_dir):
    d, lengths = video_dir
    monkeypatch.setattr(ds_mod, "METADATA_DIR", str(tmp_path))
    df = pd.read_csv(d / "all.csv")
    df.iloc[:2].assign(path=[str(d / p) for p in df.path[:2]]).to_csv(tmp_path / "part1.csv", index=False)
    df.iloc[2:].assign(path=[os.path.relpath(d / p, tmp_path) for p in df.path[2:]]).to_csv(tmp_path / "part2.csv",
                                                                                            index=False)
    assert resolve_csv("part1") == [str(tmp_path / "part1.csv")]
    assert resolve_csv("part1.csv+part2") == [str(tmp_path / "part1.csv"), str(tmp_path / "part2.csv")]
    joined = read_video_csv("part1+part2.csv")
    assert list(joined.columns) == ["id", "path", "action", "label", "csv_path"]
    assert [os.path.realpath(p) for p in joined.path] == [os.path.realpath(d / p) for p in df.path]
    assert len(VideoDataset("part1+part2", frame_num=8, input_size=16, train=True)) == 4
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_csv("part1+nope")


def test_relative_to_project_root(tmp_path):
    pd.DataFrame([{"id": "x", "path": "larp/data/__init__.py", "action": "a", "label": 0}]).to_csv(
        tmp_path / "r.csv", index=False)
    assert read_video_csv(str(tmp_path / "r.csv")).path[0] == os.path.join(ds_mod.PROJECT_ROOT, "larp/data/__init__.py")


def test_eval_clip_enumeration(video_dir, tmp_path):
    d, lengths = video_dir
    ds = VideoDataset(str(d / "all.csv"), frame_num=16, input_size=32, train=False, cache_dir=str(tmp_path))
    expected = []
    for name in sorted(lengths):  # sorted paths, every non-overlapping clip from frame 0, len // T each
        label = list(lengths).index(name)
        expected += [(str(d / name), 16 * k, label) for k in range(lengths[name] // 16)]
    assert ds.clips == expected and len(ds) == len(expected) == 2 + 2 + 0 + 1
    item = ds[1]  # a.mp4, second clip
    assert item["video"].shape == (3, 16, 32, 32) and item["label"] == 1 and item["index"] == 1
    offset = list(lengths).index("a.mp4")
    np.testing.assert_allclose(frame_levels(item["video"]), offset + STEP * np.arange(16, 32), atol=2.5)


def test_clip_index_cached(video_dir, tmp_path, monkeypatch):
    d, _ = video_dir
    first = VideoDataset(str(d / "all.csv"), frame_num=8, input_size=32, train=False, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.cache"))) == 1

    def fail(path):
        raise AssertionError("frame counting should come from the cache")
    monkeypatch.setattr(ds_mod, "count_frames", fail)
    again = VideoDataset(str(d / "all.csv"), frame_num=8, input_size=32, train=False, cache_dir=str(tmp_path))
    assert again.clips == first.clips and len(first) == 5 + 4 + 0 + 2
    monkeypatch.undo()
    df = pd.read_csv(d / "all.csv")
    df.assign(path=[str(d / p) for p in df.path]).iloc[:1].to_csv(tmp_path / "all.csv", index=False)
    with open(tmp_path / "all.csv", "a") as f:
        f.write(f"new,{tmp_path / 'new.mp4'},x,9\n")
    counter_video(tmp_path / "new.mp4", 24)
    other = VideoDataset(str(tmp_path / "all.csv"), frame_num=8, input_size=32, train=False, cache_dir=str(tmp_path))
    assert len(other) == 5 + 3 and (str(d / "c.mp4"), 0, 0) in other.clips
    assert len(list(tmp_path.glob("all-*.frames-*.cache"))) == 2  # same CSV name, other folder: own index
    counter_video(tmp_path / "new.mp4", 32)  # a video rewritten: recounted, its stale index replaced
    recounted = VideoDataset(str(tmp_path / "all.csv"), frame_num=8, input_size=32, train=False, cache_dir=str(tmp_path))
    assert len(recounted) == 5 + 4 and len(list(tmp_path.glob("all-*.frames-*.cache"))) == 2
    assert VideoDataset(str(d / "all.csv"), frame_num=8, input_size=32, train=False, cache_dir=str(tmp_path)).clips == first.clips


def test_train_items(video_dir):
    d, lengths = video_dir
    torch.manual_seed(0)
    ds = VideoDataset(str(d / "all.csv"), frame_num=8, input_size=24, train=True)
    assert len(ds) == 4
    starts = set()
    for _ in range(6):
        for i in range(len(ds)):
            item = ds[i]
            v = item["video"]
            assert v.shape == (3, 8, 24, 24) and v.dtype == torch.float32
            assert float(v.min()) >= 0 and float(v.max()) <= 1
            assert item["label"] == i and item["index"] == i
            levels = frame_levels(v) - i
            n = list(lengths.values())[i]
            first = int(round(levels[0] / STEP))
            expected = STEP * np.minimum(first + np.arange(8), n - 1)  # consecutive, short video padded
            np.testing.assert_allclose(levels, expected, atol=2.5)
            assert 0 <= first <= max(n - 8, 0)
            if i == 0:
                starts.add(first)
    assert len(starts) > 1  # the window start is random


@pytest.mark.parametrize("height, width", [(240, 320), (256, 340), (97, 131), (131, 97), (61, 83), (128, 171),
                                           (100, 100)])
def test_transform_frames_equals_torchvision(height, width):
    """Bit for bit the reference's eval transform: Resize(S, antialias=True) + CenterCrop(S) on the (3,T,H,W) float
    clip, for UCF (320x240), K600-like (340x256), odd sizes and sizes below S (upsampled)."""
    frames = np.random.default_rng(height * width).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0  # (3, T, H, W), as the reference
    ref = transforms.Compose([transforms.Resize(128, antialias=True), transforms.CenterCrop(128)])(clip)
    out = transform_frames(frames, 128)
    assert out.shape == (3, 3, 128, 128) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, ref)


def test_transform_frames_truncates_the_long_side():
    """320x240 -> 170x128 (torchvision truncates 170.67), crop columns 21:149; rounding (171) shifts the crop."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0
    resized = torch.nn.functional.interpolate(clip, size=(128, 170), mode="bilinear", antialias=True)
    assert torch.equal(transform_frames(frames, 128), resized[..., 21:149])


def test_fp_resize_equals_torchvision():
    """The frame-prediction resize to 64x64 is the reference's Resize((64, 64)) on (B*T, 3, H, W) frames."""
    video = torch.rand(2, 3, 4, 128, 128, generator=torch.Generator().manual_seed(0))  # (B, 3, T, H, W)
    frames = video.permute(0, 2, 1, 3, 4).reshape(8, 3, 128, 128)
    ref = transforms.Resize((64, 64))(frames).reshape(2, 4, 3, 64, 64).permute(0, 2, 1, 3, 4)
    assert torch.equal(resize_video(video, 64), ref)


def test_hflip(video_dir, tmp_path):
    d, _ = video_dir
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    frames[:, :, :10] = 250  # bright left band
    write_video(tmp_path / "band.mp4", frames)
    pd.DataFrame([{"id": "band", "path": "band.mp4", "action": "a", "label": 0}]).to_csv(tmp_path / "b.csv", index=False)
    torch.manual_seed(0)
    ds = VideoDataset(str(tmp_path / "b.csv"), frame_num=4, input_size=32, train=True, hflip=True)
    lefts = {bool(ds[0]["video"][:, :, :, :5].mean() > 0.5) for _ in range(12)}
    assert lefts == {True, False}
    plain = VideoDataset(str(tmp_path / "b.csv"), frame_num=4, input_size=32, train=True)
    assert all(plain[0]["video"][:, :, :, :5].mean() > 0.5 for _ in range(4))


@pytest.fixture
def bad_csv(tmp_path):
    counter_video(tmp_path / "ok1.mp4", 16)
    counter_video(tmp_path / "ok2.mp4", 16, offset=3)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00 not an mp4")
    rows = [{"id": n, "path": f"{n}.mp4", "action": "a", "label": i} for i, n in enumerate(["ok1", "broken", "ok2"])]
    pd.DataFrame(rows).to_csv(tmp_path / "bad.csv", index=False)
    return tmp_path


def test_corrupt_file_raises(bad_csv):
    csv = str(bad_csv / "bad.csv")
    with pytest.raises(VideoReadError, match="broken.mp4"):
        VideoDataset(csv, frame_num=8, input_size=32, train=False, cache_dir=str(bad_csv))
    ds = VideoDataset(csv, frame_num=8, input_size=32, train=True)
    with pytest.raises(VideoReadError, match="broken.mp4"):
        ds[1]


def test_skip_bad(bad_csv):
    csv = str(bad_csv / "bad.csv")
    ds = VideoDataset(csv, frame_num=8, input_size=32, train=True, skip_bad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in [0, 1, 2, 1, 1]]
    assert [it["index"] for it in items] == [0, 2, 2, 2, 2]  # broken item replaced by the next readable one
    assert ds.num_bad == 3
    assert len([w for w in caught if "broken.mp4" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev = VideoDataset(csv, frame_num=8, input_size=32, train=False, skip_bad=True, cache_dir=str(bad_csv))
    assert [c[0] for c in ev.clips] == [str(bad_csv / n) for n in ["ok1.mp4", "ok1.mp4", "ok2.mp4", "ok2.mp4"]]
    assert ev.num_bad == 1 and len(caught) == 1


def test_select_fvd_clips():
    assert select_fvd_clips(50, 10) == random.Random(42).sample(range(50), 10)
    assert select_fvd_clips(50, 10, seed=1) == random.Random(1).sample(range(50), 10)
    with pytest.raises(ValueError, match="only 5 clips"):
        select_fvd_clips(5, 10)


def test_no_listed_video_present_points_to_set_datasets(tmp_path):
    """A CSV whose videos are all missing (the shipped reference CSVs before set_datasets.sh) says how to set the
    dataset up; one missing video among present ones does not."""
    from larp.data.dataset import check_videos_exist
    present = tmp_path / "a.mp4"
    present.write_bytes(b"x")
    df = pd.DataFrame({"path": [str(tmp_path / "gone1.mp4"), str(tmp_path / "gone2.mp4")]})
    with pytest.raises(VideoReadError, match="set_datasets.sh"):
        check_videos_exist(df, "ucf101_train.csv")
    with pytest.raises(VideoReadError) as e:
        check_videos_exist(pd.DataFrame({"path": [str(present), str(tmp_path / "gone1.mp4")]}), "x.csv")
    assert "1 of 2" in str(e.value) and "set_datasets" not in str(e.value)
