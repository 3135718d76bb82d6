"""sample.py under faults: killed (SIGKILL) again and again at awkward moments, the same range launched twice at
once, a disk that fills up and a read-only folder. Each ends with the files of an uninterrupted run, bit for bit.

Kills and pauses come from tests/faults/sitecustomize.py in a subprocess (a kill point named in LARP_FAULT); a full
disk is simulated in-process by a writer that writes half of its file and then raises OSError(ENOSPC), a read-only
folder by an os.open / os.mkdir that raise OSError(EROFS) below it (root ignores chmod)."""
import hashlib
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import sample
from larp.core import io
from larp.core.errors import WriteError, run_cli
from larp.metrics.fvd import FeatureStats
from tests.conftest import ROOT, failing_writes, fault_env, read_only, wait_for
from tests.test_sample_resume import CHUNKS, TOTAL, argv  # the same 12-sample run in chunks of 2


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(csv, folder of an uninterrupted run, its FVD)."""
    from larp.data.synthetic import make_synthetic_dataset
    root = tmp_path_factory.mktemp("faults_sampling")
    csv, _ = make_synthetic_dataset(str(root / "syn"), classes=4, videos_per_class=4, frames=8, size=32,
                                    progress=False)  # 12 clips of 8 frames
    fvd = sample.main(sample.parse_args(argv(csv, root / "ref")))
    return csv, root / "ref", fvd


def spawn(csv, out, fault=None, do=None, umask=None):
    """sample.py as a user starts it, with a fault point; returns the Popen (stdout and stderr as text)."""
    return subprocess.Popen([sys.executable, "sample.py", *argv(csv, out)], cwd=ROOT, env=fault_env(fault, do),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def temps(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.startswith(io.TEMP_PREFIX))


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_same_as_ref(out, ref_out):
    """Stats, NLLs, rows, mp4s and the one report row of `out` equal those of the uninterrupted run."""
    for a, b in CHUNKS:
        for kind in ("generated", "gt"):
            s1, s2 = (FeatureStats.load(o / f"{kind}_fvd_stats_{a}_{b}.pkl") for o in (out, ref_out))
            assert s1.num_items == s2.num_items == b - a
            assert np.array_equal(s1.sum, s2.sum) and np.array_equal(s1.sum_outer, s2.sum_outer)
        assert np.array_equal(np.load(out / f"nll_{a}_{b}.npy"), np.load(ref_out / f"nll_{a}_{b}.npy"))
    stats = sorted(f for f in os.listdir(out) if f.endswith(".pkl"))  # one set per chunk: nothing counted twice
    assert stats == sorted(f"{k}_fvd_stats_{a}_{b}.pkl" for a, b in CHUNKS for k in ("generated", "gt"))
    rows = [pd.read_csv(o / "fvd_report.csv") for o in (out, ref_out)]
    assert len(rows[0]) == 1 and rows[0].drop(columns="time").equals(rows[1].drop(columns="time"))
    assert pd.read_csv(out / "samples.csv").equals(pd.read_csv(ref_out / "samples.csv"))
    for i in range(TOTAL):
        assert digest(out / "sampled_videos" / f"{i}.mp4") == digest(ref_out / "sampled_videos" / f"{i}.mp4")
    assert os.path.exists(out / "timing.json") and not temps(out)
    assert not [f for f in os.listdir(out) if f.startswith(".sampling_")]  # range locks are removed at the end


# (kill point, what the process was doing): generation, an mp4, a chunk's files, the shard's last stats, the FVD
KILLS = [("larp.sampling.run:generate_batch@3", "generating sample 2 (chunk [2, 4))"),
         ("replace:sampled_videos/3.mp4@1", "writing an mp4 of chunk [2, 4)"),
         ("replace:gt_fvd_stats_4_6.pkl@1", "writing the files of chunk [4, 6) (NLLs, rows and timing done)"),
         ("replace:generated_fvd_stats_10_12.pkl@1", "writing the shard's last stats"),
         ("larp.sampling.output_folder:frechet_distance@1", "computing the final FVD"),
         ("replace:timing.json@1", "writing the run's timing summary")]


@pytest.mark.slow
def test_killed_six_times_then_rerun_gives_the_uninterrupted_result(ref, tmp_path, capsys):
    csv, ref_out, ref_fvd = ref
    out = tmp_path / "killed"
    left_before = []
    for fault, doing in KILLS:
        proc = spawn(csv, out, fault, umask=0o027)
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == -9, f"not killed while {doing}: {stderr[-2000:]}"
        assert not [t for t in left_before if os.path.exists(t)], "the run after a kill left its temp files"
        left_before = temps(out)
    assert left_before, "the last kill (mid-write of timing.json) left its temp file"
    stdout, stderr = spawn(csv, out, umask=0o027).communicate(timeout=300)
    assert f"fvd={ref_fvd:.6f}" in stdout, stdout + stderr
    assert_same_as_ref(out, ref_out)
    # every file has the mode the umask gives (027: 0640), as with any other tool
    modes = {os.path.relpath(os.path.join(d, f), out): oct(os.stat(os.path.join(d, f)).st_mode & 0o777)
             for d, _, fs in os.walk(out) for f in fs}
    assert set(modes.values()) == {"0o640"}, modes
    capsys.readouterr()
    assert sample.main(sample.parse_args(argv(csv, out))) == ref_fvd  # once more: nothing to do, still one row
    assert "already in" in capsys.readouterr().out and len(pd.read_csv(out / "fvd_report.csv")) == 1


@pytest.mark.slow
def test_same_range_launched_twice_does_the_work_once(ref, tmp_path):
    csv, ref_out, ref_fvd = ref
    out, go = tmp_path / "twice", tmp_path / "go"
    first = spawn(csv, out, "larp.sampling.run:generate_batch@3", f"wait:{go}")  # paused in chunk [2, 4)
    try:
        wait_for(f"{go}.reached", first)
        second = spawn(csv, out)
        stdout, stderr = second.communicate(timeout=300)
        go.touch()
        first_out, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 1 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sample.py: error: samples [0, 12) of ") and str(out) in lines[0]
    assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0], lines[0]
    assert f"fvd={ref_fvd:.6f}" in first_out
    assert_same_as_ref(out, ref_out)


def run_expecting_one_line(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(sample.main, sample.parse_args(args), prog="sample.py")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]  # stderr also has tqdm's bars
    assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith("sample.py: error: "), err
    return lines[0]


@pytest.mark.slow
def test_full_disk_names_the_file_and_a_rerun_continues(ref, tmp_path, monkeypatch, capsys):
    csv, ref_out, _ = ref
    out = tmp_path / "full"
    for name in ("sampled_videos/5.mp4", "nll_6_8.npy"):  # an mp4 (written by a pool thread), then a chunk file
        with monkeypatch.context() as m:
            failing_writes(m, name)
            err = run_expecting_one_line(argv(csv, out), capsys)
        assert f"cannot write {out / name}: no space left on device" in err, err
        assert not (out / name).exists() and not temps(out)  # nothing partial under the final name or beside it
    capsys.readouterr()
    sample.main(sample.parse_args(argv(csv, out)))
    assert "resuming [0, 12): 6 samples already finished" in capsys.readouterr().out  # [0, 6) was kept
    assert_same_as_ref(out, ref_out)


def test_read_only_folder_is_one_line_naming_it(ref, tmp_path, monkeypatch, capsys):
    csv = ref[0]
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    for out in (ro, ro / "new"):
        err = run_expecting_one_line(argv(csv, out), capsys)
        assert f"cannot write {out}" in err and "read-only file system" in err, err
    assert os.listdir(ro) == []


def test_unrecognised_full_disk_errors_are_named_too(tmp_path, monkeypatch):
    """torch.save and np.save report a full disk without an errno: the free space tells."""
    def torch_like(tmp):
        open(tmp, "wb").write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 100, 0, 0, 10, 0, 0, 0, 255)))
    with pytest.raises(WriteError, match="cannot write .*x.pth: no space left on device"):
        io.atomic_write(tmp_path / "x.pth", torch_like)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space left it is not a disk problem
        io.atomic_write(tmp_path / "x.pth", torch_like)
