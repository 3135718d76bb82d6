"""Small training helpers: the LR schedule, optimizers, EMA, the AMP grad scaler, the finiteness check and one
optimizer step (backward, clip, step). Both stages and the loop in larp/training/loop.py use them."""
import math

import torch

from larp.core.dist import all_reduce_grads, all_reduce_mean
from larp.core.errors import NonFiniteLossError
from larp.training.fsdp import is_shard

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


# ---------------------------------------------------------------------------------------------- schedules
def lr_at(step, base_lr, total_steps, name="cosine", warmup_steps=0, min_lr_ratio=0.0, milestones=(), gamma=0.1,
          warmup_from_min=False):
    """Learning rate for optimizer step `step` (0-based): linear warmup (from 0, or from the floor base_lr *
    min_lr_ratio with `warmup_from_min`), then cosine / step / constant."""
    warm = int(warmup_steps or 0)
    if warm > 0 and step < warm:
        start = base_lr * min_lr_ratio if warmup_from_min else 0.0
        return start + (base_lr - start) * (step + 1) / warm
    if name == "constant":
        return base_lr
    if name == "step":
        return base_lr * gamma ** sum(step >= m for m in milestones)
    floor = base_lr * min_lr_ratio
    progress = min(max(step - warm, 0) / max(total_steps - warm, 1), 1.0)
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_args(lr_schedule, steps_per_epoch):
    """The keyword arguments of `lr_at` for the config section `lr_schedule` (a dict): warmup_epochs, when set,
    becomes warmup_steps (rounded, with `steps_per_epoch`)."""
    args = dict(lr_schedule)
    epochs = args.pop("warmup_epochs", 0.0)
    if epochs and epochs > 0:
        args["warmup_steps"] = int(round(epochs * steps_per_epoch))
    return args


def set_lr(optimizer, lr):
    """Set every group's lr to lr * group['lr_mult'] (groups without it: 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


DECAY_RULES = ("linear", "all")


def param_groups(model, weight_decay, decay="linear"):
    """The optimizer's parameter groups of `model`'s trainable parameters.

    decay "linear" (the reference's AR trainers): two groups, the weights of nn.Linear layers at `weight_decay` and
    everything else (biases, embeddings, norm gains, position tables) at 0. decay "all": one group, every parameter
    at `weight_decay`. Each group carries a "name" for the log line (`describe_groups`)."""
    if decay not in DECAY_RULES:
        raise ValueError(f"optimizer.decay {decay!r}: expected one of {', '.join(DECAY_RULES)}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay == "all":
        return [{"name": "decay", "params": [p for _, p in trainable], "weight_decay": weight_decay}]
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return [{"name": "decay", "params": [p for _, p in trainable if id(p) in linear], "weight_decay": weight_decay},
            {"name": "no_decay", "params": [p for _, p in trainable if id(p) not in linear], "weight_decay": 0.0}]


def describe_groups(groups):
    """One line: each group's name, weight decay, tensor count and parameter count."""
    return "optimizer groups: " + "; ".join(
        f"{g.get('name', i)} (weight_decay {g['weight_decay']:g}): {len(g['params'])} tensors, "
        f"{sum(p.numel() for p in g['params']):,} parameters" for i, g in enumerate(groups))


def build_optimizer(model, cfg):
    """Optimizer `cfg.name` (a key of OPTIMIZERS) over the trainable parameters of `model`, grouped for weight decay
    by `cfg.decay` (`param_groups`), with keyword arguments `cfg.args`."""
    kwargs = dict(cfg.args)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = param_groups(model, kwargs.pop("weight_decay", 0.0), cfg.decay)
    return OPTIMIZERS[cfg.name](groups, **kwargs)


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
    if params and is_shard(params[0].grad):  # FSDP shards: the norm is reduced over ranks
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
