"""Offline quickstart: synthetic videos -> tiny LARP tokenizer -> tiny NAR and raster generators -> samples,
oracle accuracy, FVD (Kinetics-400 I3D, on FVD_CLIPS clips per side), tokenizer PSNR, sampling speed; writes
quickstart/report.md.

Every stage is a plain command of this repository (printed before it runs), so the quickstart doubles as a
worked example. A stage whose output exists is reused, so a second run only rebuilds the report;
`--fresh` deletes quickstart/ first.

    bash scripts/quickstart.sh            # sets up .venv, then runs this file
    python scripts/quickstart.py --fresh
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from larp.models.generator import load_generator
from larp.data.dataset import VideoDataset, read_video_csv, select_fvd_clips
from larp.data.synthetic import class_names
from larp.data.video_io import read_frames
from larp.core.visualize import save_curves_png, save_video_grid_gif, save_video_grid_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_CLASSES = 8
NUM_SAMPLES = 128          # per generator; val has 96 videos x 2 eight-frame clips = 192 clips
# FVD with the Kinetics-400 I3D (eval/compute_fvd.py, default detector): every clip is upsampled to 224x224, ~1 s of
# one CPU core per 8-frame clip, so it scores the first FVD_CLIPS samples of each generator against the FVD_CLIPS
# real val clips they were conditioned on (sample.py's own FVD, in fvd_report.csv, uses the cheap random:32 I3D)
FVD_CLIPS = 32
# cfg 4 + top-k 10: oracle accuracy 0.65 against 0.27 with cfg 2, top-k 0 on one 600-step NAR (README)
SAMPLE_ARGS = ["--cfg_scale", "4.0", "--temperature", "1.0", "--top_k", "10", "--top_p", "1.0",
               "--sample_batch_size", "64", "--i3d", "random:32",
               "--dtype", "fp32", "--tokenizer_dtype", "fp32"]  # CPU: fp32 (the release protocol casts to bf16 / fp16)


def run_stages(stages, times, log_dir):
    """Run several (name, cmd, done_file) stages side by side (one CPU thread each), skipping finished ones.

    Output goes to one log file per stage; a stage that fails stops the quickstart with its log's path.
    """
    todo = []
    for name, cmd, done_file in stages:
        if os.path.exists(done_file):
            print(f"[quickstart] {name}: reusing {os.path.relpath(done_file, ROOT)}")
            times.setdefault(name, {"seconds": None})["reused"] = True
        else:
            todo.append((name, cmd, done_file))
    if not todo:
        return
    env = dict(os.environ, OMP_NUM_THREADS="1" if len(todo) > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    procs = []
    for name, cmd, done_file in todo:
        print(f"\n[quickstart] {name}: {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)}",
              flush=True)
        log_path = os.path.join(log_dir, f"{name}.log")
        procs.append((name, done_file, log_path, time.perf_counter(),
                      subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)))
    while any(p[4].poll() is None for p in procs):
        if sys.stdout.isatty():  # a status line rewritten in place: on a terminal only, never into a log file
            show_progress(procs)
        time.sleep(2)
    print(flush=True)
    for name, done_file, log_path, t0, proc in procs:
        proc.wait()
        if proc.returncode != 0 or not os.path.exists(done_file):
            sys.exit(f"[quickstart] stage '{name}' failed (exit {proc.returncode}); its log: {log_path}")
        times[name] = {"seconds": time.perf_counter() - t0, "reused": False}
        print(f"[quickstart] {name}: done in {times[name]['seconds']:.0f} s", flush=True)


def show_progress(procs):
    """One status line with the last line of every running stage's log."""
    parts = []
    for name, _, log_path, _, proc in procs:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 400))
            tail = f.read().decode(errors="replace").replace("\n", "\r").split("\r")
        last = next((t.strip() for t in reversed(tail) if t.strip()), "starting")
        parts.append(f"{name}: {'done' if proc.poll() is not None else last[:70]}")
    width = shutil.get_terminal_size((160, 20)).columns
    sys.stdout.write("\r" + " | ".join(parts)[:width - 1].ljust(width - 1))
    sys.stdout.flush()


def last_value(path, key):
    """The value of the last `key=<number>` line of a stage log."""
    value = None
    with open(path) as f:
        for line in f:
            if line.startswith(key + "="):
                value = float(line.strip().split("=", 1)[1])
    if value is None:
        sys.exit(f"[quickstart] no '{key}=' line in {path}")
    return value


def oracle(csv_path, log_dir, name):
    log = os.path.join(log_dir, f"oracle_{name}.log")
    out = subprocess.run([sys.executable, "-m", "larp.data.oracle", csv_path, "--num-classes", str(NUM_CLASSES)],
                         cwd=ROOT, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"[quickstart] oracle on {csv_path} failed; see {log}")
    return last_value(log, "oracle_accuracy")


