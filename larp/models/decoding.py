"""Sampling for larp.models.generator.Generator: the decode loop over its static KV cache, top-k/top-p, CFG.

Both orders run the same loop over precomputed steps. Step 0 (prefill) feeds the condition; step s > 0
feeds the tokens sampled at step s-1. The KV cache is preallocated once per call in decode order, so a
step writes its slice and attends to the filled prefix [0, end) with no mask:
  * nar:    step s samples plane s (T+H+W-2 steps); the cache prefix is exactly "condition + planes < s",
            which is what the proximity mask allows.
  * raster: step s samples token s (N steps), a causal prefix.
Randomness is one uniform per (sample, token), drawn up front from torch.Generator(seeds[i]) and turned
into a token by inverse-CDF sampling: sample i depends only on (seeds[i], cond[i], settings), not on its
batch neighbours, which makes sharded sampling reproducible.
"""
import torch

from larp.models.decoding_order import nar_plan, raster_plan
from larp.models.sampling_params import SamplingParams


# ---- sampling utilities --------------------------------------------------------------------------
def make_uniforms(batch, num_tokens, seeds=None, generator=None, device="cpu"):
    """(B, N) uniforms in [0, 1): per-sample torch.Generator(seed) streams when `seeds` is given."""
    if seeds is None:
        u = torch.rand(batch, num_tokens, generator=generator)
    else:
        seeds = [int(s) for s in seeds]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
        u = torch.stack([torch.rand(num_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return u.to(device)


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set logits outside the top-k / nucleus top-p to -inf. logits (..., V) float."""
    if top_k and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def sample_inverse_cdf(probs, u):
    """probs (..., V) (unnormalised ok), u (...) in [0, 1) -> (...) long: first index whose CDF exceeds u."""
    cdf = probs.cumsum(-1)
    x = (u * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def sample_logits(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """logits (B, M, V) float, u (B, M) -> tokens (B, M). top_k == 1 or temperature <= 0 is greedy."""
    if top_k == 1 or temperature <= 0:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    return sample_inverse_cdf(torch.softmax(logits, dim=-1), u)


def apply_guidance(logits, scale):
    """Doubled batch [cond ; uncond] (2B, M, V) -> uncond + scale * (cond - uncond) (B, M, V)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def _cache_dtype(model, device):
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.param_dtype


def generate(model, cond, params=SamplingParams(), seeds=None, return_nll=False, generator=None):
    """Sample tokens (B, N) in raster order; with return_nll also the mean NLL per token (B,) of the
    sampled tokens under the guided distribution at temperature 1 (before top-k/p).

    cond: (B,) labels or (B, Nc) condition tokens. Guidance (params.cfg_scale != 1, class-conditional only)
    doubles the batch with the null class and uses uncond + scale * (cond - uncond), on the first
    `params.cfg_interval` forward passes (-1: all); afterwards only the conditional half is run.
    `seeds`: one int per sample. Runs in eval mode (no label/token dropout while sampling) and restores the
    model's mode.
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params: expected a SamplingParams, got {type(params).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _generate(model, cond, params, seeds, return_nll, generator)
    finally:
        model.train(was_training)


def _generate(model, cond, params, seeds, return_nll, generator):
    device = model.device
    cond = torch.as_tensor(cond, device=device).long()
    B, N = cond.shape[0], model.num_tokens
    guided = params.cfg_scale != 1.0
    if guided and model.frame_prediction:
        raise ValueError("classifier-free guidance needs a class-conditional generator (cfg_scale must be 1.0)")
    if guided:
        cond = torch.cat([cond, torch.full_like(cond, model.args.num_classes)])  # [cond ; null]

    def guided_at(s):
        return guided and (params.cfg_interval < 0 or s < params.cfg_interval)

    steps = nar_plan(model) if model.order == "nar" else raster_plan(model)
    u = make_uniforms(B, N, seeds, generator, device)  # (B, N)
    caches = model.new_kv_cache(cond.shape[0], _cache_dtype(model, device), device)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    nll = torch.zeros(B, device=device) if return_nll else None
    x = model.embed_condition(cond)  # (B or 2B, C, D)
    for s, step in enumerate(steps):
        if guided_at(s):
            logits = apply_guidance(model.decode_step(x, caches, step), params.cfg_scale)  # (B, M, V)
        else:
            logits = model.decode_step(x[:B], caches, step)
        tok = sample_logits(logits, u[:, step["targets"]], params.temperature, params.top_k, params.top_p)  # (B, M)
        out[:, step["targets"]] = tok
        if return_nll:
            nll -= torch.log_softmax(logits, -1).gather(-1, tok[..., None]).sum((1, 2))
        if s + 1 < len(steps):
            x = model.embed_tokens(tok, step["rows"])  # (B, M, D)
            if guided_at(s + 1):
                x = torch.cat([x, x])
    return (out, nll / N) if return_nll else out
