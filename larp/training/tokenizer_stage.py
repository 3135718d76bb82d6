"""Training stage 1: the LARP tokenizer (reconstruction + VQ + prior losses, optional GAN discriminator).

`TokenizerStage(cfg, device)` builds the model, the loss (with its discriminator) and their optimizers, with no
dataset; `TokenizerStage.from_config` adds the training set and the evaluation clips. The loop in
larp/training/loop.py drives it through `set_lr`, `step`, `window_metrics`, `evaluate`, `state_dict` and
`load_state_dict`.
"""
import os

import torch

from larp.core import dist
from larp.core.errors import CheckpointError, StageError
from larp.models.losses import TokenizerLoss
from larp.metrics.image import psnr
from larp.training.optim import build_optimizer, check_finite, make_scaler, optimizer_step, set_lr
from larp.training.stage_data import clip_dataset, eval_clips
from larp.models.tokenizer import LARPTokenizer
from larp.core.utils import autocast
from larp.core.visualize import save_preview_png


class TokenizerStage:
    model_name = "larp_tokenizer"
    KEEP_METRIC = ("val_psnr", "max")  # train.keep best_val keeps the highest validation PSNR

    def __init__(self, cfg, device):
        if "lr" in cfg.disc_optimizer.args:
            raise StageError("disc_optimizer.args.lr: the discriminator lr is the generator lr x loss.disc_lr_mult")
        self.device, self.amp, self.grad_clip = device, cfg.train.amp, cfg.train.grad_clip
        self.optimizer_cfg, self.evaluates = cfg.optimizer, bool(cfg.eval.num_videos)
        try:
            self.model = LARPTokenizer(**cfg.tokenizer_kwargs()).to(device)
            self.loss_fn = TokenizerLoss(**cfg.loss).to(device)
        except TypeError as e:
            raise StageError(f"model/loss section: {e}") from e
        self.wrapped = self.model  # what `step` runs; the loop replaces it by its DDP / compiled wrapper
        self.build_optimizer()
        self.scaler = make_scaler(self.amp, device)
        self.disc_optimizer = None
        if self.loss_fn.discriminator is not None:
            self.disc_optimizer = build_optimizer(self.loss_fn.discriminator, cfg.disc_optimizer)
        self.disc_scaler = make_scaler(self.amp, device)
        self.code_counts = torch.zeros(self.model.codebook_size, dtype=torch.long, device=device)
        self.train_set, self.val_videos = None, None

    @staticmethod
    def check_csv(cfg, df, csv):
        """Pre-flight of a CSV: the tokenizer needs nothing beyond the common checks (no labels)."""

    @staticmethod
    def preflight(cfg, trust=False):
        """Pre-flight of the stage's own inputs: none beyond the CSVs (it reads no checkpoint)."""
        return []

    @classmethod
    def from_config(cls, cfg, info, run_dir, note, trust=False):
        """The stage with its training set and (rank 0) its evaluation clips (it reads no checkpoint: `trust`,
        --trust_checkpoint, is for the AR stage's signature)."""
        stage = cls(cfg, info.device)
        if info.is_main and cfg.eval.num_videos:
            stage.val_videos = eval_clips(cfg.data, cfg.eval.num_videos)[0].to(info.device)
        stage.train_set = clip_dataset(cfg.data, cfg.data.csv, train=True)
        return stage

    def build_optimizer(self):
        self.optimizer = build_optimizer(self.model, self.optimizer_cfg)

    def set_lr(self, lr):
        set_lr(self.optimizer, lr)
        if self.disc_optimizer is not None:
            set_lr(self.disc_optimizer, lr * self.loss_fn.disc_lr_mult)

    def step(self, batch, step, total_steps):
        """One training step in the reference's order: the tokenizer's forward pass, then (once it is active) a
        discriminator update on the detached reconstruction, then the generator loss against the updated
        discriminator and the generator update. Returns the logged values."""
        x = batch["video"].to(self.device, non_blocking=True)  # (B, 3, T, H, W)
        with autocast(self.device, self.amp):
            out = self.wrapped(x, global_step=step, max_steps=total_steps)
        logs = self.discriminator_step(x, out["reconstruction"], step) if self.loss_fn.disc_active(step) else {}
        disc = self.loss_fn.discriminator
        frozen = [p for p in disc.parameters() if p.requires_grad] if disc is not None else []
        for p in frozen:  # the generator's backward leaves the discriminator's gradients alone
            p.requires_grad_(False)
        try:
            with autocast(self.device, self.amp):
                loss, g_logs = self.loss_fn.generator_loss(x, out, step)
            logs.update(g_logs)
            logs["loss"] = check_finite(loss, step)
            logs["grad_norm"] = optimizer_step(loss, self.optimizer, self.scaler, self.wrapped.parameters(),
                                               self.grad_clip)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        logs["ss_ratio"] = float(out.get("ss_ratio", 0.0))
        self.code_counts += torch.bincount(out["bottleneck_rep"].flatten(), minlength=self.code_counts.numel())
        return logs

    def discriminator_step(self, x, reconstruction, step):
        """One discriminator update (gradients averaged over ranks by hand: D is not wrapped in DDP)."""
        with autocast(self.device, self.amp):
            loss, logs = self.loss_fn.discriminator_loss(x, reconstruction.detach(), step)
        check_finite(loss, step, "discriminator loss")
        logs["d_grad_norm"] = optimizer_step(loss, self.disc_optimizer, self.disc_scaler,
                                             self.loss_fn.discriminator.parameters(), self.grad_clip, sync_grads=True)
        return logs

    def window_metrics(self):
        """Codebook usage over all tokens of all ranks since the last log line."""
        if dist.is_dist():
            torch.distributed.all_reduce(self.code_counts)
        usage = float((self.code_counts > 0).float().mean())
        self.code_counts.zero_()
        return {"codebook_usage_window": usage}

    def evaluate(self, model, step, preview_dir):
        if self.val_videos is None:
            return {}
        return eval_reconstruction(model, self.val_videos, os.path.join(preview_dir, f"step_{step:07d}.png"),
                                   self.amp)

    def state_dict(self):
        """What a checkpoint needs besides the model, its optimizer and EMA: the scalers, the discriminator and the
        LeCam EMAs (the frozen LPIPS net is rebuilt, not stored), the discriminator's optimizer."""
        return {"scaler": self.scaler.state_dict(),
                "loss": {k: v for k, v in self.loss_fn.state_dict().items() if not k.startswith("lpips.")},
                "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer else None,
                "disc_scaler": self.disc_scaler.state_dict()}

    def load_state_dict(self, ckpt, source):
        if ckpt.get("scaler"):  # empty when saved by a disabled (fp32/bf16) scaler
            self.scaler.load_state_dict(ckpt["scaler"])
        missing, unexpected = self.loss_fn.load_state_dict(ckpt["loss"], strict=False)
        bad = [k for k in missing if not k.startswith("lpips.")] + list(unexpected)
        if bad:
            raise CheckpointError(f"{source}: loss/discriminator state does not match: {bad[:8]}")
        if self.disc_optimizer is not None and ckpt.get("disc_optimizer"):
            self.disc_optimizer.load_state_dict(ckpt["disc_optimizer"])
        if ckpt.get("disc_scaler"):
            self.disc_scaler.load_state_dict(ckpt["disc_scaler"])


@torch.no_grad()
def eval_reconstruction(model, videos, png_path, amp="fp32"):
    """Reconstruction PSNR (dB, mean over clips) with deterministic VQ, and a preview PNG (real / recon rows)."""
    was_training = model.training
    model.eval()
    model.set_vq_eval_deterministic(True)
    with autocast(videos.device, amp):
        enc = model.encode(videos)
        rec = model.decode(enc["encoded"]).float().clamp(0, 1)  # (B, 3, T, H, W)
    value = float(psnr(rec, videos).mean())
    save_preview_png(png_path, rec, [""] * rec.shape[0], real=videos, kinds=("real", "recon"))
    usage = torch.unique(enc["bottleneck_rep"]).numel() / model.codebook_size
    model.train(was_training)
    return {"val_psnr": value, "val_codebook_usage": usage}
