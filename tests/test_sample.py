"""sample.py on the golden tiny models and a synthetic CSV: sharded == unsharded, resume, replace, concurrency,
frame prediction. Expected values come from independent computations (clip protocol redone here, stats merged
here), never from what the code under test prints."""
import json
import os
import random
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

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


def test_condition_tokens_depend_on_first_frames_only():
    from larp.models.tokenizer import LARPTokenizer
    tok = LARPTokenizer.from_pretrained(os.path.join(GOLDEN, "tokenizer"))
    tok.set_vq_eval_deterministic(True)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 8, 32, 32, generator=g)
    base = tok.encode_condition(video, 3)
    later = video.clone()
    later[:, :, 3:] = torch.rand(2, 3, 5, 32, 32, generator=g)
    assert torch.equal(tok.encode_condition(later, 3), base)
    held = video.clone()
    held[:, :, 3:] = video[:, :, 2:3]  # what the condition video is: last conditioning frame held
    assert torch.equal(tok.encode(held)["bottleneck_rep"], base)
    assert not torch.equal(tok.encode(video)["bottleneck_rep"], base)


class Recorder:
    """Wraps the detector: keeps every video batch it is given ("gen" and "gt" calls alternate, gen first)."""

    def __init__(self, detector):
        self.detector, self.name, self.is_random, self.sha256 = detector, detector.name, detector.is_random, None
        self.seen = []

    def __call__(self, videos):
        self.seen.append(videos.detach().cpu().clone())
        return self.detector(videos)


def recording_run(monkeypatch, csv, out, **kw):
    """One sample.py run whose detector inputs and generated tokens are kept: (fvd, gen clips, real clips, tokens)."""
    import larp.metrics.detectors
    rec, tokens = {}, []
    load_i3d, load_models = larp.metrics.detectors.load_i3d, sampling.load_models

    def recording_i3d(*a, **k):
        rec["det"] = Recorder(load_i3d(*a, **k))
        return rec["det"]

    def recording_models(*a, **k):
        tok, model = load_models(*a, **k)
        generate = model.generate

        def keep(*ga, **gk):
            out = generate(*ga, **gk)
            tokens.append(out[0])
            return out
        model.generate = keep
        return tok, model
    with monkeypatch.context() as m:
        patch_everywhere(m, larp.metrics.detectors, "load_i3d", recording_i3d)
        patch_everywhere(m, sampling, "load_models", recording_models)
        value = run(csv, out, **kw)
    seen = rec["det"].seen
    return value, torch.cat(seen[0::2]), torch.cat(seen[1::2]), torch.cat(tokens)


@pytest.fixture(scope="module")
def fp_model(tmp_path_factory):
    from larp.models.generator import ModelArgs, build_generator
    torch.manual_seed(0)
    model = build_generator(ModelArgs(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=5, cls_token_num=33,
                                      max_seq_len=32, latent_shape=(2, 4, 4), frame_prediction=True), order="nar")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("output"):
                p.normal_(std=0.05)  # non-uniform logits
    path = tmp_path_factory.mktemp("fp") / "fp_nar"
    model.save_pretrained(path)
    return str(path)


FP_FLAGS = {"frame_prediction": True, "num_cond_frames": 3, "cfg_scale": 1.0, "num_samples": 4,
            "sample_batch_size": 2, "dtype": None, "tokenizer_dtype": None}  # the protocol's precision defaults


