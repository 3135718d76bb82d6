"""Screen quickstart-tokenizer recipes: train each variant of cfgs/quickstart_tokenizer.yaml for a few hundred
steps on the synthetic set and print validation PSNR against the per-clip mean-colour baseline (the PSNR of
predicting every pixel of a clip as that clip's mean colour, which a tokenizer that learned nothing reaches).

    python tools/screen_quickstart_tokenizer.py --steps 1000 \
        --variant base: \
        --variant local:model.local_query_attention=true,model.input_centering=true,loss.l2_weight=1

A variant is `name:key=value,...`; keys are dotted paths into the YAML (model.*, loss.*, optimizer.args.lr,
batch_size, lr_schedule.*); values are parsed as YAML. Data: quickstart/data (made if missing). Clips are
preloaded (every non-overlapping 8-frame window), so the numbers measure optimisation, not video decoding. Each
step is `TokenizerStage.step`, the training step itself (with the discriminator update when a variant turns the
GAN on).
"""
import argparse
import copy
import dataclasses
import os
import time

import torch
import yaml

from larp.training.config_build import from_dict
from larp.data.dataset import VideoDataset
from larp.data.synthetic import make_synthetic_dataset
from larp.core.errors import run_cli
from larp.metrics.image import mean_colour_psnr, psnr
from larp.training.optim import lr_at
from larp.training.tokenizer_stage import TokenizerStage


def load_clips(csv, cfg, limit=None):
    ds = VideoDataset(csv, frame_num=cfg["data"]["frame_num"], input_size=cfg["data"]["input_size"], train=False)
    idx = range(len(ds)) if limit is None else torch.linspace(0, len(ds) - 1, limit).round().long().tolist()
    return torch.stack([ds[i]["video"] for i in idx])  # (B, 3, T, S, S) in [0, 1]


@torch.no_grad()
def val_psnr(model, videos):
    model.eval().set_vq_eval_deterministic(True)
    enc = model.encode(videos)
    rec = model.decode(enc["encoded"]).clamp(0, 1)
    model.train()
    return float(psnr(rec, videos).mean()), torch.unique(enc["bottleneck_rep"]).numel()


def run_variant(name, overrides, base, train, val, steps, device, eval_every, seed):
    cfg = copy.deepcopy(base)
    for k, v in overrides.items():  # new model/loss kwargs are allowed here, so no larp.training.config.set_dotted
        *path, last = k.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[last] = v
    cfg = from_dict(cfg, where=name)
    cfg.train.amp = "fp32"
    torch.manual_seed(seed)
    stage = TokenizerStage(cfg, device)
    g = torch.Generator().manual_seed(seed)
    bs, lr, schedule = cfg.batch_size, cfg.optimizer.args["lr"], dataclasses.asdict(cfg.lr_schedule)
    t0, curve = time.perf_counter(), []
    for step in range(steps):
        stage.set_lr(lr_at(step, lr, steps, **schedule))
        x = train[torch.randint(len(train), (bs,), generator=g)].to(device)
        logs = stage.step({"video": x}, step, steps)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            p, used = val_psnr(stage.model, val)
            curve.append((step + 1, p))
            print(f"{name:>16} step {step + 1:5d}  val PSNR {p:6.2f} dB  codes used {used:4d}  "
                  f"l1 {logs['l1']:.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    return curve


def main(args):
    base = yaml.safe_load(open(args.cfg))
    data = args.data
    if not os.path.exists(os.path.join(data, "val.csv")):
        make_synthetic_dataset(data, progress=False)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    train = load_clips(os.path.join(data, "train.csv"), base).to(device)
    val = load_clips(os.path.join(data, "val.csv"), base, limit=args.val_clips).to(device)
    base_psnr = float(mean_colour_psnr(val).mean())
    print(f"device {device}, torch {torch.__version__}, {len(train)} train clips, {len(val)} val clips; "
          f"per-clip mean-colour baseline {base_psnr:.2f} dB", flush=True)
    results = {}
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        overrides = {}
        for kv in filter(None, rest.split(",")):
            k, _, v = kv.partition("=")
            overrides[k] = yaml.safe_load(v)
        results[name] = run_variant(name, overrides, base, train, val, args.steps, device, args.eval_every, args.seed)
    print(f"\nsummary (baseline {base_psnr:.2f} dB): " + "  ".join(
        f"{n}: {c[-1][1]:.2f} dB (best {max(p for _, p in c):.2f})" for n, c in results.items()))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="cfgs/quickstart_tokenizer.yaml")
    p.add_argument("--data", default="quickstart/data")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-clips", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--variant", action="append", required=True)
    run_cli(main, p.parse_args())
