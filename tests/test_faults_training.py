"""train.py under faults: killed during steps and during checkpoint, cache and export writes; a worker of a
2-process torchrun run killed and restarted by the agent; two runs in one folder; a full disk; a read-only folder.
Each interrupted run ends with the losses and weights of an uninterrupted one.

Kills and pauses come from tests/faults/sitecustomize.py in a subprocess (a kill point named in LARP_FAULT); a full
disk is simulated in-process by a writer that writes half of its file and then raises OSError(ENOSPC), a read-only
folder by an os.open / os.mkdir that raise OSError(EROFS) below it (root ignores chmod)."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from larp.core.dist import DistInfo
from larp.core.errors import FolderBusyError, run_cli
from larp.core.io import TEMP_PREFIX
from larp.data.synthetic import make_synthetic_dataset
from larp.training.run_folder import hold_run_folder
from tests.conftest import ROOT, failing_writes, fault_env, read_only, wait_for

STEPS = 9
EXTRA = ["train.latest_interval", "3", "train.ema_decay", "0.9"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(str(out), classes=4, videos_per_class=6, frames=16, size=32, progress=False)


def argv(synth, reference_dir, out, name, extra=()):
    train_csv, val_csv = synth
    return ["--cfg", str(ROOT / "cfgs/quickstart_nar.yaml"), "--csv_file", train_csv, "--out_path", str(out),
            "--name", name, "-b", "8", "-j", "0", "--manualSeed", "3", "--cache_tokens", "--device", "cpu",
            "--opts", "data.val_csv", val_csv, "vae.checkpoint", str(reference_dir / "golden/tiny/tokenizer"),
            "model.num_classes", "4", "train.max_steps", str(STEPS), "train.log_interval", "1",
            "lr_schedule.warmup_steps", "5", "optimizer.args.lr", "1e-3", "eval.num_videos", "0", "train.keep", "last",
            "wandb.mode", "disabled", *EXTRA, *extra]


@pytest.fixture(scope="module")
def ref(synth, reference_dir, tmp_path_factory):
    """The run folder of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    return train.main(train.build_parser().parse_args(argv(synth, reference_dir, out, "ref")))["run_dir"]


def losses(run_dir):
    import csv
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f) if r.get("loss")}


def ckpt_step(run_dir):
    path = os.path.join(run_dir, "ckpt_latest.pth")
    return torch.load(path, weights_only=False)["step"] if os.path.exists(path) else None


def temps(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.startswith(TEMP_PREFIX)]


def assert_same_as_ref(run_dir, ref_dir, steps=STEPS):
    """Losses of every step, the final checkpoint (weights, optimizer, EMA) and the export equal the reference."""
    assert losses(run_dir) == losses(ref_dir) and sorted(losses(run_dir)) == list(range(1, steps + 1))
    a, b = (torch.load(os.path.join(d, "ckpt_latest.pth"), weights_only=False) for d in (run_dir, ref_dir))
    assert a["step"] == b["step"] == steps
    for key in ("ema",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key])
    assert all(torch.equal(a["model"]["sd"][k], v) for k, v in b["model"]["sd"].items())
    assert str(a["optimizer"]["state"]) == str(b["optimizer"]["state"])
    ea, eb = (load_file(os.path.join(d, "export", "model.safetensors")) for d in (run_dir, ref_dir))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in eb)
    assert not temps(run_dir)


