"""The buffers of fixed-shape decoding and the callables that run its passes (larp.models.decoding): eager,
torch.compile'd, or recorded as CUDA graphs.

A pass has one fixed shape per (shape group, guided, kv, masked) key, and all its inputs and outputs live in
persistent buffers, so a key is recorded once and replayed:
  * "graph": the first pass of a key runs eagerly on a side stream (the real pass, and the warm-up), then the same
    pass is recorded as a CUDA graph (all graphs share one memory pool) that every later pass of that key replays.
    Recording calls capture_begin/capture_end directly: torch.cuda.graph() would also synchronise and empty the
    allocator's cache before every one of the (up to 34) recordings of a call.
  * "compile": torch.compile(fullgraph=True, dynamic=False), mode "reduce-overhead" (CUDA graphs) with inductor on
    CUDA; one compiled graph per key.
Graph and compile runners are kept on the model (one at a time) and reused by the next call with the same batch,
dtypes, knobs and weight storage (a recorded graph reads the weights where they were). A runner holds no reference
to its model, so deleting the model frees the KV cache and the graph pool at once.

The capture rule: a pass writes only into the runner's buffers (allocated outside any graph pool) and returns
nothing, since a tensor allocated inside a recorded graph is overwritten by the next replay. `check_capture_rule`
enforces it on the first pass of every key, in every mode.
"""
import functools
import warnings

import torch

from larp.core.errors import LarpError

CAPTURE_MODES = ("auto", "eager", "graph", "compile")
_KEPT = "_decode_runner"


def resolve_capture(capture, device):
    """(mode, backend) of generate's `capture`: "auto" (CUDA graphs on CUDA, else eager), "eager", "graph" (CUDA
    only), "compile" or "compile:<dynamo backend>"."""
    mode, _, backend = str(capture).partition(":")
    if mode not in CAPTURE_MODES or (backend and mode != "compile"):
        raise ValueError(f"capture: expected one of {CAPTURE_MODES} or compile:<backend>, got {capture!r}")
    if mode == "auto":
        mode = "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"capture 'graph' records CUDA graphs: the model is on {device.type}")
    return mode, backend or None


def get_runner(model, plan, batch, nb, cache_dtype, mode, knobs, pass_fn):
    """A DecodeRunner for this call: a new one when eager, else the one kept on the model if it has the same batch,
    dtypes, knobs and weight storage (a new one replaces it, its buffers freed first)."""
    mode, backend = mode
    if mode == "eager":
        return DecodeRunner(model, plan, batch, nb, cache_dtype, mode, backend, knobs, pass_fn)
    key = (batch, nb, cache_dtype, model.param_dtype, mode, backend, knobs,
           torch.is_autocast_enabled(model.device.type), tuple(p.data_ptr() for p in model.parameters()))
    kept = model.__dict__.get(_KEPT)
    if kept is None or kept[0] != key:
        model.__dict__[_KEPT] = None
        kept = model.__dict__[_KEPT] = (key, DecodeRunner(model, plan, batch, nb, cache_dtype, mode, backend, knobs,
                                                          pass_fn))
    return kept[1]


class CaptureRuleError(LarpError):
    """A decoding pass returned a tensor or replaced a buffer: replays of a recorded graph would lose it."""


def buffer_ptrs(bufs):
    """{name: data pointer} of every tensor of a runner's buffers (caches flattened)."""
    ptrs = {name: t.data_ptr() for name, t in bufs.items() if isinstance(t, torch.Tensor)}
    ptrs.update({f"caches[{i}][{j}]": t.data_ptr() for i, kv in enumerate(bufs["caches"]) for j, t in enumerate(kv)})
    return ptrs


def check_capture_rule(key, before, bufs, result):
    """Raise CaptureRuleError if the pass of `key` returned something or rebound a buffer (`before`: buffer_ptrs
    taken before the pass)."""
    if result is not None:
        raise CaptureRuleError(f"decoding pass {key} returned {type(result).__name__}: a pass must write its results "
                               "into the runner's buffers")
    moved = sorted(name for name, ptr in buffer_ptrs(bufs).items() if before.get(name) != ptr)
    if moved:
        raise CaptureRuleError(f"decoding pass {key} replaced the buffers {moved}: a pass must write in place")


