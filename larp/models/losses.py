"""Tokenizer training losses: L1 + LPIPS + adversarial (non-saturating, label smoothing, LeCam) + VQ + prior.

`TokenizerLoss(**cfg.loss)` owns the discriminator and the LPIPS network; `TokenizerStage.step` calls
`generator_loss` every step and `discriminator_loss` when `disc_active(step)`. Knobs (the YAML `loss:` section):

  l1_weight          weight of the mean absolute reconstruction error
  l2_weight          weight of the mean squared reconstruction error (0 = off, as the reference)
  perceptual_weight  weight of LPIPS (VGG); 0 = no LPIPS (needs no pretrained weights)
  lpips_net          LPIPS backbone, "vgg" (default), "alex" or "squeeze"
  gan_weight         weight of the generator's adversarial term (active from disc_start_step)
  disc_start_step    first step with adversarial terms (generator and discriminator)
  disc_update_freq   update the discriminator every k steps once started
  disc_lr_mult       discriminator lr = generator lr * disc_lr_mult (read by the trainer)
  label_smoothing    one-sided: real targets 1 - label_smoothing
  lecam_weight       LeCam regulariser weight (0 = off); lecam_ema_decay for its logit EMAs
  vq_weight          weight of the quantiser's commitment + codebook loss
  prior_weight       weight of the prior's next-code cross-entropy
  disc_dim, disc_depth, disc_num_heads, disc_patch_size, disc_temporal_patch_size   discriminator size
"""
import contextlib
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import models

from larp.models.discriminator import VideoDiscriminator
from larp.core.errors import PerceptualWeightsMissing


def lpips_backbone_path(net="vgg"):
    """Where torchvision looks for the LPIPS backbone weights ($TORCH_HOME/hub/checkpoints/<file>)."""
    weights = {"vgg": models.VGG16_Weights.IMAGENET1K_V1, "alex": models.AlexNet_Weights.IMAGENET1K_V1,
               "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1}
    if net not in weights:
        raise ValueError(f"lpips_net must be one of {sorted(weights)}, got '{net}'")
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights[net].url))


def lpips_available(net="vgg"):
    return os.path.isfile(lpips_backbone_path(net))


def build_lpips(net="vgg", random_backbone=False):
    """The frozen LPIPS module. Checks the backbone file first so a missing one never starts a download.

    random_backbone=True builds a randomly initialised backbone (meaningless values, for wiring tests)."""
    import lpips  # lazy: optional weights package, slow to import, only when the perceptual loss is on
    if not random_backbone and not lpips_available(net):
        path = lpips_backbone_path(net)
        raise PerceptualWeightsMissing(
            f"LPIPS needs the torchvision {net} weights at {path} (copy the file there or set TORCH_HOME to a "
            f"folder whose hub/checkpoints/ holds it), or set loss.perceptual_weight: 0")
    with warnings.catch_warnings():  # lpips calls torchvision with its deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lpips_video(model, a, b):
    """Mean LPIPS over frames; a, b (B, 3, T, H, W) in [0, 1] -> (B,)."""
    B, C, T, H, W = a.shape

    def frames(v):
        return v.transpose(1, 2).reshape(B * T, C, H, W) * 2 - 1

    d = model(frames(a), frames(b.to(a.dtype)))  # (B*T, 1, 1, 1)
    return d.reshape(B, T).mean(1)


def _f(v):
    return float(v.detach()) if torch.is_tensor(v) else float(v)


