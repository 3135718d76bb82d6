"""Build the dataset CSVs (id,path,action,label) so nobody edits lists by hand.

    python -m larp.data.make_csv ucf101 --root data/ucf101 [--splits-dir DIR] [--split 1]
    python -m larp.data.make_csv k600 --root data/k600 [--train-split train] [--val-split val]
    python -m larp.data.make_csv check data/metadata/ucf101_train.csv ...

Building checks that every listed video exists (the `check` command does only that).

UCF-101: train/val = the official trainlist0N/testlist0N of `--split`; the label of a video is the position of
its action name (taken from the file name v_<Action>_g.._c..) in the Python-sorted list of all action names
(file names spell some actions differently from classInd.txt, e.g. HandstandPushups).
K600: `<root>/<split>/<class>/<video>`; label = index of the class folder in the sorted train classes.
Paths are written relative to the project root when the files lie under it (keep data/ links unresolved),
else absolute.
"""
import argparse
import os
import re

import pandas as pd

from larp.core.io import atomic_write_text, expect_path
from larp.data.dataset import CSV_COLUMNS, METADATA_DIR, PROJECT_ROOT, read_video_csv
from larp.data.video_io import VIDEO_EXTENSIONS
from larp.core.errors import UsageError, run_cli

UCF_NAME = re.compile(r"^v_(.+)_g\d+_c\d+$")


def csv_path_for(path):
    """Path as written in a CSV: relative to the project root if under it (symlinks kept), else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, PROJECT_ROOT)
    return path if rel.startswith("..") else rel


def ucf_action(filename):
    """Action name of a UCF-101 file name `v_<Action>_gXX_cYY.avi`."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    m = UCF_NAME.match(stem)
    if m is None:
        raise ValueError(f"not a UCF-101 video name (v_<Action>_gXX_cYY): {filename}")
    return m.group(1)


def _index_videos(root):
    """{file name: path} of every video file under `root` (following the linked folder)."""
    found = {}
    for folder, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.setdefault(name, os.path.join(folder, name))
    return found


def _find_file(root, name):
    for folder, _dirs, files in os.walk(root, followlinks=True):
        if name in files:
            return folder
    return None


