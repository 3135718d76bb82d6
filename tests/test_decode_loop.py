"""The fixed-shape decode loop: the same ops in every pass whatever the step and grid, nothing in the loop that makes
the host wait or copy, a compiled pass that picks exactly the eager tokens, passes that attend only over the cache
slots that exist, a runner that dies with its model, and the capture rule (a pass keeps no output of its own)."""
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import larp.models.decoding as gen
from larp.models.decode_runner import CaptureRuleError, resolve_capture
from larp.models.sampling_params import SamplingParams
from tests.test_generator import tiny

# ops that wait for the device (item, data-dependent shapes) or copy host data to it
FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique2",
             "unique_consecutive", "lift_fresh", "lift_fresh_copy", "_pin_memory", "is_pinned", "equal"}


class OpLog(TorchDispatchMode):
    """Every aten op dispatched inside, with the devices of its tensor arguments and its device keyword."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {a.device for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        self.ops.append((func.overloadpacket.__name__, str(func), devices, kwargs.get("device")))
        return func(*args, **kwargs)


def ops_per_pass(monkeypatch, model, cond, params):
    passes, real = [], gen._pass

    def logged(*args, **kwargs):
        with OpLog() as log:
            real(*args, **kwargs)
        passes.append([op[1] for op in log.ops])

    monkeypatch.setattr(gen, "_pass", logged)
    model.generate(cond, params, seeds=list(range(cond.shape[0])), return_nll=True)
    monkeypatch.setattr(gen, "_pass", real)
    assert len(passes) == model.num_decode_steps()
    return passes


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_same_ops_in_every_pass_and_every_grid(monkeypatch, order):
    labels = torch.tensor([1, 3])
    counts = {}
    for grid in ((2, 3, 4), (3, 2, 2), (1, 4, 5)):
        model = tiny(order, latent_shape=grid, max_seq_len=grid[0] * grid[1] * grid[2])
        for params in (SamplingParams(cfg_scale=1.5), SamplingParams(top_k=5, top_p=0.9, temperature=0.8)):
            passes = ops_per_pass(monkeypatch, model, labels, params)
            assert all(p == passes[0] for p in passes), f"{grid}: the passes run different ops"
            counts.setdefault(params, set()).add(len(passes[0]))
    assert all(len(c) == 1 for c in counts.values()), counts


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_no_sync_or_host_copy_inside_the_loop(monkeypatch, order):
    model = tiny(order)
    seen, real = [], gen._decode_loop

    def logged(model, run, schedule):
        with OpLog() as log:
            real(model, run, schedule)
        seen.extend(log.ops)

    monkeypatch.setattr(gen, "_decode_loop", logged)
    model.generate(torch.tensor([0, 4]), SamplingParams(cfg_scale=2.0, top_k=10, top_p=0.8), seeds=[1, 2],
                   return_nll=True)
    assert len(seen) > 100
    bad = [op for op in seen if op[0] in FORBIDDEN]
    moved = [op for op in seen if (op[0] == "_to_copy" and op[3] is not None) or op[2] - {model.device}]
    assert not bad and not moved, (bad[:3], moved[:3])


def test_the_check_sees_syncs_and_host_copies():
    """The forbidden-op check is not blind: the ops it looks for are the ones these calls dispatch."""
    with OpLog() as log:
        x = torch.arange(5)
        x[x > 2].sum().item()
        torch.tensor([1, 2]) + x[:2]
        x.to("cpu", copy=True, dtype=torch.float32)
    names = {op[0] for op in log.ops}
    assert {"_local_scalar_dense", "lift_fresh"} <= names and ("index" in names or "nonzero" in names)
    assert any(op[0] == "_to_copy" and op[3] is not None for op in log.ops)


@pytest.mark.parametrize("order", ["nar", "raster"])
@pytest.mark.parametrize("kind", ["class", "frame"])
def test_compiled_pass_gives_the_eager_tokens(order, kind):
    if kind == "class":
        model = tiny(order, latent_shape=(1, 2, 2), max_seq_len=4, n_layer=1)
        cond, params = torch.tensor([0, 2, 4]), SamplingParams(cfg_scale=1.75, cfg_interval=1, top_k=20)
    else:
        model = tiny(order, latent_shape=(1, 2, 2), max_seq_len=4, n_layer=1, frame_prediction=True, cls_token_num=4)
        cond, params = torch.randint(0, 40, (3, 3), generator=torch.Generator().manual_seed(1)), SamplingParams()
    seeds = [7, 8, 9]
    eager, eager_nll = model.generate(cond, params, seeds=seeds, return_nll=True, capture="eager")
    compiled, nll = model.generate(cond, params, seeds=seeds, return_nll=True, capture="compile:aot_eager")
    assert torch.equal(compiled, eager) and torch.equal(nll, eager_nll)
    again = model.generate(cond.flip(0), params, seeds=seeds[::-1], capture="compile:aot_eager")  # kept runner
    assert torch.equal(again[0], eager[2]) and torch.equal(again[2], eager[0])


def test_capture_modes():
    cpu = torch.device("cpu")
    assert resolve_capture("auto", cpu) == ("eager", None)
    assert resolve_capture("auto", torch.device("cuda")) == ("graph", None)
    assert resolve_capture("compile:aot_eager", cpu) == ("compile", "aot_eager")
    with pytest.raises(ValueError, match="CUDA graphs"):
        resolve_capture("graph", cpu)
    with pytest.raises(ValueError, match="capture"):
        tiny("raster").generate(torch.tensor([0]), capture="fast")


def test_deleting_the_model_frees_its_kept_runner():
    """No reference cycle between a model and the runner kept on it: the KV cache (and on CUDA the graph pool) goes
    with the model, without waiting for the garbage collector."""
    model = tiny("nar")
    model.generate(torch.tensor([0, 1]), SamplingParams(cfg_scale=1.5), seeds=[0, 1], capture="compile:aot_eager")
    cache = weakref.ref(model.__dict__["_decode_runner"][1].bufs["caches"][0][0])
    assert cache() is not None
    gc.disable()
    try:
        del model
        assert cache() is None, "the KV cache outlived its model"
    finally:
        gc.enable()


def test_a_pass_that_keeps_an_output_breaks_the_capture_rule(monkeypatch):
    """A pass must write into the runner's buffers: one that returns a tensor, or rebinds a buffer, is refused on
    its first run (a recorded CUDA graph would overwrite such an output on the next replay)."""
    model, real = tiny("raster"), gen._pass

    def returns(*args, **kwargs):
        real(*args, **kwargs)
        return kwargs["bufs"]["out"] + 0

    def rebinds(*args, **kwargs):
        real(*args, **kwargs)
        kwargs["bufs"]["nll"] = kwargs["bufs"]["nll"].clone()

    for bad, message in ((returns, "returned Tensor"), (rebinds, r"replaced the buffers \['nll'\]")):
        monkeypatch.setattr(gen, "_pass", bad)
        with pytest.raises(CaptureRuleError, match=message):
            model.generate(torch.tensor([0]), seeds=[0], return_nll=True)
    monkeypatch.setattr(gen, "_pass", real)
    model.generate(torch.tensor([0]), seeds=[0], return_nll=True)  # the real pass keeps the rule


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_passes_attend_only_over_the_slots_that_exist(monkeypatch, order):
    """Each pass attends over the filled prefix of the cache: NAR over exactly the condition and the planes before
    the one it samples, with no mask; raster over its prefix rounded up to a multiple of 64 slots, masked."""
    T, H, W = 2, 6, 8  # 96 tokens: raster crosses a bucket boundary
    model = tiny(order, latent_shape=(T, H, W), max_seq_len=T * H * W)
    seen, real = [], torch.nn.functional.scaled_dot_product_attention

    def logged(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[2], k.shape[2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", logged)
    model.generate(torch.tensor([0, 1]), SamplingParams(cfg_scale=1.5), seeds=[0, 1])
    per_pass = seen[::len(model.layers)]
    assert len(per_pass) == model.num_decode_steps()
    if order == "nar":  # plane p holds the tokens with t + h + w == p; step s feeds plane s - 1
        planes = [sum(1 for t in range(T) for h in range(H) for w in range(W) if t + h + w == p)
                  for p in range(T + H + W - 2)]
        ends = [1 + sum(planes[:s]) for s in range(len(planes))]
        assert per_pass == [(end - (ends[s - 1] if s else 0), end, None) for s, end in enumerate(ends)]
    else:
        S = T * H * W
        want = [(1, min(S, 64 * -(-(s + 1) // 64)), (1, min(S, 64 * -(-(s + 1) // 64)))) for s in range(S)]
        assert per_pass == want
