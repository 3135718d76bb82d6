"""make_csv on small fake UCF-101 / Kinetics trees, the `check` command, and set_datasets.sh end to end."""
import os
import subprocess

import pandas as pd
import pytest

from larp.data import make_csv
from larp.data.dataset import PROJECT_ROOT, read_video_csv
from larp.core.errors import LarpError

# folder name -> action as spelled in the file names; classInd order as in the official file (not sorted)
UCF_CLASSES = [("ApplyEyeMakeup", "ApplyEyeMakeup"), ("Haircut", "Haircut"), ("Hammering", "Hammering"),
               ("HammerThrow", "HammerThrow"), ("HandstandPushups", "HandStandPushups"), ("YoYo", "YoYo")]
# Python-sorted action names from the file names, written out by hand
SORTED_ACTIONS = ["ApplyEyeMakeup", "Haircut", "HammerThrow", "Hammering", "HandStandPushups", "YoYo"]


def fake_ucf(root, missing=None):
    videos = root / "UCF-101"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {folder}\n" for i, (folder, _) in enumerate(UCF_CLASSES)))
    for split in (1, 2, 3):
        train, test = [], []
        for ci, (folder, action) in enumerate(UCF_CLASSES):
            for g in range(1, 5):
                name = f"{folder}/v_{action}_g{g:02d}_c01.avi"
                (test if (g + split) % 4 == 0 else train).append((name, ci + 1))
        (lists / f"trainlist0{split}.txt").write_text("".join(f"{n} {c}\r\n" for n, c in train))
        (lists / f"testlist0{split}.txt").write_text("".join(f"{n}\r\n" for n, _ in test))
    for folder, action in UCF_CLASSES:
        (videos / folder).mkdir(parents=True)
        for g in range(1, 5):
            name = f"v_{action}_g{g:02d}_c01.avi"
            if name != missing:
                (videos / folder / name).write_bytes(b"x")
    return videos, lists


@pytest.mark.parametrize("split", [1, 2])
def test_ucf101(tmp_path, split):
    videos, lists = fake_ucf(tmp_path)
    train, val = make_csv.ucf101_tables(str(videos), str(lists), split)
    assert list(train.columns) == ["id", "path", "action", "label"]
    assert len(train) == 18 and len(val) == 6
    val_groups = {int(i.split("_g")[1][:2]) for i in val.id}
    assert val_groups == {g for g in range(1, 5) if (g + split) % 4 == 0}
    for df in (train, val):
        for _, row in df.iterrows():
            assert row.action == row.id.split("_")[1]
            assert row.label == SORTED_ACTIONS.index(row.action)
            assert os.path.isabs(row.path) and os.path.isfile(row.path) and row.path.endswith(row.id + ".avi")
    assert val[val.action == "HandStandPushups"].label.tolist() == [4]


def test_ucf101_splits_found_under_root_and_errors(tmp_path):
    videos, lists = fake_ucf(tmp_path)
    train, _ = make_csv.ucf101_tables(str(tmp_path), None, 1)  # lists searched under the root
    assert len(train) == 18
    with pytest.raises(FileNotFoundError, match="classInd.txt"):
        make_csv.ucf101_tables(str(videos), None, 1)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n")
    with pytest.raises(ValueError, match="classInd"):
        make_csv.ucf101_tables(str(videos), str(lists), 1)


def test_ucf101_missing_video(tmp_path):
    videos, lists = fake_ucf(tmp_path, missing="v_YoYo_g02_c01.avi")
    with pytest.raises(FileNotFoundError, match="v_YoYo_g02_c01.avi"):
        make_csv.ucf101_tables(str(videos), str(lists), 1)


def test_k600(tmp_path):
    classes = ["zumba", "abseiling", "playing cello"]
    for split, n in (("train", 3), ("val", 1)):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(n):
                (tmp_path / split / c / f"{c[:3]}{k}.mp4").write_bytes(b"x")
            (tmp_path / split / c / "notes.txt").write_text("not a video")
    train, val = make_csv.k600_tables(str(tmp_path))
    assert len(train) == 9 and len(val) == 3
    expected = {"abseiling": 0, "playing cello": 1, "zumba": 2}
    assert all(expected[a] == l for a, l in zip(train.action, train.label))
    assert sorted(val.id) == ["abs0", "pla0", "zum0"]
    (tmp_path / "val" / "unknown").mkdir()
    with pytest.raises(ValueError, match="unknown"):
        make_csv.k600_tables(str(tmp_path))


def test_cli_and_check(tmp_path, capsys):
    videos, lists = fake_ucf(tmp_path)
    out = tmp_path / "meta"
    make_csv.main(make_csv.parse_args(["ucf101", "--root", str(videos), "--splits-dir", str(lists),
                                       "--out", str(out)]))
    train_csv, val_csv = out / "ucf101_train.csv", out / "ucf101_val.csv"
    joined = read_video_csv(f"{train_csv}+{val_csv}")
    assert len(joined) == 24 and sorted(joined.label.unique()) == list(range(6))
    make_csv.main(make_csv.parse_args(["check", str(train_csv), str(val_csv)]))
    assert "ok:" in capsys.readouterr().out
    os.remove(videos / "YoYo" / "v_YoYo_g01_c01.avi")
    with pytest.raises(LarpError, match="missing, e.g. .*v_YoYo_g01_c01.avi"):
        make_csv.main(make_csv.parse_args(["check", f"{train_csv}+{val_csv}"]))


@pytest.mark.slow
def test_set_datasets_script(tmp_path):
    """set_datasets.sh in a scratch copy of the project root: links data/ucf101, writes CSVs with data/ paths."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("larp", ".venv"):
        os.symlink(os.path.join(PROJECT_ROOT, name), project / name)
    (project / "set_datasets.sh").write_bytes(open(os.path.join(PROJECT_ROOT, "set_datasets.sh"), "rb").read())
    videos, lists = fake_ucf(tmp_path / "datasets")
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run(["bash", "set_datasets.sh", "--ucf101", str(videos), "--ucf101-splits", str(lists)],
                         cwd=project, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert os.path.realpath(project / "data" / "ucf101") == os.path.realpath(videos)
    df = pd.read_csv(project / "data" / "metadata" / "ucf101_train.csv")
    assert len(df) == 18 and all(p.startswith("data/ucf101/") for p in df.path)
    assert "all present" in res.stdout
    res = subprocess.run(["bash", "set_datasets.sh", "--k600", str(tmp_path / "nowhere")],
                         cwd=project, capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "nowhere" in res.stderr
