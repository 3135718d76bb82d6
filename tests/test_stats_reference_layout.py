"""Our .pkl stats files in the reference's layout (StyleGAN-V's FeatureStats, whose save pickles its __dict__ and
whose load puts the dict back as attributes): read here by a small loader written from that documented format, and
the reference's own layouts (only_stats_mode, capture_all) read by ours."""
import pickle

import numpy as np
import pytest

from eval.calc_fvd_from_multiple_feature_stats import fvd_from_folder
from larp.metrics.fvd import FeatureStats, frechet_distance


class LayoutStats:
    """The format as documented: a pickled dict whose entries become attributes. With capture_mean_cov, raw_mean
    is the float64 sum of the features and raw_cov the sum of their outer products over num_items items; in
    only_stats_mode, loaded_mean / loaded_cov are the moments themselves. Merging adds counts and sums, and is
    refused for only_stats_mode or for differing num_features / capture_all / capture_mean_cov."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def mean_cov(self):
        if self.only_stats_mode:
            return self.loaded_mean, self.loaded_cov
        assert self.capture_mean_cov and not self.capture_all
        mean = self.raw_mean / self.num_items
        return mean, self.raw_cov / self.num_items - np.outer(mean, mean)

    def __add__(self, other):
        assert not (self.only_stats_mode or other.only_stats_mode)
        for key in ("num_features", "capture_all", "capture_mean_cov"):
            assert getattr(self, key) == getattr(other, key), key
        out = object.__new__(LayoutStats)
        out.__dict__.update(self.__dict__, num_items=self.num_items + other.num_items,
                            raw_mean=self.raw_mean + other.raw_mean, raw_cov=self.raw_cov + other.raw_cov)
        return out


def features(n, seed, shift=0.0, d=12):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift).astype(np.float32)  # detector output


def test_our_pkl_carries_the_reference_keys(tmp_path):
    x = features(9, seed=0)
    path = FeatureStats(detector="random I3D (t)", meta={"frames": 8}).add(x).save(tmp_path / "s.pkl")
    s = LayoutStats(path)
    assert (s.capture_all, s.capture_mean_cov, s.max_items, s.only_stats_mode) == (False, True, None, False)
    assert s.loaded_mean is None and s.loaded_cov is None and s.all_features is None
    assert (s.num_items, s.num_features, s.detector, s.meta) == (9, 12, "random I3D (t)", {"frames": 8})
    x64 = x.astype(np.float64)
    assert s.raw_mean.dtype == s.raw_cov.dtype == np.float64
    np.testing.assert_allclose(s.raw_mean, x64.sum(0), rtol=1e-12)
    np.testing.assert_allclose(s.raw_cov, x64.T @ x64, rtol=1e-12)


def test_shards_merged_in_the_reference_layout_give_our_fvd(tmp_path):
    """Three sampling shards per side, as sample.py names them: the documented loader's merge and mean / cov give
    the FVD of calc_fvd_from_multiple_feature_stats.py."""
    real, fake = features(30, seed=1), features(25, seed=2, shift=0.3)
    for a, (r, f) in enumerate(zip(np.array_split(real, 3), np.array_split(fake, 3))):
        FeatureStats(detector="random I3D (t)").add(r).save(tmp_path / f"gt_fvd_stats_{a}_{a + 1}.pkl")
        FeatureStats(detector="random I3D (t)").add(f).save(tmp_path / f"generated_fvd_stats_{a}_{a + 1}.pkl")
    ours, *_ = fvd_from_folder(tmp_path, "gt_fvd_stats_*.pkl", "generated_fvd_stats_*.pkl")
    merged = {}
    for side in ("gt", "generated"):
        shards = [LayoutStats(tmp_path / f"{side}_fvd_stats_{a}_{a + 1}.pkl") for a in range(3)]
        merged[side] = shards[0] + shards[1] + shards[2]
    assert merged["gt"].num_items == 30 and merged["generated"].num_items == 25
    theirs = frechet_distance(merged["generated"].mean_cov(), merged["gt"].mean_cov())
    assert ours > 1 and theirs == pytest.approx(ours, rel=1e-9)


def test_moments_only_pkl_is_the_reference_only_stats_mode(tmp_path):
    x = features(20, seed=3)
    mu, sigma = FeatureStats().add(x).mean_cov()
    np.savez(tmp_path / "m.npz", mu=mu, sigma=sigma)  # ADM-style moments: no count
    path = FeatureStats.load(tmp_path / "m.npz").save(tmp_path / "m.pkl")
    s = LayoutStats(path)
    assert s.only_stats_mode and not s.capture_all and s.max_items is None
    for got, want in zip(s.mean_cov(), (mu, sigma)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(AssertionError):
        s + s


def test_reference_only_stats_mode_and_capture_all_files_load(tmp_path):
    x = features(40, seed=4)
    mu, sigma = FeatureStats().add(x).mean_cov()
    layouts = {"only_stats": {"only_stats_mode": True, "loaded_mean": mu, "loaded_cov": sigma},
               # capture_all keeps the per-batch arrays; its sums stay at the zeros it starts from
               "capture_all": {"only_stats_mode": False, "loaded_mean": None, "loaded_cov": None, "capture_all": True,
                               "capture_mean_cov": False, "max_items": None, "num_items": 40, "num_features": 12,
                               "all_features": [x[:16], x[16:]], "raw_mean": np.zeros(12),
                               "raw_cov": np.zeros((12, 12))}}
    for name, d in layouts.items():
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump(d, f)
        got = FeatureStats.load(tmp_path / f"{name}.pkl").mean_cov()
        np.testing.assert_allclose(got[0], mu, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[1], sigma, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without an item count"):
        FeatureStats.load(tmp_path / "only_stats.pkl") + FeatureStats().add(x)
    with open(tmp_path / "broken.pkl", "wb") as f:
        pickle.dump({"only_stats_mode": True, "loaded_mean": None, "loaded_cov": None}, f)
    with pytest.raises(ValueError, match=r"broken\.pkl.*only_stats_mode stats without loaded_mean"):
        FeatureStats.load(tmp_path / "broken.pkl")
