"""The decode sections of benchmarks/gpu_check.py (issue 22): not in its default list, run them with
    PYTHON=python3 bash benchmarks/gpu_check.sh --sections tests decode seed --out gpu_check_out   # ~7.5 min
(carry benchmarks/reference_code, and checkpoints/ for the Kinetics-400 I3D, to a device machine).

  decode 240 s  attention probe: one decode attention (batch 64, 16 heads, head dim 64, bf16) per SDPA backend, at
                KV lengths 64 / 256 / 1024 as slices (a new shape per length, as the old loop had at every step) and
                over the full 1024-slot cache with a mask (the fixed shape): first call and steady time.
                NAR-L and raster-L, random weights saved in the release format, 4x16x16, batch 32, bf16 autocast,
                cfg 1.25: our eager loop, our captured loop (CUDA graphs: first call = recording, then timed),
                the share of their tokens that agree (same seeds), and the reference samplers (LARP raster, NAR)
                on the same files, weights cast to bf16 as their sample.py does.
  seed   150 s  the seed command on 1,024 samples: sample.py's run() with a random LARP-L tokenizer and NAR-L
                generator (release format), synthetic 16x128x128 clips, batch 64, cfg 1.25, bf16, I3D (--i3d) and
                mp4 writing; wall time and its extrapolation to 10,000 samples.
Tiny sizes on a CPU (--tiny) run every step of both, in seconds, to show they work.
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

from larp.core.errors import I3DError
from larp.data.synthetic import make_synthetic_dataset
from larp.metrics.detectors import check_i3d_spec
from larp.models.generator import load_generator
from larp.models.sampling_params import SamplingParams
from larp.models.tokenizer import LARPTokenizer
from larp.sampling import run as sampling
from larp.sampling.job import SampleJob
from larp.core.utils import autocast, get_device
from bench_sampling import build_pair, sync
from bench_tokenizer import CONFIGS
from reference_samplers import ReferenceMissing, load_reference, reference_generate

EXTRA_BUDGET_S = {"decode": 240, "seed": 150}  # seconds per section (benchmarks/gpu_check.py)
EXTRA_TINY_BUDGET_S = {"decode": 120, "seed": 120}
GOLDEN = os.path.join(os.path.dirname(CONFIGS["tiny"]), "..")  # tests/fixtures/reference/golden/tiny


def clock(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def attention_probe(device, tiny):
    """ms of one decode attention call, first and steady (median of 10), per backend and KV layout."""
    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    b, h, hd, S = (4, 2, 16, 64) if tiny else (64, 16, 64, 1024)
    q = torch.randn(b, h, 1, hd, device=device, dtype=torch.bfloat16)
    k, v = torch.randn(2, b, h, S, hd, device=device, dtype=torch.bfloat16)
    out = {}
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
                out[f"{name}/{layout}"] = {"first_ms": 1000 * first, "steady_ms": 1000 * steady}
            except RuntimeError as e:  # backend not available for this shape / mask
                out[f"{name}/{layout}"] = {"error": str(e).splitlines()[0][:120]}
    return out


def time_sampler(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    runs = [clock(fn, device) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def decode_rows(order, model, path, settings, device, tiny):
    """Eager, captured and reference timings of one model; tokens agreement eager vs captured."""
    batch, cfg = settings["batch"], settings["cfg_scale"]
    labels = torch.arange(batch, device=device) % 101
    params = SamplingParams(cfg_scale=cfg)
    captured = "graph" if device.type == "cuda" else "compile:aot_eager"
    nar = order == "nar"

    def ours(capture):
        def call():
            with autocast(device, settings["dtype"]):
                return model.generate(labels, params, seeds=list(range(batch)), capture=capture)
        return call

    row = {"forward_passes": model.num_decode_steps()}
    row["eager_s"], eager = time_sampler(ours("eager"), device, 1 if nar else 0, 3 if nar or tiny else 1)
    row["captured_first_call_s"], _ = clock(ours(captured), device)  # records (or compiles) every pass shape
    row["captured_s"], graph = time_sampler(ours(captured), device, 0, 3 if nar or tiny else 2)
    row["tokens_agree"] = (eager == graph).float().mean().item()
    try:
        ref = load_reference(order, path, device, torch.bfloat16 if settings["dtype"] == "bf16" else None)
        row["reference_s"], _ = time_sampler(lambda: reference_generate(ref, labels, cfg), device, 1 if nar else 0,
                                             2 if nar else 1)
        row["reference_over_captured"] = row["reference_s"] / row["captured_s"]
        del ref
    except ReferenceMissing as e:
        row["reference_error"] = str(e)
    row["captured_mode"] = captured
    return row


def section_decode(args, rec):
    device = get_device(args.device)
    tiny = args.tiny
    if tiny:
        settings = dict(grid=[2, 4, 4], vocab=64, batch=4, dtype="fp32", cfg_scale=1.25, dim=64, layers=2, heads=4)
    else:
        settings = dict(grid=[4, 16, 16], vocab=8192, batch=32, dtype="bf16", cfg_scale=1.25, size="llama-abs-L")
    rec["settings"] = settings
    rec["attention_probe"] = attention_probe(device, tiny)
    bench_args = SimpleNamespace(**{"num_classes": 101, "size": None, "dim": 0, "layers": 0, "heads": 0, **settings})
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device(device):  # random init straight on the device
            pair = build_pair(bench_args)
        for order, model in zip(("nar", "raster"), pair):
            path = os.path.join(tmp, order)
            model.save_pretrained(path)
            ours = load_generator(path, device=device)
            rows[f"{order}-L"] = decode_rows(order, ours, path, settings, device, tiny)
            rec["rows"] = rows
            del ours
        del pair
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seed_models(tmp, tiny):
    """(tokenizer dir, generator dir) in the release format: the golden tiny pair, or random LARP-L + NAR-L."""
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


def decode_markdown(sections):
    """The report lines of the decode and seed sections (none when they did not run)."""
    lines = []
    r = sections.get("decode", {}).get("results", {})
    if r.get("rows"):
        st = r["settings"]
        lines += ["", f"**Decoding** (random weights, release format; grid {'x'.join(map(str, st['grid']))}, batch "
                  f"{st['batch']}, {st['dtype']}, cfg {st['cfg_scale']}; seconds per generate()):", "",
                  "| model | passes | eager | captured (first call) | captured | tokens agree | reference | "
                  "reference / captured |", "|---|---|---|---|---|---|---|---|"]
        for k, v in r["rows"].items():
            ref = (f"{v['reference_s']:.3f} | {v['reference_over_captured']:.1f}x" if "reference_s" in v
                   else f"- | {v.get('reference_error', '')[:60]}")
            lines.append(f"| {k} | {v['forward_passes']} | {v['eager_s']:.3f} | {v['captured_first_call_s']:.3f} | "
                         f"{v['captured_s']:.3f} | {100 * v['tokens_agree']:.2f} % | {ref} |")
        probe = {k: v for k, v in r.get("attention_probe", {}).items() if isinstance(v, dict) and "first_ms" in v}
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
