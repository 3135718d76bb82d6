"""The output folder of a sampling run: shard ranges, their files, the settings claim and the FVD report.

Kept apart from `larp.sampling.run` (which generates) so the bookkeeping that makes shards safe to run in any order,
on any machines, at the same time can be read on its own. The folder layout is described in `larp.sampling.run`.
"""
import contextlib
import csv
import datetime
import functools
import hashlib
import json
import operator
import os
import re

import numpy as np
from filelock import FileLock

from larp.core import locks
from larp.core.errors import FolderBusyError, SampleError
from larp.metrics.fvd import FeatureStats, check_comparable, frechet_distance
from larp.core.io import atomic_write, atomic_write_text, naming_write_errors, remove_stale_temps
from larp.core.safe_load import load_npy, load_npz
from larp.models.sampling_params import SAMPLING_FIELDS

REPORT_COLUMNS = ["time", "run_id", "ar_model", "tokenizer", "dataset_csv", "num_samples_total", *SAMPLING_FIELDS,
                  "dtype", "tokenizer_dtype", "seed", "frame_prediction", "num_cond_frames", "paste_cond_frames",
                  "argmax_cond", "fvd_size", "mean_nll", "fvd", "detector", "protocol"]
SAMPLE_COLUMNS = ["index", "label", "action", "path", "gt_path", "clip_path", "clip_start"]
STATS_RE = re.compile(r"^generated_fvd_stats_(\d+)_(\d+)\.pkl$")
RANGE_LOCK_RE = re.compile(r"^\.sampling_(\d+)_(\d+)\.lock$")
SUBFOLDERS = ("parts", "sampled_videos", "gt_videos", "gallery")


@contextlib.contextmanager
def folder_lock(output_dir):
    """The folder's short-lived bookkeeping lock (.fvd.lock): claims, range locks, merges and the FVD."""
    lock = FileLock(os.path.join(output_dir, ".fvd.lock"))
    with naming_write_errors(lock.lock_file):
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def hold_range(output_dir, a, b):
    """This process samples [a, b) of the folder alone while the context lasts.

    Under the folder lock: a live process holding a range lock (.sampling_<c>_<d>.lock) that overlaps [a, b) makes
    this one refuse with one line naming it (so the same command launched twice does the work once); locks of dead
    processes are removed; then this process takes its own. The OS drops the lock of a killed process.
    """
    if a >= b:
        yield
        return
    path = os.path.join(output_dir, f".sampling_{a}_{b}.lock")
    with folder_lock(output_dir):
        for name in sorted(os.listdir(output_dir)):
            m = RANGE_LOCK_RE.match(name)
            holder = locks.remove_if_stale(os.path.join(output_dir, name)) if m else None
            if holder and max(a, int(m.group(1))) < min(b, int(m.group(2))):
                raise FolderBusyError(f"samples [{m.group(1)}, {m.group(2)}) of {output_dir} are being sampled by "
                                      f"{holder}; this process would redo [{a}, {b}): wait for that one (it "
                                      f"computes the FVD once the run is covered) or sample another range")
        with naming_write_errors(path):
            fd, _ = locks.take(path)  # free: checked above, under the folder lock
    try:
        yield
    finally:
        with folder_lock(output_dir):
            os.remove(path)
            locks.release(fd)


def remove_temps(output_dir):
    """Temp files of writes killed half-way, in the folder and its subfolders (live writers' are kept)."""
    for folder in (output_dir, *(os.path.join(output_dir, s) for s in SUBFOLDERS)):
        remove_stale_temps(folder)


def find_tiling(ranges, lo, hi):
    """Ranges from `ranges` that tile [lo, hi) exactly without overlap (list sorted by start), or None."""
    starts = {}
    for a, b in sorted(set(ranges), key=lambda r: (r[0], -r[1])):
        if lo <= a < b <= hi:
            starts.setdefault(a, []).append((a, b))
    dead = set()

    def walk(pos):
        if pos == hi:
            return []
        if pos in dead:
            return None
        for a, b in starts.get(pos, []):
            rest = walk(b)
            if rest is not None:
                return [(a, b)] + rest
        dead.add(pos)
        return None
    return walk(lo)


def stats_paths(output_dir, a, b):
    return {"gen": os.path.join(output_dir, f"generated_fvd_stats_{a}_{b}.pkl"),
            "gt": os.path.join(output_dir, f"gt_fvd_stats_{a}_{b}.pkl"),
            "nll": os.path.join(output_dir, f"nll_{a}_{b}.npy"),
            "samples": os.path.join(output_dir, "parts", f"samples_{a}_{b}.csv"),
            "meta": os.path.join(output_dir, "parts", f"range_{a}_{b}.json"),
            "features": os.path.join(output_dir, "parts", f"features_{a}_{b}.npz")}


OPTIONAL_PARTS = ("features",)  # absent from ranges written before per-sample features were kept


def finished_ranges(output_dir):
    """Ranges [a, b) whose generated stats, real stats and NLL files all exist."""
    out = []
    for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else []):
        m = STATS_RE.match(name)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if all(os.path.exists(p) for k, p in stats_paths(output_dir, a, b).items() if k not in OPTIONAL_PARTS):
                out.append((a, b))
    return sorted(out)


