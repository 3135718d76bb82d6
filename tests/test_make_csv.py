"""make_csv on small fake UCF-101 / Kinetics trees, the `check` command, and set_datasets.sh end to end."""
import os
import subprocess

import pandas as pd
import pytest

from larp.data import make_csv
from larp.data.dataset import METADATA_DIR, PROJECT_ROOT, read_video_csv
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
    val_groups = {int(p.split("_g")[1][:2]) for p in val.path}
    assert val_groups == {g for g in range(1, 5) if (g + split) % 4 == 0}
    for df in (train, val):
        assert df.id.tolist() == list(range(len(df))) and df.path.tolist() == sorted(df.path)
        for _, row in df.iterrows():
            name = os.path.basename(row.path)
            assert row.action == os.path.basename(os.path.dirname(row.path))  # the folder, as the reference
            assert row.label == SORTED_ACTIONS.index(name.split("_")[1])  # sorted file-name actions
            assert os.path.isabs(row.path) and os.path.isfile(row.path)
    assert val[val.action == "HandstandPushups"].label.tolist() == [4]


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


def test_k600_class_folders(tmp_path, capsys):
    classes = ["zumba", "abseiling", "playing cello"]
    for split, n in (("train", 3), ("val", 1)):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(n):
                (tmp_path / split / c / f"{c[:3]}{k}.mp4").write_bytes(b"x")
            (tmp_path / split / c / "notes.txt").write_text("not a video")
    tables = make_csv.k600_tables(str(tmp_path))
    train, val = tables["train"], tables["val"]
    assert len(train) == 9 and len(val) == 3
    expected = {"abseiling": 0, "playing cello": 1, "zumba": 2}
    assert all(expected[a] == l for a, l in zip(train.action, train.label))
    assert sorted(os.path.basename(p) for p in val.path) == ["abs0.mp4", "pla0.mp4", "zum0.mp4"]
    assert "sort differently from the reference" in capsys.readouterr().out
    (tmp_path / "val" / "unknown").mkdir()
    with pytest.raises(ValueError, match="unknown"):
        make_csv.k600_tables(str(tmp_path))


def test_k600_cvdf_layout(tmp_path):
    """Flat videos + annotations: annotation order, existing videos only, labels over all annotated classes."""
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations").mkdir()
    rows = [("zumba", "b" * 11, 5, 15), ("abseiling", "a" * 11, 0, 10), ("juggling", "c" * 11, 3, 13)]
    (tmp_path / "annotations" / "val.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n" + "".join(f"{l},{y},{a},{b},val\n" for l, y, a, b in rows))
    for label, y, a, b in rows[:2]:  # the juggling video was never downloaded
        (tmp_path / "val" / f"{y}_{a:06d}_{b:06d}.mp4").write_bytes(b"x")
    val = make_csv.k600_tables(str(tmp_path), ("val",))["val"]
    assert val.id.tolist() == [1, 2] and val.action.tolist() == ["zumba", "abseiling"]
    assert val.label.tolist() == [2, 0]  # sorted: abseiling, juggling, zumba
    assert [os.path.basename(p) for p in val.path] == ["bbbbbbbbbbb_000005_000015.mp4", "aaaaaaaaaaa_000000_000010.mp4"]


def test_cli_and_check(tmp_path, capsys):
    videos, lists = fake_ucf(tmp_path)
    out = tmp_path / "meta"
    make_csv.main(make_csv.parse_args(["ucf101", "--root", str(videos), "--splits-dir", str(lists),
                                       "--out", str(out)]))
    train_csv, val_csv = out / "ucf101_train.csv", out / "ucf101_val.csv"
    joined = read_video_csv(f"{train_csv}+{val_csv}")
    assert len(joined) == 24 and sorted(joined.label.unique()) == list(range(6))
    make_csv.main(make_csv.parse_args(["check", str(train_csv), str(val_csv)]))
    out, err = capsys.readouterr()
    assert "ok:" in out and "warning" not in err
    os.remove(videos / "YoYo" / "v_YoYo_g01_c01.avi")
    with pytest.raises(LarpError, match="missing, e.g. .*v_YoYo_g01_c01.avi"):
        make_csv.main(make_csv.parse_args(["check", f"{train_csv}+{val_csv}"]))


