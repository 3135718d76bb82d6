"""sample.py on the golden tiny models and a synthetic CSV: sharded == unsharded, resume, replace, concurrency,
frame prediction. Expected values come from independent computations (clip protocol redone here, stats merged
here), never from what the code under test prints."""
import json
import os
import random
import re
import shutil

import numpy as np
import pandas as pd
import pytest

import sample
from larp.sampling import run as sampling
from larp.data.video_io import read_frames
from larp.metrics.fvd import FeatureStats, frechet_distance
from tests.conftest import patch_everywhere

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "reference", "golden", "tiny")
TOTAL = 10


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    from larp.data.synthetic import make_synthetic_dataset
    train_csv, _ = make_synthetic_dataset(str(tmp_path_factory.mktemp("syn")), classes=4, videos_per_class=4,
                                          frames=8, size=32, progress=False)
    return train_csv  # 12 videos of 8 frames -> 12 clips


def argv(csv, out, ar=None, **kw):
    flags = {"ar_model": ar or os.path.join(GOLDEN, "nar"), "tokenizer": os.path.join(GOLDEN, "tokenizer"),
             "output_dir": str(out), "dataset_csv": csv, "i3d": "random:32", "num_workers": 0,
             "num_samples": TOTAL, "sample_batch_size": 4, "cfg_scale": 1.5, "top_k": 40, "device": "cpu",
             "dtype": "fp32", "tokenizer_dtype": "fp32"}
    flags.update(kw)
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not False and v is not None:
            out += [f"--{k}", str(v)]
    return out


def run(csv, out, env=None, **kw):
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return sample.main(sample.parse_args(argv(csv, out, **kw)))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def merged(out, prefix):
    """Stats of a folder merged here, from whichever files tile [0, TOTAL) (found independently)."""
    names = [f for f in os.listdir(out) if f.startswith(prefix + "_fvd_stats_")]
    ranges = sorted(tuple(int(x) for x in f[:-4].split("_")[-2:]) for f in names)
    pos, parts = 0, []
    for a, b in ranges:
        assert a == pos, f"ranges {ranges} do not tile [0, {TOTAL})"
        parts.append(FeatureStats.load(os.path.join(out, f"{prefix}_fvd_stats_{a}_{b}.pkl")))
        pos = b
    assert pos == TOTAL
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    nll = np.concatenate([np.load(os.path.join(out, f"nll_{a}_{b}.npy")) for a, b in ranges])
    return total, nll


def report(out):
    return pd.read_csv(os.path.join(out, "fvd_report.csv"))


