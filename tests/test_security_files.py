"""Safe loading of stats files, .npz/.npy arrays, TorchScript detectors and hub revisions (docs/security.md); the
checkpoint load paths are in tests/test_security.py."""

import json
import pickle
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import sample
from eval import compute_fvd
from larp.core import safe_load
from larp.core.errors import LarpError, run_cli
from larp.metrics.fvd import FeatureStats
from larp.metrics.detectors import check_i3d_spec, load_i3d
from larp.core.errors import UnsafeFileError
from larp.core.safe_load import load_npy
from tests.conftest import GOLDEN, ROOT
from tests.test_security import Payload, _tiny_clips, assert_refused


# ---------------------------------------------------------------------------------------------- stats files
def reference_stats_dict(x):
    """The reference's FeatureStats.save: pickle.dump(self.__dict__) with raw_mean / raw_cov float64 sums."""
    x64 = x.astype(np.float64)
    return {"only_stats_mode": False, "loaded_mean": None, "loaded_cov": None, "capture_all": False,
            "capture_mean_cov": True, "max_items": None, "num_items": x.shape[0], "num_features": x.shape[1],
            "all_features": None, "raw_mean": x64.sum(0), "raw_cov": x64.T @ x64}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reference_and_our_stats_pickles_load(protocol, tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    with open(tmp_path / "ref.pkl", "wb") as f:
        pickle.dump(reference_stats_dict(x), f, protocol=protocol)
    mu, sigma = FeatureStats().add(x).mean_cov()
    got = FeatureStats.load(tmp_path / "ref.pkl").mean_cov()
    np.testing.assert_allclose(got[0], mu, rtol=1e-12)
    np.testing.assert_allclose(got[1], sigma, rtol=1e-9, atol=1e-12)
    ours = FeatureStats(detector="d").add(x).save(tmp_path / "ours.pkl")
    assert FeatureStats.load(ours).num_items == 50


def test_stats_pickle_with_code_is_refused(tmp_path, marker, capsys):
    x = np.ones((4, 8), np.float32)
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({**reference_stats_dict(x), "hook": Payload(marker)}, f)
    with pytest.raises(UnsafeFileError) as e:
        FeatureStats.load(evil)
    assert_refused(e, evil, "builtins.exec")
    # the same file handed to compute_fvd.py --real evil.pkl
    FeatureStats().add(x).save(tmp_path / "fake.pkl")
    with pytest.raises(SystemExit):
        run_cli(compute_fvd.main, compute_fvd.get_args(["--real", str(evil), "--fake", str(tmp_path / "fake.pkl")]),
                prog="compute_fvd.py")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compute_fvd.py: error: ") and str(evil) in err
    with open(tmp_path / "objects.pkl", "wb") as f:  # an object array of harmless items: refused all the same
        pickle.dump({"raw_mean": np.array([1, "a"], dtype=object)}, f)
    with pytest.raises(UnsafeFileError, match="object array"):
        FeatureStats.load(tmp_path / "objects.pkl")
    assert not marker.exists()


def test_npz_and_npy_with_object_arrays_are_refused(tmp_path, marker):
    evil = tmp_path / "evil.npz"
    np.savez(evil, mu=np.zeros(4), sigma=np.eye(4), detector=np.array([Payload(marker)], dtype=object))
    with pytest.raises(UnsafeFileError) as e:
        FeatureStats.load(evil)
    assert_refused(e, evil, "object array")
    np.save(tmp_path / "nll_0_4.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeFileError) as e:
        load_npy(tmp_path / "nll_0_4.npy")
    assert_refused(e, tmp_path / "nll_0_4.npy", "object array")
    assert not marker.exists()
    np.savez(tmp_path / "ok.npz", mu=np.zeros(4), sigma=np.eye(4), n=np.int64(9), detector=np.array("d"))
    assert FeatureStats.load(tmp_path / "ok.npz").num_items == 9


# ---------------------------------------------------------------------------------------------- TorchScript
@pytest.fixture
def torchscript(tmp_path, marker, monkeypatch):
    """A real TorchScript archive of unknown digest; torch.jit.load is wrapped to leave the marker when reached."""
    path = tmp_path / "i3d_torchscript.pt"
    with warnings.catch_warnings():  # recent torch flags torch.jit as deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    real = torch.jit.load

    def spy(*args, **kw):
        marker.touch()
        return real(*args, **kw)
    monkeypatch.setattr(torch.jit, "load", spy)
    monkeypatch.delenv("LARP_I3D_SHA256", raising=False)
    return path


def test_torchscript_of_unknown_digest_is_refused(torchscript, marker):
    digest = safe_load.hashlib.sha256(torchscript.read_bytes()).hexdigest()
    for call in (lambda: check_i3d_spec(str(torchscript)), lambda: load_i3d(str(torchscript), verbose=False)):
        with pytest.raises(UnsafeFileError) as e:
            call()
        assert_refused(e, torchscript, digest, "LARP_I3D_SHA256", "--trust_checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["trust", "env", "known_sha256", "known_git_blob"])
def test_torchscript_loads_when_known_or_trusted(how, torchscript, marker, monkeypatch):
    data = torchscript.read_bytes()
    digest = safe_load.hashlib.sha256(data).hexdigest()
    if how == "env":
        monkeypatch.setenv("LARP_I3D_SHA256", digest.upper())
    elif how == "known_sha256":
        monkeypatch.setitem(safe_load.KNOWN_TORCHSCRIPT, digest, "test file")
    elif how == "known_git_blob":
        monkeypatch.setitem(safe_load.KNOWN_TORCHSCRIPT_GIT_BLOBS, safe_load.git_blob_sha1(data), "test file")
    det = load_i3d(str(torchscript), verbose=False, trust=how == "trust")
    assert det.sha256 == digest and marker.exists()
    marker.unlink()


def test_git_blob_sha1_is_gits_object_id():
    assert safe_load.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


# ---------------------------------------------------------------------------------------------- hub revisions
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline huggingface_hub cache: someone/nar at two commits (main = A), someone/tok at C."""
    import huggingface_hub.constants as constants
    commits = {"A": "a" * 40, "B": "b" * 40, "C": "c" * 40}
    for repo, src, revs in (("nar", "nar", ("A", "B")), ("tok", "tokenizer", ("C",))):
        base = tmp_path / "hub" / f"models--someone--{repo}"
        for rev in revs:
            shutil.copytree(GOLDEN / src, base / "snapshots" / commits[rev])
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(commits[revs[0]])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return commits


def test_sample_records_the_hub_revision_loaded(hub, tmp_path, monkeypatch):
    seen = []
    import huggingface_hub
    real = huggingface_hub.snapshot_download

    def download(*args, **kw):
        seen.append((kw["repo_id"], kw.get("revision")))
        return real(*args, **kw)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    csv = _tiny_clips(tmp_path / "syn")[0]
    common = ["--tokenizer", "someone/tok", "--dataset_csv", csv, "--i3d", "random:32", "--num_workers", "0",
              "--num_samples", "4", "--sample_batch_size", "2", "--device", "cpu", "--stats_only"]
    rows = {}
    for out, extra in (("main", []), ("pinned", ["--ar_model_revision", hub["B"]])):
        sample.main(sample.parse_args(["--ar_model", "someone/nar", "--output_dir", str(tmp_path / out)] + common
                                      + extra))
        rows[out] = pd.read_csv(tmp_path / out / "fvd_report.csv").iloc[-1]
    assert rows["main"]["ar_model"] == f"someone/nar@{hub['A']}"
    assert rows["main"]["tokenizer"] == f"someone/tok@{hub['C']}"
    assert rows["pinned"]["ar_model"] == f"someone/nar@{hub['B']}"
    assert json.loads((tmp_path / "pinned" / "run_config.json").read_text())["ar_model"] == f"someone/nar@{hub['B']}"
    assert ("someone/nar", hub["B"]) in seen and ("someone/nar", None) in seen
    with pytest.raises(LarpError, match="--ar_model_revision .* local path"):
        sample.make_job(sample.parse_args(["--ar_model", str(GOLDEN / "nar"), "--ar_model_revision", hub["B"],
                                           "--output_dir", str(tmp_path / "x")] + common))


def test_eval_tokenizer_records_the_hub_revision_loaded(hub, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_larp_tokenizer", ROOT / "eval" / "eval_larp_tokenizer.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    ev.main(ev.get_args(["--tokenizer", "someone/tok", "--revision", hub["C"], "--dataset_csv",
                         _tiny_clips(tmp_path / "syn")[0], "--no_fvd", "--max_clips", "1", "--device", "cpu",
                         "--out", str(tmp_path / "eval"), "--num_preview", "0"]))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["tokenizer"] == f"someone/tok@{hub['C']}"