def _read_list(path):
    """Video file names of a split list (lines 'Action/v_Action_g08_c01.avi [label]')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"UCF-101 split list not found: {path}")
    with open(path) as f:
        return [os.path.basename(line.split()[0]) for line in f if line.strip()]


def _expect_folder(path, what):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path}: " + ("is a file, expected a folder" if os.path.exists(path) else
                                                        "not found"))


def ucf101_tables(root, splits_dir=None, split=1):
    """(train DataFrame, val DataFrame) of UCF-101 split `split` with videos found under `root`."""
    if split not in (1, 2, 3):
        raise ValueError(f"UCF-101 split must be 1, 2 or 3, got {split}")
    _expect_folder(root, "UCF-101 folder")
    if splits_dir:
        _expect_folder(splits_dir, "--splits-dir")
    splits_dir = splits_dir or _find_file(root, "classInd.txt")
    if splits_dir is None or not os.path.isfile(os.path.join(splits_dir, "classInd.txt")):
        raise FileNotFoundError(f"classInd.txt not found under {splits_dir or root}; pass --splits-dir")
    with open(os.path.join(splits_dir, "classInd.txt")) as f:
        class_ind = [line.split()[1] for line in f if line.strip()]
    lists = {"train": _read_list(os.path.join(splits_dir, f"trainlist0{split}.txt")),
             "val": _read_list(os.path.join(splits_dir, f"testlist0{split}.txt"))}
    actions = sorted({ucf_action(n) for names in lists.values() for n in names})
    if sorted(a.lower() for a in actions) != sorted(c.lower() for c in class_ind):
        raise ValueError(f"action names in the split lists ({len(actions)}) do not match classInd.txt "
                         f"({len(class_ind)} classes) in {splits_dir}")
    label_of = {a: i for i, a in enumerate(actions)}
    videos = _index_videos(root)
    tables = []
    for split_name, names in lists.items():
        missing = [n for n in names if n not in videos]
        if missing:
            raise FileNotFoundError(f"{len(missing)} videos of the {split_name} list not found under {root}, "
                                    f"e.g. {missing[0]}")
        rows = [{"id": os.path.splitext(n)[0], "path": csv_path_for(videos[n]), "action": ucf_action(n),
                 "label": label_of[ucf_action(n)]} for n in names]
        tables.append(pd.DataFrame(rows, columns=list(CSV_COLUMNS)))
    return tuple(tables)


def k600_tables(root, train_split="train", val_split="val"):
    """(train DataFrame, val DataFrame) of a Kinetics-style tree `<root>/<split>/<class>/<video>`."""
    tables, classes = [], None
    _expect_folder(root, "Kinetics folder")
    for split in (train_split, val_split):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"Kinetics split folder not found: {split_dir}")
        split_classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        if classes is None:
            classes = split_classes
            label_of = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(split_classes) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir} has classes missing from {train_split}: {unknown[:5]}")
        rows = []
        for c in split_classes:
            for name in sorted(os.listdir(os.path.join(split_dir, c))):
                if name.lower().endswith(VIDEO_EXTENSIONS):
                    rows.append({"id": os.path.splitext(name)[0], "path": csv_path_for(os.path.join(split_dir, c, name)),
                                 "action": c, "label": label_of[c]})
        if not rows:
            raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {split_dir}")
        tables.append(pd.DataFrame(rows, columns=list(CSV_COLUMNS)))
    return tuple(tables)


def write_csv(df, path):
    atomic_write_text(path, df.to_csv(index=False))
    print(f"wrote {path} ({len(df)} videos, {df['label'].nunique()} classes)")
    return path


def check_csvs(specs):
    """Number of rows of each CSV; raises FileNotFoundError naming the first missing video."""
    counts = {}
    for spec in specs:
        df = read_video_csv(spec)
        missing = [p for p in df["path"] if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{spec}: {len(missing)} of {len(df)} listed videos are missing, e.g. {missing[0]}")
        counts[spec] = len(df)
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)
    u = sub.add_parser("ucf101", help="UCF-101 from its folder and official split lists")
    u.add_argument("--root", required=True, help="folder containing the UCF-101 videos (any nesting)")
    u.add_argument("--splits-dir", default=None, help="folder with classInd.txt, trainlist0N.txt, testlist0N.txt "
                                                      "(default: searched under --root)")
    u.add_argument("--split", type=int, default=1, choices=(1, 2, 3))
    u.add_argument("--out", default=METADATA_DIR)
    k = sub.add_parser("k600", help="Kinetics-600 from <root>/<split>/<class>/<video>")
    k.add_argument("--root", required=True)
    k.add_argument("--train-split", default="train")
    k.add_argument("--val-split", default="val")
    k.add_argument("--out", default=METADATA_DIR)
    c = sub.add_parser("check", help="check that every path listed in the CSVs exists")
    c.add_argument("csvs", nargs="+")
    return p.parse_args(argv)


def main(args):
    if args.dataset != "check":
        expect_path(args.out, "--out")
    try:
        written = []
        if args.dataset == "ucf101":
            train, val = ucf101_tables(args.root, args.splits_dir, args.split)
            written += [write_csv(train, os.path.join(args.out, "ucf101_train.csv")),
                        write_csv(val, os.path.join(args.out, "ucf101_val.csv"))]
        if args.dataset == "k600":
            train, val = k600_tables(args.root, args.train_split, args.val_split)
            written += [write_csv(train, os.path.join(args.out, "k600_train.csv")),
                        write_csv(val, os.path.join(args.out, "k600_val.csv"))]
        for spec, n in check_csvs(written or args.csvs).items():
            print(f"ok: {spec} ({n} videos, all present)")
    except (FileNotFoundError, ValueError) as e:  # missing folders, lists or videos; malformed names
        raise UsageError(str(e)) from e


if __name__ == "__main__":
    run_cli(main, parse_args())
