"""Sampling speed: NAR vs raster on the same dims and shared weights, measured side by side.

    python benchmarks/bench_sampling.py                      # CPU default: dim 256, 4 layers, 4x16x16
    python benchmarks/bench_sampling.py --size llama-abs-L --batch 32 --dtype bf16 --device cuda

The raster model shares every tensor with the NAR model except the two extra NAR blocks and the NAR
heads (raster `norm/output` = NAR `norm_B/output_B`, its abs_pe = NAR abs_pe minus the last row).
Besides the generate() timings it reports where the time goes: one teacher-forced forward of the
(CFG-doubled) batch is the arithmetic of a whole generation in one pass, so
    overhead ~ generate time - teacher-forced time,   per-step overhead = overhead / forward passes.
It can be negative for NAR: cached decoding attends only to the filled prefix, while the teacher-forced
pass evaluates the full masked attention matrix.
"""
import argparse
import statistics
import time

import torch

from larp.models.generator import AR_MODELS, Generator, ModelArgs
from larp.core.errors import run_cli
from larp.models.sampling_params import SamplingParams
from larp.core.utils import autocast, get_device, get_dtype


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
    """Median seconds of generate() and of one teacher-forced forward of the same (doubled) batch."""
    labels = torch.arange(args.batch, device=device) % args.num_classes
    seeds = list(range(args.batch))
    ctx = autocast(device, args.dtype)

    def gen():
        with ctx:
            model.generate(labels, SamplingParams(cfg_scale=args.cfg_scale, temperature=1.0, top_k=args.top_k),
                           seeds=seeds)

    nb = args.batch * (2 if args.cfg_scale != 1.0 else 1)
    tokens = torch.randint(0, args.vocab, (nb, model.num_tokens), device=device)
    tf_labels = torch.arange(nb, device=device) % args.num_classes

    @torch.no_grad()
    def forward():
        with ctx:
            model(tokens, tf_labels)

    for _ in range(args.warmup):
        gen()
        forward()
    (gen_s, gen_cpu), (tf_s, tf_cpu) = timed(gen, device, args.repeats), timed(forward, device, args.repeats)
    return {"gen_s": gen_s, "gen_cpu_s": gen_cpu, "tf_s": tf_s, "tf_cpu_s": tf_cpu}


def run(args):
    """Benchmark both orders; returns a dict of results (printed by main)."""
    device = get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    nar, raster = build_pair(args)
    dtype = get_dtype(args.dtype)
    if device.type == "cuda" or dtype == torch.float32:
        nar, raster = nar.to(device), raster.to(device)
    else:  # CPU half precision: store the weights in that dtype instead of autocasting
        nar, raster = nar.to(device, dtype), raster.to(device, dtype)
    nar.eval()
    raster.eval()
    res = {}
    for name, model in (("raster", raster), ("nar", nar)):
        r = bench_model(model, args, device)
        r["steps"] = model.num_decode_steps()
        r["videos_per_s"] = args.batch / r["gen_s"]
        r["overhead_per_step_ms"] = 1000 * (r["gen_s"] - r["tf_s"]) / r["steps"]  # < 0: cheaper than the TF pass
        res[name] = r
    res["speedup"] = res["raster"]["gen_s"] / res["nar"]["gen_s"]
    res["speedup_cpu"] = res["raster"]["gen_cpu_s"] / res["nar"]["gen_cpu_s"]
    return res


def main(args):
    res = run(args)
    print(f"torch {torch.__version__}, device {args.device or 'auto'}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}, batch {args.batch}, cfg {args.cfg_scale}, grid {'x'.join(map(str, args.grid))}, "
          f"model {args.size or f'dim{args.dim}-L{args.layers}-H{args.heads}'}, vocab {args.vocab}")
    print(f"{'order':8s} {'passes':>6s} {'generate s':>10s} {'(cpu s)':>8s} {'videos/s':>9s} {'TF fwd s':>9s} "
          f"{'(cpu s)':>8s} {'ovh/step ms':>11s}")
    for name in ("raster", "nar"):
        r = res[name]
        print(f"{name:8s} {r['steps']:6d} {r['gen_s']:10.3f} {r['gen_cpu_s']:8.3f} {r['videos_per_s']:9.2f} "
              f"{r['tf_s']:9.3f} {r['tf_cpu_s']:8.3f} {r['overhead_per_step_ms']:11.3f}")
    print(f"speedup nar vs raster: {res['speedup']:.2f}x wall, {res['speedup_cpu']:.2f}x process CPU time")
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
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
