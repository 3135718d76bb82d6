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
  parts/features_<a>_<b>.npz         per-sample I3D features (real, fake) of [a, b), for a bootstrap interval
  parts/samples_<a>_<b>.csv, parts/range_<a>_<b>.json    per-range rows and timing, merged into samples.csv
                                     (index,label,action,path,...: readable by larp.data.oracle) and timing.json
  preview.png, fvd_report.csv, .fvd.lock
  gallery.html, gallery/             the page to look at the samples by class, and its thumbnails
                                     (larp.sampling.run_gallery)
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
size or the number of ranks. Bit for bit on one device (where kernels may depend on the batch shape): every batch
has exactly --sample_batch_size rows and sample i is always row i % sample_batch_size (`aligned_batches`; rows
outside the chunk are padding, copies of its nearest sample), so a sharded run writes the same tokens, NLLs and mp4s
as an unsharded one with the same batch size. The loop never waits for the GPU before a chunk ends: stage times
are CUDA events, features, NLLs and the mp4 frames are read back at the chunk end or by the writer threads. Under
torchrun each rank takes a contiguous part of this process's range; ranks never
talk to each other: files and one lock coordinate them, and whoever completes the coverage of [0, total) computes
the FVD (once per run id: a re-check inside the lock prevents duplicate or lost rows).

