"""The shipped data/metadata CSVs are the reference's, and the seed-42 FVD clip draw over them (and over the CSVs
make_csv writes from a download laid out like the official one) is the reference's (path, start frame, label) list.

The reference's rule is restated here from its code (datasets/video_dataset.py with use_all_frames, sample.py):
the CSV's paths sorted as spelled, `len // 16` clips per video from frame 0, UCF labels the position of the file
name's action in the sorted action names, then random.Random(42).sample(range(num_clips), N). Frame counts come
from a fake counter (no videos here), the same for both sides.
"""
import hashlib
import os
import random
import zlib

import pandas as pd
import pytest

from larp.data import dataset as ds_mod
from larp.data import make_csv
from larp.data.dataset import METADATA_DIR, VideoDataset, select_fvd_clips

# md5 of the reference's files (hywang66/LARP data/metadata/, identical in ThisisBillhe/NAR) and their row counts
REFERENCE = {"ucf101_train.csv": ("a8fc6873bb1db2fce678625841dd034b", 9537),
             "ucf101_val.csv": ("98d96e62acd5d06fac0843523006b6de", 3783),
             "k600_val.csv": ("439a0d3578cb964c568ac35e053e375c", 29739)}
DRAWS = {"ucf101_train.csv": 10000, "ucf101_val.csv": 10000, "k600_val.csv": 50000}  # the seed commands' sizes
K600_MISSING_CLASS = "mountain climber (exercise)"  # label 293: in the annotation, no video in the reference CSV


def fake_count(path):
    """Frame count of a (missing) video, from its file name: 10..309, so clip counts differ between videos."""
    return 10 + zlib.crc32(os.path.basename(str(path)).encode()) % 300


@pytest.fixture(autouse=True)
def fake_frame_counts(monkeypatch):
    monkeypatch.setattr(ds_mod, "frame_counts", lambda paths, *a, **k: [fake_count(p) for p in paths])


def reference_draw(csv, total, seed=42, frame_num=16):
    df = pd.read_csv(csv)
    videos = sorted(df.sort_values(["label", "path"])["path"].tolist())
    if os.path.basename(csv).startswith("ucf"):
        actions = sorted({os.path.basename(v).split("_")[1] for v in videos})
        label = {v: actions.index(os.path.basename(v).split("_")[1]) for v in videos}
    else:  # the reference passes no label here (-1; frame prediction ignores it): the CSV's
        label = dict(zip(df["path"], df["label"]))
    clips = [(v, k * frame_num, int(label[v])) for v in videos for k in range(fake_count(v) // frame_num)]
    return [clips[i] for i in random.Random(seed).sample(range(len(clips)), total)]


def our_draw(csv, total, tmp_path):
    ds = VideoDataset(str(csv), frame_num=16, input_size=128, train=False, cache_dir=str(tmp_path))
    spelled = dict(zip(ds.df["path"], ds.df["csv_path"]))
    return [(spelled[p], int(s), int(l)) for p, s, l in (ds.clips[i] for i in select_fvd_clips(len(ds), total, 42))]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_shipped_csvs_are_the_reference(name):
    path = os.path.join(METADATA_DIR, name)
    digest, rows = REFERENCE[name]
    assert hashlib.md5(open(path, "rb").read()).hexdigest() == digest
    assert len(pd.read_csv(path)) == rows


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_seed42_draw_of_the_shipped_csvs(name, tmp_path):
    csv = os.path.join(METADATA_DIR, name)
    ours = our_draw(csv, DRAWS[name], tmp_path)
    assert ours == reference_draw(csv, DRAWS[name])
    assert len({c[0] for c in ours}) > 1000


def shipped(name):
    return pd.read_csv(os.path.join(METADATA_DIR, name))


def ucf_download(root, train, val):
    """UCF-101/<Action>/v_*.avi and ucfTrainTestlist/{classInd,trainlist01,testlist01}.txt holding the rows of the
    DataFrames `train` and `val` (paths data/ucf101/<Action>/<file>)."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    classes = sorted(set(train["action"]) | set(val["action"]))
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    entries = {s: [p.split("/", 2)[2] for p in df["path"]] for s, df in (("train", train), ("val", val))}
    (lists / "trainlist01.txt").write_text("".join(f"{e} {classes.index(e.split('/')[0]) + 1}\r\n"
                                                   for e in entries["train"]))
    (lists / "testlist01.txt").write_text("".join(f"{e}\r\n" for e in entries["val"]))
    for e in entries["train"] + entries["val"]:
        (root / "UCF-101" / e).parent.mkdir(parents=True, exist_ok=True)
        (root / "UCF-101" / e).write_bytes(b"")
    return root / "UCF-101", lists


def k600_download(root, splits):
    """k600/<split>/<id>_<start>_<end>.mp4 (flat) and k600/annotations/<split>.csv as the CVDF download has them,
    for {split: DataFrame of CSV rows}; each annotation also lists a video of K600_MISSING_CLASS that is absent."""
    (root / "k600" / "annotations").mkdir(parents=True)
    for split, df in splits.items():
        (root / "k600" / split).mkdir()
        rows = []
        for path, action in zip(df["path"], df["action"]):
            stem = os.path.basename(path)[:-4]
            rows.append({"label": action, "youtube_id": stem[:-14], "time_start": int(stem[-13:-7]),
                         "time_end": int(stem[-6:]), "split": split})
            (root / "k600" / split / os.path.basename(path)).write_bytes(b"")
        at = next((i for i, r in enumerate(rows) if r["label"] > K600_MISSING_CLASS), len(rows))
        rows.insert(at, {"label": K600_MISSING_CLASS, "youtube_id": "gone0000000", "time_start": 0, "time_end": 10,
                         "split": split})  # annotated, never downloaded
        pd.DataFrame(rows).to_csv(root / "k600" / "annotations" / f"{split}.csv", index=False)
    return root / "k600"


@pytest.mark.slow
def test_make_csv_from_downloads_gives_the_reference_csvs_and_draw(tmp_path, monkeypatch):
    """make_csv on fake downloads laid out like the official ones, linked under data/ as set_datasets.sh links
    them, writes the reference's CSVs (same text, line ends aside), so the draw is the reference's too."""
    project, downloads = tmp_path / "project", tmp_path / "downloads"
    (project / "data" / "metadata").mkdir(parents=True)
    monkeypatch.setattr(make_csv, "PROJECT_ROOT", str(project))
    monkeypatch.setattr(ds_mod, "PROJECT_ROOT", str(project))  # where the check and the dataset resolve data/
    ucf, lists = ucf_download(downloads, shipped("ucf101_train.csv"), shipped("ucf101_val.csv"))
    os.symlink(ucf, project / "data" / "ucf101")
    os.symlink(k600_download(downloads, {"val": shipped("k600_val.csv")}), project / "data" / "k600")
    out = project / "data" / "metadata"
    monkeypatch.chdir(project)
    make_csv.main(make_csv.parse_args(["ucf101", "--root", "data/ucf101", "--splits-dir", str(lists),
                                       "--out", str(out)]))
    make_csv.main(make_csv.parse_args(["k600", "--root", "data/k600", "--splits", "val", "--out", str(out)]))
    for name in REFERENCE:
        assert (out / name).read_text() == open(os.path.join(METADATA_DIR, name)).read(), name  # k600_val: CRLF there
        assert our_draw(out / name, DRAWS[name], tmp_path) == reference_draw(os.path.join(METADATA_DIR, name),
                                                                            DRAWS[name])
