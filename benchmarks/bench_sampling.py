"""Sampling speed side by side, in one run and with the same weights: our eager decode loop, our captured loop, and
the public reference samplers (LARP's raster sampler, NAR's plane sampler).

    python benchmarks/bench_sampling.py                      # CPU default: dim 256, 4 layers, 4x16x16
    python benchmarks/bench_sampling.py --size llama-abs-L --batch 32 --cfg 1.25 --dtype bf16 --device cuda

NAR and raster generators get the same dims and share every tensor except the two extra NAR blocks and the NAR
heads (raster `norm/output` = NAR `norm_B/output_B`, its abs_pe = NAR abs_pe minus the last row). Each is saved in
the release format (config.json + model.safetensors) and loaded from there by our loader and by the reference
code, which is read from the git-ignored benchmarks/reference_code/ (see benchmarks/reference_samplers.py; without
it the reference rows are left out with a one-line note). Both run as sample.py runs: weights cast to --dtype once,
no autocast (the reference with its own KV cache and attention). "Captured" is --capture: CUDA graphs on CUDA (each
pass shape recorded once, then replayed); on a CPU it is off unless asked for (compile:aot_eager traces every pass
shape, which shows that the passes are capturable, not a speed-up). Greedy tokens (top_k 1) of ours and the
reference are compared to show that both run the same weights.

Where the eager time goes: one teacher-forced forward of the (CFG-doubled) batch is the arithmetic of a whole
generation in one pass, so overhead ~ generate time - teacher-forced time, per step = overhead / forward passes.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

from larp.models.generator import AR_MODELS, Generator, ModelArgs, load_generator
from larp.core.errors import run_cli
from larp.models.sampling_params import SamplingParams
from larp.core.utils import get_device, get_dtype
try:
    from reference_samplers import ReferenceMissing, load_reference, reference_generate
except ImportError:  # loaded by file path (tests/test_cached_decoding.py): benchmarks/ is not on sys.path
    from benchmarks.reference_samplers import ReferenceMissing, load_reference, reference_generate


def build_pair(args):
    """(nar, raster) generators with the same dims, the raster one sharing the NAR weights."""
    shape = tuple(args.grid)
    kw = dict(vocab_size=args.vocab, num_classes=args.num_classes, latent_shape=shape,
              max_seq_len=shape[0] * shape[1] * shape[2], token_dropout_p=0.0, resid_dropout_p=0.0,
              ffn_dropout_p=0.0)
    if args.size:
        margs = AR_MODELS[args.size](**kw)
    else:
        margs = ModelArgs(dim=args.dim, n_layer=args.layers, n_head=args.heads, **kw)
    torch.manual_seed(0)
    nar = Generator(margs, order="nar")
    for name, p in nar.named_parameters():  # non-zero heads so sampling is not uniform
        if name.startswith("output"):
            torch.nn.init.normal_(p, std=margs.initializer_range)
    raster = Generator(margs, order="raster")
    sd = {k: v for k, v in nar.state_dict().items() if k in raster.state_dict()}
    sd["norm.weight"], sd["output.weight"] = nar.norm_B.weight, nar.output_B.weight
    sd["abs_pe"] = nar.abs_pe[:, :raster.abs_pe.shape[1]]
    raster.load_state_dict(sd, strict=True)
    return nar, raster


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Median (wall seconds, process CPU seconds) over `repeats` calls; CPU time is the steadier figure on
    a shared machine (it excludes time spent waiting for other processes)."""
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench_model(model, args, device):
    """Median seconds of generate() eager and captured, of one teacher-forced forward of the same (doubled) batch,
    and the share of tokens on which the two loops agree (same seeds)."""
    labels = torch.arange(args.batch, device=device) % args.num_classes
    seeds = list(range(args.batch))
    params = SamplingParams(cfg_scale=args.cfg_scale, temperature=1.0, top_k=args.top_k)

    def gen(capture):
        def call():
            return model.generate(labels, params, seeds=seeds, capture=capture)
        return call

    nb = args.batch * (2 if args.cfg_scale != 1.0 else 1)
    tokens = torch.randint(0, args.vocab, (nb, model.num_tokens), device=device)
    tf_labels = torch.arange(nb, device=device) % args.num_classes

    @torch.no_grad()
    def forward():
        model(tokens, tf_labels)

    out, captured = {}, captured_mode(args, device)
    runs = [("gen", gen("eager")), ("tf", forward)] + ([("captured", gen(captured))] if captured else [])
    for key, fn in runs:
        for _ in range(args.warmup + (key == "captured")):  # the first captured call records (or compiles)
            fn()
        out[f"{key}_s"], out[f"{key}_cpu_s"] = timed(fn, device, args.repeats)
    if captured:
        out["agree"] = (gen("eager")() == gen(captured)()).float().mean().item()
    return out


def captured_mode(args, device):
    """--capture, or CUDA graphs on CUDA; None (no captured row) on a CPU unless asked for."""
    return args.capture or ("graph" if device.type == "cuda" else None)