def clip_shape(q):
    """(frames, size) of the tokenizer's clips: the sampled videos and the real val clips they were drawn for."""
    with open(os.path.join(q, "runs", "tokenizer", "export", "config.json")) as f:
        config = json.load(f)
    return int(config["frame_num"]), int(config["input_size"])


def fvd_stages(q, py):
    """compute_fvd.py (default detector: Kinetics-400) of each generator's first FVD_CLIPS samples vs their clips."""
    frames, size = clip_shape(q)
    stages = []
    for order in ("nar", "raster"):
        fvd_dir = os.path.join(q, "fvd", order)
        fake_csv = first_samples_csv(os.path.join(q, "samples", order), os.path.join(fvd_dir, "samples.csv"),
                                     FVD_CLIPS)
        stages.append((f"fvd_{order}", [py, "eval/compute_fvd.py", "--real", os.path.join(q, "data", "val.csv"),
                                        "--fake", fake_csv, "--num_clips", str(FVD_CLIPS), "--num_frames", str(frames),
                                        "--size", str(size), "--batch_size", "4", "--device", "cpu",
                                        "--save_real", os.path.join(fvd_dir, "real_stats.pkl"),
                                        "--save_fake", os.path.join(fvd_dir, "fake_stats.pkl")],
                       os.path.join(fvd_dir, "fake_stats.pkl")))
    return stages


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


def clip_stack(csv_path, frames, all_windows=False):
    """(B, T, H, W, 3) float in [0, 1]: the first `frames` frames of every video of a CSV (every non-overlapping
    window with all_windows), and their labels."""
    df = read_video_csv(csv_path)
    videos, labels = [], []
    for path, label in zip(df["path"], df["label"]):
        v = read_frames(path)
        for k in range(len(v) // frames if all_windows else 1):
            videos.append(v[k * frames:(k + 1) * frames])
            labels.append(int(label))
    return np.stack(videos).astype(np.float32) / 255, np.array(labels)


def nearest_rms(videos, reference):
    """Mean over `videos` of the RMS pixel difference to the nearest clip of `reference` (memorisation check)."""
    a, b = (v.reshape(len(v), -1).astype(np.float64) for v in (videos, reference))
    d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    return float(np.sqrt(np.clip(d2, 0, None).min(1) / a.shape[1]).mean())


def within_class_spread(videos, labels):
    """Mean over classes of the mean RMS pixel difference between two different videos of that class."""
    spreads = []
    for c in np.unique(labels):
        v = videos[labels == c].reshape((labels == c).sum(), -1).astype(np.float64)
        sq = (v ** 2).sum(1)
        d2 = np.clip(sq[:, None] + sq[None] - 2 * v @ v.T, 0, None) / v.shape[1]
        n = len(v)
        spreads.append(np.sqrt(d2)[~np.eye(n, dtype=bool)].mean())
    return float(np.mean(spreads))


def mean_colour_psnr(videos):
    """PSNR of each clip against its own mean colour (what a tokenizer that learned nothing scores), mean."""
    mse = ((videos - videos.mean((1, 2, 3), keepdims=True)) ** 2).reshape(len(videos), -1).mean(1)
    return float(np.mean(10 * np.log10(1 / mse)))


def training_curves(q, out_png):
    """Loss and validation metric against step for the three training runs (their metrics.csv)."""

    def column(name, key):
        with open(os.path.join(q, "runs", name, "metrics.csv")) as f:
            rows = [r for r in csv.DictReader(f) if r.get(key) not in (None, "")]
        return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]

    with open(os.path.join(q, "baselines.json")) as f:
        base = json.load(f)["mean_colour_psnr"]
    panels = [("tokenizer: training loss (MSE + VQ + entropy + prior)", {"loss": column("tokenizer", "loss_avg")},
               None),
              ("tokenizer: val PSNR (dB)", {"val PSNR": column("tokenizer", "val_psnr")},
               (f"mean colour {base:.1f}", base)),
              ("generators: training loss (nats/token)", {o: column(o, "loss_avg") for o in ("nar", "raster")}, None),
              ("generators: val loss (nats/token)", {o: column(o, "val_loss") for o in ("nar", "raster")}, None)]
    save_curves_png(panels, out_png)


