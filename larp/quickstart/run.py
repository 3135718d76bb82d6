"""Offline quickstart: synthetic videos -> tiny LARP tokenizer -> tiny NAR and raster generators -> samples,
oracle accuracy, FVD (Kinetics-400 I3D, on FVD_CLIPS clips per side), tokenizer PSNR, sampling speed; writes
quickstart/report.md and quickstart/index.html (the results and every gallery page, in a browser).

Every stage is a plain command of this repository (printed before it runs), so the quickstart doubles as a
worked example. A stage whose output exists is reused, so a second run only rebuilds the report;
`--fresh` deletes quickstart/ first.

    bash scripts/quickstart.sh            # sets up .venv, then runs this module
    python -m larp.quickstart --fresh
"""
import argparse
import csv
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from larp.core.visualize import save_video_grid_gif, save_video_grid_png
from larp.data.dataset import VideoDataset, select_fvd_clips
from larp.data.synthetic import class_names
from larp.data.video_io import read_frames
from larp.quickstart.report import ORDERS, measure, oracle, write_report
from larp.quickstart.stages import Stage, run_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: its train.py, sample.py

NUM_CLASSES = 8
# 1000 videos per class, 12 of them (1.2 %) held out: 7,904 training videos = 15,808 eight-frame clips, seen under
# four times each by the generators (with the earlier 36 per class they fitted the 576 training clips)
VIDEOS_PER_CLASS, VAL_FRACTION = 1000, 0.012
NUM_SAMPLES = 128          # per generator and seed; val has 96 videos x 2 eight-frame clips = 192 clips
SEEDS = (0, 1, 2)          # sampling seeds: the report gives the oracle accuracy of each and the minimum
# FVD with the Kinetics-400 I3D (eval/compute_fvd.py, default detector): every clip is upsampled to 224x224, ~1 s of
# one CPU core per 8-frame clip, so it scores the first FVD_CLIPS samples of each generator (seed 0) against the
# FVD_CLIPS real val clips they were conditioned on, and the tokenizer's reconstructions of those clips (sample.py's
# own FVD, in fvd_report.csv, uses the cheap random:32 I3D)
FVD_CLIPS = 32
# cfg 3 + top-k 10, the same for both generators: cfg 4 costs within-class spread (0.72-0.77 of the real clips' on
# the NAR against 0.79-0.82 at cfg 3), cfg 2.5 costs accuracy (NAR 0.91-0.96); docs/quickstart.md, "Design history"
SAMPLE_ARGS = ["--cfg_scale", "3.0", "--temperature", "1.0", "--top_k", "10", "--top_p", "1.0",
               "--sample_batch_size", "64", "--i3d", "random:32",
               "--dtype", "fp32", "--tokenizer_dtype", "fp32"]  # CPU: fp32 (the release protocol casts to bf16 / fp16)


def samples_dir(q, order, seed):
    return os.path.join(q, "samples", f"{order}_seed{seed}")


def sample_stages(q, py, tok, order):
    """sample.py of one generator with each seed (NUM_SAMPLES videos for the labels of the val clips)."""
    return [Stage(f"sample_{order}_seed{seed}", [py, "sample.py", "--ar_model", os.path.join(q, "runs", order, "export"),
                                                 "--tokenizer", tok, "--output_dir", samples_dir(q, order, seed),
                                                 "--num_samples", str(NUM_SAMPLES), "--seed", str(seed),
                                                 "--dataset_csv", os.path.join(q, "data", "val.csv"), *SAMPLE_ARGS],
                  os.path.join(samples_dir(q, order, seed), "fvd_report.csv"), needs=(f"train_{order}",))
            for seed in SEEDS]


def training_stages(q, py):
    """The synthetic set, the tokenizer (two threads, alone) and the two generators on its cached tokens."""
    data, runs = os.path.join(q, "data"), os.path.join(q, "runs")
    tok = os.path.join(runs, "tokenizer", "export")
    val = ["data.val_csv", os.path.join(data, "val.csv")]
    common = ["--csv_file", os.path.join(data, "train.csv"), "--out_path", runs]
    return [Stage("data", [py, "-m", "larp.data.synthetic", "--out", data, "--classes", str(NUM_CLASSES),
                           "--videos-per-class", str(VIDEOS_PER_CLASS), "--val-fraction", str(VAL_FRACTION),
                           "--workers", "2"], os.path.join(data, "val.csv"), threads=2),
            Stage("train_tokenizer", [py, "train.py", "--cfg", "cfgs/quickstart_tokenizer.yaml", "--name", "tokenizer",
                                      *common, "--opts", *val], os.path.join(tok, "config.json"), ("data",), 2)] + [
            Stage(f"train_{order}", [py, "train.py", "--cfg", f"cfgs/quickstart_{order}.yaml", "--name", order,
                                     "--cache_tokens", *common, "--opts", "vae.checkpoint", tok, *val],
                  os.path.join(runs, order, "export", "config.json"), ("train_tokenizer",)) for order in ORDERS]