@pytest.mark.slow
def test_frame_prediction_scores_all_decoded_frames(data_csv, fp_model, tmp_path, monkeypatch):
    """By default every decoded frame is scored (the reference): the clips the detector sees are torchvision
    Resize((64, 64)) of the decoded tokens, conditioning frames included; --paste_cond_frames replaces those by the
    real ones (and only those)."""
    from torchvision import transforms
    from larp.models.tokenizer import LARPTokenizer
    value, gen, real, tokens = recording_run(monkeypatch, data_csv, tmp_path / "fp", ar=fp_model, **FP_FLAGS)
    assert np.isfinite(value) and gen.shape == real.shape == (4, 3, 8, 64, 64)
    tok = LARPTokenizer.from_pretrained(os.path.join(GOLDEN, "tokenizer")).eval()  # fp32: the FP default
    with torch.no_grad():
        decoded = tok.decode_from_bottleneck(tokens).clamp(0, 1)  # (4, 3, 8, 32, 32)
    frames = decoded.permute(0, 2, 1, 3, 4).reshape(32, 3, 32, 32)
    expected = transforms.Resize((64, 64))(frames).reshape(4, 8, 3, 64, 64).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(gen, expected, rtol=0, atol=1e-6)
    assert (gen[:, :, :3] - real[:, :, :3]).abs().mean() > 0.02  # decoded condition frames, not the real ones
    rep = report(tmp_path / "fp")
    assert len(rep) == 1 and bool(rep["frame_prediction"][0]) and rep["fvd_size"][0] == 64
    assert not bool(rep["paste_cond_frames"][0]) and rep["tokenizer_dtype"][0] == "fp32" and rep["dtype"][0] == "bf16"
    card = json.loads(rep["protocol"][0])
    assert card["frames_scored"] == "every decoded frame" and "sampled (per-sample seeds)" in card["condition"]
    assert card["num_samples"] == 4 and card["resize"].startswith("torchvision Resize(32, antialias) + CenterCrop(32), "
                                                                  "then Resize((64, 64))")
    assert card["precision"] == "generator weights bf16, tokenizer fp32, detector fp32"

    pasted, gen_p, real_p, tokens_p = recording_run(monkeypatch, data_csv, tmp_path / "fp_paste", ar=fp_model,
                                                    paste_cond_frames=True, **FP_FLAGS)
    assert torch.equal(tokens_p, tokens) and torch.equal(real_p, real)
    assert torch.equal(gen_p[:, :, :3], real[:, :, :3]) and torch.equal(gen_p[:, :, 3:], gen[:, :, 3:])
    assert pasted != pytest.approx(value)
    assert json.loads(report(tmp_path / "fp_paste")["protocol"][0])["frames_scored"].endswith("replaced by the real ones")
    s = pd.read_csv(tmp_path / "fp" / "samples.csv")
    assert s["gt_path"].tolist() == [f"gt_videos/{i}.mp4" for i in range(4)]
    for i in range(4):
        sampled = read_frames(tmp_path / "fp" / "sampled_videos" / f"{i}.mp4").astype(int)
        gt = read_frames(tmp_path / "fp" / "gt_videos" / f"{i}.mp4").astype(int)
        assert sampled.shape == gt.shape == (8, 32, 32, 3)


@pytest.mark.slow
def test_frame_prediction_condition_is_sampled_per_sample(data_csv, fp_model, tmp_path, monkeypatch):
    """Condition tokens come from the sampling quantiser with per-sample draws: the same tokens whatever the batch
    size, other tokens than the argmax condition."""
    flags = dict(FP_FLAGS, dtype="fp32")
    _, _, _, tokens = recording_run(monkeypatch, data_csv, tmp_path / "a", ar=fp_model, **flags)
    _, _, _, tokens_b = recording_run(monkeypatch, data_csv, tmp_path / "b", ar=fp_model,
                                      **dict(flags, sample_batch_size=3))
    _, _, _, tokens_argmax = recording_run(monkeypatch, data_csv, tmp_path / "c", ar=fp_model, argmax_cond=True,
                                           **flags)
    assert torch.equal(tokens, tokens_b)
    assert not torch.equal(tokens, tokens_argmax)


def test_stochastic_condition_follows_the_uniforms():
    """The sampling quantiser with given uniforms: a deterministic function of them, not of the global RNG."""
    from larp.models.tokenizer import LARPTokenizer
    tok = LARPTokenizer.from_pretrained(os.path.join(GOLDEN, "tokenizer")).eval()
    video = torch.rand(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    u = torch.rand(2, tok.bottleneck_token_num, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    a = tok.encode_condition(video, 3, uniforms=u)
    torch.manual_seed(6)
    assert torch.equal(tok.encode_condition(video, 3, uniforms=u), a)
    assert not torch.equal(tok.encode_condition(video, 3, uniforms=1 - u), a)
    argmax = tok.set_vq_eval_deterministic(True).encode_condition(video, 3)
    assert not torch.equal(a, argmax)
