"""benchmarks/gpu_check.sh: its tiny CPU run goes through every section, writes the JSON report and the tables, and
prints the decoding summary; --prepare refuses an unknown argument in one line."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_tiny_cpu_fallback(tmp_path):
    out = tmp_path / "out"  # on a device machine only what is under $OUT comes back: without --out it writes there
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", OUT=str(out))
    cmd = ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--device", "cpu", "--tiny"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert (out / "sections" / "attention.log").exists() and not (tmp_path / "gpu_check_out").exists()
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["tests", "decode_nar", "decode_raster", "attention", "train_fsdp", "train_ddp",
                              "tokenizer", "i3d"]
    bad = {k: (v["status"], v.get("error"), v.get("log_tail", "")[-1500:]) for k, v in sections.items()
           if v["status"] != "ok"}
    assert not bad and res.returncode == 0, bad
    assert report["machine"]["device"] == "cpu"
    assert sections["attention"]["results"] == {"skipped": "CUDA only"}
    # CUDA tests are collected and skipped on a CPU, with the reason recorded
    tests = sections["tests"]["results"]
    assert tests["counts"].get("skipped", 0) >= 5 and not tests["counts"].get("failed")
    nar, raster = (sections[f"decode_{o}"]["results"]["row"] for o in ("nar", "raster"))
    assert nar["forward_passes"] == 2 + 4 + 4 - 2 and raster["forward_passes"] == 32
    assert nar["tokens_equal_eager"] and raster["tokens_equal_eager"]  # the traced passes pick the eager tokens
    for row in (nar, raster):
        b = row["breakdown"]
        assert b["passes"] == row["forward_passes"] and b["aten_ops_per_pass"] > 50
        assert b["attention_ms"] > 0 and b["mlp_ms"] > 0 and b["rest_ms"] > 0
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
    for text in ("| decode_nar | ok |", "| nar-tiny | 8 |", "| raster-tiny | 32 |", "**Training**", "**Tokenizer**",
                 "**I3D features**"):
        assert text in md
    assert "[gpu_check] summary" in res.stdout and "| nar-tiny | 8 |" in res.stdout.split("[gpu_check] summary")[1]
    if i3d["random_fallback"]:
        assert "RANDOM weights" in md


def test_prepare_refuses_an_unknown_argument():
    res = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--prepare", "--pyhton-version", "3.12"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "gpu_check.sh --prepare: unknown argument '--pyhton-version' (takes --python-version X.Y)"]
