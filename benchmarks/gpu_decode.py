"""The decoding sections of benchmarks/gpu_check.py, each run in its own process:

  decode_nar     NAR-L, random weights saved in the release format, 4x16x16, batch 32, cfg 1.25, weights cast to
  decode_raster  bf16 once (sample.py's configuration), raster-L the same: our eager loop, our captured loop (CUDA
                 graphs: the first call records every pass shape, then timed), whether the captured tokens equal
                 the eager ones (same seeds), the reference sampler (LARP raster, NAR) on the same files with the
                 same cast, and where a pass's time goes (one profiled eager call: attention, MLP, sampling and the
                 rest per pass, and kernels per pass on CUDA, aten ops on a CPU). Each row is written as soon as it
                 exists.
  attention      one decode attention per SDPA backend (batch 64, 16 heads, head dim 64, bf16) over 64 / 256 /
                 1024 cache slots, and over 1024 slots under a mask: first call and steady time (CUDA only).
  seed           (not in the default list) the seed command on 1,024 samples: sample.py's run() with a random LARP-L
                 tokenizer and NAR-L generator, synthetic 16x128x128 clips, batch 64, cfg 1.25, bf16, I3D and mp4
                 writing; wall time and its extrapolation to 10,000 samples.
--tiny runs every step at tiny sizes, in seconds, on a CPU.
"""
import json
import math
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, record_function

from larp.models.generator import load_generator
from larp.models.sampling_params import SamplingParams
from larp.models.transformer import Attention, FeedForward
from larp.core.utils import get_device, get_dtype
from bench_sampling import build_pair, sync
from bench_tokenizer import CONFIGS
from reference_samplers import ReferenceMissing, load_reference, reference_generate

EXTRA_BUDGET_S = {"decode_nar": 70, "decode_raster": 150, "attention": 20, "seed": 150}  # seconds per section
EXTRA_TINY_BUDGET_S = {"decode_nar": 60, "decode_raster": 60, "attention": 20, "seed": 120}
TARGET_S = {"nar": 0.20, "raster": 3.0}  # seconds per batch of 32 on an H200, bf16 weights, cfg 1.25
GOLDEN = os.path.join(os.path.dirname(CONFIGS["tiny"]), "..")  # tests/fixtures/reference/golden/tiny


