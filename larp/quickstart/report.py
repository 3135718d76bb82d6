"""The quickstart's measurements and report (larp/quickstart/run.py runs the stages, then `measure` and `write_report`):
oracle accuracy per sampling seed, memorisation and diversity against the training clips, training curves, the
kept checkpoints, FVD of samples and of tokenizer reconstructions, sampling speed, stage times."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import torch

from larp.core.visualize import save_curves_png
from larp.data.dataset import read_video_csv
from larp.data.video_io import read_frames
from larp.metrics.image import mean_colour_psnr
from larp.models.generator import load_generator
from larp.quickstart.index_page import write_index

ORDERS = ("nar", "raster")


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


def oracle(root, csv_path, log_dir, name, num_classes):
    """Oracle class accuracy of the videos of a CSV (python -m larp.data.oracle), its output kept in a log."""
    log = os.path.join(log_dir, f"oracle_{name}.log")
    out = subprocess.run([sys.executable, "-m", "larp.data.oracle", csv_path, "--num-classes", str(num_classes)],
                         cwd=root, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"[quickstart] oracle on {csv_path} failed; see {log}")
    return last_value(log, "oracle_accuracy")


def clip_stack(csv_path, frames, all_windows=False):
    """(B, T, H, W, 3) float32 in [0, 1]: the first `frames` frames of every video of a CSV (every non-overlapping
    window with all_windows), and their labels."""
    df = read_video_csv(csv_path)
    videos, labels = [], []
    for path, label in zip(df["path"], df["label"]):
        v = read_frames(path)
        for k in range(len(v) // frames if all_windows else 1):
            videos.append(v[k * frames:(k + 1) * frames])
            labels.append(int(label))
    return np.stack(videos).astype(np.float32) / 255, np.array(labels)


def nearest_rms(sets, reference, chunk=4096):
    """For each array of videos in `sets`: the mean over its videos of the RMS pixel difference to the nearest clip of
    `reference` (memorisation check). One float32 matrix product over all sets, `chunk` reference clips at a time."""
    a = torch.from_numpy(np.concatenate([v.reshape(len(v), -1) for v in sets]))
    best = torch.full((len(a),), float("inf"))
    for i in range(0, len(reference), chunk):
        b = torch.from_numpy(reference[i:i + chunk].reshape(-1, a.shape[1]))
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
        best = torch.minimum(best, d2.min(1).values)
    rms = (best.clamp(min=0) / a.shape[1]).sqrt().double().numpy()
    bounds = np.cumsum([0] + [len(v) for v in sets])
    return [float(rms[lo:hi].mean()) for lo, hi in zip(bounds[:-1], bounds[1:])]


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


def metric_column(run_dir, key):
    """(steps, values) of one metrics.csv column (the rows where it is set)."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def kept_checkpoint(run_dir):
    """{"step", "val_loss", "lowest", "lowest_step", "last", "last_step"}: the step whose weights the export holds
    (finished.json, train.keep), the validation loss there, the lowest the run reached and the last."""
    with open(os.path.join(run_dir, "finished.json")) as f:
        kept = json.load(f).get("kept", {})
    steps, losses = metric_column(run_dir, "val_loss")
    if not steps:
        sys.exit(f"[quickstart] {run_dir}/metrics.csv has no val_loss")
    step = kept.get("step", steps[-1])
    low = int(np.argmin(losses))
    return {"step": step, "val_loss": losses[steps.index(step)], "lowest": losses[low], "lowest_step": steps[low],
            "last": losses[-1], "last_step": steps[-1]}


def training_curves(q, out_png, baseline_psnr, kept):
    """Tokenizer loss and val PSNR; each generator's training and validation loss on one axis."""
    runs = os.path.join(q, "runs")
    panels = [("tokenizer: training loss (MSE + VQ + entropy + prior)",
               {"train loss": metric_column(os.path.join(runs, "tokenizer"), "loss_avg")}, None),
              ("tokenizer: val PSNR (dB)", {"val PSNR": metric_column(os.path.join(runs, "tokenizer"), "val_psnr")},
               (f"mean colour {baseline_psnr:.1f}", baseline_psnr))]
    for order in ORDERS:
        run = os.path.join(runs, order)
        panels.append((f"{order.upper()}: loss (nats/token), kept step {kept[order]['step']}",
                       {"train": metric_column(run, "loss_avg"), "val": metric_column(run, "val_loss")}, None))
    save_curves_png(panels, out_png)


