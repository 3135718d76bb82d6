"""The first hour of a new user, on tiny models: results never overwrite each other, a finished run does nothing,
messages name what they mean (changed keys, outputs), logs have no progress-bar noise, class names everywhere,
and the quickstart configs work on the quickstart's layout."""
import contextlib
import io
import re
import shutil

import pytest

import sample
import train
from larp.data.synthetic import make_synthetic_dataset
from larp.metrics.fvd import FeatureStats
from tests.conftest import GOLDEN, ROOT


def quiet_run(fn, *args):
    """fn(*args) with stdout and stderr captured as a non-terminal would (a log file): -> (result, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = fn(*args)
    return result, out.getvalue(), err.getvalue()


def train_argv(data, out, name, steps=2, extra=()):
    train_csv, val_csv = data
    return ["--cfg", str(ROOT / "cfgs/quickstart_nar.yaml"), "--csv_file", train_csv, "--out_path", str(out),
            "--name", name, "-b", "8", "-j", "0", "--cache_tokens", "--opts", "data.val_csv", val_csv,
            "vae.checkpoint", str(GOLDEN / "tokenizer"), "model.num_classes", "4", "train.max_steps", str(steps),
            "train.log_interval", "1", "eval.num_videos", "2", "wandb.mode", "disabled", *extra]


def run_train(argv):
    return quiet_run(train.main, train.build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("syn")), classes=4, videos_per_class=6, frames=16,
                                  size=32, progress=False)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished 2-step NAR run, its output, and the row labels of the preview it drew."""
    import larp.training.ar_stage as ar_stage
    out, labels = tmp_path_factory.mktemp("runs"), []
    real = ar_stage.save_preview_png

    def spy(path, videos, names, **kw):
        labels.append(list(names))
        return real(path, videos, names, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ar_stage, "save_preview_png", spy)
        result, stdout, stderr = run_train(train_argv(data, out, "run"))
    return {"dir": out / "run", "result": result, "stdout": stdout, "stderr": stderr, "labels": labels}


def test_logs_have_one_line_per_interval_and_no_progress_bar(trained):
    assert "\r" not in trained["stdout"] + trained["stderr"]  # no carriage-return bar updates in a log file
    for text in (trained["stdout"], (trained["dir"] / "log.txt").read_text()):
        assert re.search(r"step 1/2: loss [\d.]+", text) and re.search(r"step 2/2: loss [\d.]+", text)


def test_training_previews_show_class_names(trained, data):
    import pandas as pd
    names = set(pd.read_csv(data[1])["action"])
    assert trained["labels"] and all(label in names for label in trained["labels"][-1]), trained["labels"]


def test_a_finished_run_says_so_and_does_nothing(trained, data):
    run = trained["dir"]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    result, stdout, _ = run_train(train_argv(data, run.parent, "run"))
    assert result["finished"] and result["step"] == 2
    assert "finished at step 2" in stdout and "nothing to do" in stdout
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    assert after == before  # no second export, no metrics.csv row, no log line: nothing written


def test_the_resume_note_names_each_changed_key(trained, data, tmp_path):
    shutil.copytree(trained["dir"], tmp_path / "run")
    result, stdout, _ = run_train(train_argv(data, tmp_path, "run", steps=3, extra=["optimizer.args.lr", "0.004"]))
    assert result["step"] == 3 and not result.get("finished")
    note = next(line for line in stdout.splitlines() if "config differs" in line)
    assert "train.max_steps: 2 -> 3" in note and "optimizer.args.lr: 0.003 -> 0.004" in note


def eval_tokenizer(tokenizer, csv, *extra):
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_larp_tokenizer", ROOT / "eval" / "eval_larp_tokenizer.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    _, out, _ = quiet_run(ev.main, ev.get_args(["--tokenizer", str(tokenizer), "--dataset_csv", csv, "--det",
                                                "--no_fvd", "--max_clips", "2", "--device", "cpu", *extra]))
    return out


def test_evaluations_of_two_exports_get_their_own_folders(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # eval_results/ is relative to the working directory
    for run in ("tok_a", "tok_b"):
        shutil.copytree(GOLDEN / "tokenizer", tmp_path / "save" / run / "export")
    folders = []
    for run in ("tok_a", "tok_b"):
        out = eval_tokenizer(tmp_path / "save" / run / "export", data[1])
        folders.append(tmp_path / re.search(r"wrote (\S+)/metrics\.json", out).group(1))
    assert folders[0] != folders[1] and all(f.name.startswith(f"tokenizer_{r}_") for f, r in zip(folders, ("tok_a",
                                                                                                           "tok_b")))
    first = folders[0] / "metrics.json"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    again = eval_tokenizer(tmp_path / "save" / "tok_a" / "export", data[1])  # the same evaluation: kept
    assert "already holds this evaluation" in again and "psnr=" in again
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp
    with pytest.raises(Exception, match="holds the result of another evaluation"):  # --out of another evaluation
        eval_tokenizer(tmp_path / "save" / "tok_b" / "export", data[1], "--out", str(folders[0]))
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    csv, _ = make_synthetic_dataset(str(tmp_path_factory.mktemp("syn8")), classes=4, videos_per_class=4, frames=8,
                                    size=32, progress=False)
    out = tmp_path_factory.mktemp("samples") / "nar"
    argv = ["--ar_model", str(GOLDEN / "nar"), "--tokenizer", str(GOLDEN / "tokenizer"), "--output_dir", str(out),
            "--dataset_csv", csv, "--num_samples", "4", "--sample_batch_size", "4", "--i3d", "random:32",
            "--num_workers", "0", "--device", "cpu"]
    _, stdout, stderr = quiet_run(sample.main, sample.parse_args(argv))
    return out, stdout, stderr


def test_the_sampler_names_every_output(sampled):
    out, stdout, stderr = sampled
    line = next(line for line in stdout.splitlines() if "outputs:" in line)
    for name in ("sampled_videos/ (4 generated mp4s)", "samples.csv", "preview.png", "fvd_report.csv"):
        assert f"{out}/{name}" in line, (name, line)
    assert "\r" not in stdout + stderr


def test_sampler_stats_record_their_clips(sampled):
    meta = FeatureStats.load(sampled[0] / "gt_fvd_stats_0_4.pkl").meta
    assert meta["frames"] == 8 and meta["size"] == 32 and meta["draw"] == "4 of 12 clips, seed 42"


def test_quickstart_configs_run_on_the_quickstart_layout(tmp_path, monkeypatch):
    """`train.py --cfg cfgs/quickstart_*.yaml --check` from a folder laid out as the quickstart leaves it."""
    make_synthetic_dataset(str(tmp_path / "quickstart" / "data"), classes=8, videos_per_class=4, frames=16, size=32,
                           progress=False)
    shutil.copytree(GOLDEN / "tokenizer", tmp_path / "quickstart" / "runs" / "tokenizer" / "export")
    monkeypatch.chdir(tmp_path)
    for name in ("tokenizer", "nar", "raster"):
        _, stdout, _ = run_train(["--cfg", str(ROOT / f"cfgs/quickstart_{name}.yaml"), "--check"])
        assert "train.py --check: ok" in stdout, stdout
        assert "quickstart/data/train.csv" in stdout
