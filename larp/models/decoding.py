"""Sampling for larp.models.generator.Generator: a fixed-shape decode loop, top-k/top-p, CFG.

Both orders run the same loop over the steps of their plan (larp.models.decoding_order.fixed_plan). Step 0
(prefill) feeds the condition; step s > 0 feeds the tokens sampled at step s-1:
  * nar:    step s samples plane s (T+H+W-2 steps); it feeds plane s-1, which sees the condition and the planes
            before it, as the proximity mask allows.
  * raster: step s samples token s (N steps), a causal prefix.
Every pass has a fixed shape: the KV cache is persistent (one slot per sequence position), the step number lives on
the device (bufs["step"]), and each pass reads its slots, targets and uniforms by index from tables of the plan,
writes the cache, the tokens and the next inputs by index, and attends only over the cache slots that exist
(larp.models.decoding_order.attention_spans): NAR over the exact filled prefix with no mask, raster over the
prefix rounded up to a bucket of slots under a mask by rank. All steps of one shape therefore run the same ops on
the same tensors, with no host sync: a shape can be recorded once as a CUDA graph (or compiled) and replayed
(larp.models.decode_runner). A shape is (fed chunk, sampled tokens, attended slots): raster has one per bucket;
NAR one per step (34 for a 4x16x16 grid).

Randomness is one uniform per (sample, token), drawn up front from torch.Generator(seeds[i]) and turned into a
token by inverse-CDF sampling: sample i depends only on (seeds[i], cond[i], settings), not on its batch neighbours,
which makes sharded sampling reproducible.
"""
import torch

from larp.models.decode_runner import get_runner, resolve_capture
from larp.models.decoding_order import fixed_plan, nar_plan, raster_plan  # noqa: F401 (the plans, for callers)
from larp.models.sampling_params import SamplingParams


# ---- sampling utilities --------------------------------------------------------------------------
def make_uniforms(batch, num_tokens, seeds=None, generator=None, device="cpu"):
    """(B, N) uniforms in [0, 1): per-sample torch.Generator(seed) streams when `seeds` is given. Drawn on the CPU
    (the same numbers on every device), copied without blocking the host."""
    if seeds is None:
        u = torch.rand(batch, num_tokens, generator=generator)
    else:
        seeds = [int(s) for s in seeds]
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
        u = torch.stack([torch.rand(num_tokens, generator=torch.Generator().manual_seed(s)) for s in seeds])
    if torch.device(device).type == "cuda":
        return u.pin_memory().to(device, non_blocking=True)
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
        remove[..., 0].fill_(False)  # (fill_, not item assignment, which makes a host tensor of the value)
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
    """Doubled batch [cond ; uncond] (2B, M, V) -> uncond + scale * (cond - uncond) (B, M, V), in one new tensor
    (the same operations in the same order as written, so the same bits)."""
    cond, uncond = logits.chunk(2, dim=0)
    return (cond - uncond).mul_(scale).add_(uncond)


def _cache_dtype(model, device):
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.param_dtype


def guided_pass(order, cfg_interval, tokens_before):
    """Whether CFG guides a pass under `cfg_interval` (-1: every pass), as the reference samplers do. The prefill is
    always guided; then
      * raster (LARP's sampler): the decode steps 0..cfg_interval, i.e. the passes that follow at most
        cfg_interval + 1 sampled tokens;
      * nar (NAR's sampler): the planes decoded while at most cfg_interval tokens have been sampled.
    `tokens_before`: tokens sampled by the earlier passes."""
    if cfg_interval < 0:
        return True
    return tokens_before <= cfg_interval + (1 if order == "raster" else 0)