def measure(q, frames, samples, seeds):
    """Memorisation and diversity of real val clips and of every seed's samples: {"spread", "nearest_train"} plus
    the per-clip mean-colour PSNR of the val clips."""
    real, real_labels = clip_stack(os.path.join(q, "data", "val.csv"), frames)
    name = "real videos (val)"
    sets = {name: (real, real_labels)}
    for order in ORDERS:
        for seed in seeds:
            sets[f"{order.upper()} samples, seed {seed}"] = clip_stack(os.path.join(samples(order, seed), "samples.csv"),
                                                                       frames)
    train_clips, _ = clip_stack(os.path.join(q, "data", "train.csv"), frames, all_windows=True)
    nearest = nearest_rms([v for v, _ in sets.values()], train_clips)
    baseline = float(mean_colour_psnr(torch.from_numpy(real).permute(0, 4, 1, 2, 3)).mean())  # (B, 3, T, H, W)
    return {"mean_colour_psnr": baseline, "train_clips": len(train_clips),
            "spread": {k: within_class_spread(v, labels) for k, (v, labels) in sets.items()},
            "nearest_train": dict(zip(sets, nearest))}


def detector_line(path):
    """The `detector: ...` line compute_fvd.py prints before `fvd=`."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.startswith("detector: ")]
    if not lines:
        sys.exit(f"[quickstart] no 'detector:' line in {path}")
    return lines[-1]


def generator_results(q, samples, seed):
    """Per generator: fvd {order: (FVD, detector line, mean NLL)} and speed {order: (passes, seconds, videos/s)} of
    the samples of `seed`."""
    fvd, speed = {}, {}
    for order in ORDERS:
        d = samples(order, seed)
        with open(os.path.join(d, "fvd_report.csv")) as f:
            row = list(csv.DictReader(f))[-1]
        log = os.path.join(q, "logs", f"fvd_{order}.log")
        fvd[order] = (last_value(log, "fvd"), detector_line(log), float(row["mean_nll"]))
        with open(os.path.join(d, "timing.json")) as f:
            timing = json.load(f)
        steps = load_generator(os.path.join(q, "runs", order, "export")).num_decode_steps()
        speed[order] = (steps, timing["generate_s"], timing["generate_videos_per_s"])
    return fvd, speed


def accuracy_lines(acc, seeds):
    """The oracle table: real videos, then each generator's accuracy for every seed and the minimum."""
    lines = ["| videos | " + " | ".join(f"seed {s}" for s in seeds) + " | **minimum** |",
             "|---|" + "---|" * (len(seeds) + 1), f"| real videos (val) | {acc['real']:.3f} |" + " |" * len(seeds)]
    for order in ORDERS:
        values = [acc[order][s] for s in seeds]
        lines.append(f"| {order.upper()} samples | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | **{min(values):.3f}** |")
    return lines


def goal_rows(acc, kept, stats, fvd_ratio, psnr_gain, total_s):
    """The quickstart's goals (a generator that learned the classes, not its training clips) and whether this run
    met each: (goal, this run, target, met) rows."""
    real = "real videos (val)"
    fakes = [k for k in stats["spread"] if k != real]
    spread = min(stats["spread"][k] for k in fakes) / stats["spread"][real]
    nearest = min(stats["nearest_train"][k] for k in fakes)
    kept_ratio = max(k["val_loss"] / k["lowest"] for k in kept.values())
    nar, raster = min(acc["nar"].values()), min(acc["raster"].values())
    farther = nearest / stats["nearest_train"][real]
    rows = [("NAR oracle accuracy, lowest of the seeds", f"{nar:.3f}", ">= 0.95", nar >= 0.95),
            ("raster oracle accuracy, lowest of the seeds", f"{raster:.3f}", ">= 0.90", raster >= 0.90),
            ("val loss at the kept checkpoint / lowest, worse generator", f"{kept_ratio:.3f}", "<= 1.05",
             kept_ratio <= 1.05),
            ("nearest training clip: closest sample set / real val clips", f"{farther:.2f}", "> 1 (samples farther)",
             farther > 1),
            ("within-class spread / real, lowest sample set", f"{spread:.3f}", ">= 0.80", spread >= 0.80),
            ("NAR FVD / tokenizer reconstruction FVD", f"{fvd_ratio:.2f}", "<= 2", fvd_ratio <= 2),
            ("tokenizer PSNR - mean-colour PSNR (dB)", f"{psnr_gain:.2f}", ">= 4", psnr_gain >= 4),
            ("wall time of this run (min; a new machine adds the venv)", f"{total_s / 60:.1f}", "<= 15",
             total_s <= 900)]
    return [(name, value, target, "yes" if ok else "no") for name, value, target, ok in rows]


