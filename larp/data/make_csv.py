"""Build the dataset CSVs (id,path,action,label) so nobody edits lists by hand.

    python -m larp.data.make_csv ucf101 --root data/ucf101 [--splits-dir DIR] [--split 1]
    python -m larp.data.make_csv k600 --root data/k600 [--splits train val]
    python -m larp.data.make_csv check data/metadata/ucf101_train.csv ...

Building checks that every listed video exists; the `check` command does that and warns when a UCF-101 CSV's labels
do not follow the rule below (the reference's dataset sets UCF-101 labels from the file names by that rule, whatever
the CSV says; classInd.txt's order differs, e.g. at HammerThrow / Hammering). data/metadata/ ships the
reference's UCF-101 split-1 and K600-val CSVs; these builders write the same rows from the same downloads, so the
FVD clip draw (which takes the clips sorted by path as spelled in the CSV) is the reference's.

UCF-101 (the official UCF-101/<Action>/v_<Action>_gXX_cYY.avi): train/val = trainlist0N/testlist0N of `--split`;
path = <root>/<the list entry>, action = the entry's folder, label = the position of the action in the
Python-sorted list of the action names of the file names (they spell some differently, e.g. HandStandPushups);
rows sorted by path, id = row number from 0.
K600 (the CVDF download, k600/<split>/<youtube_id>_<start:06d>_<end:06d>.mp4 with k600/annotations/<split>.csv or
.txt): the annotation rows whose video exists, in the annotation's order, path = <root>/<split>/<file>, label =
the position of the class in the sorted class names of the train annotation (else of this split's), id = row
number from 1. A `<root>/<split>/<class>/<video>` tree without annotations is read as well (label = index of the
class folder in the sorted train classes), but its paths sort differently, so its clip draw is not the reference's.
Paths are written relative to the project root when the files lie under it (keep data/ links unresolved),
else absolute.
"""
import os
import re
import sys

import pandas as pd

from larp.core.cli import HelpFormatter, parser
from larp.core.io import atomic_write_text, expect_path
from larp.data.dataset import CSV_COLUMNS, METADATA_DIR, PROJECT_ROOT, read_video_csv
from larp.data.video_io import VIDEO_EXTENSIONS
from larp.core.errors import UsageError, run_cli

UCF_NAME = re.compile(r"^v_(.+)_g\d+_c\d+$")
UCF_NUM_CLASSES = 101


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
    """Entries 'Action/v_Action_g08_c01.avi' of a split list (lines '<entry> [label]')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"UCF-101 split list not found: {path}")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


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
    actions = sorted({ucf_action(e) for entries in lists.values() for e in entries})
    if sorted(a.lower() for a in actions) != sorted(c.lower() for c in class_ind):
        raise ValueError(f"action names in the split lists ({len(actions)}) do not match classInd.txt "
                         f"({len(class_ind)} classes) in {splits_dir}")
    label_of = {a: i for i, a in enumerate(actions)}
    videos = _index_videos(root)
    tables = []
    for split_name, entries in lists.items():
        rows = []
        for entry in entries:
            path = os.path.join(root, entry)
            if not os.path.isfile(path):  # another layout: found by file name, spelled as found
                path = videos.get(os.path.basename(entry))
            if path is None:
                raise FileNotFoundError(f"videos of the {split_name} list not found under {root}, e.g. {entry}")
            folder = os.path.dirname(entry) or ucf_action(entry)
            rows.append({"path": csv_path_for(path), "action": folder, "label": label_of[ucf_action(entry)]})
        tables.append(_numbered(rows, first_id=0))
    return tuple(tables)


def _numbered(rows, first_id, sort=True):
    """DataFrame of `rows` (sorted by path when `sort`) with ids first_id, first_id + 1, ..."""
    if sort:
        rows = sorted(rows, key=lambda r: r["path"])
    rows = [{"id": first_id + i, **r} for i, r in enumerate(rows)]
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


def _annotation(root, split):
    """The CVDF annotation file of `split` (annotations/<split>.csv or .txt), or None."""
    for ext in (".csv", ".txt"):
        path = os.path.join(root, "annotations", split + ext)
        if os.path.isfile(path):
            return path
    return None


def _read_annotation(path):
    """(label, file name) of every row of a Kinetics annotation: label,youtube_id,time_start,time_end[,split]."""
    df = pd.read_csv(path, dtype={"youtube_id": str})
    missing = {"label", "youtube_id", "time_start", "time_end"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not a Kinetics annotation (no column(s) {', '.join(sorted(missing))})")
    names = [f"{y}_{int(a):06d}_{int(b):06d}.mp4"
             for y, a, b in zip(df["youtube_id"], df["time_start"], df["time_end"])]
    return list(zip(df["label"].astype(str), names))


def _k600_flat(root, split, classes):
    """Rows of the flat CVDF layout: annotation order, videos that exist, ids from 1."""
    rows = []
    for label, name in _read_annotation(_annotation(root, split)):
        path = os.path.join(root, split, name)
        if os.path.isfile(path):
            rows.append({"path": csv_path_for(path), "action": label, "label": classes.index(label)})
    return _numbered(rows, first_id=1, sort=False)


def _k600_folders(root, split, classes):
    """Rows of a `<split>/<class>/<video>` tree, sorted by path, ids from 1."""
    split_dir = os.path.join(root, split)
    split_classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    unknown = sorted(set(split_classes) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir} has classes missing from the train split: {unknown[:5]}")
    rows = [{"path": csv_path_for(os.path.join(split_dir, c, name)), "action": c, "label": classes.index(c)}
            for c in split_classes for name in sorted(os.listdir(os.path.join(split_dir, c)))
            if name.lower().endswith(VIDEO_EXTENSIONS)]
    return _numbered(rows, first_id=1)


def k600_tables(root, splits=("train", "val")):
    """{split: DataFrame} of a Kinetics download: the CVDF layout (flat videos + annotations) or class folders."""
    tables = {}
    _expect_folder(root, "Kinetics folder")
    train = "train" if "train" in splits else splits[0]
    annotated = _annotation(root, train) or _annotation(root, splits[0])
    if annotated:
        classes = sorted({label for label, _ in _read_annotation(annotated)})
    else:
        train_dir = os.path.join(root, train)
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(f"Kinetics split folder not found: {train_dir}")
        classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    for split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"Kinetics split folder not found: {os.path.join(root, split)}")
        if _annotation(root, split):
            tables[split] = _k600_flat(root, split, classes)
        else:
            tables[split] = _k600_folders(root, split, classes)
            print(f"note: {root}/{split} has no annotations/{split}.csv: read as <class>/<video> folders, whose "
                  f"paths sort differently from the reference's CSV (another FVD clip draw)")
        if tables[split].empty:
            raise FileNotFoundError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {os.path.join(root, split)}")
    return tables


def write_csv(df, path):
    atomic_write_text(path, df.to_csv(index=False))
    print(f"wrote {path} ({len(df)} videos, {df['label'].nunique()} classes)")
    return path


def ucf_label_warning(df, spec):
    """A one-line warning when the labels of a UCF-101 CSV (every file named v_<Action>_gXX_cYY) break the
    sorted-action-name rule, else None. The rule: label = position of the file name's action in the sorted action
    names of the CSV. A CSV holding only some of the 101 actions is held to their order: the k-th action in sorted
    order has the k-th smallest label."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in df["path"]]
    found = [UCF_NAME.match(s) for s in stems]
    if not found or not all(found):
        return None
    actions, labels = [m.group(1) for m in found], [int(x) for x in df["label"]]
    order, distinct = sorted(set(actions)), sorted(set(labels))
    if len(order) != UCF_NUM_CLASSES and len(distinct) != len(order):
        return (f"warning: {spec}: {len(order)} actions but {len(distinct)} distinct labels; the sorted-action-name "
                f"rule gives each action one label")
    want = dict(zip(order, range(len(order)) if len(order) == UCF_NUM_CLASSES else distinct))
    wrong = sorted((a, x) for a, x in zip(actions, labels) if x != want[a])
    if not wrong:
        return None
    first = {}
    for action, label in wrong:
        first.setdefault(action, label)
    examples = ", ".join(f"{a} has {x} (the rule: {want[a]})" for a, x in list(first.items())[:2])
    return (f"warning: {spec}: {len(wrong)} of {len(labels)} labels do not follow the sorted-action-name rule (label = "
            f"position of the file name's action in the sorted action names, as the reference sets them), e.g. "
            f"{examples}")