@contextlib.contextmanager
def frozen(module):
    """No parameter gradients for `module` inside the block (the generator step must not touch D)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


class TokenizerLoss(nn.Module):
    def __init__(self, l1_weight=1.0, perceptual_weight=1.0, lpips_net="vgg", gan_weight=0.1, disc_start_step=0,
                 disc_update_freq=1, disc_lr_mult=1.0, label_smoothing=0.0, lecam_weight=0.001,
                 lecam_ema_decay=0.999, vq_weight=1.0, prior_weight=0.03, disc_dim=256, disc_depth=4,
                 disc_num_heads=None, disc_patch_size=8, disc_temporal_patch_size=4, lpips_model=None, l2_weight=0.0):
        super().__init__()
        if disc_update_freq < 1:
            raise ValueError(f"disc_update_freq must be >= 1, got {disc_update_freq}")
        self.l1_weight, self.l2_weight = l1_weight, l2_weight
        self.perceptual_weight, self.gan_weight = perceptual_weight, gan_weight
        self.disc_start_step, self.disc_update_freq, self.disc_lr_mult = disc_start_step, disc_update_freq, disc_lr_mult
        self.label_smoothing, self.lecam_weight, self.lecam_ema_decay = label_smoothing, lecam_weight, lecam_ema_decay
        self.vq_weight, self.prior_weight = vq_weight, prior_weight
        self.lpips = None
        if perceptual_weight > 0:
            self.lpips = lpips_model if lpips_model is not None else build_lpips(lpips_net)
        self.discriminator = None
        if gan_weight > 0:
            self.discriminator = VideoDiscriminator(dim=disc_dim, depth=disc_depth, num_heads=disc_num_heads,
                                                    patch_size=disc_patch_size,
                                                    temporal_patch_size=disc_temporal_patch_size)
        self.register_buffer("ema_logits_real", torch.zeros(()))
        self.register_buffer("ema_logits_fake", torch.zeros(()))

    def gan_started(self, global_step):
        return self.discriminator is not None and global_step >= self.disc_start_step

    def disc_active(self, global_step):
        """Whether the trainer should run a discriminator update at this step."""
        return self.gan_started(global_step) and (global_step - self.disc_start_step) % self.disc_update_freq == 0

    def generator_loss(self, x, out, global_step):
        """x (B, 3, T, H, W) in [0, 1], out = tokenizer forward dict -> (loss, logs of floats)."""
        rec = out["reconstruction"]
        err = rec.float() - x.float()
        l1, l2 = err.abs().mean(), err.pow(2).mean()
        loss = self.l1_weight * l1 + self.vq_weight * out["loss_vq"] + self.prior_weight * out["loss_prior"]
        if self.l2_weight:
            loss = loss + self.l2_weight * l2
        logs = {"l1": _f(l1), "l2": _f(l2), "vq": _f(out["loss_vq"]), "prior": _f(out["loss_prior"]),
                "prior_acc": _f(out.get("prior_acc", 0.0)), "codebook_usage": _f(out.get("codebook_usage", 0.0))}
        if self.lpips is not None:
            p = lpips_video(self.lpips, rec, x).mean().float()
            loss = loss + self.perceptual_weight * p
            logs["lpips"] = p.item()
        if self.gan_started(global_step):
            with frozen(self.discriminator):
                g = F.softplus(-self.discriminator(rec)).mean()  # non-saturating: -log sigmoid(D(rec))
            loss = loss + self.gan_weight * g
            logs["gan_g"] = g.item()
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x, reconstruction, global_step):
        """Smoothed non-saturating D loss + LeCam; updates the LeCam logit EMAs. -> (loss, logs)."""
        real = self.discriminator(x)  # (B,)
        fake = self.discriminator(reconstruction.detach())
        target_real = torch.full_like(real, 1.0 - self.label_smoothing)
        loss = F.binary_cross_entropy_with_logits(real, target_real) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        logs = {"d_loss": loss.item(), "logits_real": real.mean().item(), "logits_fake": fake.mean().item()}
        if self.lecam_weight > 0:
            # on the batch means of the logits, as the reference's LeCam term
            lecam = F.relu(real.mean() - self.ema_logits_fake).pow(2) + F.relu(self.ema_logits_real - fake.mean()).pow(2)
            loss = loss + self.lecam_weight * lecam
            logs["lecam"] = lecam.item()
            with torch.no_grad():
                d = self.lecam_ema_decay
                self.ema_logits_real.mul_(d).add_((1 - d) * real.mean())
                self.ema_logits_fake.mul_(d).add_((1 - d) * fake.mean())
        logs["d_total"] = loss.item()
        return loss, logs
