"""benchmarks/gpu_check.sh: its tiny CPU fallback runs every section and writes the JSON report and the tables."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_tiny_cpu_fallback(tmp_path):
    out = tmp_path / "gpu_check_out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    cmd = ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["tests", "sampling", "train_fsdp", "train_ddp", "tokenizer", "i3d"]
    bad = {k: (v["status"], v.get("error"), v.get("log_tail", "")[-1500:]) for k, v in sections.items()
           if v["status"] != "ok"}
    assert not bad and res.returncode == 0, bad
    assert report["machine"]["device"] == "cpu"
    # CUDA tests are collected and skipped on a CPU, with the reason recorded
    tests = sections["tests"]["results"]
    assert tests["counts"].get("skipped", 0) >= 5 and not tests["counts"].get("failed")
    rows = sections["sampling"]["results"]["rows"]
    assert rows["nar-L"]["forward_passes"] == 2 + 4 + 4 - 2 and rows["raster-L"]["forward_passes"] == 32
    ratios = sections["sampling"]["results"]["ratios"]
    assert ratios["raster-L / nar-L"] == pytest.approx(rows["raster-L"]["seconds"] / rows["nar-L"]["seconds"])
    ddp, fsdp = (sections[k]["results"]["result"] for k in ("train_ddp", "train_fsdp"))
    assert ddp["steps"] == fsdp["steps"] == 20
    assert fsdp["loss_first"] == pytest.approx(ddp["loss_first"], abs=1e-5)  # same init and batch, one process
    assert fsdp["loss_last"] == pytest.approx(ddp["loss_last"], abs=1e-4)
    assert ddp["loss_last"] < ddp["loss_first"] - 0.1  # 22 steps on one batch: it fits
    tok = sections["tokenizer"]["results"]["result"]
    assert tok["encode_clips_per_s"] > 0 and tok["decode_clips_per_s"] > 0
    i3d = sections["i3d"]["results"]
    assert i3d["requested"] == "kinetics400" and i3d["result"]["clips_per_s"] > 0
    assert i3d["random_fallback"] == ("error" in i3d)  # a fallback is always explained, never silent
    md = (out / "gpu_check.md").read_text()
    for text in ("| sampling | ok |", "raster-L / nar-L", "**Training**", "**Tokenizer**", "**I3D features**"):
        assert text in md
    if i3d["random_fallback"]:
        assert "RANDOM weights" in md