def goal_lines(rows):
    """The goals table of report.md, from goal_rows."""
    lines = ["| goal | this run | target | met |", "|---|---|---|---|"]
    return lines + [f"| {name} | {value} | {target} | {'yes' if met == 'yes' else '**no**'} |"
                    for name, value, target, met in rows]


def gallery_links(q, samples, seed):
    """(text, path relative to `q`) of the gallery pages the run wrote. `samples`: (order, seed) -> folder."""
    pages = [("tokenizer: val clips beside their reconstructions", os.path.join(q, "eval_tokenizer"))]
    pages += [(f"{order.upper()} generator: samples of seed {seed} by class, beside real clips", samples(order, seed))
              for order in ORDERS]
    return [(text, os.path.relpath(os.path.join(folder, "gallery.html"), q)) for text, folder in pages
            if os.path.exists(os.path.join(folder, "gallery.html"))]


def gallery_lines(pages):
    """The report's links to the pages that show the videos (quickstart/index.html gathers them)."""
    return ["## Galleries (open in a browser, offline)", "",
            "[index.html](index.html): the goals, the curves and links to every page below.", ""] + \
        ([f"- [{text}]({path})" for text, path in pages] or ["(none written by this run)"])


def fvd_lines(fvd, recon_fvd, run):
    """The FVD section: samples of the first seed and the tokenizer's reconstructions against the same real clips."""
    n, seed = run["fvd_clips"], run["seeds"][0]
    detectors = "; ".join(sorted({v[1] for v in fvd.values()}))
    lines = ["", "## FVD against the same real clips", "",
             f"`eval/compute_fvd.py`, {detectors}. Scored: the first {n} samples of seed {seed} of each generator "
             f"against the {n} val clips they were conditioned on, and the tokenizer's reconstructions of those "
             f"{n} clips (`eval/eval_larp_tokenizer.py --max_clips {n}`: the floor a generator on these tokens can "
             f"reach); {run['frames']}-frame {run['size']}x{run['size']} clips, each frame upsampled bilinearly to "
             f"224x224 for the I3D. With {n} clips the 400-d covariance has rank <= {n - 1}, so these numbers compare "
             "the rows here; they are not comparable to published FVD (10,000 16-frame clips).", "",
             "| videos | FVD | FVD / reconstruction FVD | mean NLL / token |", "|---|---|---|---|",
             f"| tokenizer reconstructions | {recon_fvd:.2f} | 1.00 | |"]
    return lines + [f"| {k.upper()} samples | {v[0]:.2f} | {v[0] / recon_fvd:.2f} | {v[2]:.3f} |"
                    for k, v in fvd.items()]


def diversity_lines(stats, tok):
    """The within-class spread and nearest-training-clip table of the real val clips and every sample set."""
    real_spread = stats["spread"]["real videos (val)"]
    lines = ["## Within-class diversity and memorisation", "",
             "Spread: mean RMS pixel difference between two videos of the same class. Nearest training clip: mean "
             f"RMS pixel difference to the closest of the {stats['train_clips']} training clips (a generator that "
             "copies training clips token for token sits near the tokenizer's own reconstruction error, "
             f"{(tok['mse']) ** 0.5:.4f}).", "",
             "| videos | spread | spread / real | nearest training clip |", "|---|---|---|---|"]
    return lines + [f"| {k} | {v:.4f} | {v / real_spread:.2f} | {stats['nearest_train'][k]:.4f} |"
                    for k, v in stats["spread"].items()]


