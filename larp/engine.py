"""Per-step training work: LR schedules, EMA, optimizer steps, the tokenizer generator/discriminator steps,
the AR step, and the periodic evaluations. The loop that calls these lives in larp/training.py.
"""
import math

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from larp.dist import all_reduce_grads, all_reduce_mean
from larp.errors import LarpError
from larp.utils import autocast


class NonFiniteLossError(LarpError, FloatingPointError):
    """Raised on every rank together (the loss is averaged over ranks first); names the step."""

    def __init__(self, step, name, value):
        super().__init__(f"non-finite {name} ({value}) at step {step}: stopping (lower the lr, enable grad "
                         f"clipping or use bf16 instead of fp16)")
        self.step = step  # 1-based, as the step column of metrics.csv


# ---------------------------------------------------------------------------------------------- schedules
def lr_at(step, base_lr, total_steps, sched):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine / step / constant."""
    warm = int(sched.get("warmup_steps", 0) or 0)
    if warm > 0 and step < warm:
        return base_lr * (step + 1) / warm
    name = sched.get("name", "cosine")
    if name == "constant":
        return base_lr
    if name == "step":
        return base_lr * sched.get("gamma", 0.1) ** sum(step >= m for m in sched.get("milestones", []))
    floor = base_lr * sched.get("min_lr_ratio", 0.0)
    progress = min(max(step - warm, 0) / max(total_steps - warm, 1), 1.0)
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Set every group's lr to lr * group['lr_mult'] (groups without it: 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def build_optimizer(params, opt_cfg):
    from larp.config import optimizer_keys
    cls, _ = optimizer_keys(opt_cfg["name"])
    kwargs = dict(opt_cfg["args"])
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls([p for p in params if p.requires_grad], **kwargs)


# ---------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (kept in fp32)."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.is_floating_point():
                s.mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, sd):
        for k in self.shadow:
            self.shadow[k].copy_(sd[k])

    def weights_like(self, model):
        """The EMA weights cast to the model's dtypes, as a state dict for load_state_dict."""
        own = model.state_dict()
        return {k: self.shadow[k].to(own[k].dtype) for k in own}


# ---------------------------------------------------------------------------------------------- optimization
def make_scaler(amp, device):
    """A GradScaler for fp16 on CUDA; disabled otherwise (bf16/fp32 need none, CPU fp16 falls back to fp32)."""
    enabled = amp == "fp16" and torch.device(device).type == "cuda"
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)


def check_finite(loss, step, name="loss"):
    """Mean of `loss` over ranks as a float; raises NonFiniteLossError naming the step (on every rank).

    `step` is the 0-based global step being computed; the message names it 1-based like metrics.csv."""
    value = float(all_reduce_mean(loss.detach().float()))
    if not math.isfinite(value):
        raise NonFiniteLossError(step + 1, name, value)
    return value


