"""Sharded sampling with FVD on completion: the work behind `sample.py`.

One output folder holds one run (one set of settings, `larp.sampling.job.run_settings`); shards of it may run in any
order, on any machines, at the same time. `run(job)` takes a `larp.sampling.job.SampleJob` (sample.py builds it from
the flags), checks it with `prepare` before any model loads, then samples and finalizes. The folder:

  run_config.json                    the run's settings; a later call with other settings is refused
  shards.json                        the shard ranges [a, b) used so far; a different overlapping range is refused
  sampled_videos/<i>.mp4             the generated video of global index i (gt_videos/<i>.mp4: its real clip,
                                     frame prediction only)
  generated_fvd_stats_<a>_<b>.pkl    I3D feature statistics of the samples [a, b) (b exclusive), written last:
  gt_fvd_stats_<a>_<b>.pkl, nll_<a>_<b>.npy    a range with all its files is finished and is skipped on reruns
  parts/samples_<a>_<b>.csv, parts/range_<a>_<b>.json    per-range rows and timing, merged into samples.csv
                                     (index,label,action,path,...: readable by larp.data.oracle) and timing.json
  preview.png, fvd_report.csv, .fvd.lock
  .sampling_<a>_<b>.lock             held while a process samples [a, b): the same range started again meanwhile
                                     refuses in one line naming that process (larp.sampling.output_folder.hold_range)

Chunks: a process writes its range as chunks of `--chunk_size` samples ([a, a + C), [a + C, a + 2C), ...), each a
finished range of its own once its files are written. A killed process loses only the chunk in progress: a rerun
removes that chunk's partial files (and the temp files of killed writes) and continues from the first unfinished
chunk, with the same chunk boundaries and therefore the same batches, files, FVD and report row as an uninterrupted
run. The float64 statistics of the chunks add up exactly, and the FVD uses one tiling of [0, total) by finished
ranges, so no sample counts twice.

Reproducibility: sample i is drawn with seed `sample_seed(seed, i)` = seed * 1_000_003 + i, handed to the
generator's per-sample `seeds`, so a video depends on its global index only, never on the shard layout, the batch
size or the number of ranks. Under torchrun each rank takes a contiguous part of this process's range; ranks never
talk to each other: files and one lock coordinate them, and whoever completes the coverage of [0, total) computes
the FVD (once per run id: a re-check inside the lock prevents duplicate or lost rows).

Frame prediction: the condition is the tokenizer tokens of the first `num_cond_frames` frames with the last of them
repeated to the clip length; the generated tokens are decoded to the full clip. For FVD (and the saved mp4) the
conditioning frames of the generated clip are replaced by the real ones: they are given, not predicted, so the
score measures the prediction rather than the tokenizer's reconstruction of the context. Real and generated clips
are resized to `fvd_size` (64 by default, as in the reference protocol).
"""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from larp.models.generator import load_generator
from larp.core.errors import CheckpointError, SampleError
from larp.data.video_io import write_video
from larp.core.dist import dist_info
from larp.metrics.detectors import load_i3d
from larp.metrics.fvd import FeatureStats, fvd_label
from larp.core.io import atomic_write, atomic_write_text, resize_video, to_uint8
from larp.sampling.output_folder import SAMPLE_COLUMNS, claim_output_dir, finalize, find_tiling, finished_ranges, hold_range, remove_partial, remove_ranges, remove_temps, run_id, stats_paths, write_csv
from larp.sampling.job import prepare
from larp.models.tokenizer import LARPTokenizer
from larp.core.utils import autocast, get_device
from larp.core.visualize import save_preview_png

SEED_STRIDE = 1_000_003
PREVIEW_SAMPLES = 8


def sample_seed(seed, index):
    """Seed of global sample `index`: independent of shard layout and batch size."""
    return int(seed) * SEED_STRIDE + int(index)


def rank_range(start, num, rank, world):
    """Contiguous part [a, b) of [start, start + num) for `rank` of `world`."""
    return start + num * rank // world, start + num * (rank + 1) // world