def remove_partial(output_dir, a, b):
    """Files of unfinished ranges inside [a, b) (a process killed while writing a chunk): they are redone, and
    must not be globbed by the eval/ tools meanwhile. [a, b) belongs to the caller alone (shards never overlap)."""
    pattern = re.compile(r"^(?:generated|gt)_fvd_stats_(\d+)_(\d+)\.pkl$|^nll_(\d+)_(\d+)\.npy$|"
                         r"^samples_(\d+)_(\d+)\.csv$|^range_(\d+)_(\d+)\.json$|^features_(\d+)_(\d+)\.npz$")
    finished = set(finished_ranges(output_dir))
    for folder in (output_dir, os.path.join(output_dir, "parts")):
        for name in (os.listdir(folder) if os.path.isdir(folder) else []):
            m = pattern.match(name)
            if m:
                ra, rb = (int(x) for x in m.groups() if x is not None)
                if a <= ra < rb <= b and (ra, rb) not in finished:
                    os.remove(os.path.join(folder, name))


def remove_ranges(output_dir, a, b):
    """--replace: delete (under the lock) the files of every finished range that overlaps [a, b)."""
    with folder_lock(output_dir):
        for ra, rb in finished_ranges(output_dir):
            for p in stats_paths(output_dir, ra, rb).values() if max(ra, a) < min(rb, b) else ():
                if os.path.exists(p):
                    os.remove(p)


