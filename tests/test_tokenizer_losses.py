"""Tokenizer training losses, discriminator, metrics, and a short training run that must lower the L1 loss."""
import json
import os

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from larp.models.losses import TokenizerLoss, build_lpips
from larp.core.errors import PerceptualWeightsMissing
from larp.metrics.image import psnr, ssim
from larp.models.tokenizer import LARPTokenizer


def _ssim_reference(a, b):
    """Wang et al. SSIM with scipy's correlate2d on the valid region, per frame and channel (numpy float64)."""
    c = np.arange(11) - 5.0
    g = np.exp(-c ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for fa, fb in zip(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])):
        def f(v):
            return correlate2d(v, w, mode="valid")
        ma, mb = f(fa), f(fb)
        va, vb, cov = f(fa * fa) - ma ** 2, f(fb * fb) - mb ** 2, f(fa * fb) - ma * mb
        vals.append((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(vals))


def test_metrics_against_numpy():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 4, 24, 20, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    p = psnr(a, b)
    for i in range(2):
        mse = np.mean((a[i].numpy().astype(np.float64) - b[i].numpy().astype(np.float64)) ** 2)
        assert p[i].item() == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-9)
        assert ssim(a, b)[i].item() == pytest.approx(_ssim_reference(a[i].numpy().astype(np.float64),
                                                                     b[i].numpy().astype(np.float64)), abs=1e-9)
    assert torch.allclose(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert ssim(a, b).lt(0.99).all() and ssim(a, 1 - a).lt(ssim(a, b)).all()


def _rec_out(x, noise=0.2):
    rec = (x + noise * torch.randn_like(x)).requires_grad_(True)
    return rec, {"reconstruction": rec, "loss_vq": torch.tensor(0.5), "loss_prior": torch.tensor(2.0),
                 "prior_acc": torch.tensor(0.25), "codebook_usage": torch.tensor(0.5)}


def test_generator_loss_weights_and_disc_schedule():
    torch.manual_seed(0)
    lf = TokenizerLoss(perceptual_weight=0, gan_weight=0.5, disc_start_step=10, disc_update_freq=2, vq_weight=2.0,
                       prior_weight=0.1, disc_dim=32, disc_depth=1, disc_patch_size=8, disc_temporal_patch_size=4)
    x = torch.rand(2, 3, 8, 16, 16)
    rec, out = _rec_out(x)
    loss, logs = lf.generator_loss(x, out, global_step=3)  # before disc_start_step: no GAN term
    l1 = (rec - x).abs().mean().item()
    assert loss.item() == pytest.approx(l1 + 2.0 * 0.5 + 0.1 * 2.0, rel=1e-6)
    assert "gan_g" not in logs and logs["prior_acc"] == pytest.approx(0.25)
    assert [s for s in range(8, 16) if lf.disc_active(s)] == [10, 12, 14]

    loss, logs = lf.generator_loss(x, out, global_step=11)
    expected_g = torch.nn.functional.softplus(-lf.discriminator(rec)).mean().item()
    assert logs["gan_g"] == pytest.approx(expected_g, rel=1e-5)
    loss.backward()
    assert rec.grad is not None and rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in lf.discriminator.parameters())  # the generator step leaves D untouched
    assert all(p.requires_grad for p in lf.discriminator.parameters())


def test_discriminator_loss_smoothing_and_lecam():
    torch.manual_seed(0)
    lf = TokenizerLoss(perceptual_weight=0, gan_weight=1.0, label_smoothing=0.1, lecam_weight=0.5,
                       lecam_ema_decay=0.9, disc_dim=32, disc_depth=1)
    x = torch.rand(2, 3, 8, 16, 16)
    rec = torch.rand(2, 3, 8, 16, 16)
    with torch.no_grad():
        r, f = lf.discriminator(x), lf.discriminator(rec)
    loss, logs = lf.discriminator_loss(x, rec, global_step=0)
    bce = lambda z, t: (torch.clamp(z, min=0) - z * t + torch.log1p(torch.exp(-z.abs()))).mean()  # noqa: E731
    # the reference's LeCam term: on the batch means of the logits (EMAs start at 0)
    lecam = torch.relu(r.mean() - 0).pow(2) + torch.relu(0 - f.mean()).pow(2)
    per_sample = torch.relu(r).pow(2).mean() + torch.relu(-f).pow(2).mean()
    assert abs(lecam - per_sample) > 1e-3 * abs(lecam)  # the two readings differ on this batch
    assert loss.item() == pytest.approx((bce(r, 0.9) + bce(f, 0.0) + 0.5 * lecam).item(), rel=1e-5)
    assert lf.ema_logits_real.item() == pytest.approx(0.1 * r.mean().item(), rel=1e-5)
    assert lf.ema_logits_fake.item() == pytest.approx(0.1 * f.mean().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in lf.discriminator.parameters())


def test_missing_lpips_weights_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub reads it at call time
    want = os.path.join(str(tmp_path), "hub", "checkpoints", "vgg16-397923af.pth")
    with pytest.raises(PerceptualWeightsMissing) as e:
        TokenizerLoss(perceptual_weight=1.0, gan_weight=0)
    assert want in str(e.value) and "perceptual_weight: 0" in str(e.value)
    assert TokenizerLoss(perceptual_weight=0, gan_weight=0).lpips is None  # trains without it


def test_lpips_term_with_random_backbone():
    """Wiring of the perceptual term (values of a random backbone are meaningless, only the plumbing is checked)."""
    torch.manual_seed(0)
    lf = TokenizerLoss(perceptual_weight=1.0, gan_weight=0, lpips_model=build_lpips("squeeze", random_backbone=True))
    x = torch.rand(1, 3, 4, 32, 32)
    rec, out = _rec_out(x)
    loss, logs = lf.generator_loss(x, out, 0)
    assert logs["lpips"] > 0 and loss.item() > logs["l1"]
    _, same = lf.generator_loss(x, {**out, "reconstruction": x}, 0)
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="lpips_net"):
        build_lpips("nonet")


def test_short_training_lowers_reconstruction_loss(reference_dir):
    """120 steps on 4 single-colour clips: L1 falls far below the start and below the best video-agnostic
    output (the clip mean), so the tokens carry per-video information. ~3 s of CPU with one thread."""
    with open(reference_dir / "golden" / "tiny" / "tokenizer" / "config.json") as f:
        cfg = json.load(f)
    cfg["bottleneck"]["args"]["regularizer"]["args"]["entropy_loss_weight"] = 0.1  # keeps codes in use
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = LARPTokenizer(**cfg)
    data = torch.rand(4, 3, 1, 1, 1, generator=g).expand(4, 3, 8, 32, 32).contiguous()
    loss_fn = TokenizerLoss(perceptual_weight=0, gan_weight=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)

    def eval_l1():
        model.eval().set_vq_eval_deterministic(True)
        with torch.no_grad():
            rec = model.decode(model.encode(data)["encoded"])
        model.train()
        return (rec - data).abs().mean().item()

    before = eval_l1()
    for step in range(120):
        out = model(data, global_step=step, max_steps=120)
        loss, _ = loss_fn.generator_loss(data, out, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_l1()
    mean_baseline = (data - data.mean(0, keepdim=True)).abs().mean().item()
    assert after < 0.25 * before, (before, after)
    assert after < 0.5 * mean_baseline, (after, mean_baseline)
