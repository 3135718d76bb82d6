"""LARP tokenizer: golden case, released state-dict layout, checkpoint layouts, VQ modes, prior, dtypes."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_manifest
from larp.core.errors import CheckpointError
from larp.core.io import atomic_save
from larp.models.tokenizer import LARPTokenizer

TINY_PRIOR = {"name": "gptc-tiny", "n_rounds": 2, "use_mix_ss": True, "mix_ss_max_ratio": 0.5,
              "mix_ss_peak_steps_ratio": 0.3, "avg_loss_over_rounds": True, "args": {"l2_normalized": True}}


@pytest.fixture(scope="module")
def golden_dir(reference_dir):
    return reference_dir / "golden" / "tiny" / "tokenizer"


@pytest.fixture(scope="module")
def tiny_cfg(golden_dir):
    with open(golden_dir / "config.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    return LARPTokenizer.from_pretrained(golden_dir).set_vq_eval_deterministic(True)


def test_golden_tokens_and_videos(golden_model, golden_cases):
    x = golden_cases["tokenizer.input_video"]
    with torch.no_grad():
        enc = golden_model.encode(x)
        rec = golden_model.decode(enc["encoded"])
        dec = golden_model.decode_from_bottleneck(golden_cases["tokenizer.tokens"])
    assert torch.equal(enc["bottleneck_rep"], golden_cases["tokenizer.tokens"])
    assert (rec - golden_cases["tokenizer.reconstruction"]).abs().max() < 1e-4
    assert (dec - golden_cases["tokenizer.decoded_from_tokens"]).abs().max() < 1e-4


def test_fixed_tables_match_released_buffers(tiny_cfg, golden_dir):
    """A freshly built model computes the same sin-cos buffers the reference stored."""
    sd = load_file(str(golden_dir / "model.safetensors"))
    fresh = LARPTokenizer(**tiny_cfg).state_dict()
    for name in ("encoder_patch_pe", "decoder_latent_pe", "decoder_patch_query_embed"):
        assert (fresh[name] - sd[name]).abs().max() < 1e-6, name


def test_L_long_config_matches_manifest(reference_dir):
    with open(reference_dir / "tokenizer_larp_L_long.config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        model = LARPTokenizer(**cfg)
    ours = {n: ("param", tuple(p.shape)) for n, p in model.named_parameters()}
    ours.update({n: ("buffer", tuple(b.shape)) for n, b in model.named_buffers()})
    manifest = read_manifest(reference_dir / "tokenizer_larp_L_long.state_dict.tsv")
    assert sorted(set(manifest) - set(ours)) == [] and sorted(set(ours) - set(manifest)) == []
    assert {k: v for k, v in ours.items() if manifest[k] != v} == {}
    assert model.config == cfg and json.loads(json.dumps(model.config)) == cfg
    assert (model.bottleneck_token_num, model.codebook_size, model.frame_num, model.input_size) == (1024, 8192, 16, 128)


def _tiny_with_prior(tiny_cfg, seed=0):
    torch.manual_seed(seed)
    return LARPTokenizer(**{**copy.deepcopy(tiny_cfg), "prior_model": TINY_PRIOR})


def test_save_pretrained_round_trip_bit_exact(tiny_cfg, tmp_path):
    model = _tiny_with_prior(tiny_cfg)
    model.save_pretrained(tmp_path / "tok")
    loaded = LARPTokenizer.from_pretrained(tmp_path / "tok")
    assert not loaded.training and loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 8, 32, 32)
    model.eval().set_vq_eval_deterministic(True)
    loaded.set_vq_eval_deterministic(True)
    with torch.no_grad():
        assert torch.equal(model.encode(x)["bottleneck_rep"], loaded.encode(x)["bottleneck_rep"])


def test_other_layouts_load(golden_model, tiny_cfg, tmp_path):
    sd = golden_model.state_dict()
    nar = tmp_path / "nar"
    nar.mkdir()
    torch.save(sd, nar / "larp.pth")
    (nar / "larp.json").write_text(json.dumps(tiny_cfg))
    ckpt = tmp_path / "train.pth"
    atomic_save({"model": {"name": "larp_tokenizer", "args": tiny_cfg, "sd": sd}, "optimizer": {}, "step": 3}, ckpt)
    for spec in (nar, ckpt):
        m = LARPTokenizer.from_pretrained(spec)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


def test_hub_id_resolves_through_offline_cache(golden_dir, tmp_path):
    snap = tmp_path / "hub" / "models--someone--larp-tiny" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abc")
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((golden_dir / f).read_bytes())
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = "from larp.models.tokenizer import LARPTokenizer; print(LARPTokenizer.from_pretrained('someone/larp-tiny').codebook_size)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "64"


def test_wrong_config_names_keys(golden_model, tiny_cfg, tmp_path):
    golden_model.save_pretrained(tmp_path / "tok")
    bad = {**tiny_cfg, "decoder_hidden_size": 96}
    (tmp_path / "tok" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*decoder"):
        LARPTokenizer.from_pretrained(tmp_path / "tok")
    with pytest.raises(CheckpointError, match="no such file"):
        LARPTokenizer.from_pretrained(tmp_path / "missing_dir")


def test_vq_modes(golden_model):
    x = torch.rand(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        golden_model.set_vq_eval_deterministic(True)
        det = [golden_model.encode(x)["bottleneck_rep"] for _ in range(2)]
        golden_model.set_vq_eval_deterministic(False)
        torch.manual_seed(0)
        sampled = [golden_model.encode(x)["bottleneck_rep"] for _ in range(4)]
        golden_model.set_vq_eval_deterministic(True)
        # independent argmax: cosine similarity with the normalised codebook
        z = torch.nn.functional.normalize(golden_model.bottleneck.in_linear(_encoder_out(golden_model, x)), dim=-1)
        cb = torch.nn.functional.normalize(golden_model.bottleneck.regularizer.embedding.weight, dim=-1)
    assert torch.equal(det[0], det[1])
    assert torch.equal(det[0], (z @ cb.t()).argmax(-1))
    assert any(not torch.equal(s, det[0]) for s in sampled)


def _encoder_out(model, x):
    p = model.x_embedder(x) + model.encoder_patch_pe
    return model.encoder(p, model.encoder_latent_query_embed[None].expand(x.shape[0], -1, -1))


def test_training_forward_with_prior(tiny_cfg):
    model = _tiny_with_prior(tiny_cfg).train()
    x = torch.rand(2, 3, 8, 32, 32)
    out = model(x, global_step=5, max_steps=100)
    assert out["reconstruction"].shape == x.shape and out["bottleneck_rep"].shape == (2, 32)
    assert out["loss_prior"].item() > 0 and 0 <= out["prior_acc"].item() <= 1
    assert 0 < out["codebook_usage"].item() <= 1
    out["loss_prior"].backward()
    # the prior's cross-entropy shapes the encoder (LARP's point), not only the prior itself
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.bottleneck.regularizer.embedding.weight.grad.abs().sum() > 0
    prior = model.prior_model
    assert prior.ss_ratio(0, 100) == 0.0
    assert prior.ss_ratio(15, 100) == pytest.approx(0.25)
    assert prior.ss_ratio(30, 100) == pytest.approx(0.5) and prior.ss_ratio(90, 100) == pytest.approx(0.5)


def test_prior_loss_is_next_code_cross_entropy(tiny_cfg):
    """Round 1 of the prior equals an explicit teacher-forced next-index cross-entropy."""
    model = _tiny_with_prior(tiny_cfg).eval().set_vq_eval_deterministic(True)
    model.prior_model.cfg.n_rounds = 1
    x = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        out = model(x)
        enc = model.encode(x)
        cb = torch.nn.functional.normalize(model.bottleneck.regularizer.embedding.weight, dim=-1)
        pred = torch.nn.functional.normalize(model.prior_model(enc["regularized_z"][:, :-1]), dim=-1)
        ref = torch.nn.functional.cross_entropy((pred @ cb.t()).flatten(0, 1), enc["bottleneck_rep"][:, 1:].flatten())
    assert abs(out["loss_prior"].item() - ref.item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(golden_model, golden_cases, dtype):
    """Low precision is judged by the tokens: the golden tiny decoder barely depends on its tokens (a decode of
    other tokens is as close to the golden video as a bf16 decode of the right ones), so pixels cannot tell two
    decodes apart, while the codes the encoder picks are exact."""
    x = golden_cases["tokenizer.input_video"]
    m = copy.deepcopy(golden_model).set_vq_eval_deterministic(True)
    if dtype == torch.bfloat16:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            rec = m.decode_from_bottleneck(golden_cases["tokenizer.tokens"])
            enc = m.encode(x)
        assert enc["encoded"].dtype == torch.bfloat16
        assert enc["regularized_z"].dtype == torch.float32  # codes are matched in fp32 even under autocast
    else:  # fp16 weights (CPU autocast has no fp16 path)
        m = m.to(dtype)
        with torch.no_grad():
            rec = m.decode_from_bottleneck(golden_cases["tokenizer.tokens"])
            enc = m.encode(x.to(dtype))
    assert torch.equal(enc["bottleneck_rep"], golden_cases["tokenizer.tokens"])
    assert rec.shape == golden_cases["tokenizer.decoded_from_tokens"].shape and torch.isfinite(rec.float()).all()


def test_bad_input_shape(golden_model):
    with pytest.raises(ValueError, match="expected video"):
        golden_model.encode(torch.rand(1, 3, 4, 32, 32))


def _eval_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_larp_tokenizer", ROOT / "eval" / "eval_larp_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_eval_script_end_to_end(golden_dir, golden_model, tmp_path, capsys):
    from larp.data.dataset import VideoDataset
    from larp.data.synthetic import make_synthetic_dataset
    _, val_csv = make_synthetic_dataset(tmp_path / "syn", classes=4, videos_per_class=4, frames=16, size=32,
                                        progress=False)
    ev = _eval_module()
    out = tmp_path / "eval"
    metrics = ev.main(ev.get_args(["--tokenizer", str(golden_dir), "--dataset_csv", str(val_csv), "--det",
                                   "--i3d", "random:32", "--batch_size", "4", "--max_clips", "4", "--clips", "all",
                                   "--device", "cpu", "--out", str(out)]))
    text = capsys.readouterr().out
    for key in ("mse=", "psnr=", "ssim=", "fvd="):
        assert any(line.startswith(key) for line in text.splitlines()), key
    assert "not comparable to published FVD" in text
    assert (out / "preview.png").stat().st_size > 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["num_clips"] == 4 and report["protocol"]["num_samples"] == 4
    assert report["protocol"]["clips"].endswith("4 of the 8 drawn with random.Random(42).sample")
    # independent check of the MSE on the same 4 clips (seed-42 selection of the FVD protocol clips)
    import random
    ds = VideoDataset(str(val_csv), frame_num=8, input_size=32, train=False)
    idx = random.Random(42).sample(range(len(ds)), 4)
    x = torch.stack([ds[i]["video"] for i in idx])
    with torch.no_grad():
        rec = golden_model.decode(golden_model.encode(x)["encoded"]).clamp(0, 1)
    assert metrics["mse"] == pytest.approx((rec - x).pow(2).mean().item(), rel=1e-5)
    assert metrics["fvd"] > 0


@pytest.mark.slow
def test_eval_script_reference_protocol(golden_dir, golden_model, tmp_path):
    """By default one window per video (the reference's rFVD clip set), drawn from per-video seeds: a rerun gives
    the same numbers, and the MSE is that of the windows recomputed here; --use_amp means fp16."""
    from larp.data.dataset import read_video_csv, transform_frames
    from larp.data.synthetic import make_synthetic_dataset
    from larp.data.video_io import read_clip
    _, val_csv = make_synthetic_dataset(tmp_path / "syn", classes=4, videos_per_class=4, frames=20, size=32,
                                        progress=False)  # 20-frame videos: 13 possible 8-frame windows each
    ev = _eval_module()
    argv = ["--tokenizer", str(golden_dir), "--dataset_csv", str(val_csv), "--det", "--no_fvd", "--seed", "3",
            "--batch_size", "4", "--device", "cpu", "--use_amp"]
    first = ev.main(ev.get_args(argv + ["--out", str(tmp_path / "a")]))
    again = ev.main(ev.get_args(argv + ["--out", str(tmp_path / "b")]))
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    paths = read_video_csv(str(val_csv))["path"]
    assert first["num_clips"] == len(paths) and first["mse"] == again["mse"]
    assert report["clips"] == "window" and report["amp_dtype"] == "fp16"
    clips = [read_clip(p, 8, generator=torch.Generator().manual_seed(3 * 1_000_003 + i)) for i, p in enumerate(paths)]
    assert len({start for _, start in clips}) > 1
    x = torch.stack([transform_frames(frames, 32) for frames, _ in clips])
    with torch.no_grad():
        rec = golden_model.decode(golden_model.encode(x)["encoded"]).clamp(0, 1)  # fp16 autocast is off on the CPU
    assert first["mse"] == pytest.approx((rec - x).pow(2).mean().item(), rel=1e-5)


def test_eval_script_bad_tokenizer_is_one_line(tmp_path):
    ev = _eval_module()
    with pytest.raises(CheckpointError, match=r"--tokenizer: .*nope.*no such file"):
        ev.main(ev.get_args(["--tokenizer", str(tmp_path / "nope"), "--dataset_csv", "x.csv", "--no_fvd"]))


@pytest.mark.parametrize("deterministic", [True, False])
def test_tokens_without_losses_are_the_same(golden_dir, golden_cases, deterministic):
    """encode(losses=False), what a frozen tokenizer uses, gives the same tokens and code vectors (and, sampling,
    takes the same random draws) without the VQ and entropy losses."""
    model = LARPTokenizer.from_pretrained(golden_dir).set_vq_eval_deterministic(deterministic)
    x = golden_cases["tokenizer.input_video"]
    with torch.no_grad():
        torch.manual_seed(5)
        full = model.encode(x)
        torch.manual_seed(5)
        fast = model.encode(x, losses=False)
    assert torch.equal(full["bottleneck_rep"], fast["bottleneck_rep"])
    assert torch.equal(full["encoded"], fast["encoded"]) and "loss" not in fast
    if deterministic:
        assert torch.equal(fast["bottleneck_rep"], golden_cases["tokenizer.tokens"])