def bench_reference(order, path, args, device, ours):
    """Median seconds of the reference sampler on the saved weights, and its greedy agreement with ours."""
    dtype = get_dtype(args.dtype)
    try:
        ref = load_reference(order, path, device, dtype)
    except ReferenceMissing as e:
        return {"error": str(e)}
    labels = torch.arange(args.batch, device=device) % args.num_classes
    for _ in range(args.warmup):
        reference_generate(ref, labels, args.cfg_scale, args.top_k)
    seconds, cpu = timed(lambda: reference_generate(ref, labels, args.cfg_scale, args.top_k), device, args.repeats)
    mine = ours.generate(labels, SamplingParams(cfg_scale=args.cfg_scale, top_k=1), capture="eager")
    theirs = reference_generate(ref, labels, args.cfg_scale, top_k=1)
    return {"gen_s": seconds, "gen_cpu_s": cpu, "greedy_agree": (mine == theirs.to(mine.device)).float().mean().item()}


def load_ours(model, path, args, device):
    """Our generator loaded from the release-format folder, as the benchmark runs it."""
    model.save_pretrained(path)
    return load_generator(path, device=device).to(get_dtype(args.dtype)).eval()  # cast once, as sample.py


def run(args):
    """Benchmark both orders: ours eager and captured, and the references; returns a dict of results."""
    device = get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in zip(("nar", "raster"), build_pair(args)):
            path = os.path.join(tmp, name)
            ours = load_ours(model, path, args, device)
            r = bench_model(ours, args, device)
            r["steps"] = ours.num_decode_steps()
            r["videos_per_s"] = args.batch / r["gen_s"]
            r["overhead_per_step_ms"] = 1000 * (r["gen_s"] - r["tf_s"]) / r["steps"]  # < 0: cheaper than the TF pass
            r["reference"] = bench_reference(name, path, args, device, ours) if args.reference else {"error": "off"}
            res[name] = r
    res["speedup"] = res["raster"]["gen_s"] / res["nar"]["gen_s"]
    res["speedup_cpu"] = res["raster"]["gen_cpu_s"] / res["nar"]["gen_cpu_s"]
    res["captured_mode"] = captured_mode(args, device) or "off"
    return res


def main(args):
    res = run(args)
    print(f"torch {torch.__version__}, device {args.device or 'auto'}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}, batch {args.batch}, cfg {args.cfg_scale}, grid {'x'.join(map(str, args.grid))}, "
          f"model {args.size or f'dim{args.dim}-L{args.layers}-H{args.heads}'}, vocab {args.vocab}, "
          f"captured = {res['captured_mode']}")
    print(f"{'sampler':22s} {'passes':>6s} {'seconds':>9s} {'(cpu s)':>8s} {'videos/s':>9s} {'x eager':>9s}")
    for name, ref_name in (("raster", "LARP"), ("nar", "NAR")):
        r = res[name]
        rows = [(f"{name} ours eager", r["gen_s"], r["gen_cpu_s"])]
        if "captured_s" in r:
            rows.append((f"{name} ours captured", r["captured_s"], r["captured_cpu_s"]))
        if "gen_s" in r["reference"]:
            rows.append((f"{name} reference {ref_name}", r["reference"]["gen_s"], r["reference"]["gen_cpu_s"]))
        for label, sec, cpu in rows:
            print(f"{label:22s} {r['steps']:6d} {sec:9.3f} {cpu:8.3f} {args.batch / sec:9.2f} "
                  f"{sec / r['gen_s']:9.2f}")
        note = (f"greedy tokens = reference on {100 * r['reference']['greedy_agree']:.1f} %"
                if "gen_s" in r["reference"] else r["reference"]["error"])
        agree = f"captured tokens = eager on {100 * r['agree']:.2f} %; " if "agree" in r else ""
        print(f"  {name}: {agree}TF fwd {r['tf_s']:.3f} s, eager overhead {r['overhead_per_step_ms']:.3f} ms/step; "
              f"{note}")
    print(f"speedup nar vs raster (ours eager): {res['speedup']:.2f}x wall, {res['speedup_cpu']:.2f}x process CPU time")
    for name in ("nar", "raster"):
        if "gen_s" in res[name]["reference"]:
            ref = res[name]["reference"]
            print(f"{name}: ours eager vs the reference: {ref['gen_s'] / res[name]['gen_s']:.2f}x wall, "
                  f"{ref['gen_cpu_s'] / res[name]['gen_cpu_s']:.2f}x process CPU time")
    return res


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(AR_MODELS), default=None, help="size name (overrides dim/layers/heads)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid", type=int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"))
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--num-classes", type=int, default=101)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cfg_scale", "--cfg", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu / cuda / cuda:1 (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--capture", default=None, help="our captured loop (default: graph on CUDA, none on a CPU; "
                   "e.g. compile:aot_eager)")
    p.add_argument("--no_reference", dest="reference", action="store_false", help="skip the reference samplers")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