def spawn(args, fault=None, do=None, **env):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=fault_env(fault, do, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# (kill point, checkpoint step left behind): writing the token cache, a step, writing a checkpoint (the temp file
# whole, the final name not yet), writing the export
KILLS = [("replace:token_cache.pt@1", None), ("larp.training.ar_stage:ARStage.step@5", 3),
         ("replace:ckpt_latest.pth@1", 3), ("replace:export/model.safetensors@1", 9)]


@pytest.mark.slow
def test_killed_four_times_then_rerun_gives_the_uninterrupted_run(synth, reference_dir, ref, tmp_path):
    args = argv(synth, reference_dir, tmp_path, "killed")
    run_dir = tmp_path / "killed"
    left = []
    for fault, step in KILLS:
        proc = spawn(args, fault)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == -9, f"{fault} did not kill it: {err[-2000:]}"
        assert ckpt_step(run_dir) == step, fault
        assert not [t for t in left if os.path.exists(t)], "the next run left the killed run's temp files"
        left = temps(run_dir)
    assert left  # the export was killed mid-write
    proc = spawn(args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed from" in out and "at step 9" in out, err[-2000:]
    assert_same_as_ref(run_dir, ref)


@pytest.mark.slow
def test_second_run_in_the_same_folder_refuses_naming_the_holder(synth, reference_dir, ref, tmp_path, capsys):
    args, go = argv(synth, reference_dir, tmp_path, "busy"), tmp_path / "go"
    first = spawn(args, "larp.training.ar_stage:ARStage.step@2", f"wait:{go}")  # holds the folder, paused
    try:
        wait_for(f"{go}.reached", first)
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        for extra in ([], ["--check"]):  # a second run, and the launch scripts' pre-flight check
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                run_cli(train.main, train.build_parser().parse_args(extra + args), prog="train.py")
            lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
            assert e.value.code == 1 and len(lines) == 1, lines
            assert f"run folder {tmp_path / 'busy'} is in use by {holder}" in lines[0], lines[0]
        with pytest.raises(FolderBusyError, match=holder):  # what every rank of a torchrun run gets
            with hold_run_folder(str(tmp_path / "busy"), DistInfo()):
                pass
    finally:
        if first.poll() is None:
            first.kill()  # SIGKILL: the lock file stays, its lock goes with the process
            first.communicate()
    assert os.path.exists(tmp_path / "busy" / ".run.lock")
    train.main(train.build_parser().parse_args(args))  # not blocked by the dead holder; starts fresh (no ckpt)
    assert_same_as_ref(tmp_path / "busy", ref)


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_names_it_and_a_rerun_continues(synth, reference_dir, ref, tmp_path,
                                                                   monkeypatch, capsys):
    args = train.build_parser().parse_args(argv(synth, reference_dir, tmp_path, "full"))
    run_dir = tmp_path / "full"
    with monkeypatch.context() as m:
        failing_writes(m, "ckpt_latest.pth", nth=2)  # the step-6 checkpoint
        with pytest.raises(SystemExit):
            run_cli(train.main, args, prog="train.py")
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert lines == [f"train.py: error: cannot write {run_dir / 'ckpt_latest.pth'}: no space left on device (free "
                     f"some space and run the same command again: finished work is kept)"]
    assert ckpt_step(run_dir) == 3 and not temps(run_dir)  # the last whole checkpoint, nothing partial
    train.main(args)  # the space is back: resumes from step 3 (the same process takes the folder again)
    assert_same_as_ref(run_dir, ref)


def test_read_only_run_folder_is_one_line(synth, reference_dir, tmp_path, monkeypatch, capsys):
    read_only(monkeypatch, tmp_path / "ro")
    with pytest.raises(SystemExit):
        run_cli(train.main, train.build_parser().parse_args(argv(synth, reference_dir, tmp_path / "ro", "run")),
                prog="train.py")
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and f"cannot write {tmp_path / 'ro' / 'run'}" in lines[0], lines
    assert "read-only file system" in lines[0] and not (tmp_path / "ro").exists()


def run_launcher(cmd, env, timeout=300):
    """(returncode, stdout, stderr) of a torchrun launch; past `timeout` its agent gets SIGTERM (it stops the workers
    it started in sessions of their own), then SIGKILL, so a hang fails the test without leaving processes."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{cmd[:4]} hung: {err[-3000:]}")
    return proc.returncode, out, err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_finishes(synth, reference_dir, tmp_path):
    """scripts/launch.sh with its default restarts: rank 1 of 2 is SIGKILLed once at step 5; the agent restarts
    both workers, they resume from the step-3 checkpoint and end with the losses of an uninterrupted 2-process
    run."""
    plain = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    rc, out, err = run_launcher(plain + argv(synth, reference_dir, tmp_path, "two"), fault_env())
    assert rc == 0, err[-3000:]
    once = tmp_path / "killed_once"
    env = fault_env("larp.training.ar_stage:ARStage.step@5", LARP_FAULT_RANK="1", LARP_FAULT_ONCE=str(once),
                    MASTER_PORT=str(free_port()), PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    rc, out, err = run_launcher(["bash", "-c", 'source scripts/launch.sh && launch 2 "$@"', "launch",
                                 *argv(synth, reference_dir, tmp_path, "restarted")], env)
    assert rc == 0, err[-3000:]
    assert once.exists() and "resumed from" in out and "at step 3" in out  # it was killed and restarted
    assert_same_as_ref(tmp_path / "restarted", tmp_path / "two")


def test_launch_script_passes_max_restarts(tmp_path):
    """torchrun gets --max-restarts 3 unless MAX_RESTARTS says otherwise (0 turns restarts off)."""
    log = tmp_path / "calls"
    for tool in ("python", "torchrun"):
        (tmp_path / tool).write_text(f'#!/bin/sh\necho {tool} "$@" "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" >> {log}\n')
        (tmp_path / tool).chmod(0o755)
    for value, expected in ((None, "3"), ("0", "0")):
        env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
        if value is not None:
            env["MAX_RESTARTS"] = value
        log.write_text("")
        subprocess.run(["bash", "-c", 'source scripts/launch.sh && launch 2 --cfg c.yaml'], cwd=ROOT, env=env,
                       check=True)
        calls = log.read_text().splitlines()
        assert calls[0].split() == "python train.py --check 2 --cfg c.yaml".split()
        assert f"--max-restarts={expected}" in calls[1].split() and "--rdzv-backend=c10d" in calls[1].split()
        assert calls[1].endswith("train.py --cfg c.yaml 1")  # the store of each attempt is its own
