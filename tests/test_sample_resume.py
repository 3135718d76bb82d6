"""A sample.py shard killed with SIGKILL after some chunks, then rerun: it continues from its last finished chunk
(the finished chunks are neither generated nor written again) and ends with the same statistics, FVD and report
row as an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

import sample
from larp.metrics.fvd import FeatureStats
from tests.conftest import GOLDEN, ROOT

TOTAL, CHUNK = 12, 2
CHUNKS = [(a, a + CHUNK) for a in range(0, TOTAL, CHUNK)]


def argv(csv, out):
    return ["--ar_model", str(GOLDEN / "nar"), "--tokenizer", str(GOLDEN / "tokenizer"), "--output_dir", str(out),
            "--dataset_csv", csv, "--i3d", "random:32", "--num_workers", "0", "--num_samples", str(TOTAL),
            "--sample_batch_size", "1", "--chunk_size", str(CHUNK), "--cfg_scale", "1.5", "--top_k", "40",
            "--device", "cpu"]


def chunk_files(out, a, b):
    return [os.path.join(out, f) for f in (f"generated_fvd_stats_{a}_{b}.pkl", f"gt_fvd_stats_{a}_{b}.pkl",
                                           f"nll_{a}_{b}.npy", f"parts/samples_{a}_{b}.csv",
                                           f"parts/range_{a}_{b}.json")]


def finished(out):
    return [c for c in CHUNKS if os.path.exists(chunk_files(out, *c)[0])]


@pytest.mark.slow
def test_killed_shard_resumes_from_last_chunk(tmp_path, capsys):
    from larp.data.synthetic import make_synthetic_dataset
    csv, _ = make_synthetic_dataset(str(tmp_path / "syn"), classes=4, videos_per_class=4, frames=8, size=32,
                                    progress=False)  # 12 clips of 8 frames
    killed, full = tmp_path / "killed", tmp_path / "full"

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "sample.py", *argv(csv, killed)], cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not finished(killed) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # polling for the first finished chunk, not a fixed wait
        child.send_signal(signal.SIGKILL)
        child.wait()
    done = finished(killed)
    assert child.returncode == -signal.SIGKILL, open(tmp_path / "child.log").read()
    assert 1 <= len(done) < len(CHUNKS), f"killed too late to test resuming: {done}"
    stamps = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for c in done for p in chunk_files(killed, *c)}

    capsys.readouterr()
    fvd_resumed = sample.main(sample.parse_args(argv(csv, killed)))
    text = capsys.readouterr().out
    assert f"resuming [0, {TOTAL}): {CHUNK * len(done)} samples already finished" in text
    redone = [c for c in CHUNKS if f"timing [{c[0]}, {c[1]})" in text]
    assert redone == [c for c in CHUNKS if c not in done]  # only the chunks that were not finished
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in stamps} == stamps  # not written again

    fvd_full = sample.main(sample.parse_args(argv(csv, full)))
    assert fvd_resumed == fvd_full
    for a, b in CHUNKS:  # every chunk's statistics and NLLs are bit-identical
        for kind in ("generated", "gt"):
            s1 = FeatureStats.load(killed / f"{kind}_fvd_stats_{a}_{b}.pkl")
            s2 = FeatureStats.load(full / f"{kind}_fvd_stats_{a}_{b}.pkl")
            assert s1.num_items == s2.num_items == b - a
            assert np.array_equal(s1.sum, s2.sum) and np.array_equal(s1.sum_outer, s2.sum_outer)
        assert np.array_equal(np.load(killed / f"nll_{a}_{b}.npy"), np.load(full / f"nll_{a}_{b}.npy"))
    rows = [pd.read_csv(out / "fvd_report.csv") for out in (killed, full)]
    assert len(rows[0]) == len(rows[1]) == 1
    assert rows[0].drop(columns="time").equals(rows[1].drop(columns="time"))
    assert pd.read_csv(killed / "samples.csv").equals(pd.read_csv(full / "samples.csv"))
    assert sorted(os.listdir(killed / "sampled_videos")) == sorted(f"{i}.mp4" for i in range(TOTAL))
    # exactly one set of files per chunk: nothing partial left, nothing counted twice
    stats = sorted(f for f in os.listdir(killed) if f.endswith(".pkl"))
    assert stats == sorted(f"{k}_fvd_stats_{a}_{b}.pkl" for a, b in CHUNKS for k in ("generated", "gt"))
