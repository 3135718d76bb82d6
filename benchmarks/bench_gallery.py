"""Size and load time of a sampling run's gallery page for a run of many samples, in headless Chromium.

    python -m benchmarks.bench_gallery [--samples 1000] [--classes 101] [--per_class 4] [--repeats 5] [--keep DIR]

Builds a fake run folder as sample.py leaves it (run_config.json, samples.csv with UCF-101-like class names, tiny
mp4s, fvd_report.csv, timing.json, stats files named as the run's) with the thumbnails sampling makes (animated
WebP of 16-frame 128x128 procedural clips, for the samples the page shows), then measures:
- writing the page (larp.sampling.run_gallery.write_run_gallery) and a rewrite that changes nothing;
- the page's bytes, and the bytes of the thumbnails it shows;
- in Chromium from file://: navigation to the load event (lazy thumbnails: the first screen only), and to every
  thumbnail loaded (all of them asked to load at once), medians of --repeats fresh loads;
- the cost of one sample's thumbnails (generated + real) while sampling.
Prints a markdown table. Needs `chromium` on PATH.
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from larp.core.gallery import save_thumbnail
from larp.data.procedural import procedural_clip
from larp.data.video_io import write_video
from larp.sampling.output_folder import REPORT_COLUMNS, SAMPLE_COLUMNS, run_id, write_csv
from larp.sampling.run_gallery import thumbnail_names, write_run_gallery
from tools.browser import LOAD_ALL_IMAGES, Browser  # tools/ is not installed: run with python -m from the root


def fake_settings(total):
    return {"ar_model": "hywang66/LARP-L-long-AR@0123abc", "tokenizer": "hywang66/LARP-L-long-tokenizer@4567def",
            "dataset_csv": "/data/ucf101_train.csv", "dataset_split_seed": 42, "num_samples_total": total,
            "cfg_scale": 1.25, "cfg_interval": -1, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "dtype": "bf16",
            "tokenizer_dtype": "fp16", "seed": 0, "frame_prediction": False, "num_cond_frames": 0,
            "paste_cond_frames": False, "argmax_cond": False, "num_frames": 16, "input_size": 128, "fvd_size": 128,
            "i3d": "kinetics400"}


def build_run(out, total, classes, per_class):
    """The fake run folder; returns (settings, seconds per sample for its thumbnails)."""
    settings = fake_settings(total)
    os.makedirs(os.path.join(out, "sampled_videos"), exist_ok=True)
    with open(os.path.join(out, "run_config.json"), "w") as f:
        json.dump(settings, f)
    tiny = np.zeros((2, 16, 16, 3), np.uint8)
    rows, shown, spent = [], {}, []
    for i in range(total):
        label = i % classes
        rows.append({"index": i, "label": label, "action": f"Action{label:03d}_{'Long' * (label % 3)}Name",
                     "path": f"sampled_videos/{i}.mp4", "gt_path": "", "clip_path": f"/data/v_{i}.avi",
                     "clip_start": 0})
        write_video(os.path.join(out, rows[-1]["path"]), tiny)
        if shown.setdefault(label, 0) < per_class:
            shown[label] += 1
            clip = procedural_clip(i, frames=16, size=128)
            t0 = time.perf_counter()
            for key in ("fake", "real"):
                save_thumbnail(os.path.join(out, thumbnail_names(i)[key]), clip)
            spent.append(time.perf_counter() - t0)
    write_csv(os.path.join(out, "samples.csv"), rows, SAMPLE_COLUMNS)
    card = {"detector": "Kinetics-400 I3D", "clips": f"{total} clips", "num_samples": total}
    row = {**{k: settings.get(k, "") for k in REPORT_COLUMNS}, "run_id": run_id(settings), "fvd": "123.456789",
           "mean_nll": "5.0", "detector": "detector: Kinetics-400 I3D", "protocol": json.dumps(card)}
    write_csv(os.path.join(out, "fvd_report.csv"), [row], REPORT_COLUMNS)
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump({"num_videos": total, "generate_s": total / 20.0}, f)
    for prefix in ("generated", "gt"):
        open(os.path.join(out, f"{prefix}_fvd_stats_0_{total}.pkl"), "wb").close()
    return settings, statistics.median(spent)


def measure_browser(page, repeats):
    """Medians over fresh browsers of (seconds to the load event, seconds to every image loaded, images, broken)."""
    loads, alls = [], []
    for _ in range(repeats):
        with Browser() as b:
            t0 = time.perf_counter()
            loads.append(b.open(page))
            seen = b.evaluate(LOAD_ALL_IMAGES)
            alls.append(time.perf_counter() - t0)
    broken = [i["src"] for i in seen["images"] if not i["loaded"]]
    return statistics.median(loads), statistics.median(alls), len(seen["images"]), broken


def main(args):
    out = args.keep or tempfile.mkdtemp(prefix="bench_gallery_")
    settings, thumb_s = build_run(out, args.samples, args.classes, args.per_class)
    page = os.path.join(out, "gallery.html")
    t0 = time.perf_counter()
    write_run_gallery(out, settings, args.per_class)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rewrote = write_run_gallery(out, settings, args.per_class)
    again_s = time.perf_counter() - t0
    load_s, all_s, images, broken = measure_browser(page, args.repeats)
    thumbs = sum(os.path.getsize(os.path.join(out, "gallery", n)) for n in os.listdir(os.path.join(out, "gallery")))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads; folder: {out}")
    print(f"| {args.samples} samples, {args.classes} classes, {args.per_class} per class | value |\n|---|---|")
    for name, value in (("gallery.html size", f"{os.path.getsize(page) / 1024:.1f} KiB"),
                        ("thumbnails shown (generated + real)", f"{images} images, {thumbs / 2**20:.2f} MiB"),
                        ("write the page", f"{write_s * 1000:.0f} ms"),
                        ("rewrite with nothing changed", f"{again_s * 1000:.0f} ms (file rewritten: {rewrote})"),
                        ("Chromium: navigation to load event (median)", f"{load_s * 1000:.0f} ms"),
                        ("Chromium: every thumbnail loaded (median)", f"{all_s * 1000:.0f} ms"),
                        ("thumbnails that did not load", str(len(broken))),
                        ("thumbnails of one sample while sampling", f"{thumb_s * 1000:.1f} ms")):
        print(f"| {name} | {value} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000, help="samples of the fake run (default: 1000)")
    p.add_argument("--classes", type=int, default=101, help="classes (default: 101, as UCF-101)")
    p.add_argument("--per_class", type=int, default=4, help="samples shown per class (default: 4)")
    p.add_argument("--repeats", type=int, default=5, help="fresh browser loads, median reported (default: 5)")
    p.add_argument("--keep", default=None, help="build the folder here and keep it (default: a temp folder)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