@pytest.mark.parametrize("name", ["ucf101_train.csv", "ucf101_val.csv"])
def test_shipped_ucf101_labels_follow_the_sorted_action_name_rule(name):
    df = read_video_csv(os.path.join(METADATA_DIR, name))
    assert df.label.nunique() == 101 and make_csv.ucf_label_warning(df, name) is None
    # in classInd.txt's order (case-insensitive) two pairs of classes swap places
    by_class_ind = sorted(set(df.action), key=str.lower)
    relabelled = df.assign(label=[by_class_ind.index(a) for a in df.action])
    swapped = relabelled.action.isin(["HammerThrow", "Hammering", "JumpRope", "JumpingJack"]).sum()
    warning = make_csv.ucf_label_warning(relabelled, name)
    assert warning.startswith(f"warning: {name}: {swapped} of {len(df)} labels do not follow the sorted-action-name")
    assert warning.endswith("e.g. HammerThrow has 35 (the rule: 34), Hammering has 34 (the rule: 35)")
    assert "\n" not in warning


def test_check_warns_about_labels_in_class_ind_order(tmp_path, capsys):
    """A CSV of some of the classes, labelled in classInd.txt's order: `check` names the first two classes off the
    rule and still checks the videos; a K600-style CSV is not held to the rule."""
    videos, lists = fake_ucf(tmp_path)
    train, _ = make_csv.ucf101_tables(str(videos), str(lists), 1)
    class_ind = [action for _, action in UCF_CLASSES]
    off = train.assign(label=[class_ind.index(make_csv.ucf_action(p)) for p in train.path])
    off.to_csv(tmp_path / "off.csv", index=False)
    make_csv.main(make_csv.parse_args(["check", str(tmp_path / "off.csv")]))
    out, err = capsys.readouterr()
    assert "ok:" in out and err.count("\n") == 1
    assert err.startswith(f"warning: {tmp_path / 'off.csv'}: 6 of 18 labels do not follow the sorted-action-name rule")
    assert "e.g. HammerThrow has 3 (the rule: 2), Hammering has 2 (the rule: 3)" in err
    twice = train.assign(label=[i % 2 for i in range(len(train))])  # an action with two labels
    assert "6 actions but 2 distinct labels" in make_csv.ucf_label_warning(twice, "twice.csv")
    kinetics = pd.DataFrame({"path": ["k600/val/abc_000001_000011.mp4"], "label": [5]})
    assert make_csv.ucf_label_warning(kinetics, "k600_val.csv") is None


@pytest.mark.slow
def test_set_datasets_script(tmp_path):
    """set_datasets.sh in a scratch copy of the project root (the first rows of the shipped CSVs as its CSVs):
    links data/ucf101 and data/k600 to downloads laid out as the official ones, checks every listed video, builds
    k600_train.csv with the same spelling."""
    from tests.test_metadata import k600_download, shipped, ucf_download
    project = tmp_path / "project"
    (project / "data" / "metadata").mkdir(parents=True)
    for name in ("larp", ".venv"):
        os.symlink(os.path.join(PROJECT_ROOT, name), project / name)
    (project / "set_datasets.sh").write_bytes(open(os.path.join(PROJECT_ROOT, "set_datasets.sh"), "rb").read())
    csvs = {n: shipped(n).head(12) for n in ("ucf101_train.csv", "ucf101_val.csv", "k600_val.csv")}
    for name, df in csvs.items():
        df.to_csv(project / "data" / "metadata" / name, index=False)
    ucf, _ = ucf_download(tmp_path / "downloads", csvs["ucf101_train.csv"], csvs["ucf101_val.csv"])
    k600 = k600_download(tmp_path / "downloads", {"val": csvs["k600_val.csv"], "train": csvs["k600_val.csv"].tail(5)})
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run(["bash", "set_datasets.sh", "--ucf101", str(ucf), "--k600", str(k600)],
                         cwd=project, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert os.path.realpath(project / "data" / "ucf101") == os.path.realpath(ucf)
    assert res.stdout.count("all present") == 4  # ucf101 train + val, the new k600_train, k600_val
    train = pd.read_csv(project / "data" / "metadata" / "k600_train.csv")
    assert [p.rsplit("/", 1)[0] for p in train.path] == ["data/k600/train"] * 5
    os.remove(next((ucf / "ApplyEyeMakeup").iterdir()))
    res = subprocess.run(["bash", "set_datasets.sh", "--ucf101", str(ucf)], cwd=project, capture_output=True,
                         text=True, env=env)
    assert res.returncode != 0 and "1 of 12 listed videos are missing" in res.stderr
    res = subprocess.run(["bash", "set_datasets.sh", "--k600", str(tmp_path / "nowhere")],
                         cwd=project, capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "nowhere" in res.stderr
