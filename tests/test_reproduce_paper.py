"""eval/reproduce_paper.py: the rows' commands are the documented protocol, bad input is one line before anything
runs, and a --smoke table killed in its second row and run again gives the cells of the underlying reports, read
here independently (fvd_report.csv, metrics.json and the per-sample features), without redoing the first row."""
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from larp.core.errors import run_cli
from larp.metrics.fvd import FeatureStats, bootstrap_fvd, frechet_distance
from larp.sampling.paper_rows import ROWS, documented_command
import eval.reproduce_paper as reproduce_paper
from tests.conftest import GOLDEN, ROOT, wait_for


def test_every_row_runs_the_documented_protocol():
    """Each row with a public checkpoint runs, word for word, the command docs/evaluation.md shows for it (less its
    output folder)."""
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    shown = []
    for span in re.findall(r"`(python [^`]+)`", doc):
        words = shlex.split(span)
        if "--output_dir" in words:
            i = words.index("--output_dir")
            del words[i:i + 2]
        shown.append(words)
    for row in ROWS:
        if row.generator or not row.needs_generator:
            assert documented_command(row) in shown, f"{row.name}: {shlex.join(documented_command(row))}"


def test_sampling_rows_use_every_gpu_and_estimates_cite_measured_throughputs():
    """On an 8-GPU node the sampling rows run through torchrun on all 8 and the tokenizer row on one; the estimate
    comes from the measured figures of that GPU, and a device without figures gets no guess."""
    from larp.sampling import paper_plan as plan
    opts = plan.TableOptions(out="o", rows=ROWS, gpus=8, device_name="NVIDIA H200")
    detector = plan.Detector("kinetics400", "our port")
    plans = {r.name: plan.plan_row(r, opts, detector) for r in ROWS}
    assert plans["ucf_larp_ar"].argv[:4] == ("torchrun", "--nproc_per_node", "8", "sample.py")
    assert plans["tokenizer_rfvd"].argv[:2] == ("python", "eval/eval_larp_tokenizer.py")
    assert plans["ucf_nar_l"].missing.startswith("needs --model ucf_nar_l=PATH")
    figures = plan.load_throughputs()
    assert all("BENCHMARKS.md" in f["source"] for f in figures)
    assert plan.estimate(plans["ucf_nar_l"], 10000, "NVIDIA H200", figures) == \
        "~44 s from measured throughputs on NVIDIA H200 x8"
    assert plan.estimate(plans["ucf_larp_ar"], 10000, "CPU", figures).startswith(
        "no measured throughput on CPU for generate raster-LP")


def test_detector_is_the_reference_torchscript_only_at_a_known_digest(tmp_path, monkeypatch):
    """checkpoints/i3d_torchscript.pt is used when its git blob id is a known one, else our Kinetics-400 port."""
    from larp.core import safe_load
    from larp.sampling import paper_plan as plan
    monkeypatch.setattr(plan, "ROOT", str(tmp_path))
    assert plan.choose_detector(False).spec == "kinetics400"  # no file
    path = tmp_path / "checkpoints" / "i3d_torchscript.pt"
    path.parent.mkdir()
    path.write_bytes(b"a stand-in for the TorchScript archive")
    assert plan.choose_detector(False).spec == "kinetics400"  # unknown digest
    monkeypatch.setitem(safe_load.KNOWN_TORCHSCRIPT_GIT_BLOBS, safe_load.git_blob_sha1(path.read_bytes()), "test")
    chosen = plan.choose_detector(False)
    assert chosen.spec == str(path) and "StyleGAN-V" in chosen.label
    assert plan.choose_detector(True).spec == "random:32"  # the smoke run's


def one_error_line(capsys, argv):
    with pytest.raises(SystemExit):
        run_cli(reproduce_paper.main, reproduce_paper.get_args(argv), prog="reproduce_paper.py")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("reproduce_paper.py: error: "), err
    return err[0]


