"""Every entry point turns a bad input into one line `<prog>: error: <cause>` and a non-zero exit, with no
traceback, and changes no file that already exists (inputs, run folders, output folders).

Each case runs as a user would: its own process from the project root, offline, on the tiny golden models and a
small synthetic set. The table lists the command, the text the one error line must contain (the file, flag or
key at fault) and, optionally, text it must not contain. Python commands run in a fork of an interpreter that has
imported torch, torchvision and timm once (`FORK_SERVER`; nothing of the project), which saves each case the
seconds those imports take; shell commands run as subprocesses.
"""
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import GOLDEN, ROOT

pytestmark = pytest.mark.slow  # ~30 subprocesses of a few seconds each


# Reads one JSON case per line (argv, env, output files), runs it in a fork as `python argv...` would (sys.argv,
# sys.path[0], __main__, exit status; stdin from /dev/null) and answers with its exit status.
FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import timm, torch, torchvision
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, case["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, case["stderr"], os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, flags), fd)
        os.environ.update(case["env"])
        argv, code = case["argv"], 0
        try:
            if argv[0] == "-m":
                sys.argv, sys.path[0] = argv[1:], os.getcwd()
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    """run(argv, env) -> CompletedProcess: `sys.executable ...` commands in a fork of FORK_SERVER, others as
    subprocesses."""
    folder = tmp_path_factory.mktemp("forks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(folder / "hf"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("LARP_DEBUG", None)
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def run(argv, case_env):
        if argv[0] != sys.executable:
            return subprocess.run(argv, cwd=ROOT, env=case_env, capture_output=True, text=True, timeout=300)
        out, err = folder / "stdout", folder / "stderr"
        for f in (out, err):
            f.unlink(missing_ok=True)
        server.stdin.write(json.dumps({"argv": argv[1:], "env": case_env, "stdout": str(out), "stderr": str(err)})
                           + "\n")
        server.stdin.flush()
        assert select.select([server.stdout], [], [], 300)[0], f"no answer in 300 s: {argv}"
        code = int(server.stdout.readline())
        return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())

    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace: synthetic videos and CSVs (good and broken), damaged checkpoints, non-model files."""
    from larp.data.synthetic import make_synthetic_dataset
    root = tmp_path_factory.mktemp("bad_inputs")
    train_csv, val_csv = make_synthetic_dataset(str(root / "syn"), classes=4, videos_per_class=4, frames=8, size=32,
                                                progress=False)
    lines = open(train_csv).read().splitlines()
    header, rows = lines[0], []
    for line in lines[1:]:  # absolute paths: the broken CSVs live in another folder
        parts = line.split(",")
        rows.append(",".join([parts[0], os.path.join(os.path.dirname(train_csv), parts[1]), *parts[2:]]))
    videos = root / "syn" / "videos"
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))

    def csv(name, text):
        (root / name).write_text(text)
        return str(root / name)

    first = rows[0].split(",")  # id,path,action,label

    def row(path, label=None):
        return ",".join([first[0], str(path), first[2], first[3] if label is None else str(label)])

    w = {"root": root, "train": train_csv, "val": val_csv, "videos": str(videos)}
    w["no_label"] = csv("no_label.csv", "id,path,action\n" + "\n".join(",".join(r.split(",")[:3]) for r in rows))
    w["empty_csv"] = csv("empty.csv", "")
    w["missing_video"] = csv("missing_video.csv", "\n".join([header] + rows[:3] + [row(root / "gone.mp4")]) + "\n")
    w["empty_video"] = csv("empty_video.csv", "\n".join([header] + rows[:3] + [row(root / "empty.mp4")]) + "\n")
    w["corrupt_video"] = csv("corrupt_video.csv", "\n".join([header] + rows[:3] + [row(root / "corrupt.mp4")]) + "\n")
    w["label_7"] = csv("label_7.csv", "\n".join([header] + rows + [row(first[1], 7)]) + "\n")

    for name in ("tokenizer", "nar"):  # an interrupted download: model.safetensors cut in half
        shutil.copytree(GOLDEN / name, root / f"truncated_{name}")
        st = root / f"truncated_{name}" / "model.safetensors"
        data = st.read_bytes()
        st.write_bytes(data[:len(data) // 2])
    (root / "not_a_model.pt").write_text("12345\n")

    (root / "stats").mkdir()  # stats pickles cut short
    (root / "stats" / "gt_fvd_stats_0_4.pkl").write_bytes(b"\x80\x04\x95\x10\x00")
    (root / "stats" / "generated_fvd_stats_0_4.pkl").write_bytes(b"\x80\x04\x95\x10\x00")

    # training run folders holding a checkpoint to resume from: truncated, and one of another stage
    for run, make in (("corrupt", "truncated"), ("wrong_kind", "tokenizer")):
        folder = root / "runs" / run
        folder.mkdir(parents=True)
        ckpt = {"model": {"name": "larp_tokenizer", "args": {}, "sd": {"w": torch.zeros(64)}}, "optimizer": {},
                "step": 5, "epoch": 0, "cfg": {"stage": "tokenizer", "model": {}}}
        torch.save(ckpt, folder / "ckpt_latest.pth")
        if make == "truncated":
            data = (folder / "ckpt_latest.pth").read_bytes()
            (folder / "ckpt_latest.pth").write_bytes(data[:len(data) - 300])
        (folder / "log.txt").write_text("step 5\n")
    (root / "out_existing").mkdir()
    (root / "out_existing" / "keep.txt").write_text("an earlier result\n")
    return w


def sample(w, **kw):
    flags = {"ar_model": str(GOLDEN / "nar"), "tokenizer": str(GOLDEN / "tokenizer"),
             "output_dir": str(w["root"] / "out_existing"), "dataset_csv": w["train"], "i3d": "random:32",
             "num_workers": "0", "num_samples": "4", "device": "cpu"}
    flags.update(kw)
    return [sys.executable, "sample.py"] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def train(w, run="fresh", check=False, opts=(), csv=None):
    argv = [sys.executable, "train.py", "--cfg", "cfgs/quickstart_nar.yaml", "--csv_file", csv or w["train"],
            "--out_path", str(w["root"] / "runs"), "--name", run, "-b", "4", "-j", "0", "--device", "cpu"]
    return argv + (["--check"] if check else []) + ["--opts", "data.val_csv", w["val"], "vae.checkpoint",
                                                      str(GOLDEN / "tokenizer"), "model.num_classes", "4",
                                                      "train.max_steps", "2", "wandb.mode", "disabled", *opts]


def tok_eval(w, tokenizer=None, csv=None, *extra):
    return [sys.executable, "eval/eval_larp_tokenizer.py", "--tokenizer", tokenizer or str(GOLDEN / "tokenizer"),
            "--dataset_csv", csv or w["val"], "--i3d", "random:32", "--device", "cpu",
            "--out", str(w["root"] / "out_existing"), *extra]


def module(name, *args):
    return [sys.executable, "-m", f"larp.data.{name}", *args]


# name: (command builder, prog, needles in the error line, text the error line must not contain)
CASES = {
    # --- checkpoints
    "sample_truncated_tokenizer": (lambda w: sample(w, tokenizer=w["root"] / "truncated_tokenizer"), "sample.py",
                                   ["--tokenizer", "truncated_tokenizer/model.safetensors", "truncated"], []),
    "sample_truncated_generator": (lambda w: sample(w, ar_model=w["root"] / "truncated_nar"), "sample.py",
                                   ["--ar_model", "truncated_nar/model.safetensors", "truncated"], []),
    "sample_swapped_models": (lambda w: sample(w, ar_model=GOLDEN / "tokenizer", tokenizer=GOLDEN / "nar"),
                              "sample.py", ["--tokenizer", "NAR generator", "expected a LARP tokenizer", "swapped"],
                              ["frame_num"]),
    "sample_raster_as_tokenizer": (lambda w: sample(w, tokenizer=GOLDEN / "raster"), "sample.py",
                                   ["--tokenizer", "raster generator", "expected a LARP tokenizer"], []),
    "eval_truncated_tokenizer": (lambda w: tok_eval(w, str(w["root"] / "truncated_tokenizer")),
                                 "eval_larp_tokenizer.py",
                                 ["--tokenizer", "truncated_tokenizer/model.safetensors", "truncated"],
                                 ["SafetensorError"]),
    "eval_generator_as_tokenizer": (lambda w: tok_eval(w, str(GOLDEN / "nar")), "eval_larp_tokenizer.py",
                                    ["--tokenizer", "NAR generator", "expected a LARP tokenizer"], []),
    "train_resume_corrupt_checkpoint": (lambda w: train(w, run="corrupt"), "train.py",
                                        ["runs/corrupt/ckpt_latest.pth", "cannot resume", "--replace"], []),
    "train_resume_other_stage": (lambda w: train(w, run="wrong_kind", check=True), "train.py",
                                 ["runs/wrong_kind/ckpt_latest.pth", "LARP tokenizer", "NAR generator",
                                  "--replace"], []),
    "train_vae_is_a_generator": (lambda w: train(w, check=True, opts=["vae.checkpoint", str(GOLDEN / "nar")]),
                                 "train.py", ["vae.checkpoint", "NAR generator", "expected a LARP tokenizer"], []),
    # --- detector
    "sample_i3d_not_a_model": (lambda w: sample(w, i3d=w["root"] / "not_a_model.pt"), "sample.py",
                               ["not_a_model.pt", "not a model file"], []),
    "compute_fvd_i3d_not_a_model": (lambda w: [sys.executable, "eval/compute_fvd.py", "--real", w["val"], "--fake",
                                               w["val"], "--i3d", str(w["root"] / "not_a_model.pt")],
                                    "compute_fvd.py", ["not_a_model.pt", "not a model file"], []),
    # --- CSVs and videos
    "sample_missing_csv": (lambda w: sample(w, dataset_csv="nope.csv"), "sample.py", ["nope.csv"], ["nope.csv.csv"]),
    "sample_csv_without_label": (lambda w: sample(w, dataset_csv=w["no_label"]), "sample.py",
                                 ["no_label.csv", "missing column(s) label"], []),
    "sample_empty_csv": (lambda w: sample(w, dataset_csv=w["empty_csv"]), "sample.py", ["empty.csv", "empty file"],
                         []),
    "sample_corrupt_video": (lambda w: sample(w, dataset_csv=w["corrupt_video"]), "sample.py",
                             ["corrupt.mp4", "cannot read video"], []),
    "sample_label_outside_classes": (lambda w: sample(w, dataset_csv=w["label_7"]), "sample.py",
                                     ["label_7.csv", "label 7", "5 classes"], []),
    "eval_empty_video": (lambda w: tok_eval(w, None, w["empty_video"], "--no_fvd"), "eval_larp_tokenizer.py",
                         ["empty.mp4", "empty file", "empty_video.csv", "--skip_bad"], []),
    "eval_csv_without_label": (lambda w: tok_eval(w, None, w["no_label"], "--no_fvd"), "eval_larp_tokenizer.py",
                               ["--dataset_csv", "no_label.csv", "label"], []),
    "compute_fvd_missing_video": (lambda w: [sys.executable, "eval/compute_fvd.py", "--real", w["missing_video"],
                                             "--fake", w["val"], "--i3d", "random:32", "--num_frames", "8",
                                             "--size", "32"], "compute_fvd.py", ["gone.mp4", "file not found", "--skip_bad"], []),
    "calc_fvd_truncated_stats": (lambda w: [sys.executable, "eval/calc_fvd_from_multiple_feature_stats.py", "--dir",
                                            str(w["root"] / "stats")], "calc_fvd_from_multiple_feature_stats.py",
                                 ["fvd_stats_0_4.pkl", "not a readable stats pickle"], []),
    "oracle_unreadable_video": (lambda w: module("oracle", w["corrupt_video"]), "python -m larp.data.oracle",
                                ["corrupt.mp4", "cannot read video"], []),
    "oracle_label_outside_classes": (lambda w: module("oracle", w["label_7"], "--num-classes", "4"),
                                     "python -m larp.data.oracle", ["label_7.csv", "label 7", "--num-classes 4"], []),
    "make_csv_check_missing_video": (lambda w: module("make_csv", "check", w["missing_video"]),
                                     "python -m larp.data.make_csv", ["missing_video.csv", "gone.mp4"], []),
    "synthetic_odd_size": (lambda w: module("synthetic", "--out", str(w["root"] / "syn2"), "--size", "15"),
                           "python -m larp.data.synthetic", ["--size", "15"], []),
    "train_csv_without_label": (lambda w: train(w, csv=w["no_label"]), "train.py",
                                ["no_label.csv", "missing column(s) label"], []),
    "train_missing_videos": (lambda w: train(w, csv=w["missing_video"]), "train.py",
                             ["missing_video.csv", "gone.mp4", "data.skip_bad"], []),
    "train_check_empty_csv": (lambda w: train(w, check=True, csv=w["empty_csv"]), "train.py",
                              ["empty.csv", "empty file"], []),
    "train_label_outside_classes": (lambda w: train(w, check=True, csv=w["label_7"]), "train.py",
                                    ["label_7.csv", "label 7", "model.num_classes"], []),
    "train_missing_csv": (lambda w: train(w, check=True, csv="nope.csv"), "train.py", ["nope.csv"],
                          ["nope.csv.csv"]),
    "reproduce_paper_tokenizer_as_generator": (lambda w: [sys.executable, "eval/reproduce_paper.py", "--rows",
                                                          "ucf_nar_l", "--model", f"ucf_nar_l={GOLDEN / 'tokenizer'}",
                                                          "--out", str(w["root"] / "paper")],
                                               "reproduce_paper.py", ["--model ucf_nar_l=", "LARP tokenizer",
                                                                      "expected a generator"], []),
    # --- flags, configs, launch scripts
    "bench_train_unknown_config": (lambda w: [sys.executable, "benchmarks/bench_train.py", "--configs", "nope"],
                                   "bench_train.py", ["cfgs/nope.yaml", "not found"], []),
    "bench_fvd_bad_device": (lambda w: [sys.executable, "benchmarks/bench_fvd.py", "--device", "gpu0"],
                             "bench_fvd.py", ["--device gpu0"], []),
    "launch_script_missing_dataset_csv": (lambda w: ["bash", "scripts/train_larp_ar.sh", "data.csv",
                                                     "ucf101_not_set_up.csv"], "train.py",
                                          ["ucf101_not_set_up.csv", "not found", "set_datasets.sh", "docs/datasets.md"], []),
    "launch_script_offline_hub_tokenizer": (lambda w: ["bash", "scripts/train_larp_ar.sh", "data.csv", w["train"],
                                                       "data.val_csv", w["val"]], "train.py",
                                            ["vae.checkpoint", "hywang66/LARP-L-long-tokenizer", "not a local path"],
                                            []),
}


def snapshot(folder):
    """sha256 of every file under `folder`, except the frame-count caches the clip index writes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".cache"):
                path = os.path.join(dirpath, name)
                out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line(name, ws, forks, tmp_path):
    build, prog, needles, forbidden = CASES[name]
    env = {k: v for k, v in os.environ.items() if k != "LARP_DEBUG"}
    bin_dir = os.path.dirname(sys.executable)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PATH=f"{bin_dir}:{env.get('PATH', '')}")
    before = snapshot(ws["root"])
    res = forks(build(ws), env)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    for bad in forbidden:
        assert bad not in line, (bad, line)
    assert snapshot(ws["root"]) == before  # nothing written before was changed, removed, or added to


def test_debug_shows_the_traceback(ws, tmp_path):
    """LARP_DEBUG=1: the same error with its traceback, for a bug report."""
    env = dict(os.environ, LARP_DEBUG="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(CASES["sample_missing_csv"][0](ws), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "Traceback" in res.stderr and "SampleError" in res.stderr


def test_table_covers_every_entry_point():
    scripts = {"train.py", "sample.py"} | {f"eval/{f}" for f in os.listdir(ROOT / "eval") if f.endswith(".py")}
    commands = [" ".join(map(str, CASES[name][0]({"root": ROOT, "train": "t", "val": "v", "no_label": "n",
                                                   "empty_csv": "e", "missing_video": "m", "empty_video": "ev",
                                                   "corrupt_video": "c", "label_7": "l", "videos": "d"})))
                for name in CASES]
    for script in sorted(scripts) + ["larp.data.oracle", "larp.data.make_csv", "larp.data.synthetic",
                                     "benchmarks/", "scripts/train_"]:
        assert any(script in c for c in commands), f"no bad-input case for {script}"
    assert len(CASES) >= 20