def main(args):
    q = os.path.join(ROOT, "quickstart")
    if args.fresh and os.path.isdir(q):
        shutil.rmtree(q)
    logs = os.path.join(q, "logs")
    os.makedirs(logs, exist_ok=True)
    times_path = os.path.join(q, "stage_times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    py = sys.executable
    data, runs, samples = os.path.join(q, "data"), os.path.join(q, "runs"), os.path.join(q, "samples")
    tok = os.path.join(runs, "tokenizer", "export")
    t_start = time.perf_counter()

    run_stages([("data", [py, "-m", "larp.data.synthetic", "--out", data, "--classes", str(NUM_CLASSES)],
                 os.path.join(data, "val.csv"))], times, logs)
    val = ["data.val_csv", os.path.join(data, "val.csv")]
    train_common = ["--csv_file", os.path.join(data, "train.csv"), "--out_path", runs]
    run_stages([("train_tokenizer", [py, "train.py", "--cfg", "cfgs/quickstart_tokenizer.yaml", "--name", "tokenizer",
                                     *train_common, "--opts", *val], os.path.join(tok, "config.json"))], times, logs)
    run_stages([(f"train_{order}", [py, "train.py", "--cfg", f"cfgs/quickstart_{order}.yaml", "--name", order,
                                    "--cache_tokens", *train_common, "--opts", "vae.checkpoint", tok, *val],
                 os.path.join(runs, order, "export", "config.json")) for order in ("nar", "raster")], times, logs)
    run_stages([(f"sample_{order}", [py, "sample.py", "--ar_model", os.path.join(runs, order, "export"),
                                     "--tokenizer", tok, "--output_dir", os.path.join(samples, order),
                                     "--num_samples", str(NUM_SAMPLES), "--dataset_csv", os.path.join(data, "val.csv"),
                                     *SAMPLE_ARGS], os.path.join(samples, order, "fvd_report.csv"))
                for order in ("nar", "raster")]
               + [("eval_tokenizer", [py, "eval/eval_larp_tokenizer.py", "--tokenizer", tok, "--dataset_csv",
                                      os.path.join(data, "val.csv"), "--det", "--no_fvd", "--clips", "all",
                                      "--out", os.path.join(q, "eval_tokenizer")],
                   os.path.join(q, "eval_tokenizer", "metrics.json"))], times, logs)

    run_stages(fvd_stages(q, py), times, logs)

    t0 = time.perf_counter()
    acc = {"real videos (val)": oracle(os.path.join(data, "val.csv"), logs, "real")}
    for order in ("nar", "raster"):
        acc[f"{order.upper()} samples"] = oracle(os.path.join(samples, order, "samples.csv"), logs, order)
        class_preview(os.path.join(samples, order), os.path.join(q, f"preview_{order}.png"),
                      os.path.join(q, f"preview_{order}.gif"))
    real, real_labels = clip_stack(os.path.join(data, "val.csv"), 8)
    train_clips, _ = clip_stack(os.path.join(data, "train.csv"), 8, all_windows=True)
    stats = {"mean_colour_psnr": mean_colour_psnr(real), "spread": {"real videos (val)": within_class_spread(
        real, real_labels)}, "nearest_train": {"real videos (val)": nearest_rms(real, train_clips)}}
    for order in ("nar", "raster"):
        fake, fake_labels = clip_stack(os.path.join(samples, order, "samples.csv"), 8)
        stats["spread"][f"{order.upper()} samples"] = within_class_spread(fake, fake_labels)
        stats["nearest_train"][f"{order.upper()} samples"] = nearest_rms(fake, train_clips)
    with open(os.path.join(q, "baselines.json"), "w") as f:
        json.dump(stats, f, indent=2)
    training_curves(q, os.path.join(q, "training_curves.png"))
    previews = sorted(os.listdir(os.path.join(runs, "tokenizer", "previews")))
    shutil.copyfile(os.path.join(runs, "tokenizer", "previews", previews[-1]), os.path.join(q, "tokenizer_recon.png"))
    times["oracle_and_previews"] = {"seconds": time.perf_counter() - t0, "reused": False}
    with open(times_path, "w") as f:
        json.dump(times, f, indent=2)
    write_report(q, acc, times, time.perf_counter() - t_start, stats)


def detector_line(path):
    """The `detector: ...` line compute_fvd.py prints before `fvd=`."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.startswith("detector: ")]
    if not lines:
        sys.exit(f"[quickstart] no 'detector:' line in {path}")
    return lines[-1]


def generator_results(q):
    """Per generator: fvd {order: (FVD, detector line, mean NLL)} and speed {order: (passes, seconds, videos/s)}."""
    fvd, speed = {}, {}
    for order in ("nar", "raster"):
        d = os.path.join(q, "samples", order)
        with open(os.path.join(d, "fvd_report.csv")) as f:
            row = list(csv.DictReader(f))[-1]
        log = os.path.join(q, "logs", f"fvd_{order}.log")
        fvd[order] = (last_value(log, "fvd"), detector_line(log), float(row["mean_nll"]))
        with open(os.path.join(d, "timing.json")) as f:
            timing = json.load(f)
        steps = load_generator(os.path.join(q, "runs", order, "export")).num_decode_steps()
        speed[order] = (steps, timing["generate_s"], timing["generate_videos_per_s"])
    return fvd, speed


def write_report(q, acc, times, total_s, stats):
    fvd, speed = generator_results(q)
    with open(os.path.join(q, "eval_tokenizer", "metrics.json")) as f:
        tok = json.load(f)
    lines = ["# Quickstart report", "",
             f"Machine: {os.cpu_count()} CPU threads, torch {torch.__version__}, "
             f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}. "
             f"{NUM_SAMPLES} samples per generator, conditioned on the labels of {NUM_SAMPLES} val clips "
             f"(FVD clip protocol, seed 42); sampling flags: `{' '.join(SAMPLE_ARGS)}`.", "",
             "## Oracle class accuracy (analytic classifier, larp/data/oracle.py)", "",
             "| videos | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in acc.items()]
    detectors = "; ".join(sorted({v[1] for v in fvd.values()}))  # one line when both stages used the same I3D
    frames, size = clip_shape(q)
    if same_real_clips(q, os.path.join(q, "samples", "nar"), FVD_CLIPS):
        real = f"the {FVD_CLIPS} val clips they were conditioned on"
    else:
        real = f"{FVD_CLIPS} val clips of the FVD clip protocol (seed 42; not those the samples were conditioned on)"
    lines += ["", "## FVD against the same real clips", "",
              f"`eval/compute_fvd.py`, {detectors}. Scored: the first "
              f"{FVD_CLIPS} samples of each generator against {real}, "
              f"{frames}-frame {size}x{size} clips, each frame upsampled bilinearly to 224x224 for the I3D. With "
              f"{FVD_CLIPS} clips the 400-d covariance has rank <= {FVD_CLIPS - 1}, so these numbers compare the two "
              "generators here; they are not comparable to published FVD (10,000 16-frame clips).", "",
              "| generator | FVD | mean NLL / token |", "|---|---|---|"]
    lines += [f"| {k.upper()} | {v[0]:.2f} | {v[2]:.3f} |" for k, v in fvd.items()]
    lines += ["", "## Tokenizer reconstruction (val clips, deterministic VQ)", "",
              "| PSNR (dB) | per-clip mean colour PSNR (dB) | SSIM | MSE |", "|---|---|---|---|",
              f"| {tok['psnr']:.2f} | {stats['mean_colour_psnr']:.2f} | {tok['ssim']:.4f} | {tok['mse']:.5f} |", "",
              "The mean-colour column is what predicting every pixel of a clip as that clip's mean colour scores "
              "(a tokenizer that learned nothing). Input (rows `real`) and reconstruction (rows `recon`): "
              "![tokenizer](tokenizer_recon.png)", "",
              "## Within-class diversity and memorisation", "",
              "Spread: mean RMS pixel difference between two videos of the same class. Nearest training clip: mean "
              "RMS pixel difference to the closest 8-frame training clip (a generator that copies training clips "
              "token for token sits near the tokenizer's own reconstruction error, "
              f"{(tok['mse']) ** 0.5:.4f}).", "",
              "| videos | spread | nearest training clip |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {stats['nearest_train'][k]:.4f} |" for k, v in stats["spread"].items()]
    lines += ["", "## Training curves", "", "![training curves](training_curves.png)", "",
              "## Sampling speed (generation only, same batch size and settings)", "",
              "| generator | forward passes / video | seconds | videos/s |", "|---|---|---|---|"]
    lines += [f"| {k.upper()} | {v[0]} | {v[1]:.2f} | {v[2]:.1f} |" for k, v in speed.items()]
    lines += ["", f"NAR / raster speed ratio: **{speed['raster'][1] / speed['nar'][1]:.2f}x** "
              f"(forward-pass ratio {speed['raster'][0] / speed['nar'][0]:.1f}x).", "",
              "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    for k, v in times.items():
        seconds = "reused" if v.get("reused") else f"{v['seconds']:.1f}"
        lines.append(f"| {k} | {seconds} |")
    lines += [f"| **this run, total** | {total_s:.1f} |", "",
              "## Previews (one row per class)", "",
              "NAR: ![NAR samples](preview_nar.gif)  raster: ![raster samples](preview_raster.gif)", ""]
    text = "\n".join(lines)
    with open(os.path.join(q, "report.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"[quickstart] report written to {os.path.join(q, 'report.md')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="delete quickstart/ and redo every stage")
    main(p.parse_args())