def write_report(q, run, acc, stats, times, total_s):
    """quickstart/report.md. `run`: the run's settings {"num_samples", "sample_args", "seeds", "fvd_clips",
    "frames", "size", "samples" (order, seed) -> folder}."""
    seeds = run["seeds"]
    fvd, speed = generator_results(q, run["samples"], seeds[0])
    with open(os.path.join(q, "eval_tokenizer", "metrics.json")) as f:
        tok = json.load(f)
    recon_fvd = last_value(os.path.join(q, "logs", "fvd_tokenizer.log"), "fvd")
    kept = {order: kept_checkpoint(os.path.join(q, "runs", order)) for order in ORDERS}
    training_curves(q, os.path.join(q, "training_curves.png"), stats["mean_colour_psnr"], kept)
    lines = ["# Quickstart report", "",
             f"Machine: {os.cpu_count()} CPU threads, torch {torch.__version__}, "
             f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}. Training set: {stats['train_clips']} clips. "
             f"{run['num_samples']} samples per generator and sampling seed, conditioned on the labels of "
             f"{run['num_samples']} val clips (FVD clip protocol, seed 42); sampling flags: "
             f"`{' '.join(run['sample_args'])}`.", "", "## Goals", ""]
    goals = goal_rows(acc, kept, stats, fvd["nar"][0] / recon_fvd, tok["psnr"] - stats["mean_colour_psnr"], total_s)
    galleries = gallery_links(q, run["samples"], seeds[0])
    lines += goal_lines(goals) + [""] + gallery_lines(galleries)
    lines += ["", "## Oracle class accuracy (analytic classifier, larp/data/oracle.py)", ""]
    lines += accuracy_lines(acc, seeds)
    lines += ["", "## Generators: the kept checkpoint (train.keep best_val)", "",
              "| generator | kept step | val loss there | lowest val loss (step) | kept / lowest | last val loss (step) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {o.upper()} | {k['step']} | {k['val_loss']:.4f} | {k['lowest']:.4f} ({k['lowest_step']}) | "
              f"{k['val_loss'] / k['lowest']:.3f} | {k['last']:.4f} ({k['last_step']}) |" for o, k in kept.items()]
    lines += fvd_lines(fvd, recon_fvd, run)
    lines += ["", "## Tokenizer reconstruction (val clips, deterministic VQ)", "",
              "| PSNR (dB) | per-clip mean colour PSNR (dB) | SSIM | MSE |", "|---|---|---|---|",
              f"| {tok['psnr']:.2f} | {stats['mean_colour_psnr']:.2f} | {tok['ssim']:.4f} | {tok['mse']:.5f} |", "",
              "The mean-colour column is what predicting every pixel of a clip as that clip's mean colour scores "
              "(a tokenizer that learned nothing). Input (rows `real`) and reconstruction (rows `recon`): "
              "![tokenizer](tokenizer_recon.png)", ""]
    lines += diversity_lines(stats, tok)
    lines += ["", "## Training curves", "", "![training curves](training_curves.png)", "",
              f"## Sampling speed (generation only, seed {seeds[0]}, same batch size and settings)", "",
              "| generator | forward passes / video | seconds | videos/s |", "|---|---|---|---|"]
    lines += [f"| {k.upper()} | {v[0]} | {v[1]:.2f} | {v[2]:.1f} |" for k, v in speed.items()]
    lines += ["", f"NAR / raster speed ratio: **{speed['raster'][1] / speed['nar'][1]:.2f}x** "
              f"(forward-pass ratio {speed['raster'][0] / speed['nar'][0]:.1f}x).", "",
              "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {'reused' if v.get('reused') else format(v['seconds'], '.1f')} |" for k, v in times.items()]
    lines += [f"| **this run, total** | {total_s:.1f} |", "", "## Previews (one row per class)", "",
              "NAR: ![NAR samples](preview_nar.gif)  raster: ![raster samples](preview_raster.gif)", ""]
    text = "\n".join(lines)
    write_index(q, goals, galleries)
    with open(os.path.join(q, "report.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"[quickstart] report written to {os.path.join(q, 'report.md')}")
    return kept