# ---------------------------------------------------------------------------------------------- generation

def _clock(device):
    """perf_counter after the device finished its queued work (honest CUDA timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def load_models(tokenizer_spec, ar_model_spec, device):
    """(tokenizer, generator) in eval mode on `device`; the tokenizer's quantizer made deterministic."""
    try:
        tokenizer = LARPTokenizer.from_pretrained(tokenizer_spec).to(device).eval()
    except CheckpointError as e:
        raise SampleError(f"--tokenizer: {e}") from None
    try:
        model = load_generator(ar_model_spec, device=device).eval()
    except CheckpointError as e:
        raise SampleError(f"--ar_model: {e}") from None
    tokenizer.set_vq_eval_deterministic(True)
    return tokenizer, model


def load_all(job, plan, world, local_rank, log):
    """(models, detector, device) of a process that has samples to draw; under torchrun each rank on its GPU."""
    device = get_device(job.device)
    if device.type == "cuda" and world > 1 and job.device in (None, "", "auto", "cuda"):
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    t0 = time.perf_counter()
    models = load_models(job.tokenizer, job.ar_model, device)
    detector = load_i3d(plan.i3d_spec, device)
    log(f"models and I3D loaded in {time.perf_counter() - t0:.1f} s on {device}")
    return models, detector, device


