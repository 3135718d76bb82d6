"""sample.py refuses bad flags with one clear line, before any model (or the I3D) is loaded."""
import json
import os

import pytest

import sample
from larp.sampling import run as sampling
from tests.conftest import patch_everywhere

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "reference", "golden", "tiny")


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory):
    from larp.data.synthetic import make_synthetic_dataset
    train_csv, _ = make_synthetic_dataset(str(tmp_path_factory.mktemp("syn")), classes=4, videos_per_class=4,
                                          frames=8, size=32, progress=False)
    return train_csv  # 12 clips of 8 frames


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any model or detector load fails the test: the errors must come first."""
    import larp.metrics.detectors

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the flag error")
    assert patch_everywhere(monkeypatch, sampling, "load_models", forbidden)
    assert patch_everywhere(monkeypatch, larp.metrics.detectors, "load_i3d", forbidden)


def args(csv, out, **kw):
    flags = {"ar_model": os.path.join(GOLDEN, "nar"), "tokenizer": os.path.join(GOLDEN, "tokenizer"),
             "output_dir": str(out), "dataset_csv": csv, "i3d": "random:32", "num_workers": 0, "num_samples": 4,
             "device": "cpu"}
    flags.update(kw)
    argv = []
    for k, v in flags.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return sample.parse_args(argv)


def job(csv, out, **kw):
    return sample.make_job(args(csv, out, **kw))


def fails(a, pattern):
    with pytest.raises(sampling.SampleError) as e:
        sample.main(a)
    text = str(e.value)
    assert "\n" not in text, text
    assert pattern in text, text
    return text


CASES = {
    "start_beyond_total": ({"num_samples": 2, "num_samples_total": 4, "starting_index": 4}, "outside [0, 4)"),
    "range_past_total": ({"num_samples": 3, "num_samples_total": 4, "starting_index": 2},
                         "exceeds --num_samples_total 4"),
    "total_beyond_clips": ({"num_samples": 13}, "exceeds the 12 clips"),
    "cfg_with_frame_prediction": ({"frame_prediction": True, "cfg_scale": 1.5},
                                  "--cfg_scale 1.5 with --frame_prediction"),
    "missing_csv": ({"dataset_csv": "/nonexistent/list.csv"}, "--dataset_csv /nonexistent/list.csv"),
    "missing_csv_name": ({"dataset_csv": "no_such_metadata_name"}, "no_such_metadata_name"),
    "missing_ar_model": ({"ar_model": "/nonexistent/nar"}, "--ar_model /nonexistent/nar: no such file"),
    "missing_tokenizer": ({"tokenizer": "./nowhere/tok"}, "--tokenizer ./nowhere/tok: no such file"),
    "missing_i3d": ({"i3d": "/nonexistent/i3d_torchscript.pt"}, "I3D detector file not found"),
    "bad_i3d_size": ({"i3d": "random:x"}, "bad I3D spec"),
    "frame_prediction_with_class_model": ({"frame_prediction": True}, "remove --frame_prediction"),
    "num_frames_mismatch": ({"num_frames": 16}, "--num_frames 16 does not match the tokenizer (8)"),
    "cond_frames_out_of_range": ({"frame_prediction": True, "num_cond_frames": 8, "ar_model": "FP"},
                                 "--num_cond_frames 8 must be in [1, 8)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_flags(name, data_csv, tmp_path):
    kw, pattern = CASES[name]
    if kw.get("ar_model") == "FP":
        from larp.models.generator import ModelArgs, build_generator
        build_generator(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=64, cls_token_num=33, max_seq_len=32,
                                  latent_shape=(2, 4, 4), frame_prediction=True)).save_pretrained(tmp_path / "fp")
        kw = dict(kw, ar_model=str(tmp_path / "fp"))
    fails(args(data_csv, tmp_path / "out", **kw), pattern)
    assert not os.path.exists(tmp_path / "out" / "run_config.json")  # nothing claimed by a refused call


def test_overlapping_shard_refused(data_csv, tmp_path):
    out = tmp_path / "out"
    sampling.claim(job(data_csv, out, num_samples=6, num_samples_total=10))  # claims [0, 6)
    shards = (out / "shards.json").read_text()
    fails(args(data_csv, out, num_samples=4, num_samples_total=10, starting_index=4), "overlaps shard [0, 6)")
    fails(args(data_csv, out, num_samples=2, num_samples_total=10, starting_index=2, replace=True),
          "overlaps shard [0, 6)")
    assert (out / "shards.json").read_text() == shards
    sampling.claim(job(data_csv, out, num_samples=4, num_samples_total=10, starting_index=6))  # disjoint: fine
    sampling.claim(job(data_csv, out, num_samples=6, num_samples_total=10))  # the same range again: fine
    assert json.loads((out / "shards.json").read_text()) == [[0, 6], [6, 10]]


def test_settings_mismatch_refused_even_with_replace(data_csv, tmp_path):
    out = tmp_path / "out"
    sampling.claim(job(data_csv, out, num_samples=2, num_samples_total=10, dtype="bfloat16"))
    assert json.loads((out / "run_config.json").read_text())["dtype"] == "bf16"
    sampling.claim(job(data_csv, out, num_samples=2, num_samples_total=10, dtype="bf16",
                          sample_batch_size=7))  # same settings spelled differently, other batch size: accepted
    config = (out / "run_config.json").read_text()
    fails(args(data_csv, out, num_samples=2, num_samples_total=10, dtype="bf16", cfg_scale=2.0, replace=True),
          "cfg_scale: 1.0 there vs 2.0 now")
    fails(args(data_csv, out, num_samples=2, num_samples_total=8, dtype="bf16", starting_index=2),
          "num_samples_total: 10 there vs 8 now")
    fails(args(data_csv, out, num_samples=2, num_samples_total=10, dtype="fp32", starting_index=2),
          "different settings")
    assert (out / "run_config.json").read_text() == config


def test_hub_id_offline_is_one_line(data_csv, tmp_path, monkeypatch):
    """Hub ids (owner/name) go through the hub resolver; one that cannot be fetched is one clear error.
    The id does not exist, so a machine with network access downloads nothing either."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fails(args(data_csv, tmp_path / "out", ar_model="larp-test-nobody/no-such-model"),
          "--ar_model: larp-test-nobody/no-such-model: not a local path")
