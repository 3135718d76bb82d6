"""The GPU check: one command on a bare GPU machine, within 8 minutes; writes <out>/gpu_check.json and
<out>/gpu_check.md and prints the decoding summary.

    bash benchmarks/gpu_check.sh --prepare                     # on a machine with a package index: fetch .whl/
    bash benchmarks/gpu_check.sh                               # on the GPU machine (--out defaults to $OUT)
    bash benchmarks/gpu_check.sh --device cpu --tiny           # tiny CPU run of every section
    bash benchmarks/gpu_check.sh --sections decode_nar seed    # chosen sections

Sections, in this order, each in its own process with its own time budget (seconds, GPU sizes; 455 s in all). A
section writes its results as it measures them, so a crash or a timeout loses only what was still to come:
  tests          60  pytest tests/test_cuda.py tests/test_generator.py tests/test_cached_decoding.py (the CUDA paths
                     against the golden cases and the CPU)
  decode_nar     70  NAR-L and raster-L decoding, batch 32, cfg 1.25, bf16 weights: eager and captured seconds,
  decode_raster 150  tokens, the reference samplers, and the per-pass breakdown (benchmarks/gpu_decode.py)
  attention      20  SDPA decode attention per backend and cache length
  train_fsdp     50  20 training steps of NAR-L, batch 8, bf16, random tokens, torchrun --nproc_per_node 1, FSDP2
  train_ddp      50  the same with DDP: median step time and peak memory of both
  tokenizer      30  LARP-L-long encode / decode clips/s, batch 8, bf16 (benchmarks/bench_tokenizer.py)
  i3d            25  I3D features clips/s, batch 16 of 16x128x128 clips (--i3d, default kinetics400; if that detector
                     cannot be loaded the error is recorded and a random I3D, labelled as such, is timed instead)
  seed          150  (not in the default list) the seed command on 1,024 samples, see benchmarks/gpu_decode.py
The exit status is 0 when every section passed. The driver imports only torch and the standard library; each
section imports what it needs, so a missing package fails that section alone. gpu_check.sh installs the packages
a bare GPU image lacks (benchmarks/gpu_check_wheels.txt) from the .whl/ folder that --prepare fills.
"""
import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from larp.core.io import atomic_write_text
from larp.core.utils import get_device
from bench_sampling import sync
from gpu_decode import (EXTRA_BUDGET_S, EXTRA_TINY_BUDGET_S, decode_markdown, section_attention,  # noqa: F401
                        section_decode_nar, section_decode_raster, section_seed, summary_table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ("tests", "decode_nar", "decode_raster", "attention", "train_fsdp", "train_ddp", "tokenizer", "i3d")
BUDGET_S = dict(tests=60, train_fsdp=50, train_ddp=50, tokenizer=30, i3d=25, **EXTRA_BUDGET_S)
TINY_BUDGET_S = dict(tests=120, train_fsdp=90, train_ddp=90, tokenizer=60, i3d=60, **EXTRA_TINY_BUDGET_S)
TESTS = ["tests/test_cuda.py", "tests/test_generator.py", "tests/test_cached_decoding.py"]
TINY_TESTS = ["tests/test_cuda.py"]  # on a CPU these skip; the CPU suite runs the rest anyway


class Recorder:
    """A section's results, rewritten (atomically) after every measurement so a timeout keeps what was done."""

    def __init__(self, path):
        self.path, self.data = path, {}

    def __setitem__(self, key, value):
        self.data[key] = value
        if self.path:
            atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- sections
def section_tests(args, rec):
    files = TINY_TESTS if args.tiny else TESTS
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", *files]
    rec["command"] = " ".join(cmd[1:])
    res = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in res.stdout:  # echoed to the section log as it comes, so a hang shows where it stopped
        print(line, end="", flush=True)
        lines.append(line)
    res.wait()
    out = "".join(lines)
    rec["counts"] = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out.splitlines()[-1]
                                                     if out.strip() else "")}
    rec["problems"] = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))][:20]
    rec["skip_reasons"] = sorted({line.split(": ", 1)[-1] for line in out.splitlines() if line.startswith("SKIPPED")})
    rec["summary"] = out.strip().splitlines()[-1].strip("= ") if out.strip() else ""
    if res.returncode != 0:
        raise SystemExit(f"pytest exit status {res.returncode}: {rec.data['summary']}")


