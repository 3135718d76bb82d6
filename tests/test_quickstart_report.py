"""The quickstart's measurements: the nearest-training-clip distance (one float32 product over all sample sets) equals
a brute-force float64 search; the goals table says `no` where a goal is missed; the stage runner orders stages by
what they need and stops on a failing one."""
import os
import sys

import numpy as np
import pytest

from larp.quickstart import report as quickstart_report
from larp.quickstart import stages as quickstart_stages


def test_nearest_rms_matches_brute_force():
    rng = np.random.default_rng(0)
    reference = rng.random((37, 4, 6, 6, 3), dtype=np.float32)
    sets = [rng.random((5, 4, 6, 6, 3), dtype=np.float32), reference[[3, 9]] + 0.01]
    got = quickstart_report.nearest_rms(sets, reference, chunk=8)
    for videos, value in zip(sets, got):
        d = videos.reshape(len(videos), 1, -1).astype(np.float64) - reference.reshape(1, len(reference), -1)
        want = np.sqrt((d ** 2).mean(-1)).min(1).mean()
        assert value == pytest.approx(want, rel=1e-3)  # float32 products: ~1e-4 of a small distance
    assert got[1] == pytest.approx(0.01, rel=1e-3)  # copies of training clips sit at their offset


def test_goals_table_marks_misses():
    stats = {"spread": {"real videos (val)": 0.1, "NAR samples, seed 0": 0.09, "RASTER samples, seed 0": 0.07},
             "nearest_train": {"real videos (val)": 0.05, "NAR samples, seed 0": 0.06, "RASTER samples, seed 0": 0.04}}
    kept = {"nar": {"val_loss": 3.0, "lowest": 3.0}, "raster": {"val_loss": 3.3, "lowest": 3.0}}
    acc = {"nar": {0: 0.96, 1: 0.94}, "raster": {0: 0.95, 1: 0.97}}
    rows = {line.split(" | ")[0][2:]: line for line in quickstart_report.goal_lines(
        quickstart_report.goal_rows(acc, kept, stats, 1.5, 5.0, 600))}
    assert rows["NAR oracle accuracy, lowest of the seeds"].endswith("0.940 | >= 0.95 | **no** |")
    assert rows["raster oracle accuracy, lowest of the seeds"].endswith("| yes |")
    assert rows["val loss at the kept checkpoint / lowest, worse generator"].endswith("1.100 | <= 1.05 | **no** |")
    nearest = rows["nearest training clip: closest sample set / real val clips"]
    assert nearest.endswith("0.80 | > 1 (samples farther) | **no** |")
    assert rows["within-class spread / real, lowest sample set"].endswith("0.700 | >= 0.80 | **no** |")
    assert rows["NAR FVD / tokenizer reconstruction FVD"].endswith("| yes |")


def stage(tmp_path, name, code, needs=()):
    done = tmp_path / f"{name}.done"
    write = f"pathlib.Path({str(done)!r}).write_text(str(time.time()))"
    cmd = [sys.executable, "-c", f"import time, pathlib; {code}; {write}"]
    return quickstart_stages.Stage(name, cmd, str(done), needs)


def test_stages_wait_for_what_they_need(tmp_path):
    stages = [stage(tmp_path, "late", "time.sleep(0.2)", needs=("early",)), stage(tmp_path, "early", "time.sleep(1)")]
    times = {}
    quickstart_stages.run_pipeline(stages, times, str(tmp_path), str(tmp_path))
    assert float((tmp_path / "late.done").read_text()) > float((tmp_path / "early.done").read_text())
    assert set(times) == {"early", "late"}
    quickstart_stages.run_pipeline(stages, times, str(tmp_path), str(tmp_path))  # done files exist: both reused
    assert times["early"]["reused"] and times["late"]["reused"]


def test_a_failing_stage_stops_the_run_naming_its_log(tmp_path):
    with pytest.raises(SystemExit, match=r"stage 'bad' failed \(exit 3\); its log: .*bad\.log"):
        quickstart_stages.run_pipeline([stage(tmp_path, "bad", "raise SystemExit(3)")], {}, str(tmp_path),
                                       str(tmp_path))
    assert os.path.exists(tmp_path / "bad.log")