@pytest.fixture(scope="module")
def runs(data_csv, tmp_path_factory):
    """One unsharded run (batch 4) and the same run as shards [5, 10) (batch 3) then [0, 5) split by two
    torchrun-style ranks (batch 2)."""
    root = tmp_path_factory.mktemp("runs")
    single, sharded = root / "single", root / "sharded"
    fvd_single = run(data_csv, single)
    first = run(data_csv, sharded, num_samples=5, num_samples_total=TOTAL, starting_index=5, sample_batch_size=3)
    report_after_first = os.path.exists(sharded / "fvd_report.csv")
    rank0 = run(data_csv, sharded, num_samples=5, num_samples_total=TOTAL, starting_index=0, sample_batch_size=2,
                env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    rank1 = run(data_csv, sharded, num_samples=5, num_samples_total=TOTAL, starting_index=0, sample_batch_size=2,
                env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    return {"single": str(single), "sharded": str(sharded), "fvd_single": fvd_single, "first": first,
            "report_after_first": report_after_first, "rank0": rank0, "rank1": rank1, "csv": data_csv}


def test_helpers():
    assert sampling.find_tiling([(5, 10), (0, 2), (2, 5)], 0, 10) == [(0, 2), (2, 5), (5, 10)]
    assert sampling.find_tiling([(0, 4), (0, 2), (2, 5), (4, 10)], 0, 10) == [(0, 4), (4, 10)]
    assert sampling.find_tiling([(0, 4), (0, 2), (2, 5), (5, 10)], 0, 10) == [(0, 2), (2, 5), (5, 10)]
    assert sampling.find_tiling([(0, 4), (5, 10)], 0, 10) is None
    assert sampling.find_tiling([(0, 6), (4, 10)], 0, 10) is None
    parts = [sampling.rank_range(3, 10, r, 4) for r in range(4)]
    assert parts[0][0] == 3 and parts[-1][1] == 13 and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    seeds = {sampling.sample_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000
    # chunks still to sample: boundaries a + k * chunk_size, finished ranges skipped, none crossing them
    assert sampling.todo_chunks([], 0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert sampling.todo_chunks([(0, 4)], 0, 10, 4) == [(4, 8), (8, 10)]
    assert sampling.todo_chunks([(4, 8), (20, 24)], 0, 10, 4) == [(0, 4), (8, 10)]
    assert sampling.todo_chunks([(2, 5)], 0, 10, 4) == [(0, 2), (5, 8), (8, 10)]
    assert sampling.todo_chunks([(6, 12)], 3, 10, 4) == [(3, 7), (7, 10)]  # a range crossing b is not used


@pytest.mark.slow
def test_sharded_equals_unsharded(runs):
    single, sharded = runs["single"], runs["sharded"]
    assert runs["first"] is None and not runs["report_after_first"]  # [5, 10) alone does not cover the run
    assert runs["rank0"] is None and runs["rank1"] is not None  # the rank that completed coverage finalized
    for name in ("generated_fvd_stats_0_2.pkl", "generated_fvd_stats_2_5.pkl", "generated_fvd_stats_5_10.pkl"):
        assert os.path.exists(os.path.join(sharded, name))
    gen_a, nll_a = merged(single, "generated")
    gen_b, nll_b = merged(sharded, "generated")
    gt_a, _ = merged(single, "gt")
    gt_b, _ = merged(sharded, "gt")
    assert gen_a.num_items == gen_b.num_items == TOTAL
    np.testing.assert_allclose(gen_b.sum, gen_a.sum, rtol=1e-4, atol=1e-5)  # float32 I3D, other batch sizes
    np.testing.assert_allclose(gen_b.sum_outer, gen_a.sum_outer, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gt_b.sum_outer, gt_a.sum_outer, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nll_b, nll_a, rtol=1e-5)
    assert np.isfinite(nll_a).all() and nll_a.std() > 0
    expected = frechet_distance(gen_a, gt_a)
    assert runs["fvd_single"] == pytest.approx(expected, rel=1e-5)
    assert runs["rank1"] == pytest.approx(runs["fvd_single"], rel=1e-5)
    for out, nll in ((single, nll_a), (sharded, nll_b)):
        rep = report(out)
        assert len(rep) == 1
        assert rep["fvd"][0] == pytest.approx(expected, rel=1e-5)
        assert rep["mean_nll"][0] == pytest.approx(float(nll.mean()), abs=1e-5)
        assert "not comparable" in rep["detector"][0] and rep["cfg_scale"][0] == 1.5 and rep["top_k"][0] == 40
    # same video for the same index whatever the layout and batch size
    for i in (0, 3, 7):
        va = read_frames(os.path.join(single, "sampled_videos", f"{i}.mp4")).astype(int)
        vb = read_frames(os.path.join(sharded, "sampled_videos", f"{i}.mp4")).astype(int)
        assert np.abs(va - vb).max() <= 2
    assert np.abs(va - read_frames(os.path.join(single, "sampled_videos", "0.mp4")).astype(int)).mean() > 1
    # the gallery shows the same samples, in the same places, whatever the layout
    thumbnails = [re.findall(r'src="([^"]+)"', open(os.path.join(out, "gallery.html")).read())
                  for out in (single, sharded)]
    assert thumbnails[0] == thumbnails[1] and len(thumbnails[0]) == 2 * TOTAL


@pytest.mark.slow
def test_padded_shards_equal_the_unsharded_run_bit_for_bit(data_csv, tmp_path, monkeypatch):
    """The same batch size, shards off the batch grid ([0, 3), then [3, 10) split by two ranks): every generate()
    gets the full batch with sample i at row i % 4, and the tokens (mp4 bytes) and NLLs equal the unsharded run's."""
    from larp.models.generator import Generator
    calls, real = [], Generator.generate

    def spy(self, cond, params, seeds=None, **kw):
        calls.append(list(seeds))
        return real(self, cond, params, seeds=seeds, **kw)

    monkeypatch.setattr(Generator, "generate", spy)
    one, parts = tmp_path / "one", tmp_path / "parts"
    run(data_csv, one)
    run(data_csv, parts, num_samples=3, num_samples_total=TOTAL)
    for rank in ("0", "1"):
        run(data_csv, parts, num_samples=7, num_samples_total=TOTAL, starting_index=3,
            env={"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank})
    assert len(calls) == 3 + 1 + 2 + 2  # unsharded; [0, 3); rank 0: [3, 4) [4, 6); rank 1: [6, 8) [8, 10)
    for seeds in calls:
        g = (seeds[0] - sampling.sample_seed(0, 0)) // 4 * 4
        assert seeds == [sampling.sample_seed(0, g + j) for j in range(4)]
    assert np.array_equal(merged(one, "generated")[1], merged(parts, "generated")[1])
    for i in range(TOTAL):
        mp4s = [(out / "sampled_videos" / f"{i}.mp4").read_bytes() for out in (one, parts)]
        assert mp4s[0] == mp4s[1], i


@pytest.mark.slow
def test_outputs_follow_clip_protocol(runs):
    """samples.csv lists the clips of random.Random(42).sample over the sorted-path clip list, in index order."""
    df = pd.read_csv(runs["csv"])
    base = os.path.dirname(runs["csv"])
    videos = sorted((os.path.join(base, p), int(l), a) for p, l, a in zip(df["path"], df["label"], df["action"]))
    chosen = random.Random(42).sample(range(len(videos)), TOTAL)  # one 8-frame clip per video
    for out in (runs["single"], runs["sharded"]):
        s = pd.read_csv(os.path.join(out, "samples.csv"))
        assert s["index"].tolist() == list(range(TOTAL))
        assert s["label"].tolist() == [videos[c][1] for c in chosen]
        assert s["action"].tolist() == [videos[c][2] for c in chosen]
        assert [os.path.abspath(p) for p in s["clip_path"]] == [os.path.abspath(videos[c][0]) for c in chosen]
        mp4s = sorted(os.listdir(os.path.join(out, "sampled_videos")))
        assert mp4s == sorted(f"{i}.mp4" for i in range(TOTAL))
        assert all(os.path.exists(os.path.join(out, p)) for p in s["path"])
        assert os.path.getsize(os.path.join(out, "preview.png")) > 0
        timing = json.load(open(os.path.join(out, "timing.json")))
        assert timing["num_videos"] == TOTAL and timing["generate_videos_per_s"] > 0 and timing["i3d_s"] > 0


@pytest.mark.slow
def test_rerun_skips_and_replace_redoes(runs, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(runs["sharded"], out)
    stats = out / "generated_fvd_stats_5_10.pkl"
    stamp = stats.stat().st_mtime_ns
    capsys.readouterr()
    value = run(runs["csv"], out, num_samples=5, num_samples_total=TOTAL, starting_index=5)
    text = capsys.readouterr().out
    assert "skipping [5, 10)" in text and text.strip().splitlines()[-1].startswith("fvd=")
    assert stats.stat().st_mtime_ns == stamp and value == pytest.approx(runs["rank1"], rel=1e-5)
    assert len(report(out)) == 1
    # [0, 5) was done by two ranks; a plain rerun finds it complete too
    run(runs["csv"], out, num_samples=5, num_samples_total=TOTAL, starting_index=0)
    assert "skipping [0, 5)" in capsys.readouterr().out
    # another rank layout for [0, 5): rank 0 of 3 redoes [0, 1); the folder keeps one tiling of [0, 10)
    run(runs["csv"], out, num_samples=5, num_samples_total=TOTAL, starting_index=0,
        env={"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"})
    assert "timing [0, 1)" in capsys.readouterr().out
    assert merged(out, "generated")[0].num_items == TOTAL and len(report(out)) == 1  # merged() asserts a tiling
    mp4 = out / "sampled_videos" / "0.mp4"
    mp4_stamp = mp4.stat().st_mtime_ns
    value = run(runs["csv"], out, num_samples=5, num_samples_total=TOTAL, starting_index=0, replace=True,
                stats_only=True)
    assert "skipping" not in capsys.readouterr().out
    assert not (out / "generated_fvd_stats_0_2.pkl").exists() and (out / "generated_fvd_stats_0_5.pkl").exists()
    assert mp4.stat().st_mtime_ns == mp4_stamp  # --stats_only wrote no video
    assert len(report(out)) == 1 and value == pytest.approx(runs["rank1"], rel=1e-5)
    s = pd.read_csv(out / "samples.csv")
    assert s["index"].tolist() == list(range(TOTAL)) and s["path"].tolist()[0] == "sampled_videos/0.mp4"


@pytest.mark.slow
def test_concurrent_finalize_computes_once(runs, tmp_path, monkeypatch):
    """Two shards finishing at the same moment: both call finalize together; one computes, one row results."""
    import threading
    import larp.metrics.fvd
    out = tmp_path / "race"
    shutil.copytree(runs["sharded"], out)
    os.remove(out / "fvd_report.csv")
    settings = json.load(open(out / "run_config.json"))
    real, barrier, meet, computed, results = larp.metrics.fvd.frechet_distance, threading.Barrier(2), threading.Barrier(2), [], []

    def frechet_waiting_for_the_other_shard(a, b):
        # Without the lock both threads get here and meet at once; with it the second one is held at the lock,
        # so the first gives up waiting for it and goes on.
        computed.append(1)
        try:
            meet.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return real(a, b)
    assert patch_everywhere(monkeypatch, larp.metrics.fvd, "frechet_distance", frechet_waiting_for_the_other_shard)

    def shard_finishing():
        barrier.wait()
        results.append(sampling.finalize(str(out), settings, log=lambda m: None))
    threads = [threading.Thread(target=shard_finishing) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(r["computed"] for r in results) == [False, True] and len(computed) == 1
    assert results[0]["fvd"] == pytest.approx(results[1]["fvd"]) == pytest.approx(runs["rank1"], rel=1e-5)
    assert len(report(out)) == 1