def section_tokenizer(args, rec):
    from bench_tokenizer import CONFIGS, bench  # lazy, as every section's own imports (see the module docstring)
    device = get_device(args.device)
    name, batch, dtype, repeats = ("tiny", 2, "fp32", 1) if args.tiny else ("L", 8, "bf16", 3)
    with open(CONFIGS[name]) as f:
        cfg = json.load(f)
    rec["settings"] = {"config": os.path.relpath(CONFIGS[name], ROOT), "batch": batch, "dtype": dtype,
                       "repeats": repeats, "clip": [cfg.get("frame_num"), cfg.get("input_size")]}
    rec["result"] = bench(name, cfg, device, dtype, batch, repeats, train_step=False)


def section_i3d(args, rec):
    from larp.metrics.detectors import load_i3d
    device = get_device(args.device)
    batch, frames, size, repeats = (1, 16, 32, 1) if args.tiny else (16, 16, 128, 3)
    rec["requested"] = args.i3d
    try:
        det = load_i3d(args.i3d, device, batch_size=batch, verbose=False)
    except Exception as e:  # e.g. the weights are not on this machine: time a random I3D instead, say so
        rec["error"] = f"{type(e).__name__}: {e}"
        det = load_i3d("random:32" if args.tiny else "random", device, batch_size=batch, verbose=False)
    rec["detector"] = det.name
    rec["random_fallback"] = bool(det.is_random)
    videos = torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0))
    det(videos)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        det(videos)
    sync(device)
    seconds = (time.perf_counter() - t0) / repeats
    rec["result"] = {"batch": batch, "clip": [frames, size, size], "repeats": repeats,
                     "clips_per_s": batch / seconds, "seconds_per_batch": seconds}


def section_train(args, rec, parallel):
    """Under torchrun (one process per GPU): NAR steps on random tokens through the real wrap + step code."""
    from larp.core import dist
    from larp.training import fsdp, loop as training
    from larp.training.ar_stage import ARStage, build_ar_model
    from larp.training.config_build import build_config
    info = dist.init_distributed(args.device)
    device = info.device
    fsdp.ensure_process_group(device)  # DDP on a single rank needs a process group too
    if args.tiny:
        cfg_name, amp, batch, n, vocab = "quickstart_nar", "fp32", 4, 32, 64
    else:
        cfg_name, amp, batch, n, vocab = "larp_ar", "bf16", 8, 1024, 8192
    cfg = build_config(os.path.join(ROOT, "cfgs", cfg_name + ".yaml"),
                       opts=["train.amp", amp, "train.parallel", parallel])
    torch.manual_seed(0)
    raw = build_ar_model(cfg.model, SimpleNamespace(bottleneck_token_num=n, codebook_size=vocab)).to(device).train()
    stage = ARStage(cfg, raw, None, device)
    if parallel == "fsdp":
        stage.wrapped = training.wrap_model(raw, cfg.train, info)
        stage.build_optimizer()  # over the DTensor shards, as train() does
    else:
        # training.wrap_model leaves a single process unwrapped; wrap it here so DDP's buckets count in the peak
        ids = [device.index] if device.type == "cuda" else None
        stage.wrapped = torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids)
    batch_data = {"tokens": torch.randint(vocab, (batch, n), device=device),
                  "label": torch.randint(cfg.model.num_classes, (batch,), device=device)}
    if info.is_main:
        rec["settings"] = {"model": cfg.model.name if not args.tiny else "quickstart_nar dims",
                           "order": cfg.model.order, "parallel": parallel, "amp": amp, "batch_per_gpu": batch,
                           "tokens": n, "world_size": info.world_size,
                           "params_M": sum(p.numel() for p in raw.parameters()) / 1e6}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(2 + args.train_steps):  # 2 warm-up steps (the first compiles FlexAttention on CUDA)
        sync(device)
        t = time.perf_counter()
        logs = stage.step(batch_data, i, 2 + args.train_steps)
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(logs["loss"])
        if info.is_main and (i < 2 or (i - 1) % 5 == 0):
            rec["progress"] = {"steps_done": i + 1, "first_step_s": times[0]}
    timed = times[2:]
    if info.is_main:
        median = statistics.median(timed)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        rec["result"] = {"steps": len(timed), "first_step_s": times[0], "median_step_ms": 1000 * median,
                         "mean_step_ms": 1000 * statistics.mean(timed), "clips_per_s": batch / median,
                         "peak_memory_gb": peak, "loss_first": losses[0], "loss_last": losses[-1]}
    dist.cleanup()