def check_csvs(specs):
    """Number of rows of each CSV; raises FileNotFoundError naming the first missing video. Prints a warning line
    for a UCF-101 CSV whose labels break the sorted-action-name rule (ucf_label_warning)."""
    counts = {}
    for spec in specs:
        df = read_video_csv(spec)
        warning = ucf_label_warning(df, spec)
        if warning:
            print(warning, file=sys.stderr)
        missing = [p for p in df["path"] if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{spec}: {len(missing)} of {len(df)} listed videos are missing, e.g. {missing[0]}")
        counts[spec] = len(df)
    return counts


def parse_args(argv=None):
    p = parser(__doc__)
    sub = p.add_subparsers(dest="dataset", required=True)
    u = sub.add_parser("ucf101", help="UCF-101 from its folder and official split lists", formatter_class=HelpFormatter)
    u.add_argument("--root", required=True, help="folder containing the UCF-101 videos (any nesting)")
    u.add_argument("--splits-dir", default=None, help="folder with classInd.txt, trainlist0N.txt, testlist0N.txt "
                                                      "(default: searched under --root)")
    u.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="official train/test split")
    u.add_argument("--out", default=METADATA_DIR, help="folder of ucf101_train.csv and ucf101_val.csv")
    k = sub.add_parser("k600", help="Kinetics-600: the CVDF download (<root>/<split>/*.mp4 + <root>/annotations/) "
                                     "or <root>/<split>/<class>/<video>", formatter_class=HelpFormatter)
    k.add_argument("--root", required=True, help="Kinetics-600 folder holding the split folders")
    k.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to write as k600_<split>.csv")
    k.add_argument("--out", default=METADATA_DIR, help="folder of the k600_<split>.csv files")
    c = sub.add_parser("check", help="check that every path listed in the CSVs exists (and warn when UCF-101 "
                                     "labels break the sorted-action-name rule)", formatter_class=HelpFormatter)
    c.add_argument("csvs", nargs="+", help="CSV paths or names under data/metadata/")
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
            written += [write_csv(df, os.path.join(args.out, f"k600_{split}.csv"))
                        for split, df in k600_tables(args.root, tuple(args.splits)).items()]
        for spec, n in check_csvs(written or args.csvs).items():
            print(f"ok: {spec} ({n} videos, all present)")
    except (FileNotFoundError, ValueError) as e:  # missing folders, lists or videos; malformed names
        raise UsageError(str(e)) from e


if __name__ == "__main__":
    run_cli(main, parse_args())
