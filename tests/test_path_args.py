"""Every path argument that names a file where a folder is expected, or a folder where a file is expected, is one
line `<prog>: error: ...` naming the flag and the path, before any work, and nothing is written. Each case runs the
entry point's main in-process through run_cli (the error edge every script uses)."""
import hashlib
import os

import pytest

import eval.calc_fvd_from_multiple_feature_stats as calc_fvd
import eval.compute_fvd as compute_fvd
import eval.eval_larp_tokenizer as eval_tokenizer
import sample
import train
from larp.core.errors import run_cli
from larp.data import make_csv, oracle, synthetic
from tests.conftest import GOLDEN, ROOT


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A file, a folder, a folder named like a stats file and a small synthetic set."""
    from larp.data.synthetic import make_synthetic_dataset
    root = tmp_path_factory.mktemp("path_args")
    train_csv, val_csv = make_synthetic_dataset(str(root / "syn"), classes=4, videos_per_class=4, frames=8, size=32,
                                                progress=False)
    (root / "a_file").write_text("not a folder\n")
    (root / "a_folder").mkdir()
    (root / "stats.pkl").mkdir()
    return {"root": root, "file": str(root / "a_file"), "folder": str(root / "a_folder"), "train": train_csv,
            "val": val_csv}


def sample_args(w, **kw):
    flags = {"ar_model": str(GOLDEN / "nar"), "tokenizer": str(GOLDEN / "tokenizer"),
             "output_dir": str(w["root"] / "out"), "dataset_csv": w["train"], "i3d": "random:32",
             "num_workers": "0", "num_samples": "4", "device": "cpu"}
    flags.update(kw)
    return sample.parse_args([x for k, v in flags.items() for x in (f"--{k}", str(v))])


def train_args(w, out=None, cfg=None, csv=None, opts=()):
    return train.build_parser().parse_args([
        "--cfg", cfg or str(ROOT / "cfgs/quickstart_nar.yaml"), "--csv_file", csv or w["train"],
        "--out_path", out or str(w["root"] / "runs"), "--name", "run", "-b", "4", "-j", "0", "--device", "cpu",
        "--opts", "data.val_csv", w["val"], "vae.checkpoint", str(GOLDEN / "tokenizer"), "model.num_classes", "4",
        "train.max_steps", "1", "wandb.mode", "disabled", *opts])


def fvd_args(w, *extra):
    return compute_fvd.get_args(["--real", w["val"], "--fake", w["val"], "--i3d", "random:32", "--device", "cpu",
                                 "--num_frames", "8", "--size", "32", *extra])


def tok_eval_args(w, *extra):
    return eval_tokenizer.get_args(["--tokenizer", str(GOLDEN / "tokenizer"), "--dataset_csv", w["val"], "--i3d",
                                    "random:32", "--device", "cpu", *extra])


# name: (main, args builder, prog, text the one line must contain)
CASES = {
    "sample_output_dir_is_a_file": (sample.main, lambda w: sample_args(w, output_dir=w["file"]), "sample.py",
                                    ["--output_dir", "a_file: is a file, expected a folder"]),
    "sample_output_dir_below_a_file": (sample.main, lambda w: sample_args(w, output_dir=w["file"] + "/out"),
                                       "sample.py", ["--output_dir", "a_file/out", "a_file is a file"]),
    "sample_csv_is_a_folder": (sample.main, lambda w: sample_args(w, dataset_csv=w["folder"]), "sample.py",
                               ["--dataset_csv", "a_folder' is a folder, expected a CSV file"]),
    "sample_i3d_is_a_folder": (sample.main, lambda w: sample_args(w, i3d=w["folder"]), "sample.py",
                               ["--i3d", "a_folder' is a folder, expected a model file"]),
    "train_out_path_is_a_file": (train.main, lambda w: train_args(w, out=w["file"]), "train.py",
                                 ["--out_path/--name", "a_file/run", "a_file is a file, expected a folder"]),
    "train_cfg_is_a_folder": (train.main, lambda w: train_args(w, cfg=w["folder"]), "train.py",
                              ["a_folder: is a folder, expected a YAML config file"]),
    "train_csv_is_a_folder": (train.main, lambda w: train_args(w, csv=w["folder"]), "train.py",
                              ["a_folder' is a folder, expected a CSV file"]),
    "train_val_csv_is_a_folder": (train.main, lambda w: train_args(w, opts=["data.val_csv", w["folder"]]),
                                  "train.py", ["a_folder' is a folder, expected a CSV file"]),
    "train_cache_dir_is_a_file": (train.main, lambda w: train_args(w, opts=["data.cache_dir", w["file"]]),
                                  "train.py", ["data.cache_dir", "a_file: is a file, expected a folder"]),
    "compute_fvd_save_is_a_folder": (compute_fvd.main, lambda w: fvd_args(w, "--save_real",
                                                                          str(w["root"] / "stats.pkl")),
                                     "compute_fvd.py", ["--save_real", "stats.pkl: is a folder, expected a file"]),
    "compute_fvd_save_below_a_file": (compute_fvd.main, lambda w: fvd_args(w, "--save_fake", w["file"] + "/s.pkl"),
                                      "compute_fvd.py", ["--save_fake", "a_file is a file, expected a folder"]),
    "compute_fvd_i3d_is_a_folder": (compute_fvd.main, lambda w: fvd_args(w, "--i3d", w["folder"]),
                                    "compute_fvd.py", ["a_folder' is a folder, expected a model file"]),
    "calc_fvd_dir_is_a_file": (calc_fvd.main, lambda w: calc_fvd.get_args(["--dir", w["file"]]),
                               "calc_fvd_from_multiple_feature_stats.py", ["--dir", "a_file: not a folder"]),
    "eval_out_is_a_file": (eval_tokenizer.main, lambda w: tok_eval_args(w, "--out", w["file"]),
                           "eval_larp_tokenizer.py", ["--out", "a_file: is a file, expected a folder"]),
    "eval_csv_is_a_folder": (eval_tokenizer.main,
                             lambda w: eval_tokenizer.get_args(["--tokenizer", str(GOLDEN / "tokenizer"),
                                                                "--dataset_csv", w["folder"]]),
                             "eval_larp_tokenizer.py", ["--dataset_csv", "a_folder' is a folder"]),
    "synthetic_out_is_a_file": (synthetic.main, lambda w: synthetic.parse_args(["--out", w["file"]]),
                                "python -m larp.data.synthetic", ["--out", "a_file: is a file, expected a folder"]),
    "make_csv_out_is_a_file": (make_csv.main,
                               lambda w: make_csv.parse_args(["k600", "--root", w["folder"], "--out", w["file"]]),
                               "python -m larp.data.make_csv", ["--out", "a_file: is a file, expected a folder"]),
    "make_csv_root_is_a_file": (make_csv.main, lambda w: make_csv.parse_args(["ucf101", "--root", w["file"]]),
                                "python -m larp.data.make_csv", ["UCF-101 folder", "a_file: is a file"]),
    "make_csv_check_a_folder": (make_csv.main, lambda w: make_csv.parse_args(["check", w["folder"]]),
                                "python -m larp.data.make_csv", ["a_folder' is a folder, expected a CSV file"]),
    "oracle_csv_is_a_folder": (oracle.main, lambda w: oracle.parse_args([w["folder"]]),
                               "python -m larp.data.oracle", ["a_folder' is a folder, expected a CSV file"]),
}


def snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read())
            .hexdigest() for d, _, fs in os.walk(folder) for f in fs if not f.endswith(".cache")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrong_kind_of_path_is_one_line(name, ws, capsys, monkeypatch):
    main, build, prog, needles = CASES[name]
    monkeypatch.delenv("LARP_DEBUG", raising=False)
    before = snapshot(ws["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(main, build(ws), prog=prog)
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert e.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(ws["root"]) == before