def optimizer_step(loss, optimizer, scaler, params, grad_clip, sync_grads=False):
    """backward, (all-reduce for modules outside DDP), unscale, clip, step. Returns the grad norm (float)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    params = [p for p in params if p.grad is not None]
    if sync_grads:
        all_reduce_grads(params)
    scaler.unscale_(optimizer)
    if params and isinstance(params[0].grad, DTensor):  # FSDP shards: the norm is reduced over ranks
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    elif grad_clip and grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])) \
            if params else torch.zeros(())
    scaler.step(optimizer)
    scaler.update()
    return float(norm)


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer_generator_step(model, loss_fn, x, step, max_steps, optimizer, scaler, grad_clip, amp, device):
    """One generator update: forward (with the prior and its scheduled sampling) + TokenizerLoss.generator_loss.

    Returns (logs, forward output); the discriminator step reuses the reconstruction."""
    with autocast(device, amp):
        out = model(x, global_step=step, max_steps=max_steps)
        loss, logs = loss_fn.generator_loss(x, out, step)
    logs["loss"] = check_finite(loss, step)
    logs["grad_norm"] = optimizer_step(loss, optimizer, scaler, model.parameters(), grad_clip)
    logs["ss_ratio"] = float(out.get("ss_ratio", 0.0))
    return logs, out


def tokenizer_discriminator_step(loss_fn, x, reconstruction, step, optimizer, scaler, grad_clip, amp, device):
    """One discriminator update (gradients averaged over ranks by hand: D is not wrapped in DDP)."""
    with autocast(device, amp):
        loss, logs = loss_fn.discriminator_loss(x, reconstruction.detach(), step)
    check_finite(loss, step, "discriminator loss")
    logs["d_grad_norm"] = optimizer_step(loss, optimizer, scaler, loss_fn.discriminator.parameters(), grad_clip,
                                         sync_grads=True)
    return logs


def code_usage(counts):
    """Fraction of the codebook used in a window, from its (V,) token counts."""
    return float((counts > 0).float().mean())


# ---------------------------------------------------------------------------------------------- AR
def ar_step(model, tokens, cond, step, optimizer, scaler, grad_clip, amp, device):
    """One teacher-forced update of a generator. tokens (B, N) long, cond (B,) labels or (B, Nc) tokens."""
    with autocast(device, amp):
        _, loss = model(tokens, cond, targets=tokens)
    logs = {"loss": check_finite(loss, step)}
    logs["grad_norm"] = optimizer_step(loss, optimizer, scaler, model.parameters(), grad_clip)
    return logs


@torch.no_grad()
def encode_batch(tokenizer, video, num_cond_frames=0, dtype="fp32"):
    """Frozen-tokenizer tokens of a video batch (deterministic VQ): tokens (B, N) and, for frame prediction,
    the condition tokens (B, N) of the first frames with the last one repeated (larp.sampling.condition_tokens)."""
    from larp.sampling import condition_tokens
    with autocast(video.device, dtype):
        tokens = tokenizer.encode(video)["bottleneck_rep"]
        cond = condition_tokens(tokenizer, video, num_cond_frames) if num_cond_frames else None
    return tokens, cond


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_tokenizer(model, videos, png_path, amp="fp32"):
    """Reconstruction PSNR (dB, mean over clips) with deterministic VQ, and a preview PNG (real / recon rows)."""
    from larp.metrics import psnr
    from larp.visualize import save_video_grid_png
    was_training = model.training
    model.eval()
    model.set_vq_eval_deterministic(True)
    with autocast(videos.device, amp):
        enc = model.encode(videos)
        rec = model.decode(enc["encoded"]).float().clamp(0, 1)  # (B, 3, T, H, W)
    value = float(psnr(rec, videos).mean())
    rows = torch.stack([videos.float(), rec], dim=1).flatten(0, 1)  # (2B, 3, T, H, W) interleaved
    labels = [("real" if i % 2 == 0 else "recon") for i in range(rows.shape[0])]
    save_video_grid_png(rows.cpu(), png_path, row_labels=labels)
    usage = torch.unique(enc["bottleneck_rep"]).numel() / model.codebook_size
    model.train(was_training)
    return {"val_psnr": value, "val_codebook_usage": usage}


@torch.no_grad()
def generate_videos(model, tokenizer, cond, eval_cfg, seeds):
    """Sample tokens with the eval settings and decode them: (B, 3, T, H, W) in [0, 1]."""
    was_training = model.training
    model.eval()
    tokens = model.generate(cond, cfg_scale=eval_cfg["cfg_scale"], temperature=eval_cfg["temperature"],
                            top_k=eval_cfg["top_k"], top_p=eval_cfg["top_p"], seeds=seeds)
    model.train(was_training)
    return tokenizer.decode_from_bottleneck(tokens).float().clamp(0, 1)


@torch.no_grad()
def val_loss_ar(model, tokenizer, videos, cond, dtype="fp32"):
    """Teacher-forced cross-entropy (nats/token) of held-out clips: the generators' validation curve."""
    was_training = model.training
    model.eval()
    tokens, _ = encode_batch(tokenizer, videos, 0, dtype)
    _, loss = model(tokens, cond, targets=tokens)
    model.train(was_training)
    return float(loss)


@torch.no_grad()
def eval_ar(model, tokenizer, cond, eval_cfg, png_path, real=None, labels=None):
    """Sample grid PNG: one generated video per condition (and its real clip above it, for frame prediction)."""
    from larp.visualize import save_video_grid_png
    fake = generate_videos(model, tokenizer, cond, eval_cfg, seeds=list(range(cond.shape[0])))
    if real is not None:
        rows = torch.stack([real.float(), fake], dim=1).flatten(0, 1)
        row_labels = [("real" if i % 2 == 0 else "pred") for i in range(rows.shape[0])]
    else:
        rows, row_labels = fake, [f"class {int(c)}" for c in (labels if labels is not None else cond)]
    save_video_grid_png(rows.cpu(), png_path, row_labels=row_labels)
    return fake


@torch.no_grad()
def small_fvd(model, tokenizer, detector, real_videos, cond, eval_cfg, batch_size, size=None):
    """FVD between `real_videos` and as many generated ones (same conditions), optionally resized to `size`."""
    from larp.fvd import FeatureStats, frechet_distance
    real_stats, fake_stats = FeatureStats(), FeatureStats()
    for i in range(0, cond.shape[0], batch_size):
        real = real_videos[i:i + batch_size]
        fake = generate_videos(model, tokenizer, cond[i:i + batch_size], eval_cfg,
                               seeds=list(range(i, i + real.shape[0])))
        if size is not None and real.shape[-1] != size:
            real, fake = (F.interpolate(v.transpose(1, 2).flatten(0, 1), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
                          .unflatten(0, (v.shape[0], v.shape[2])).transpose(1, 2) for v in (real, fake))
        real_stats.add(detector(real))
        fake_stats.add(detector(fake))
    return frechet_distance(real_stats, fake_stats)