class DecodeRunner:
    """Persistent buffers of one decoding configuration, and one callable per pass key.

    bufs: caches [per block (k, v), each (nb, Hkv, S, hd)]; emb (nb, S + 1, D) the embedded input of every slot
    (the condition, then each token once sampled; slot S takes what is never fed); out (B, N) tokens;
    u (B, N) uniforms; nll (B,) summed NLL; step (1,) the step number, advanced by each pass."""

    def __init__(self, model, plan, batch, nb, cache_dtype, mode, backend, knobs, pass_fn):
        device, S, N = model.device, model.abs_pe.shape[1], model.num_tokens
        self.plan, self.nb, self.batch, self.knobs, self.mode, self.device = plan, nb, batch, knobs, mode, device
        with torch.inference_mode(False):  # buffers reused by later calls, inside inference mode or not
            self.bufs = {"caches": model.new_kv_cache(nb, cache_dtype, device),
                         "emb": torch.zeros(nb, S + 1, model.args.dim, dtype=model.param_dtype, device=device),
                         "out": torch.zeros(batch, N, dtype=torch.long, device=device),
                         "u": torch.zeros(batch, N, device=device), "nll": torch.zeros(batch, device=device),
                         "step": torch.zeros(1, dtype=torch.long, device=device)}
        self.fn = _compiled(pass_fn, device, backend, self.bufs) if mode == "compile" else pass_fn
        self.calls, self.pool, self.failed = {}, None, None

    def reset(self, cond_x, u):
        """A new call: its condition embedding (nb, C, D) and uniforms (B, N); NLL and step cleared."""
        b = self.bufs
        b["emb"][:, :cond_x.shape[1]].copy_(cond_x)
        b["u"].copy_(u)
        b["nll"].zero_()
        b["step"].zero_()

    def step(self, model, key):
        """Run the pass of the current step, whose (shape group, guided, kv, masked) is `key`."""
        call = self.calls.get(key)
        if call is not None:
            return call(model)
        group, guided, kv, masked = key
        run = functools.partial(self.fn, bufs=self.bufs, tab=self.plan["groups"][group], rank=self.plan["rank"],
                                nb=self.nb if guided else self.batch, guided=guided, kv=kv, masked=masked,
                                knobs=self.knobs)
        before = buffer_ptrs(self.bufs)
        if self.mode == "graph":
            self.calls[key] = self._record(model, run, key, before)
        else:
            check_capture_rule(key, before, self.bufs, run(model))
            self.calls[key] = run

    def _record(self, model, run, key, before):
        """Run the pass eagerly on a side stream, then record it as a CUDA graph for the next passes of its key. If
        recording fails, warn once and stay eager."""
        if self.failed:
            run(model)
            return run
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            check_capture_rule(key, before, self.bufs, run(model))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            _capture(graph, self.pool, side, lambda: run(model), self.device)
        except Exception as e:  # an op that cannot be recorded on this setup: correct, only slower
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph recording of a decoding pass failed ({self.failed}); decoding eagerly")
            return run
        if self.pool is None:
            self.pool = graph.pool()
        return lambda _model: graph.replay()


def _capture(graph, pool, stream, fn, device):
    """Record fn() into `graph` on `stream`, sharing the memory `pool` (None: a new pool). Unlike torch.cuda.graph(),
    neither synchronises the device nor empties the allocator's cache first. thread_local: CUDA calls of other
    threads (the loader's pinning, mp4 writers) may go on meanwhile."""
    with torch.cuda.stream(stream), _autocast_without_cache(device.type):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            fn()
        finally:
            graph.capture_end()


def _autocast_without_cache(device_type):
    """The current autocast state with its cast cache off while recording: a weight cast cached outside the graph
    would be freed when the autocast region ends, while the graph still reads it."""
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)


def _compiled(fn, device, backend, bufs):
    """torch.compile of the pass (one graph per key, hence the raised recompile limits)."""
    backend = backend or "inductor"
    cuda_graphs = device.type == "cuda" and backend == "inductor"
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend,
                             mode="reduce-overhead" if cuda_graphs else None)
    dynamo = torch._dynamo  # loaded by torch.compile (importing it up front would cost every process ~1.5 s)
    if cuda_graphs:  # the buffers are mutated in place: static addresses keep them inside the CUDA graphs
        for t in [bufs[k] for k in ("emb", "out", "u", "nll", "step")] + [t for kv in bufs["caches"] for t in kv]:
            dynamo.mark_static_address(t)

    def call(*args, **kwargs):
        with dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=65536):
            return compiled(*args, **kwargs)
    return call