def tokenizer_stages(q, py, tok):
    """The tokenizer's PSNR / SSIM on every val clip, and the Kinetics-400 FVD of its reconstructions of the
    FVD_CLIPS clips the generators' FVD scores (eval_larp_tokenizer.py --max_clips draws them with the same rule)."""
    val, out = os.path.join(q, "data", "val.csv"), os.path.join(q, "fvd", "tokenizer")
    return [Stage("eval_tokenizer", [py, "eval/eval_larp_tokenizer.py", "--tokenizer", tok, "--dataset_csv", val,
                                     "--det", "--no_fvd", "--clips", "all", "--out", os.path.join(q, "eval_tokenizer")],
                  os.path.join(q, "eval_tokenizer", "metrics.json"), ("train_tokenizer",)),
            Stage("fvd_tokenizer", [py, "eval/eval_larp_tokenizer.py", "--tokenizer", tok, "--dataset_csv", val, "--det",
                                    "--clips", "all", "--max_clips", str(FVD_CLIPS), "--batch_size", "4", "--device",
                                    "cpu", "--out", out], os.path.join(out, "metrics.json"), ("train_tokenizer",))]


def all_stages(q, py, tok):
    """Every stage in priority order: the NAR generator (the slower one) starts first; the raster generator's core
    then goes on to the tokenizer's evaluations and the raster samples and FVD while the NAR still trains. The NAR's
    FVD reuses the real clips' features the raster's FVD saved."""
    real_stats = os.path.join(q, "fvd", "raster", "real_stats.pkl")
    fvd_raster = Stage("fvd_raster", lambda: fvd_command(q, py, "raster"),
                       os.path.join(q, "fvd", "raster", "fake_stats.pkl"), (f"sample_raster_seed{SEEDS[0]}",))
    fvd_nar = Stage("fvd_nar", lambda: fvd_command(q, py, "nar", real_stats),
                    os.path.join(q, "fvd", "nar", "fake_stats.pkl"), (f"sample_nar_seed{SEEDS[0]}", "fvd_raster"))
    return (training_stages(q, py) + tokenizer_stages(q, py, tok) + sample_stages(q, py, tok, "raster") + [fvd_raster]
            + sample_stages(q, py, tok, "nar") + [fvd_nar])


def clip_shape(q):
    """(frames, size) of the tokenizer's clips: the sampled videos and the real val clips they were drawn for."""
    with open(os.path.join(q, "runs", "tokenizer", "export", "config.json")) as f:
        config = json.load(f)
    return int(config["frame_num"]), int(config["input_size"])


def fvd_command(q, py, order, real_stats=None):
    """compute_fvd.py of the first FVD_CLIPS samples of seed SEEDS[0] against the val clips they were drawn for
    (`real_stats`: the features of those clips saved by an earlier stage, instead of computing them again)."""
    frames, size = clip_shape(q)
    fvd_dir, sample_dir = os.path.join(q, "fvd", order), samples_dir(q, order, SEEDS[0])
    if not same_real_clips(q, sample_dir, FVD_CLIPS):
        sys.exit(f"[quickstart] the first {FVD_CLIPS} samples of {sample_dir} were not drawn for the clips "
                 f"compute_fvd.py --num_clips {FVD_CLIPS} scores")
    fake_csv = first_samples_csv(sample_dir, os.path.join(fvd_dir, "samples.csv"), FVD_CLIPS)
    real = ["--real", real_stats] if real_stats else ["--real", os.path.join(q, "data", "val.csv"), "--save_real",
                                                      os.path.join(fvd_dir, "real_stats.pkl")]
    return [py, "eval/compute_fvd.py", *real, "--fake", fake_csv, "--num_clips", str(FVD_CLIPS), "--num_frames",
            str(frames), "--size", str(size), "--batch_size", "4", "--device", "cpu",
            "--save_fake", os.path.join(fvd_dir, "fake_stats.pkl")]


def first_samples(sample_dir, n):
    with open(os.path.join(sample_dir, "samples.csv")) as f:
        return sorted(csv.DictReader(f), key=lambda r: int(r["index"]))[:n]