def todo_chunks(done, a, b, chunk_size):
    """The chunks [c, d) of [a, b) still to sample, given the finished ranges `done`.

    Walks from `a`: a finished range starting here (and ending within [a, b)) is skipped, else a new chunk of at
    most `chunk_size` samples starts here and stops at the next finished range. Chunk boundaries are a + k *
    chunk_size whatever was killed when, so a resumed run writes the same files as an uninterrupted one.
    """
    ends = {}
    for c, d in done:
        if a <= c < d <= b:
            ends[c] = max(ends.get(c, d), d)
    todo, pos = [], a
    while pos < b:
        if pos in ends:
            pos = ends[pos]
            continue
        stop = min([c for c in ends if c > pos] + [b, a + ((pos - a) // chunk_size + 1) * chunk_size])
        todo.append((pos, stop))
        pos = stop
    return todo


def _new_timing():
    return dict.fromkeys(["data_s", "encode_s", "generate_s", "decode_s", "i3d_s", "write_wait_s"], 0.0)


class ChunkState:
    """What one chunk [c, d) accumulates until its files are written: feature statistics, NLLs, sample rows, the
    pending mp4 writes and the timing."""

    def __init__(self, detector, t_start):
        self.gen_stats, self.gt_stats = FeatureStats(detector=detector.name), FeatureStats(detector=detector.name)
        self.nlls, self.rows, self.pending, self.tm, self.t_start = [], [], [], _new_timing(), t_start


def sample_chunks(job, plan, chunks, models, detector, device, log=print):
    """Generate, save and measure the samples of each chunk [c, d) in `chunks` (one loader over all of them).

    A chunk's files are written once all its samples and mp4s are done, its generated stats last (their presence
    marks the chunk finished), so a killed process loses at most the chunk in progress. Returns the timing dicts.
    """
    batches = [list(range(i, min(i + job.sample_batch_size, d))) for c, d in chunks
               for i in range(c, d, job.sample_batch_size)]  # global indices; a batch never crosses a chunk
    subset = torch.utils.data.Subset(plan.dataset, plan.chosen)  # position i = global sample index i
    loader = torch.utils.data.DataLoader(subset, batch_sampler=batches, num_workers=job.num_workers,
                                         pin_memory=device.type == "cuda")
    timings, k, chunk = [], 0, None
    with ThreadPoolExecutor(max_workers=4) as pool:
        t_data = time.perf_counter()
        for batch, idx in tqdm(zip(loader, batches), total=len(batches), unit="batch",
                               desc=f"sampling {sum(d - c for c, d in chunks)} videos in {len(chunks)} chunk(s)"):
            if chunk is None:
                chunk = ChunkState(detector, t_data)
            video, fake = generate_batch(job, plan, batch, idx, models, detector, device, chunk, t_data)
            queue_writes(job, plan, batch, idx, video, fake, chunk, pool)
            if idx[0] == 0:
                save_preview(os.path.join(job.output_dir, "preview.png"), fake,
                             video if job.frame_prediction else None, chunk.rows[:PREVIEW_SAMPLES])
            chunk.pending = _drain(chunk.pending, keep=4 * job.sample_batch_size)
            if idx[-1] + 1 == chunks[k][1]:  # the chunk is complete
                t5 = time.perf_counter()
                for fut in chunk.pending:
                    fut.result()
                chunk.tm["write_wait_s"] = time.perf_counter() - t5
                chunk.tm["total_s"] = time.perf_counter() - chunk.t_start
                timings.append(_write_chunk(job.output_dir, chunks[k], chunk, detector, job.frame_prediction, log))
                k, chunk = k + 1, None
            t_data = time.perf_counter()
    return timings


def generate_batch(job, plan, batch, idx, models, detector, device, chunk, t_data):
    """Condition, generate, decode and measure the samples `idx` (global indices) of one batch into `chunk`.
    Returns (real clips, generated clips), each (B, 3, T, S, S) in [0, 1] on the device."""
    tokenizer, model = models
    fp, num_cond, tm = job.frame_prediction, job.num_cond_frames, chunk.tm
    video = batch["video"].to(device, non_blocking=True)  # (B, 3, T, S, S) real clips in [0, 1]
    t0 = _clock(device)
    tm["data_s"] += t0 - t_data
    with torch.no_grad(), autocast(device, job.dtype):
        if fp:
            cond = tokenizer.encode_condition(video, num_cond)  # (B, N)
        else:
            cond = batch["label"].to(device).long()  # (B,)
        t1 = _clock(device)
        tokens, nll = model.generate(cond, job.params, seeds=[sample_seed(job.seed, i) for i in idx],
                                     return_nll=True)
        t2 = _clock(device)
        fake = tokenizer.decode_from_bottleneck(tokens).float().clamp(0, 1)  # (B, 3, T, S, S)
    t3 = _clock(device)
    if fp:
        fake[:, :, :num_cond] = video[:, :, :num_cond]
    chunk.gen_stats.add(detector(resize_video(fake, plan.fvd_size)))  # (B, 400), fp32 on the detector
    chunk.gt_stats.add(detector(resize_video(video, plan.fvd_size)))
    t4 = _clock(device)
    tm["encode_s"] += t1 - t0
    tm["generate_s"] += t2 - t1
    tm["decode_s"] += t3 - t2
    tm["i3d_s"] += t4 - t3
    chunk.nlls.append(nll.float().cpu().numpy())
    return video, fake


def queue_writes(job, plan, batch, idx, video, fake, chunk, pool):
    """The sample rows of one batch, and its mp4 writes queued on `pool` (none with --stats_only)."""
    out = job.output_dir
    fake_u8 = to_uint8(fake)  # (B, T, S, S, 3)
    real_u8 = to_uint8(video) if job.frame_prediction else None
    for j, i in enumerate(idx):
        label = int(batch["label"][j])
        path, start = plan.dataset.clips[plan.chosen[i]][:2]
        row = {"index": i, "label": label, "action": plan.class_names.get(label, ""),
               "clip_path": path, "clip_start": int(start), "path": "", "gt_path": ""}
        videos = [("path", f"sampled_videos/{i}.mp4", fake_u8[j])]
        if real_u8 is not None:
            videos.append(("gt_path", f"gt_videos/{i}.mp4", real_u8[j]))
        for key, rel, frames in videos:  # --stats_only: list only files left by an earlier run
            if not job.stats_only:
                chunk.pending.append(pool.submit(write_video, os.path.join(out, rel), frames))
            row[key] = rel if not job.stats_only or os.path.exists(os.path.join(out, rel)) else ""
        chunk.rows.append(row)


def _write_chunk(out, bounds, chunk, detector, frame_prediction, log):
    """The files of a finished chunk [a, b) = `bounds`, atomically, the generated stats last."""
    a, b = bounds
    gen_stats, gt_stats, nlls, rows, tm = chunk.gen_stats, chunk.gt_stats, chunk.nlls, chunk.rows, chunk.tm
    tm["num_videos"] = b - a
    tm["generate_videos_per_s"] = (b - a) / max(tm["generate_s"], 1e-9)
    paths = stats_paths(out, a, b)
    atomic_write(paths["nll"], lambda tmp: np.save(tmp, np.concatenate(nlls)))
    write_csv(paths["samples"], rows, SAMPLE_COLUMNS)
    meta = {"range": [a, b], "detector": fvd_label(detector), "timing": tm}
    atomic_write_text(paths["meta"], json.dumps(meta, indent=2) + "\n")
    gt_stats.save(paths["gt"])  # atomic
    gen_stats.save(paths["gen"])  # last: its presence marks the range finished
    log(f"timing [{a}, {b}): generation {b - a} videos in {tm['generate_s']:.2f} s "
        f"({tm['generate_videos_per_s']:.2f} videos/s); tokenizer decode {tm['decode_s']:.2f} s"
        f"{'; condition encode %.2f s' % tm['encode_s'] if frame_prediction else ''}; "
        f"I3D {tm['i3d_s']:.2f} s; data {tm['data_s']:.2f} s; mp4 wait {tm['write_wait_s']:.2f} s; "
        f"total {tm['total_s']:.2f} s")
    return tm


def _drain(futures, keep):
    """Re-raise errors of finished mp4 writes; block until at most `keep` writes are pending."""
    pending = []
    for f in futures:
        if f.done():
            f.result()
        else:
            pending.append(f)
    while len(pending) > keep:
        pending.pop(0).result()
    return pending


def save_preview(path, fake, real, rows):
    """PNG grid of the first samples (one row per video), labelled with index and class name."""
    n = len(rows)
    names = [f"#{r['index']} {r['action']}" for r in rows]
    save_preview_png(path, fake[:n], names, real=real[:n] if real is not None else None)


# ---------------------------------------------------------------------------------------------- finalization


def claim(job):
    """Check the job before any model loads (larp/sampling/job.py), then claim its shard in the output folder.
    Returns the SamplePlan."""
    plan = prepare(job)
    claim_output_dir(job.output_dir, plan.settings, job.starting_index, job.starting_index + job.num_samples)
    return plan


def run(job):
    """Validate the SampleJob, sample this process's range (its rank's part under torchrun), finalize. Returns the
    FVD or None (other shards still missing)."""
    plan = claim(job)
    rank, world, local_rank = dist_info()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""

    def log(msg):
        print(prefix + msg, flush=True)

    a, b = rank_range(job.starting_index, job.num_samples, rank, world)
    out, settings = job.output_dir, plan.settings
    with hold_range(out, a, b):  # the same range launched twice: the second one refuses in one line
        log(f"run {run_id(settings)}: samples [{a}, {b}) of [0, {settings['num_samples_total']}) into {out}")
        remove_temps(out)
        if job.replace and a < b:
            remove_ranges(out, a, b)
        remove_partial(out, a, b)
        done = finished_ranges(out)
        todo = todo_chunks(done, a, b, job.chunk_size) if a < b and find_tiling(done, a, b) is None else []
        if a < b and not todo:
            log(f"skipping [{a}, {b}): its stats already exist in {out} (use --replace to redo)")
        elif todo:
            left = sum(d - c for c, d in todo)
            if left < b - a:
                log(f"resuming [{a}, {b}): {b - a - left} samples already finished in {out}; sampling the other "
                    f"{left}")
            sample_chunks(job, plan, todo, *load_all(job, plan, world, local_rank, log), log=log)
        result = finalize(out, settings, replace=job.replace, log=log)
    if result["fvd"] is None:
        log(f"covered {result['covered']} of {settings['num_samples_total']} samples; the FVD is computed when "
            f"the remaining shards finish")
        return None
    print(f"fvd={result['fvd']:.6f}", flush=True)
    return result["fvd"]