Precision (the reference's sample.py): the generator's weights are cast to `--dtype` (bf16 by default) and the
tokenizer to `--tokenizer_dtype` (fp16 for class-conditional decoding, fp32 for frame prediction by default); no
autocast.

Frame prediction: the condition is the tokenizer tokens of the first `num_cond_frames` frames with the last of them
repeated to the clip length, quantised by sampling as the reference does (its tokenizer is not made
deterministic), with per-sample draws: sample i's condition uniforms come from torch.Generator(sample_seed + 2**62),
a stream apart from its decoding draws, so the condition too depends on the global index only (`--argmax_cond`:
argmax codes instead). All decoded frames are scored and saved, as in the reference; `--paste_cond_frames`
replaces the conditioning frames of the generated clip by the real ones first (a deliberate deviation: it scores
the prediction without the tokenizer's reconstruction of the context, and gives a lower FVD). Real and generated
clips are resized to `fvd_size` (64 by default, torchvision Resize((64, 64))).
"""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from larp.models.generator import load_generator
from larp.core.errors import CheckpointError, SampleError
from larp.core.dist import dist_info
from larp.metrics.detectors import load_i3d
from larp.metrics.fvd import FeatureStats, fvd_label
from larp.core.io import atomic_savez, atomic_write, atomic_write_text, resize_video
from larp.sampling.output_folder import (SAMPLE_COLUMNS, claim_output_dir, finalize, find_tiling, finished_ranges,
                                         hold_range, remove_partial, remove_ranges, remove_temps, run_id, stats_paths,
                                         write_csv)
from larp.sampling.job import prepare
from larp.sampling.nll import null_class_nll, null_swapped
from larp.sampling.overlap import StageClock, host_copy, write_sample
from larp.sampling.run_gallery import queue_thumbnails, shown_samples, update_gallery
from larp.models.tokenizer import LARPTokenizer
from larp.core.utils import get_device, get_dtype, matmul_precision, progress_bar, say
from larp.models.decoding import make_uniforms
from larp.core.visualize import save_preview_png

SEED_STRIDE = 1_000_003
COND_STREAM = 2 ** 62  # condition-token draws of sample i: torch.Generator(sample_seed(seed, i) + COND_STREAM)
PREVIEW_SAMPLES = 8


def sample_seed(seed, index):
    """Seed of global sample `index`: independent of shard layout and batch size."""
    return int(seed) * SEED_STRIDE + int(index)


def rank_range(start, num, rank, world):
    """Contiguous part [a, b) of [start, start + num) for `rank` of `world`."""
    return start + num * rank // world, start + num * (rank + 1) // world


# ---------------------------------------------------------------------------------------------- generation

def load_models(job, plan, device):
    """(tokenizer, generator) in eval mode on `device`, read from what `prepare` resolved (a hub id fetched once),
    cast to job.tokenizer_dtype and job.dtype; the tokenizer's quantizer samples (the reference's frame-prediction
    condition) unless job.argmax_cond. job.trust_checkpoint: --trust_checkpoint (larp/core/safe_load.py)."""
    trust = job.trust_checkpoint
    try:
        tokenizer = LARPTokenizer.from_pretrained(plan.tokenizer, trust=trust)
        tokenizer = tokenizer.to(device, get_dtype(job.tokenizer_dtype)).eval()
    except CheckpointError as e:
        raise SampleError(f"--tokenizer: {e}") from None
    try:
        model = load_generator(plan.ar_model, device=device, trust=trust).to(get_dtype(job.dtype)).eval()
    except CheckpointError as e:
        raise SampleError(f"--ar_model: {e}") from None
    tokenizer.set_vq_eval_deterministic(job.argmax_cond)
    return tokenizer, model


def condition_uniforms(seed, indices, num_tokens, device):
    """(B, N) uniforms of the condition quantiser for the global sample `indices` (see COND_STREAM)."""
    return make_uniforms(len(indices), num_tokens, [sample_seed(seed, i) + COND_STREAM for i in indices],
                         device=device)


def load_all(job, plan, world, local_rank, log):
    """(models, detector, device) of a process that has samples to draw; under torchrun each rank on its GPU."""
    device = get_device(job.device)
    if device.type == "cuda" and world > 1 and job.device in (None, "", "auto", "cuda"):
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    t0 = time.perf_counter()
    models = load_models(job, plan, device)
    detector = load_i3d(plan.i3d_spec, device, trust=job.trust_checkpoint)
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


def aligned_batches(chunks, batch_size):
    """The batches of `chunks` as (g, lo, hi): global rows [g, g + batch_size) with g a multiple of batch_size, of
    which [lo, hi) are samples of one chunk (a batch never crosses a chunk); the other rows are padding."""
    return [(g, max(g, c), min(g + batch_size, d)) for c, d in chunks
            for g in range(c - c % batch_size, d, batch_size)]


def padded_rows(g, lo, hi, batch_size):
    """Global indices loaded for the rows of batch (g, lo, hi): its samples, padded with copies of the nearest."""
    return [min(max(g + j, lo), hi - 1) for j in range(batch_size)]


class ChunkState:
    """What one chunk [c, d) accumulates until its files are written: features, NLLs (on the device until then),
    sample rows, the pending mp4 writes, stage clocks and the timing."""

    def __init__(self, detector, t_start, meta, shown=frozenset()):
        self.shown = shown  # the global indices whose thumbnails the gallery shows
        self.gen_stats, self.gt_stats = (FeatureStats(detector=detector.name, meta=meta) for _ in range(2))
        self.gen_feats, self.gt_feats, self.clocks = [], [], []
        self.nlls, self.rows, self.pending, self.tm, self.t_start = [], [], [], _new_timing(), t_start
        self.features = {}

    def settle(self):
        """Read back what stayed on the device: features into the statistics (batch by batch, as they came), stage
        times into the timing."""
        for key, feats, stats in (("fake", self.gen_feats, self.gen_stats), ("real", self.gt_feats, self.gt_stats)):
            arrays = [f.detach().cpu().numpy() for f in feats]  # (b, F) fp32 per batch
            for x in arrays:
                stats.add(x)
            self.features[key] = np.concatenate(arrays)  # kept per sample for the bootstrap interval
            feats.clear()
        for clock in self.clocks:
            for key, span in zip(("encode_s", "generate_s", "decode_s", "i3d_s"), clock.spans()):
                self.tm[key] += span


def sample_chunks(job, plan, chunks, models, detector, device, log=print):
    """Generate, save and measure the samples of each chunk [c, d) in `chunks` (one loader over all of them).

    A chunk's files are written once all its samples and mp4s are done, its generated stats last (their presence
    marks the chunk finished), so a killed process loses at most the chunk in progress. Returns the timing dicts.
    """
    B = job.sample_batch_size
    batches = aligned_batches(chunks, B)
    subset = torch.utils.data.Subset(plan.dataset, plan.chosen)  # position i = global sample index i
    loader = torch.utils.data.DataLoader(subset, batch_sampler=[padded_rows(*b, B) for b in batches],
                                         num_workers=job.num_workers, pin_memory=device.type == "cuda")
    timings, k, chunk = [], 0, None
    shown = shown_samples(plan, job.gallery_per_class)
    with ThreadPoolExecutor(max_workers=4) as pool:
        t_data = time.perf_counter()
        desc = f"sampling {sum(d - c for c, d in chunks)} videos in {len(chunks)} chunk(s)"
        for batch, (g, lo, hi) in progress_bar(zip(loader, batches), total=len(batches), unit="batch", desc=desc):
            if chunk is None:
                chunk = ChunkState(detector, t_data, plan.stats_meta, shown)
            rows, idx = slice(lo - g, hi - g), list(range(lo, hi))
            video, fake = generate_batch(job, plan, batch, g, rows, models, detector, device, chunk, t_data)
            queue_writes(job, plan, batch["label"][rows], idx, video, fake, chunk, pool)
            if lo == 0:
                save_preview(os.path.join(job.output_dir, "preview.png"), fake,
                             video if job.frame_prediction else None, chunk.rows[:PREVIEW_SAMPLES])
            chunk.pending = _drain(chunk.pending, keep=4 * B)
            if hi == chunks[k][1]:  # the chunk is complete
                t5 = time.perf_counter()
                for fut in chunk.pending:
                    fut.result()
                chunk.tm["write_wait_s"] = time.perf_counter() - t5
                chunk.settle()
                chunk.tm["total_s"] = time.perf_counter() - chunk.t_start
                timings.append(_write_chunk(job.output_dir, chunks[k], chunk, detector, job.frame_prediction, log))
                k, chunk = k + 1, None
            t_data = time.perf_counter()
    return timings


def generate_batch(job, plan, batch, first, rows, models, detector, device, chunk, t_data):
    """Condition, generate and decode a padded batch whose row j is global sample first + j; measure its samples
    (`rows`) into `chunk`. Returns (real clips, generated clips) of those rows, each (b, 3, T, S, S) in [0, 1] on the
    device. Nothing here waits for the GPU."""
    tokenizer, model = models
    fp, num_cond, clock = job.frame_prediction, job.num_cond_frames, StageClock(device)
    video = batch["video"].to(device, non_blocking=True)  # (B, 3, T, S, S) real clips in [0, 1]
    chunk.tm["data_s"] += time.perf_counter() - t_data
    clock.mark()
    # the models are cast to their dtypes (load_models): no autocast, as the reference
    with torch.no_grad(), matmul_precision(job.matmul_precision):
        if fp:
            n_tok = tokenizer.bottleneck_token_num
            u = None if job.argmax_cond else condition_uniforms(job.seed, range(first, first + video.shape[0]), n_tok,
                                                              device)  # (B, N)
            cond = tokenizer.encode_condition(video.to(get_dtype(job.tokenizer_dtype)), num_cond, uniforms=u)
        else:
            cond = batch["label"].to(device, non_blocking=True).long()  # (B,)
        clock.mark()
        seeds = [sample_seed(job.seed, first + j) for j in range(video.shape[0])]
        tokens, nll = model.generate(cond, job.params, seeds=seeds, return_nll=True, capture=job.capture)
        if job.nll == "class_swapped":
            nll = null_class_nll(model, tokens, nll, null_swapped(seeds, model.args.class_dropout_prob))
        clock.mark()
        fake = tokenizer.decode_from_bottleneck(tokens).float().clamp(0, 1)[rows]  # (b, 3, T, S, S)
    clock.mark()
    video = video[rows]
    if fp and job.paste_cond_frames:
        fake[:, :, :num_cond] = video[:, :, :num_cond]
    chunk.gen_feats.append(detector.device_features(resize_video(fake, plan.fvd_size)))  # (b, 400) fp32
    chunk.gt_feats.append(detector.device_features(resize_video(video.clamp(0, 1), plan.fvd_size)))
    clock.mark()
    chunk.clocks.append(clock)
    chunk.nlls.append(nll[rows])
    return video, fake


def queue_writes(job, plan, labels, idx, video, fake, chunk, pool):
    """The sample rows of one batch (its samples `idx`, their `labels`), and its mp4 writes queued on `pool` (none
    with --stats_only). The clips are copied to the host without waiting; each write waits for its copy."""
    out = job.output_dir
    frames = {"path": host_copy(fake), "gt_path": host_copy(video) if job.frame_prediction else None}
    for j, i in enumerate(idx):
        label = int(labels[j])
        path, start = plan.dataset.clips[plan.chosen[i]][:2]
        row = {"index": i, "label": label, "action": plan.class_names.get(label, ""),
               "clip_path": path, "clip_start": int(start), "path": "", "gt_path": ""}
        for key, rel in (("path", f"sampled_videos/{i}.mp4"), ("gt_path", f"gt_videos/{i}.mp4")):
            if frames[key] is None:
                continue
            if not job.stats_only:  # --stats_only: list only files left by an earlier run
                chunk.pending.append(pool.submit(write_sample, os.path.join(out, rel), frames[key], j))
            row[key] = rel if not job.stats_only or os.path.exists(os.path.join(out, rel)) else ""
        chunk.rows.append(row)
    num_cond = job.num_cond_frames if job.frame_prediction else 0
    chunk.pending += queue_thumbnails(pool, out, chunk.shown, idx, frames["path"], video, num_cond,
                                      real_copy=frames["gt_path"])


def _write_chunk(out, bounds, chunk, detector, frame_prediction, log):
    """The files of a finished chunk [a, b) = `bounds`, atomically, the generated stats last."""
    a, b = bounds
    gen_stats, gt_stats, nlls, rows, tm = chunk.gen_stats, chunk.gt_stats, chunk.nlls, chunk.rows, chunk.tm
    tm["num_videos"] = b - a
    tm["generate_videos_per_s"] = (b - a) / max(tm["generate_s"], 1e-9)
    paths = stats_paths(out, a, b)
    atomic_write(paths["nll"], lambda tmp: np.save(tmp, torch.cat(nlls).float().cpu().numpy()))
    write_csv(paths["samples"], rows, SAMPLE_COLUMNS)
    meta = {"range": [a, b], "detector": fvd_label(detector), "detector_sha256": getattr(detector, "sha256", None),
            "timing": tm}
    atomic_write_text(paths["meta"], json.dumps(meta, indent=2) + "\n")
    atomic_savez(paths["features"], chunk.features)
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
        say(prefix + msg)

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
        update_gallery(job, plan)
    log(outputs_line(out))
    if result["fvd"] is None:
        log(f"covered {result['covered']} of {settings['num_samples_total']} samples; the FVD is computed when "
            f"the remaining shards finish")
        return None
    print(f"fvd={result['fvd']:.6f}", flush=True)
    return result["fvd"]


def outputs_line(out):
    """The closing line: what a user looks at in the output folder, of what exists so far."""
    shown = []
    for name, what in (("sampled_videos", "generated mp4s"), ("gt_videos", "real clips"),
                       ("samples.csv", "index, class, video"), ("preview.png", "first samples"),
                       ("fvd_report.csv", "FVD row"), ("timing.json", None),
                       ("gallery.html", "open in a browser")):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shown.append(f"{path}/ ({len(os.listdir(path))} {what})")
        elif os.path.exists(path):
            shown.append(f"{path}" + (f" ({what})" if what else ""))
    return "outputs: " + ", ".join(shown)