def clock(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def time_sampler(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    runs = [clock(fn, device) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def decode_settings(tiny):
    if tiny:
        return dict(grid=[2, 4, 4], vocab=64, batch=4, dtype="fp32", cfg_scale=1.25, dim=64, layers=2, heads=4)
    return dict(grid=[4, 16, 16], vocab=8192, batch=32, dtype="bf16", cfg_scale=1.25, size="llama-abs-L")


def pass_breakdown(model, call, device):
    """Per pass of one profiled eager call: ms in attention, MLP, and the rest (norms, heads, embeddings, cache
    writes, guidance and sampling), kernels (CUDA) or aten ops (CPU). Device time on CUDA, CPU time on a CPU."""
    scopes = [(m, "attention") for m in model.modules() if isinstance(m, Attention)]
    scopes += [(m, "mlp") for m in model.modules() if isinstance(m, FeedForward)]
    open_ranges, hooks = [], []

    def enter(name):
        def hook(_m, _args):
            open_ranges.append(record_function(name))
            open_ranges[-1].__enter__()
        return hook

    def leave(_m, _args, _out):
        open_ranges.pop().__exit__(None, None, None)

    for module, name in scopes:
        hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    cuda = device.type == "cuda"
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            with record_function("generate"):
                call()
            sync(device)
    finally:
        for h in hooks:
            h.remove()
    passes = model.num_decode_steps()
    ms = {}
    for e in prof.key_averages():
        if e.key in ("generate", "attention", "mlp"):
            ms[e.key] = (e.device_time_total if cuda else e.cpu_time_total) / 1000 / passes
    events = prof.events()
    if cuda:
        count = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        count = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is not None
                    and e.cpu_parent.name in ("generate", "attention", "mlp"))
    return {"total_ms": ms.get("generate", 0.0), "attention_ms": ms.get("attention", 0.0), "mlp_ms": ms.get("mlp", 0.0),
            "rest_ms": ms.get("generate", 0.0) - ms.get("attention", 0.0) - ms.get("mlp", 0.0),
            "kernels_per_pass" if cuda else "aten_ops_per_pass": count / passes, "passes": passes}


def decode_row(order, model, path, settings, device, rec):
    """Eager, captured, breakdown and reference of one model, recorded as each is measured."""
    batch, cfg, nar = settings["batch"], settings["cfg_scale"], order == "nar"
    labels = torch.arange(batch, device=device) % 101
    captured = "graph" if device.type == "cuda" else "compile:aot_eager"

    def ours(capture):
        return lambda: model.generate(labels, SamplingParams(cfg_scale=cfg), seeds=list(range(batch)), capture=capture)

    row = rec["row"] = {"forward_passes": model.num_decode_steps(), "captured_mode": captured}
    row["eager_s"], eager = time_sampler(ours("eager"), device, 1 if nar else 0, 3 if nar else 1)
    rec["row"] = row
    row["captured_first_call_s"], _ = clock(ours(captured), device)  # records (or compiles) every pass shape
    row["captured_s"], graph = time_sampler(ours(captured), device, 0, 3)
    row["tokens_equal_eager"] = bool(torch.equal(eager, graph))
    row["tokens_agree"] = (eager == graph).float().mean().item()
    row["target_s"] = None if "size" not in settings else TARGET_S[order]  # the targets are for the real sizes
    rec["row"] = row
    row["breakdown"] = pass_breakdown(model, ours("eager"), device)
    rec["row"] = row
    try:
        ref = load_reference(order, path, device, get_dtype(settings["dtype"]))
        row["reference_s"], _ = time_sampler(lambda: reference_generate(ref, labels, cfg), device, 1 if nar else 0,
                                             2 if nar else 1)
        row["reference_over_captured"] = row["reference_s"] / row["captured_s"]
        del ref
    except ReferenceMissing as e:
        row["reference_error"] = str(e)
    rec["row"] = row


def section_decode(args, rec, order):
    device = get_device(args.device)
    settings = decode_settings(args.tiny)
    rec["settings"] = settings
    bench_args = SimpleNamespace(**{"num_classes": 101, "size": None, "dim": 0, "layers": 0, "heads": 0, **settings})
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(device):  # random init straight on the device
            pair = dict(zip(("nar", "raster"), build_pair(bench_args)))
        path = os.path.join(tmp, order)
        pair[order].save_pretrained(path)
        del pair
        model = load_generator(path, device=device).to(get_dtype(settings["dtype"])).eval()  # cast once
        decode_row(order, model, path, settings, device, rec)


def section_decode_nar(args, rec):
    section_decode(args, rec, "nar")


def section_decode_raster(args, rec):
    section_decode(args, rec, "raster")


def section_attention(args, rec):
    """ms of one decode attention call, first and steady (median of 10), per backend and KV layout."""
    device = get_device(args.device)
    if device.type != "cuda":
        rec["skipped"] = "CUDA only"
        return
    b, h, hd, S = (4, 2, 16, 64) if args.tiny else (64, 16, 64, 1024)
    q = torch.randn(b, h, 1, hd, device=device, dtype=torch.bfloat16)
    k, v = torch.randn(2, b, h, S, hd, device=device, dtype=torch.bfloat16)
    for name in ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "default"):
        backends = list(SDPBackend.__members__.values()) if name == "default" else [getattr(SDPBackend, name)]
        for layout in ("slice64", "slice256", f"slice{S}", "masked"):
            n = int(layout[5:]) if layout.startswith("slice") else S
            mask = (torch.arange(S, device=device) < S // 2)[None] if layout == "masked" else None
            kk, vv = (k, v) if layout == "masked" else (k[:, :, :n], v[:, :, :n])
            call = lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)  # noqa: E731
            try:
                with sdpa_kernel(backends):
                    first, _ = clock(call, device)
                    steady = statistics.median(clock(call, device)[0] for _ in range(10))
                rec[f"{name}/{layout}"] = {"first_ms": 1000 * first, "steady_ms": 1000 * steady}
            except RuntimeError as e:  # backend not available for this shape / mask
                rec[f"{name}/{layout}"] = {"error": str(e).splitlines()[0][:120]}


def seed_models(tmp, tiny):
    """(tokenizer dir, generator dir) in the release format: the golden tiny pair, or random LARP-L + NAR-L."""
    from larp.models.tokenizer import LARPTokenizer
    if tiny:
        return os.path.join(GOLDEN, "tokenizer"), os.path.join(GOLDEN, "nar")
    with open(CONFIGS["L"]) as f:
        cfg = json.load(f)
    torch.manual_seed(0)
    LARPTokenizer(**cfg).save_pretrained(os.path.join(tmp, "tokenizer"))
    nar, _ = build_pair(SimpleNamespace(grid=[4, 16, 16], vocab=8192, num_classes=101, size="llama-abs-L"))
    nar.save_pretrained(os.path.join(tmp, "nar"))
    return os.path.join(tmp, "tokenizer"), os.path.join(tmp, "nar")


def section_seed(args, rec):
    # lazy: the sampling stack reads videos (av); the decoding sections must run without it
    from larp.core.errors import I3DError
    from larp.data.synthetic import make_synthetic_dataset
    from larp.metrics.detectors import check_i3d_spec
    from larp.sampling import run as sampling
    from larp.sampling.job import SampleJob
    device = get_device(args.device)
    tiny = args.tiny
    n, batch, T, frames, size, classes = (16, 8, 8, 16, 32, 4) if tiny else (1024, 64, 16, 64, 128, 8)
    i3d = "random:32" if tiny else args.i3d
    try:
        check_i3d_spec(i3d)
    except I3DError as e:  # e.g. the Kinetics-400 weights were not carried: time a random I3D, say so
        rec["i3d_error"], i3d = str(e), "random"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        per_class = math.ceil(n / (frames // T) / classes / 0.75) + 1  # 3/4 of the videos are the train split
        csv, _ = make_synthetic_dataset(os.path.join(tmp, "data"), classes=classes, videos_per_class=per_class,
                                        frames=frames, size=size, progress=False)
        with torch.device(device):
            tok, gen = seed_models(tmp, tiny)
        rec["setup_s"] = time.perf_counter() - t0
        job = SampleJob(ar_model=gen, tokenizer=tok, output_dir=os.path.join(tmp, "out"), dataset_csv=csv,
                        num_samples=n, params=SamplingParams(cfg_scale=1.25), dtype="fp32" if tiny else "bf16",
                        sample_batch_size=batch, num_workers=2 if tiny else 8, i3d=i3d, device=str(device))
        rec["settings"] = {"num_samples": n, "batch": batch, "cfg_scale": 1.25, "dtype": job.dtype, "i3d": i3d,
                           "clip": [T, size, size], "capture": job.capture}
        t0 = time.perf_counter()
        fvd = sampling.run(job)
        wall = time.perf_counter() - t0
        with open(os.path.join(job.output_dir, "timing.json")) as f:
            timing = json.load(f)
    rec["result"] = {"wall_s": wall, "fvd": fvd, "timing": timing,
                     "extrapolated_10000_s": wall * 10000 / n, "videos_per_s": n / wall}


def summary_table(sections):
    """The decoding summary: seconds per batch, eager and captured, tokens, targets, and the per-pass breakdown."""
    rows = [(o, sections.get(f"decode_{o}", {}).get("results", {})) for o in ("nar", "raster")]
    rows = [(o, r) for o, r in rows if r.get("row")]
    if not rows:
        return []
    st = rows[0][1]["settings"]
    unit = "kernels" if any("kernels_per_pass" in r["row"].get("breakdown", {}) for _, r in rows) else "aten ops"
    lines = ["", f"**Decoding** ({st.get('size') or 'tiny'}, random weights in the release format, grid "
             f"{'x'.join(map(str, st['grid']))}, batch {st['batch']}, {st['dtype']} weights, cfg {st['cfg_scale']}; "
             "seconds per batch):", "",
             f"| model | passes | eager s | captured s (first call) | tokens = eager | target s | reference s | "
             f"attention / MLP / rest ms per pass | {unit} per pass |", "|---|---|---|---|---|---|---|---|---|"]
    for order, r in rows:
        v = r["row"]
        b = v.get("breakdown", {})
        cap = f"{v['captured_s']:.3f} ({v['captured_first_call_s']:.1f})" if "captured_s" in v else "-"
        same = "-" if "tokens_equal_eager" not in v else ("yes" if v["tokens_equal_eager"] else
                                                          f"no ({100 * v['tokens_agree']:.2f} %)")
        met = "-" if v.get("target_s") is None or "captured_s" not in v else \
            f"{v['target_s']} ({'met' if v['captured_s'] <= v['target_s'] else 'missed'})"
        ref = f"{v['reference_s']:.3f}" if "reference_s" in v else "-"
        split = (f"{b['attention_ms']:.3f} / {b['mlp_ms']:.3f} / {b['rest_ms']:.3f}" if b else "-")
        count = b.get("kernels_per_pass", b.get("aten_ops_per_pass"))
        name = f"{order}-{'L' if st.get('size') else 'tiny'}"
        lines.append(f"| {name} | {v['forward_passes']} | {v['eager_s']:.3f} | {cap} | {same} | {met} | {ref} | "
                     f"{split} | {'-' if count is None else f'{count:.0f}'} |")
    return lines


def decode_markdown(sections):
    """The report lines of the decoding, attention and seed sections (none when they did not run)."""
    lines = summary_table(sections)
    probe = {k: v for k, v in sections.get("attention", {}).get("results", {}).items()
             if isinstance(v, dict) and "first_ms" in v}
    if probe:
        lines += ["", "SDPA decode attention, ms (first call / steady):", "",
                  "| backend / layout | first | steady |", "|---|---|---|"]
        lines += [f"| {k} | {v['first_ms']:.3f} | {v['steady_ms']:.3f} |" for k, v in probe.items()]
    r = sections.get("seed", {}).get("results", {})
    if r.get("result"):
        t, st = r["result"], r["settings"]
        tm = t["timing"]
        lines += ["", f"**Seed command** ({st['num_samples']} samples, batch {st['batch']}, {st['dtype']}, cfg "
                  f"{st['cfg_scale']}, I3D {st['i3d']}, capture {st['capture']}): {t['wall_s']:.1f} s wall "
                  f"({t['videos_per_s']:.1f} videos/s; generate {tm.get('generate_s', 0):.1f} s, decode "
                  f"{tm.get('decode_s', 0):.1f} s, I3D {tm.get('i3d_s', 0):.1f} s, mp4 wait "
                  f"{tm.get('write_wait_s', 0):.1f} s); 10,000 samples extrapolated: "
                  f"{t['extrapolated_10000_s'] / 60:.1f} min."]
        if r.get("i3d_error"):
            lines.append(f"The requested I3D could not be loaded ({r['i3d_error'][:120]}); a random I3D was timed.")
    return lines