SECTION_FUNCTIONS = {"tests": section_tests, "decode_nar": section_decode_nar, "decode_raster": section_decode_raster,
                     "attention": section_attention, "tokenizer": section_tokenizer, "i3d": section_i3d,
                     "seed": section_seed}


# ---------------------------------------------------------------------------------------------- driver
def descendants(pid):
    """Every process below `pid` (torchrun starts its workers in new sessions, so a process group kill misses them)."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(proc):
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def section_command(name, args, result_path):
    own = ["--section", name, "--result", result_path, "--device", args.device, "--i3d", args.i3d,
           "--train_steps", str(args.train_steps)] + (["--tiny"] if args.tiny else [])
    if name.startswith("train_"):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                os.path.abspath(__file__)] + own
    return [sys.executable, os.path.abspath(__file__)] + own


def run_section(name, args, deadline):
    budget = min((TINY_BUDGET_S if args.tiny else BUDGET_S)[name], deadline - time.time())
    entry = {"status": "skipped", "budget_s": round(budget, 1)}
    if budget < 5:
        entry["error"] = "not started: the total time budget is used up"
        return entry
    os.makedirs(os.path.join(args.out, "sections"), exist_ok=True)
    result_path = os.path.join(args.out, "sections", f"{name}.json")
    log_path = os.path.join(args.out, "sections", f"{name}.log")
    if os.path.exists(result_path):
        os.remove(result_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(section_command(name, args, result_path), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=budget)
            entry["status"] = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            entry["status"] = "timeout"
            entry["error"] = f"stopped after its {budget:.0f} s budget"
    entry["seconds"] = round(time.time() - t0, 1)
    if os.path.exists(result_path):
        with open(result_path) as f:
            entry["results"] = json.load(f)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-2500:]
    if entry["status"] == "failed":
        entry["error"] = tail.strip().splitlines()[-1] if tail.strip() else f"exit status {rc}"
    if entry["status"] != "ok":
        entry["log_tail"] = tail
    entry["log"] = os.path.relpath(log_path, args.out)
    return entry


def machine(device):
    d = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "host_cpus": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        d.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), gpu_count=torch.cuda.device_count())
    return d


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(report):
    m, s = report["machine"], report["sections"]
    lines = [f"# GPU check ({'tiny CPU fallback' if report['tiny'] else 'full sizes'})", "",
             f"{m.get('gpu', m['device'])}, torch {m['torch']} (CUDA {m['cuda']}), python {m['python']}; "
             f"total {report['seconds']:.0f} s of a {report['budget_s']} s budget.", "",
             "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, e in s.items():
        lines.append(f"| {name} | {e['status']} | {e.get('seconds', '-')} | {e.get('error', '')[:160]} |")
    r = s.get("tests", {}).get("results", {})
    if r:
        lines += ["", f"**Tests:** `{r.get('command', '')}`: {r.get('summary', '')}"]
        lines += [f"- {p}" for p in r.get("problems", [])]
    rows = [(k, s[k]["results"]) for k in ("train_ddp", "train_fsdp") if s.get(k, {}).get("results", {}).get("result")]
    if rows:
        st = rows[0][1]["settings"]
        lines += ["", f"**Training** ({st['model']} {st['order']}, batch {st['batch_per_gpu']}/GPU, {st['amp']}, "
                  f"{st['world_size']} process, random tokens):", "",
                  "| mode | steps | first step s | median ms/step | clips/s | peak GB | loss first -> last |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in rows:
            t = v["result"]
            lines.append(f"| {v['settings']['parallel']} | {t['steps']} | {t['first_step_s']:.1f} | "
                         f"{t['median_step_ms']:.1f} | {t['clips_per_s']:.1f} | {fmt(t['peak_memory_gb'])} | "
                         f"{t['loss_first']:.3f} -> {t['loss_last']:.3f} |")
    r = s.get("tokenizer", {}).get("results", {})
    if r.get("result"):
        t, st = r["result"], r["settings"]
        lines += ["", f"**Tokenizer** ({st['config']}, batch {st['batch']}, {st['dtype']}): encode "
                  f"{t['encode_clips_per_s']:.2f} clips/s, decode {t['decode_clips_per_s']:.2f} clips/s "
                  f"({t['params_M']:.1f} M params)."]
    r = s.get("i3d", {}).get("results", {})
    if r.get("result"):
        t = r["result"]
        label = " -- RANDOM weights (fallback; not the requested detector)" if r.get("random_fallback") else ""
        lines += ["", f"**I3D features** ({r['detector']}{label}, batch {t['batch']} of "
                  f"{'x'.join(map(str, t['clip']))} clips): {t['clips_per_s']:.2f} clips/s."]
        if r.get("error"):
            lines.append(f"Requested `{r['requested']}` could not be loaded: {r['error']}")
    return "\n".join(lines + decode_markdown(s)) + "\n"


def drive(args):
    device = get_device(args.device)
    args.device = str(device)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    deadline = t0 + args.budget
    report = {"tiny": args.tiny, "budget_s": args.budget, "machine": machine(device), "sections": {}}
    for name in args.sections:
        print(f"[gpu_check] {name} ...", flush=True)
        report["sections"][name] = entry = run_section(name, args, deadline)
        print(f"[gpu_check] {name}: {entry['status']} ({entry.get('seconds', 0)} s)"
              + (f" -- {entry['error']}" if entry.get("error") else ""), flush=True)
        report["seconds"] = time.time() - t0
        atomic_write_text(os.path.join(args.out, "gpu_check.json"), json.dumps(report, indent=2, default=str) + "\n")
    md = markdown(report)
    atomic_write_text(os.path.join(args.out, "gpu_check.md"), md)
    print(md, flush=True)
    print("\n".join(["[gpu_check] summary"] + summary_table(report["sections"])), flush=True)
    print(f"[gpu_check] wrote {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md", flush=True)
    return 0 if all(e["status"] == "ok" for e in report["sections"].values()) else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="output folder: gpu_check.json, gpu_check.md, sections/ (default: $OUT when set, else "
                   "gpu_check_out in the repository root)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU fallback of every section")
    p.add_argument("--i3d", default="kinetics400", help="detector spec for the I3D section (as --i3d elsewhere)")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default: the sections' + 5; tiny 600)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(BUDGET_S))
    p.add_argument("--train_steps", type=int, default=20, help="timed steps per training mode")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.section is None:
        args.budget = args.budget or (600 if args.tiny else sum(BUDGET_S[k] for k in args.sections) + 5)
        return drive(args)
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rec = Recorder(args.result)
    if args.section.startswith("train_"):
        section_train(args, rec, args.section.split("_", 1)[1])
    else:
        SECTION_FUNCTIONS[args.section](args, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
