"""Tokens of synthetic clips from our tokenizer beside the reference tokenizer's, same weights, same precision.

Both sides load one reference-format folder (config.json + model.safetensors) and encode the same clips (the
project's synthetic clips, float (B, 3, T, H, W) in [0, 1], which is also what the reference's video dataset feeds
its VAE: frames / 255, resized and cropped, not normalised). Ours: `LARPTokenizer.from_pretrained`, encoded under
`larp.core.utils.autocast` as the AR stage's `tokens()` does. The reference's: its LARPTokenizer, read from the clone
in benchmarks/reference_code (see reference_samplers.py), loaded as its AR trainer loads the VAE (`from_pretrained`,
`eval()`, `set_vq_eval_deterministic(True)`) and encoded under `torch.autocast`. Prints, per precision, the tokens
that agree and the largest difference of the pre-quantisation latents (the bottleneck's `in_linear` output);
exits 1 when any token differs.

On the CPU the reference's quantiser scores the codes in bf16 under a bf16 autocast (its autocast-off decorator
names only CUDA), ours in fp32, so near ties of a large codebook can split there; on CUDA both score in fp32. The
L-size example takes about a minute per precision on two CPU cores.

The reference tokenizer imports `easydict`, which this project does not use; install it outside the project:

    pip install --target /tmp/refdeps easydict

    python benchmarks/compare_tokenizer_encode.py                         # golden tiny tokenizer, bf16, CPU
    python benchmarks/compare_tokenizer_encode.py --dtype bf16 fp32 --device cuda
    python benchmarks/compare_tokenizer_encode.py --config tests/fixtures/reference/tokenizer_larp_L_long.config.json \\
        --random_init --num_clips 2
"""
import argparse
import functools
import importlib
import json
import os
import sys
import tempfile
import types

import numpy as np
import torch
import torch.nn.functional as F

from larp.core.errors import UsageError, run_cli
from larp.core.utils import autocast, get_device, get_dtype
from larp.data.dataset import transform_frames
from larp.data.synthetic import render_video
from larp.models.tokenizer import LARPTokenizer
from reference_samplers import import_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "reference", "golden", "tiny", "tokenizer")


def reference_tokenizer_class(refdeps):
    """The reference's LARPTokenizer class. Its `models` package is set up as for the samplers; its `utils`
    package (FVD / FID tools, used only by the prior's accuracy metric) is replaced by an empty module."""
    if os.path.isdir(refdeps):
        sys.path.append(refdeps)
    try:
        importlib.import_module("easydict")
    except ImportError:
        raise UsageError(f"the reference tokenizer needs easydict: pip install --target {refdeps} easydict") from None
    import_reference("raster")
    sys.modules["utils"] = types.ModuleType("utils")
    for name in ("transformer", "bottleneck", "gptc"):  # the registry entries the tokenizer's constructor makes
        importlib.import_module(f"models.{name}")
    return importlib.import_module("models.larp_tokenizer").LARPTokenizer


def synthetic_clips(num, frames, size, seed):
    """(num, 3, T, S, S) float in [0, 1]: synthetic clips of labels 0..7 in turn, one seeded generator each."""
    clips = [render_video(i % 8, 8, frames, size, np.random.default_rng([seed, i])) for i in range(num)]
    return torch.stack([transform_frames(c, size) for c in clips])


def encode(model, clips, context, batch_size):
    """(tokens (B, N), pre-quantisation latents (B, N, d) in fp32) of `clips` encoded under `context()`."""
    latents = []
    hook = model.bottleneck.in_linear.register_forward_hook(lambda m, i, out: latents.append(out.float()))
    tokens = []
    try:
        with torch.no_grad():
            for chunk in clips.split(batch_size):
                with context():
                    out = model.encode(chunk)
                tokens.append(out["bottleneck_rep"])
    finally:
        hook.remove()
    return torch.cat(tokens), torch.cat(latents)


def compare(directory, clips, device, dtype_name, batch_size, reference_cls):
    """One line of agreement between the two tokenizers of `directory` at precision `dtype_name`; True if equal."""
    dtype = get_dtype(dtype_name)
    ours = LARPTokenizer.from_pretrained(directory, map_location=device).eval().set_vq_eval_deterministic(True)
    ref = reference_cls.from_pretrained(directory, strict=True).to(device).eval()
    ref.set_vq_eval_deterministic(True)
    clips = clips.to(device)
    ref_context = functools.partial(torch.autocast, device_type=device.type, dtype=dtype,
                                    enabled=dtype != torch.float32)  # the trainer's, with use_amp = not fp32
    a, za = encode(ours, clips, functools.partial(autocast, device, dtype), batch_size)
    b, zb = encode(ref, clips, ref_context, batch_size)
    same = int((a == b).sum())
    print(f"{dtype_name:>5}: {a.shape[0]} clips x {a.shape[1]} tokens, tokens equal {same}/{a.numel()}, "
          f"max |pre-quantisation latent difference| {(za - zb).abs().max().item():.3g}")
    if same < a.numel():
        print(f"       differing codes: fp32 score of ours minus theirs at most {score_gap(ours, za, a, b):.3g}")
    return same == a.numel()


def score_gap(model, latents, a, b):
    """The largest fp32 matching-score margin of code `a` over code `b` where they differ: near zero means the
    two sides split a near tie."""
    vq = model.bottleneck.regularizer
    z = latents[a != b]  # (K, d)
    scores = vq.similarity(F.normalize(z, dim=-1) if vq.cfg.l2_normalized else z)  # (K, V)
    return (scores.gather(-1, a[a != b, None]) - scores.gather(-1, b[a != b, None])).max().item()


def main(args):
    device = get_device(args.device)
    needed = [args.config] if args.random_init else [os.path.join(args.tokenizer, n)
                                                     for n in ("config.json", "model.safetensors")]
    for path in needed:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    reference_cls = reference_tokenizer_class(args.refdeps)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.tokenizer
        if args.random_init:
            torch.manual_seed(args.seed)
            with open(args.config) as f:
                LARPTokenizer(**json.load(f)).save_pretrained(tmp)
            directory = tmp
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        clips = synthetic_clips(args.num_clips, config["frame_num"], config["input_size"], args.seed)
        print(f"{args.config if args.random_init else directory} on {device}")
        equal = [compare(directory, clips, device, d, args.batch_size, reference_cls) for d in args.dtype]
    return 0 if all(equal) else 1


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=TINY, help="reference-format folder (default: the golden tiny tokenizer)")
    p.add_argument("--config", help="with --random_init: a tokenizer config.json to build with random weights")
    p.add_argument("--random_init", action="store_true", help="compare a random-init tokenizer of --config")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp32"], help="encode precisions")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_clips", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the clips and of --random_init weights")
    p.add_argument("--refdeps", default="/tmp/refdeps", help="folder of the reference's extra packages (easydict)")
    args = p.parse_args(argv)
    if args.random_init != bool(args.config):
        p.error("--config and --random_init go together")
    return args


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args()))
