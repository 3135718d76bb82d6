"""Encode / decode throughput of the LARP tokenizer (random weights; speed does not depend on their values).

    python benchmarks/bench_tokenizer.py                       # tiny (golden) and L-long configs on the CPU
    python benchmarks/bench_tokenizer.py --configs L --device cuda --dtype bf16 --batch_size 8

Prints one line per (config, stage): clips/s and ms per clip, plus one training-step line (forward with the
prior + backward) per config.
"""
import argparse
import json
import os
import time

import torch

from larp.models.tokenizer import LARPTokenizer
from larp.core.errors import run_cli
from larp.core.utils import autocast, get_device, get_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCE = os.path.join(ROOT, "tests", "fixtures", "reference")  # golden tiny model + released config
CONFIGS = {
    "tiny": os.path.join(REFERENCE, "golden", "tiny", "tokenizer", "config.json"),
    "L": os.path.join(REFERENCE, "tokenizer_larp_L_long.config.json"),
}


def timed(fn, device, repeats):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def bench(name, cfg, device, dtype, batch_size, repeats, train_step=True):
    """Prints the throughput lines; returns them as a dict (clips/s)."""
    torch.manual_seed(0)
    model = LARPTokenizer(**cfg).to(device).eval().set_vq_eval_deterministic(True)
    x = torch.rand(batch_size, model.in_channels, model.frame_num, model.input_size, model.input_size, device=device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    with torch.no_grad(), autocast(device, dtype):
        enc = model.encode(x)
        t_enc = timed(lambda: model.encode(x), device, repeats)
        t_dec = timed(lambda: model.decode_from_bottleneck(enc["bottleneck_rep"]), device, repeats)
    result = {"params_M": n_params, "batch": batch_size, "encode_clips_per_s": batch_size / t_enc,
              "decode_clips_per_s": batch_size / t_dec}
    for stage, t in (("encode", t_enc), ("decode", t_dec)):
        print(f"{name:5s} {stage:6s} batch {batch_size}: {batch_size / t:8.2f} clips/s  {1000 * t / batch_size:9.1f} "
              f"ms/clip  ({n_params:.1f} M params, {device.type}, {dtype})", flush=True)
    if train_step:
        model.train()

        def step():
            with autocast(device, dtype):
                out = model(x, global_step=1, max_steps=10)
                loss = (out["reconstruction"].float() - x).abs().mean() + out["loss_vq"] + 0.03 * out["loss_prior"]
            loss.backward()
            model.zero_grad(set_to_none=True)

        t = timed(step, device, repeats)
        print(f"{name:5s} train  batch {batch_size}: {batch_size / t:8.2f} clips/s  {1000 * t / batch_size:9.1f} "
              f"ms/clip  (forward{' with prior' if model.prior_cfg else ''} + backward)", flush=True)
        result["train_clips_per_s"] = batch_size / t
    return result


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    dtype = get_dtype(args.dtype)
    for name in args.configs:
        with open(CONFIGS[name]) as f:
            cfg = json.load(f)
        bs = args.batch_size or (8 if name == "tiny" else 1)
        bench(name, cfg, device, dtype, bs, args.repeats, train_step=not args.no_train)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "L"], choices=sorted(CONFIGS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch_size", type=int, default=0, help="default: 8 for tiny, 1 for L")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--no_train", action="store_true", help="skip the training-step timing")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, get_args())