def write_csv(path, rows, columns):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_id(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def claim_output_dir(output_dir, settings, start, end):
    """Under the lock: record or compare run_config.json, then register the shard [start, end)."""
    with naming_write_errors(output_dir):
        os.makedirs(output_dir, exist_ok=True)
    with folder_lock(output_dir):
        cfg_path = os.path.join(output_dir, "run_config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                old = json.load(f)
            diff = [f"{k}: {old.get(k)!r} there vs {settings.get(k)!r} now"
                    for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            if diff:
                raise SampleError(f"--output_dir {output_dir} holds a run with different settings "
                                  f"({'; '.join(diff)}); use another --output_dir")
        else:
            atomic_write_text(cfg_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        shards_path = os.path.join(output_dir, "shards.json")
        shards = json.load(open(shards_path)) if os.path.exists(shards_path) else []
        for a, b in shards:
            if (a, b) != (start, end) and max(a, start) < min(b, end):
                raise SampleError(f"shard [{start}, {end}) overlaps shard [{a}, {b}) already sampled into "
                                  f"{output_dir}; choose non-overlapping --starting_index/--num_samples")
        if [start, end] not in shards:
            atomic_write_text(shards_path, json.dumps(sorted(shards + [[start, end]])) + "\n")


MATMUL_WORDS = {"high": "float32 matmuls of generation and decoding in TF32 on CUDA (matmul precision high)",
                "highest": "float32 matmuls of generation and decoding in full fp32 (matmul precision highest)"}
NLL_WORDS = {"conditional": "mean_nll: per-token NLL of the sampled tokens under their own class (LARP's NLL_sampled)",
             "class_swapped": "mean_nll: per-token NLL of the sampled tokens, a class-dropout share of samples scored "
                              "under the null class (the reference NAR's NLL_sampled)"}


def protocol_card(settings, detector, detector_sha256=None):
    """What the FVD of a run measured, from its settings: detector and weight digest, clip set and draw, resize,
    precision, sample count (and, for frame prediction, the condition and the frames scored)."""
    size, fvd, total = settings["input_size"], settings["fvd_size"], settings["num_samples_total"]
    csvs = ", ".join(os.path.basename(p) for p in settings["dataset_csv"].split("+"))
    card = {"detector": detector.removeprefix("detector: "), "detector_sha256": detector_sha256,
            "clips": f"{total} of the non-overlapping {settings['num_frames']}-frame clips of {csvs} (paths sorted "
                     f"as spelled), drawn with random.Random({settings['dataset_split_seed']}).sample; real "
                     f"statistics from the same clips",
            "resize": f"torchvision Resize({size}, antialias) + CenterCrop({size})"
                      + (f", then Resize(({fvd}, {fvd}))" if fvd != size else "") + "; detector input 224x224",
            "precision": f"generator weights {settings['dtype']}, tokenizer {settings.get('tokenizer_dtype')}, "
                         f"{MATMUL_WORDS.get(settings.get('matmul_precision'), 'float32 matmuls as the GPU default')}"
                         f"; detector {'bf16' if detector.endswith(', bf16') else 'fp32'}",
            "num_samples": total,
            "nll": NLL_WORDS.get(settings.get("nll", "conditional"))}
    if settings["frame_prediction"]:
        k = settings["num_cond_frames"]
        card["condition"] = (f"tokens of the first {k} frames (the last repeated to the clip length), "
                             f"{'argmax' if settings.get('argmax_cond') else 'sampled (per-sample seeds)'} VQ")
        pasted = settings.get("paste_cond_frames")
        card["frames_scored"] = f"decoded, the first {k} replaced by the real ones" if pasted else "every decoded frame"
    return card


def read_features(output_dir):
    """(real (n, F), generated (n, F)) per-sample I3D features of the finished ranges that tile [0, total), in
    sample order, or None when the run is not covered or a range of the tiling kept no features (written by an
    older version)."""
    with open(os.path.join(output_dir, "run_config.json")) as f:
        total = json.load(f)["num_samples_total"]
    tiling = find_tiling(finished_ranges(output_dir), 0, total)
    paths = [stats_paths(output_dir, a, b)["features"] for a, b in tiling or []]
    if not paths or not all(os.path.exists(p) for p in paths):
        return None
    parts = [load_npz(p) for p in paths]
    return tuple(np.concatenate([d[k] for d in parts]) for k in ("real", "fake"))


def merge_parts(output_dir):
    """samples.csv and timing.json from every finished range (sorted by index, deduplicated). Caller holds lock."""
    rows, timing = {}, {}
    for a, b in finished_ranges(output_dir):
        paths = stats_paths(output_dir, a, b)
        for r in read_csv(paths["samples"]):
            rows[int(r["index"])] = r
        with open(paths["meta"]) as f:
            timing[f"{a}_{b}"] = json.load(f)["timing"]
    write_csv(os.path.join(output_dir, "samples.csv"), [rows[i] for i in sorted(rows)], SAMPLE_COLUMNS)
    return timing


def report_row(settings, rid, value, nll, meta):
    """The fvd_report.csv row of run `rid`: its settings, the FVD, the mean NLL and the protocol card."""
    row = {k: settings.get(k, "") for k in REPORT_COLUMNS}
    row.update(time=datetime.datetime.now().isoformat(timespec="seconds"), run_id=rid,
               mean_nll=f"{float(nll.mean()):.6f}", fvd=f"{value:.6f}", detector=meta["detector"],
               protocol=json.dumps(protocol_card(settings, meta["detector"], meta.get("detector_sha256"))))
    return row


def finalize(output_dir, settings, replace=False, log=print):
    """Under the lock: merge the parts; when finished ranges tile [0, total), compute the FVD once per run id.

    Finished ranges left outside the tiling (a rerun with another rank layout) duplicate samples of the tiling:
    their files are removed, so every stats file in the folder counts once (eval/ tools glob them).
    Returns {"fvd": float or None, "computed": bool, "covered": int}. With `replace`, an existing row of this run
    is recomputed and replaced (never duplicated).
    """
    total = settings["num_samples_total"]
    with folder_lock(output_dir):
        ranges = finished_ranges(output_dir)
        tiling = find_tiling(ranges, 0, total)
        for a, b in set(ranges) - set(tiling or ranges):
            for p in stats_paths(output_dir, a, b).values():
                if os.path.exists(p):
                    os.remove(p)
        timing = merge_parts(output_dir)
        if tiling is None:
            covered = len(set().union(*[range(a, b) for a, b in ranges])) if ranges else 0
            return {"fvd": None, "computed": False, "covered": covered}
        rid = run_id(settings)
        report = os.path.join(output_dir, "fvd_report.csv")
        rows = read_csv(report)
        mine = [r for r in rows if r.get("run_id") == rid]
        if mine and not replace:
            log(f"FVD of run {rid} already in {report}")
            return {"fvd": float(mine[-1]["fvd"]), "computed": False, "covered": total}
        paths = [stats_paths(output_dir, a, b) for a, b in tiling]
        gen = functools.reduce(operator.add, [FeatureStats.load(p["gen"]) for p in paths])
        gt = functools.reduce(operator.add, [FeatureStats.load(p["gt"]) for p in paths])
        check_comparable(gen, gt, ("generated", "real"))
        value = float(frechet_distance(gen, gt))
        nll = np.concatenate([load_npy(p["nll"]) for p in paths])  # allow_pickle=False
        with open(paths[0]["meta"]) as f:
            meta = json.load(f)
        detector = meta["detector"]
        used = {f"{a}_{b}": timing[f"{a}_{b}"] for a, b in tiling}
        gen_s = sum(t["generate_s"] for t in used.values())
        summary = {"num_videos": total, "generate_s": gen_s, "generate_videos_per_s": total / max(gen_s, 1e-9),
                   **{k: sum(t[k] for t in used.values()) for k in ("encode_s", "decode_s", "i3d_s", "total_s")},
                   "ranges": used}
        atomic_write_text(os.path.join(output_dir, "timing.json"), json.dumps(summary, indent=2) + "\n")
        row = report_row(settings, rid, value, nll, meta)
        # last: a run killed before this line computes the FVD again; after it, finds it done
        write_csv(report, [r for r in rows if r.get("run_id") != rid] + [row], REPORT_COLUMNS)
        log(f"FVD over {total} samples ({len(tiling)} ranges): {value:.4f} [{detector}]; mean NLL "
            f"{float(nll.mean()):.4f}; row appended to {report}")
        return {"fvd": float(row["fvd"]), "computed": True, "covered": total}
