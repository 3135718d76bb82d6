"""Training step time of each stage: the stage's full optimizer step (forward, backward, clipping, AdamW; the
tokenizer's discriminator update too when its GAN is on) on random inputs, so data loading is not included.

    python benchmarks/bench_train.py --threads 1                                  # the quickstart configs on CPU
    python benchmarks/bench_train.py --configs larp_ar larp_tokenizer --device cuda --batch_size 8

Prints a markdown table (one row per config) for the "Training step time" section of BENCHMARKS.md.
"""
import argparse
import math
import os
import statistics
import time
from types import SimpleNamespace

import torch

from larp.training.ar_stage import ARStage, build_ar_model
from larp.training.config_build import build_config
from larp.core.errors import run_cli
from larp.training.tokenizer_stage import TokenizerStage
from larp.core.utils import get_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# codebook size of the tokenizer each AR config is trained on: cfgs/quickstart_tokenizer.yaml's / LARP-L-long's
VOCAB = {"quickstart": 4096, "larp": 8192}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_stepper(cfg, device, batch):
    """(step(i) -> logs, params in M) for the stage of `cfg`, built without a dataset, with random inputs of its
    clip / token shape."""
    if cfg.stage == "tokenizer":
        cfg.loss.update(perceptual_weight=0.0, disc_start_step=0)  # LPIPS needs VGG weights
        stage = TokenizerStage(cfg, device)
        stage.model.train()
        d = cfg.data
        batch_data = {"video": torch.rand(batch, 3, d.frame_num, d.input_size, d.input_size, device=device)}
        extra = "+ D" if stage.disc_optimizer is not None else ""
    else:
        m = cfg.model
        n = math.prod(m.latent_shape)
        vocab = VOCAB["quickstart" if n <= 64 else "larp"]
        model = build_ar_model(m, SimpleNamespace(bottleneck_token_num=n, codebook_size=vocab)).to(device)
        stage = ARStage(cfg, model.train(), None, device)
        if cfg.train.compile:
            stage.wrapped = torch.compile(model)
        batch_data = {"tokens": torch.randint(vocab, (batch, n), device=device)}
        if m.frame_prediction:
            batch_data["cond"] = torch.randint(vocab, (batch, n), device=device)
        else:
            batch_data["label"] = torch.randint(m.num_classes, (batch,), device=device)
        extra = ""

    def step(i):
        return stage.step(batch_data, i, 1000)
    params = sum(p.numel() for p in stage.model.parameters()) / 1e6
    return step, params, extra


def bench(cfg, device, batch, steps, warmup):
    step, params, extra = make_stepper(cfg, device, batch)
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        sync(device)
        t = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), params, extra


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    rows = []
    for name in args.configs:
        opts = ["train.amp", args.amp] if args.amp else []
        if args.compile:
            opts += ["train.compile", "true"]
        cfg = build_config(os.path.join(ROOT, "cfgs", name + ".yaml"), opts=opts)
        batch = args.batch_size or cfg.batch_size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        med, best, params, extra = bench(cfg, device, batch, args.steps, args.warmup)
        mem = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f}" if device.type == "cuda" else "-"
        what = cfg.model.order if cfg.stage == "ar" else "tokenizer" + (f" {extra}" if extra else "")
        rows.append(f"| {name} | {what} | {params:.2f} | {batch} | {cfg.train.amp} | {1000 * med:.0f} | "
                    f"{1000 * best:.0f} | {batch / med:.1f} | {mem} |")
        print(rows[-1], flush=True)
    print("\n| config | model | M params | batch | amp | median ms/step | best ms/step | clips/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["quickstart_tokenizer", "quickstart_nar", "quickstart_raster"],
                   help="names of cfgs/*.yaml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's global batch")
    p.add_argument("--amp", default=None, choices=["fp32", "bf16", "fp16"], help="default: the config's train.amp")
    p.add_argument("--compile", action="store_true", help="AR: torch.compile the generator")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy machine)")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