@pytest.mark.parametrize("case", ["unknown_row", "model_for_no_row", "tokenizer_as_generator", "missing_dataset"])
def test_bad_input_is_one_line_before_anything_runs(case, capsys, tmp_path):
    out = tmp_path / "table"
    argv, needles = {
        "unknown_row": (["--rows", "ucf_nar_xl"], ["--rows ucf_nar_xl", "no such row", "ucf_nar_lp"]),
        "model_for_no_row": (["--model", f"ucf_nar_xl={GOLDEN / 'nar'}"], ["--model ucf_nar_xl=", "no row named"]),
        "tokenizer_as_generator": (["--rows", "ucf_nar_l", "--model", f"ucf_nar_l={GOLDEN / 'tokenizer'}"],
                                   ["--model ucf_nar_l=", "LARP tokenizer", "expected a generator"]),
        "missing_dataset": (["--rows", "ucf_larp_ar", "--model", f"ucf_larp_ar={GOLDEN / 'raster'}",
                             "--tokenizer", str(GOLDEN / "tokenizer")],
                            ["row ucf_larp_ar", "ucf101_train.csv", "not on disk", "--rows"]),
    }[case]
    line = one_error_line(capsys, argv + ["--out", str(out)])
    for needle in needles:
        assert needle in line, (needle, line)
    assert not out.exists()  # no row started: no command ran, no model loaded


def table(out):
    with open(out / "paper_table.csv", newline="") as f:
        return {r["row"]: r for r in csv.DictReader(f)}


def smoke(out, rows, **kw):
    cmd = [sys.executable, "eval/reproduce_paper.py", "--smoke", "--out", str(out), "--rows", rows]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            process_group=0, **kw)


def check_sample_row(folder, cells, num):
    """The cells of a sample.py row against its report and the features it kept."""
    with open(folder / "fvd_report.csv", newline="") as f:
        report = list(csv.DictReader(f))[-1]
    assert float(cells["fvd"]) == float(report["fvd"])
    assert int(cells["samples"]) == json.loads(report["protocol"])["num_samples"] == 8
    parts = sorted(folder.glob("parts/features_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    real = np.concatenate([np.load(p)["real"] for p in parts])
    fake = np.concatenate([np.load(p)["fake"] for p in parts])
    gen = sum(FeatureStats.load(p) for p in folder.glob("generated_fvd_stats_*.pkl"))
    assert len(real) == len(fake) == gen.num_items == 8
    np.testing.assert_allclose(gen.sum, fake.astype(np.float64).sum(0), rtol=1e-9)  # the features that were scored
    assert frechet_distance(FeatureStats().add(real), FeatureStats().add(fake)) == pytest.approx(float(report["fvd"]),
                                                                                                   abs=1e-5)
    return real, fake


@pytest.mark.slow
def test_smoke_killed_in_its_second_row_resumes_to_the_reports(tmp_path):
    """SIGKILL while the second row samples; the rerun reads the first row (same files, a log line), resumes the
    second and runs the rest; every cell equals what the reports hold. (That a resumed sample.py run equals an
    uninterrupted one is tests/test_faults_sampling.py's.)"""
    out, rows = tmp_path / "table", "tokenizer_rfvd,ucf_larp_ar,k600_fp"  # each kind of row: tokenizer, class, frames
    proc = smoke(out, rows)
    wait_for(out / "ucf_larp_ar" / "generated_fvd_stats_0_4.pkl", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "ucf_larp_ar" / "paper_row.json").exists()  # killed inside the row
    first = out / "tokenizer_rfvd" / "metrics.json"
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    rerun = smoke(out, rows)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, log[-3000:]
    assert "row tokenizer_rfvd: finished result in" in log and "read (not rerun)" in log
    assert first.stat().st_mtime_ns == mtime and ("resuming [0, 8)" in log or "skipping [0, 8)" in log)

    cells = table(out)
    assert list(cells) == rows.split(",")
    assert all("not the paper's protocol" in c["ours"] and "random I3D" in c["protocol"] for c in cells.values())
    m = json.loads(first.read_text())
    tok = cells["tokenizer_rfvd"]
    assert float(tok["fvd"]) == m["fvd"] and int(tok["samples"]) == m["num_clips"] and f"PSNR {m['psnr']:.2f}" in tok["ours"]
    for name in ("ucf_larp_ar", "k600_fp"):
        real, fake = check_sample_row(out / name, cells[name], 8)
    b = bootstrap_fvd(real, fake, num=50, seed=0)  # the last row's interval, from the features read here
    assert (float(cells["k600_fp"]["interval_lo"]), float(cells["k600_fp"]["interval_hi"])) == (b["lo"], b["hi"])
    assert (out / "paper_table.md").read_text().count("\n| ") == 1 + len(cells)
