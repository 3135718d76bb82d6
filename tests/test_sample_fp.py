"""Frame-prediction sampling: the condition tokens, every decoded frame scored, the sampled condition (the
reference protocol); the shared fixtures are in tests/test_sample_sharding.py."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from larp.sampling import run as sampling
from larp.data.video_io import read_frames
from tests.conftest import patch_everywhere

from tests.test_sample_sharding import GOLDEN, data_csv, report, run  # noqa: F401 (data_csv: a fixture)


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

    def device_features(self, videos):  # what the sampler calls (features left on the device)
        self.seen.append(videos.detach().cpu().clone())
        return self.detector.device_features(videos)


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
    assert card["precision"] == ("generator weights bf16, tokenizer fp32, float32 matmuls of generation and "
                                 "decoding in TF32 on CUDA (matmul precision high); detector fp32")

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
    assert tokens.shape[0] == 4 and tokens_b.shape[0] == 6  # batches of 3 hold rows 0-2, then 3 and two padding rows
    assert torch.equal(tokens, tokens_b[:4])
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
