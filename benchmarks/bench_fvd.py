"""FVD feature throughput: clips/s of our InceptionI3d (input resized to 224, the cost of a real FVD run) and of
the `random:64` smoke detector, on batches of 16-frame 128x128 clips.

    python benchmarks/bench_fvd.py [--device cpu] [--threads 1] [--batch_size 4] [--repeats 1]

Prints a markdown section for BENCHMARKS.md. The StyleGAN-V torchscript has the same architecture, so its cost
at 224 should be close to the first row (not measured here: the file is not available offline).
"""
import argparse
import os
import platform
import subprocess
import time

import torch

from larp.errors import run_cli
from larp.fvd import load_i3d
from larp.utils import get_device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clips_per_second(spec, device, batch_size, frames, size, repeats):
    """One warm-up batch (kernel selection / weight packing), then the mean over `repeats` timed batches."""
    det = load_i3d(spec, device, batch_size=batch_size, verbose=False)
    videos = torch.rand(batch_size, 3, frames, size, size, generator=torch.Generator().manual_seed(0))  # (B,3,T,H,W)
    det(videos)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        det(videos)
    sync(device)
    seconds = (time.perf_counter() - t0) / repeats
    return batch_size / seconds, seconds


def machine_line(device):
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} thread(s); " \
           f"shared machine, `uptime` at start: {load}"


def main(args):
    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    machine = machine_line(device)
    rows = []
    for spec, label in (("random", "our I3D, input resized to 224 (real FVD cost)"),
                        ("random:64", "random:64 smoke detector")):
        cps, sec = clips_per_second(spec, device, args.batch_size, args.frames, args.size, args.repeats)
        rows.append(f"| {label} | {args.batch_size} | {sec:.2f} | {cps:.2f} |")
        print(rows[-1], flush=True)
    print()
    print("## FVD feature throughput\n")
    print(f"`python benchmarks/bench_fvd.py --device {device.type} --threads {args.threads} --batch_size "
          f"{args.batch_size} --repeats {args.repeats}`: batches of {args.frames}-frame {args.size}x{args.size} "
          f"clips in [0, 1] through `larp.fvd` detectors. Machine: {machine}.\n")
    print("| detector | batch | s / batch | clips / s |\n|---|---|---|---|")
    print("\n".join(rows))
    return rows


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    return p.parse_args(argv)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main, get_args())