def generate(model, cond, params=SamplingParams(), seeds=None, return_nll=False, generator=None, capture="auto"):
    """Sample tokens (B, N) in raster order; with return_nll also the NLL_sampled of the reference: per sample, the
    mean teacher-forced cross-entropy (nats per token) of the sampled tokens under the *unguided* conditional
    model, at temperature 1 and before top-k/p (whatever cfg_scale, cfg_interval and the filters were).

    cond: (B,) labels or (B, Nc) condition tokens. Guidance (params.cfg_scale != 1, class-conditional only)
    doubles the batch with the null class and samples from uncond + scale * (cond - uncond) on the passes that
    `guided_pass` selects by params.cfg_interval; the other passes run the conditional half alone.
    `seeds`: one int per sample. `capture`: how each pass shape runs: "auto" (recorded once as a CUDA graph and
    replayed on CUDA, eager elsewhere), "eager", "graph" (CUDA only), "compile" (torch.compile, fullgraph, static
    shapes; "compile:<backend>" picks the dynamo backend, e.g. "compile:aot_eager"). Graph and compile runs keep
    their buffers on the model for the next call with the same batch and settings. Runs in eval mode and
    restores the model's mode.
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params: expected a SamplingParams, got {type(params).__name__}")
    mode = resolve_capture(capture, model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _generate(model, cond, params, seeds, return_nll, generator, mode)
    finally:
        model.train(was_training)


def _generate(model, cond, params, seeds, return_nll, generator, mode):
    device = model.device
    cond = torch.as_tensor(cond, device=device).long()
    B, N = cond.shape[0], model.num_tokens
    guided = params.cfg_scale != 1.0
    if guided and model.frame_prediction:
        raise ValueError("classifier-free guidance needs a class-conditional generator (cfg_scale must be 1.0)")
    if guided:
        cond = torch.cat([cond, torch.full_like(cond, model.args.num_classes)])  # [cond ; null]
    plan = fixed_plan(model)
    schedule = [(g, guided and guided_pass(model.order, params.cfg_interval, t), kv, masked)
                for g, t, (kv, masked) in zip(plan["group_of"], plan["tokens_before"], plan["spans"])]
    knobs = (params.cfg_scale, params.temperature, params.top_k, params.top_p, bool(return_nll))
    run = get_runner(model, plan, B, cond.shape[0], _cache_dtype(model, device), mode, knobs, _call_pass)
    run.reset(model.embed_condition(cond), make_uniforms(B, N, seeds, generator, device))
    _decode_loop(model, run, schedule)
    out = run.bufs["out"].clone()
    return (out, run.bufs["nll"] / N) if return_nll else out


def _decode_loop(model, run, schedule):
    """The passes of one call: schedule[s] = (shape group, guided, kv, masked) of step s."""
    for key in schedule:
        run.step(model, key)


def _call_pass(*args, **kwargs):
    return _pass(*args, **kwargs)  # looked up at call time, so that tests can wrap it


def _pass(model, bufs, tab, rank, nb, guided, kv, masked, knobs):
    """One fixed-shape pass at step bufs["step"] (1,), in place on the buffers of larp.models.decode_runner; it
    returns nothing and allocates nothing that outlives it (what a recorded CUDA graph needs).

    tab: the step tables of this shape group; rank (S,): the slot ranks; nb: the sequences run (2B when guided);
    kv, masked: the pass attends over cache slots [0, kv), under the rank mask when `masked`;
    knobs: (cfg_scale, temperature, top_k, top_p, with_nll)."""
    scale, temperature, top_k, top_p, with_nll = knobs
    out, emb, step = bufs["out"], bufs["emb"], bufs["step"]
    B = out.shape[0]
    at = {name: table.index_select(0, step)[0] for name, table in tab.items()}  # this step's row of each table
    at["kv"] = kv
    at["mask"] = rank[None, :kv] <= rank.index_select(0, at["fed"])[:, None] if masked else None  # (L, kv)
    logits = model.decode_step(emb[:nb].index_select(1, at["fed"]), bufs["caches"], at)  # (nb, M, V)
    cond_logits = logits[:B]
    if guided:
        logits = apply_guidance(logits, scale)
    tok = sample_logits(logits, bufs["u"].index_select(1, at["targets"]), temperature, top_k, top_p)  # (B, M)
    out.index_copy_(1, at["targets"], tok)
    if with_nll:  # NLL_sampled: cross-entropy under the unguided conditional model
        bufs["nll"].sub_(torch.log_softmax(cond_logits, -1).gather(-1, tok[..., None]).sum((1, 2)))
    x = model.embed_tokens(tok, at["rows"])  # (B, M, D)
    for half in range(emb.shape[0] // B):  # both halves of a CFG batch are fed the sampled tokens
        emb[half * B:(half + 1) * B].index_copy_(1, at["slots"], x)
    step.add_(1)