def same_real_clips(q, sample_dir, n):
    """Whether `compute_fvd.py --num_clips n` scores the very val clips that samples 0..n-1 were drawn for (it does
    when random.sample's first n draws do not depend on how many are drawn, true for the quickstart's sizes)."""
    frames, size = clip_shape(q)
    ds = VideoDataset(os.path.join(q, "data", "val.csv"), frame_num=frames, input_size=size, train=False)
    real = {(str(ds.clips[i][0]), int(ds.clips[i][1])) for i in select_fvd_clips(len(ds), n)}
    return real == {(r["clip_path"], int(r["clip_start"])) for r in first_samples(sample_dir, n)}


def first_samples_csv(sample_dir, out_csv, n):
    """CSV (id,path,action,label) of samples 0..n-1 (sample i was drawn for FVD clip i of val.csv)."""
    rows = first_samples(sample_dir, n)
    if len(rows) < n:
        sys.exit(f"[quickstart] {sample_dir} has {len(rows)} samples, FVD needs {n}")
    os.makedirs(os.path.dirname(out_csv), exist_ok=True)
    with open(out_csv, "w") as f:
        f.write("id,path,action,label\n")
        f.writelines(f"{r['index']},{os.path.join(sample_dir, r['path'])},{r['action']},{r['label']}\n" for r in rows)
    return out_csv


def class_preview(sample_dir, out_png, out_gif, per_class=4):
    """One row per class: the first `per_class` samples of each class, side by side (PNG frames + GIF)."""
    with open(os.path.join(sample_dir, "samples.csv")) as f:
        rows = list(csv.DictReader(f))
    names = class_names(NUM_CLASSES)
    videos, labels = [], []
    for c in range(NUM_CLASSES):
        mine = [r for r in rows if int(r["label"]) == c][:per_class]
        for r in mine:
            videos.append(read_frames(os.path.join(sample_dir, r["path"]) if not os.path.isabs(r["path"])
                                      else r["path"]))
            labels.append(names[c])
    videos = np.stack(videos)  # (B, T, H, W, 3)
    save_video_grid_gif(videos, out_gif, nrow=per_class, fps=4, row_labels=labels[::per_class])
    # PNG: first sample of each class, frames left to right
    firsts = np.stack([videos[i] for i in range(0, len(videos), per_class)])
    save_video_grid_png(firsts, out_png, row_labels=labels[::per_class])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m larp.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="delete quickstart/ and redo every stage")
    return p.parse_args(argv)


def main(args=None):
    args = args if args is not None else parse_args()
    q = os.path.join(ROOT, "quickstart")
    if args.fresh and os.path.isdir(q):
        shutil.rmtree(q)
    logs = os.path.join(q, "logs")
    os.makedirs(logs, exist_ok=True)
    times_path = os.path.join(q, "stage_times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    py = sys.executable
    data, runs = os.path.join(q, "data"), os.path.join(q, "runs")
    tok = os.path.join(runs, "tokenizer", "export")
    t_start = time.perf_counter()

    run_pipeline(all_stages(q, py, tok), times, logs, ROOT)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # one oracle process per CSV, two at a time
        real = pool.submit(oracle, ROOT, os.path.join(data, "val.csv"), logs, "real", NUM_CLASSES)
        runs_of = {(o, s): pool.submit(oracle, ROOT, os.path.join(samples_dir(q, o, s), "samples.csv"), logs,
                                       f"{o}_seed{s}", NUM_CLASSES) for o in ORDERS for s in SEEDS}
        acc = {"real": real.result(), **{o: {s: runs_of[o, s].result() for s in SEEDS} for o in ORDERS}}
    for order in ORDERS:
        class_preview(samples_dir(q, order, SEEDS[0]), os.path.join(q, f"preview_{order}.png"),
                      os.path.join(q, f"preview_{order}.gif"))
    frames, size = clip_shape(q)
    stats = measure(q, frames, lambda o, s: samples_dir(q, o, s), SEEDS)
    with open(os.path.join(q, "baselines.json"), "w") as f:
        json.dump({**stats, "oracle_accuracy": acc}, f, indent=2)
    previews = sorted(os.listdir(os.path.join(runs, "tokenizer", "previews")))
    shutil.copyfile(os.path.join(runs, "tokenizer", "previews", previews[-1]), os.path.join(q, "tokenizer_recon.png"))
    times["oracle_and_previews"] = {"seconds": time.perf_counter() - t0, "reused": False}
    with open(times_path, "w") as f:
        json.dump(times, f, indent=2)
    run = {"num_samples": NUM_SAMPLES, "sample_args": SAMPLE_ARGS, "seeds": SEEDS, "fvd_clips": FVD_CLIPS,
           "frames": frames, "size": size, "samples": lambda o, s: samples_dir(q, o, s)}
    write_report(q, run, acc, stats, times, time.perf_counter() - t_start)
