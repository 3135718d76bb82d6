"""Feature statistics know what they were computed on (clip length, size, resize, clip set, draw, detector): stats of
different clips never merge or compare silently, old and reference-layout files still load, and compute_fvd.py
takes the clip length from its inputs."""
import pickle
import re

import numpy as np
import pytest

import eval.compute_fvd as cf
from larp.core.errors import LarpError, StatsMismatchError
from larp.data.video_io import write_video
from larp.metrics.fvd import FeatureStats, check_comparable, frechet_distance

META = {"frames": 16, "size": 128, "resize": "short side resized (antialias), centre crop",
        "clips": "data/metadata/ucf101_train.csv", "draw": "10000 of 13320 clips, seed 42"}


def stats(meta=None, seed=0, n=20, detector="I3D test"):
    x = np.random.default_rng(seed).normal(size=(n, 6))
    return FeatureStats(detector=detector, meta=meta).add(x)


def test_meta_survives_pkl_and_npz(tmp_path):
    for ext in ("pkl", "npz"):
        back = FeatureStats.load(stats(META).save(tmp_path / f"s.{ext}"))
        assert back.meta == META and back.detector == "I3D test"
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:  # a plain str array: readable without pickle
        assert z["meta"].dtype.kind == "U"


@pytest.mark.parametrize("key,value", [("frames", 8), ("size", 64), ("resize", "bilinear"),
                                       ("clips", "data/metadata/k600_val.csv"), ("draw", "all 13320 clips")])
def test_merging_stats_of_other_clips_names_the_difference(key, value):
    other = stats({**META, key: value}, seed=1)
    with pytest.raises(StatsMismatchError, match=re.escape(f"{key} {META[key]!r} vs {value!r}")):
        stats(META) + other
    merged = stats(META) + stats(META, seed=1)  # the same clips: shards merge
    assert merged.num_items == 40 and merged.meta == META


@pytest.mark.parametrize("key,value", [("frames", 8), ("size", 64), ("resize", "bilinear")])
def test_comparing_stats_of_other_clips_is_an_error(key, value):
    real, fake = stats(META), stats({**META, key: value, "clips": "samples/"}, seed=1)
    with pytest.raises(StatsMismatchError, match=re.escape(f"{key} {META[key]!r} (real) vs {value!r} (fake)")):
        check_comparable(real, fake, ("real", "fake"))
    with pytest.raises(StatsMismatchError, match=key):
        frechet_distance(real, fake)
    with pytest.raises(StatsMismatchError, match="detector"):
        frechet_distance(real, stats(META, detector="another I3D"))
    # other clips (real vs generated) of the same length, size and resize compare
    assert check_comparable(real, stats({**META, "clips": "samples/"}), ("real", "fake")) is None


def test_old_and_reference_stats_load_as_unknown(tmp_path):
    x = np.random.default_rng(2).normal(size=(30, 6))
    old = {"num_items": 30, "num_features": 6, "raw_mean": x.sum(0), "raw_cov": x.T @ x, "detector": "I3D test"}
    reference = {"capture_all": False, "capture_mean_cov": True, "max_items": None, "num_items": 30,
                 "num_features": 6, "all_features": None, "raw_mean": x.sum(0), "raw_cov": x.T @ x}  # StyleGAN-V
    for name, d in (("old", old), ("reference", reference)):
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump(d, f)
        loaded = FeatureStats.load(tmp_path / f"{name}.pkl")
        assert loaded.meta == {} and loaded.num_items == 30
        note = check_comparable(loaded, stats(META), ("real", "fake"))
        assert note.startswith("note: the real stats do not record") and "frames" in note and "\n" not in note
        assert np.isfinite(frechet_distance(loaded, stats(META)))
    assert (FeatureStats.load(tmp_path / "old.pkl") + stats(META)).meta == {}  # known + unknown = unknown


def write_videos(folder, n, frames):
    folder.mkdir()
    rng = np.random.default_rng(frames)
    for i in range(n):
        write_video(str(folder / f"v{i}.mp4"), rng.integers(0, 256, size=(frames, 32, 32, 3), dtype=np.uint8))
    return sorted(folder.glob("*.mp4"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("fvd_inputs")
    real = write_videos(root / "real", 3, frames=16)
    (root / "real.csv").write_text("id,path,action,label\n" + "".join(f"r{i},{p},a,0\n" for i, p in enumerate(real)))
    write_videos(root / "fake", 4, frames=8)  # what an 8-frame quickstart sampler writes
    return root


COMMON = ["--i3d", "random:32", "--size", "32", "--batch_size", "4", "--device", "cpu"]


def test_saved_16_frame_real_stats_against_8_frame_samples_is_an_error(videos, tmp_path, capsys):
    """The walkthrough's case: real stats saved from 16-frame clips, then compared with 8-frame generated clips."""
    cf.main(cf.get_args(["--real", str(videos / "real.csv"), "--fake", str(videos / "real.csv"), "--num_frames", "16",
                         "--save_real", str(tmp_path / "real16.pkl"), *COMMON]))
    cf.main(cf.get_args(["--real", str(videos / "fake"), "--fake", str(videos / "fake"), "--num_frames", "8",
                         "--save_fake", str(tmp_path / "fake8.npz"), *COMMON]))
    with pytest.raises(LarpError, match=r"frames 16 \(real\) vs 8 \(fake\)"):
        cf.main(cf.get_args(["--real", str(tmp_path / "real16.pkl"), "--fake", str(tmp_path / "fake8.npz")]))
    # against a folder, the saved stats' clip length is used: 8-frame samples cannot give 16-frame clips
    with pytest.raises(LarpError, match=r"fewer than the 16-frame clips.*--num_frames"):
        cf.main(cf.get_args(["--real", str(tmp_path / "real16.pkl"), "--fake", str(videos / "fake"), *COMMON]))


def test_compute_fvd_takes_the_clip_length_from_a_folder(videos, capsys):
    value = cf.main(cf.get_args(["--real", str(videos / "real.csv"), "--fake", str(videos / "fake"), *COMMON]))
    out = capsys.readouterr().out
    assert "clip length: 8 frames (from the videos of --fake)" in out and np.isfinite(value)
    assert "real items: 6  fake items: 4" in out  # 16-frame videos give two 8-frame clips each
    with pytest.raises(LarpError, match=r"no 32-frame clips.*--num_frames"):
        cf.main(cf.get_args(["--real", str(videos / "real.csv"), "--fake", str(videos / "real.csv"),
                             "--num_frames", "32", *COMMON]))
