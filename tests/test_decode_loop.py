"""The fixed-shape decode loop: the same ops in every pass whatever the step and grid, nothing in the loop that makes
the host wait or copy, and a compiled pass that picks exactly the eager tokens."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import larp.models.decoding as gen
from larp.models.decode_runner import resolve_capture
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

    def logged(*args):
        with OpLog() as log:
            real(*args)
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

    def logged(run, schedule):
        with OpLog() as log:
            real(run, schedule)
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
