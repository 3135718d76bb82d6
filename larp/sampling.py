"""Sharded sampling with FVD on completion: the work behind `sample.py`.

One output folder holds one run (one set of settings, `run_settings`); shards of it may run in any order, on any
machines, at the same time:

  run_config.json                    the run's settings; a later call with other settings is refused
  shards.json                        the shard ranges [a, b) used so far; a different overlapping range is refused
  sampled_videos/<i>.mp4             the generated video of global index i (gt_videos/<i>.mp4: its real clip,
                                     frame prediction only)
  generated_fvd_stats_<a>_<b>.pkl    I3D feature statistics of the samples [a, b) (b exclusive), written last:
  gt_fvd_stats_<a>_<b>.pkl, nll_<a>_<b>.npy    a range with all its files is finished and is skipped on reruns
  parts/samples_<a>_<b>.csv, parts/range_<a>_<b>.json    per-range rows and timing, merged into samples.csv
                                     (index,label,action,path,...: readable by larp.data.oracle) and timing.json
  preview.png, fvd_report.csv, .fvd.lock

Chunks: a process writes its range as chunks of `--chunk_size` samples ([a, a + C), [a + C, a + 2C), ...), each a
finished range of its own once its files are written. A killed process loses only the chunk in progress: a rerun
removes that chunk's partial files and continues from the first unfinished chunk, with the same chunk boundaries
and therefore the same batches, files, FVD and report row as an uninterrupted run. The float64 statistics of the
chunks add up exactly, and the FVD uses one tiling of [0, total) by finished ranges, so no sample counts twice.

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
import torch.nn.functional as F
from tqdm import tqdm

from larp.checkpoint import CheckpointError, checkpoint_kind, describe_checkpoint, peek_checkpoint
from larp.io import atomic_write, atomic_write_text
from larp.sample_folder import (SAMPLE_COLUMNS, SampleError, claim_output_dir, finalize,
                                find_tiling, finished_ranges, remove_partial, remove_ranges, run_id, stats_paths,
                                write_csv)
from larp.utils import autocast, get_device

SEED_STRIDE = 1_000_003
DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
               "float16": "fp16"}
PREVIEW_SAMPLES = 8


def sample_seed(seed, index):
    """Seed of global sample `index`: independent of shard layout and batch size."""
    return int(seed) * SEED_STRIDE + int(index)


def rank_range(start, num, rank, world):
    """Contiguous part [a, b) of [start, start + num) for `rank` of `world`."""
    return start + num * rank // world, start + num * (rank + 1) // world


def dist_info():
    """(rank, world size, local rank) from an initialised process group or the torchrun environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


# ---------------------------------------------------------------------------------------------- validation

def _spec_id(spec):
    """A model/file spec as recorded in the settings: absolute path when local, else the hub id / keyword."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def read_model_config(spec, flag, want):
    """The config dict of a checkpoint, checked cheaply before any model is built (larp.checkpoint.peek_checkpoint)
    and required to be a `want` ('tokenizer' or 'generator')."""
    if not os.path.exists(spec) and (spec.count("/") != 1 or spec.startswith((".", "/")) or spec.endswith(".pth")):
        raise SampleError(f"--{flag} {spec}: no such file or directory")  # not a hub id either
    try:
        cfg = peek_checkpoint(spec)
    except CheckpointError as e:
        raise SampleError(f"--{flag}: {e}") from None
    if checkpoint_kind(cfg) != want:
        expected = "a LARP tokenizer" if want == "tokenizer" else "a generator (NAR or raster)"
        found = describe_checkpoint(cfg)
        if found is None:
            raise SampleError(f"--{flag} {spec}: its config has neither tokenizer nor generator keys; expected "
                              f"{expected}")
        raise SampleError(f"--{flag} {spec}: holds {found}, expected {expected}; are --ar_model and --tokenizer "
                          f"swapped?")
    return cfg


def _check_ranges(args, total):
    if args.num_samples < 1 or args.sample_batch_size < 1 or args.chunk_size < 1:
        raise SampleError("--num_samples, --sample_batch_size and --chunk_size must be >= 1")
    if args.starting_index < 0 or args.starting_index >= total:
        raise SampleError(f"--starting_index {args.starting_index} is outside [0, {total}) "
                          f"(--num_samples_total {total})")
    if args.starting_index + args.num_samples > total:
        raise SampleError(f"--starting_index {args.starting_index} + --num_samples {args.num_samples} "
                          f"exceeds --num_samples_total {total}")
    if args.frame_prediction and args.cfg_scale != 1.0:
        raise SampleError(f"--cfg_scale {args.cfg_scale} with --frame_prediction: classifier-free "
                          f"guidance needs a class condition; use --cfg_scale 1")


def _check_models(args, tok_cfg, ar_cfg):
    """Config-level consistency of tokenizer, generator and flags; returns (num_frames, input_size)."""
    frames, size = tok_cfg.get("frame_num"), tok_cfg.get("input_size")
    for flag, want, have in (("num_frames", frames, args.num_frames), ("input_size", size, args.input_size)):
        if have is not None and want is not None and have != want:
            raise SampleError(f"--{flag} {have} does not match the tokenizer ({want})")
    frames, size = args.num_frames or frames, args.input_size or size
    if frames is None or size is None:
        raise SampleError("the tokenizer config has no frame_num/input_size; pass --num_frames/--input_size")
    fp = bool(ar_cfg.get("frame_prediction", ar_cfg.get("model_type") == "frame_pred"))
    if fp != bool(args.frame_prediction):
        raise SampleError(f"--ar_model is a {'frame-prediction' if fp else 'class-conditional'} generator; "
                          f"{'add' if fp else 'remove'} --frame_prediction")
    if args.frame_prediction and not 1 <= args.num_cond_frames < frames:
        raise SampleError(f"--num_cond_frames {args.num_cond_frames} must be in [1, {frames})")
    shape, n_tok = ar_cfg.get("latent_shape"), tok_cfg.get("bottleneck_token_num")
    if shape and n_tok and int(np.prod(shape)) != n_tok:
        raise SampleError(f"generator grid {list(shape)} has {int(np.prod(shape))} tokens but the tokenizer "
                          f"makes {n_tok}")
    if fp and shape and ar_cfg.get("cls_token_num") and ar_cfg["cls_token_num"] != int(np.prod(shape)) + 1:
        raise SampleError(f"frame-prediction generator has cls_token_num {ar_cfg['cls_token_num']}, "
                          f"expected {int(np.prod(shape)) + 1} (condition tokens + separator)")
    reg = tok_cfg.get("bottleneck", {}).get("args", {}).get("regularizer", {}).get("args", {})
    if reg.get("codebook_size") and ar_cfg.get("vocab_size") and reg["codebook_size"] != ar_cfg["vocab_size"]:
        raise SampleError(f"generator vocab_size {ar_cfg['vocab_size']} != tokenizer codebook_size "
                          f"{reg['codebook_size']}")
    return int(frames), int(size)


def run_settings(args, num_frames, input_size, fvd_size, csv_paths, i3d_spec):
    """Everything that changes the result: stored in run_config.json and hashed into the run id."""
    s = {"ar_model": _spec_id(args.ar_model), "tokenizer": _spec_id(args.tokenizer),
         "dataset_csv": "+".join(os.path.abspath(p) for p in csv_paths),
         "dataset_split_seed": int(args.dataset_split_seed), "num_samples_total": int(args.num_samples_total),
         "cfg_scale": float(args.cfg_scale), "cfg_interval": int(args.cfg_interval),
         "temperature": float(args.temperature), "top_k": int(args.top_k), "top_p": float(args.top_p),
         "dtype": DTYPE_NAMES[args.dtype], "seed": int(args.seed), "frame_prediction": bool(args.frame_prediction),
         "num_cond_frames": int(args.num_cond_frames) if args.frame_prediction else 0,
         "num_frames": num_frames, "input_size": input_size, "fvd_size": int(fvd_size), "i3d": _spec_id(i3d_spec)}
    return json.loads(json.dumps(s))


def prepare(args):
    """Validate flags, data and output folder before any model loads. Returns a dict with the plan."""
    from larp import fvd
    from larp.data.dataset import (CSVError, CSVNotFoundError, VideoDataset, check_labels, read_video_csv, resolve_csv,
                                   select_fvd_clips)
    from larp.data.video_io import VideoReadError

    if args.dtype not in DTYPE_NAMES:
        raise SampleError(f"--dtype {args.dtype}: expected one of {sorted(DTYPE_NAMES)}")
    total = args.num_samples if args.num_samples_total is None else args.num_samples_total
    args.num_samples_total = total
    _check_ranges(args, total)
    try:
        csv_paths = resolve_csv(args.dataset_csv)
    except CSVNotFoundError as e:
        raise SampleError(f"--dataset_csv {args.dataset_csv}: {e}") from None
    tok_cfg = read_model_config(args.tokenizer, "tokenizer", "tokenizer")
    ar_cfg = read_model_config(args.ar_model, "ar_model", "generator")
    num_frames, input_size = _check_models(args, tok_cfg, ar_cfg)
    try:
        i3d_spec = fvd.check_i3d_spec(args.i3d)
    except fvd.I3DError as e:
        raise SampleError(f"--i3d: {e}") from None
    fvd_size = args.fvd_size or (64 if args.frame_prediction else input_size)

    try:
        df = read_video_csv(args.dataset_csv)
        if not args.frame_prediction and ar_cfg.get("num_classes"):
            check_labels(df, ar_cfg["num_classes"], args.dataset_csv, f"the generator --ar_model {args.ar_model}")
        dataset = VideoDataset(args.dataset_csv, num_frames=num_frames, size=input_size, train=False)
    except (VideoReadError, CSVError) as e:  # the message names the CSV or the video
        raise SampleError(f"--dataset_csv: {e}") from None
    if total > len(dataset):
        raise SampleError(f"--num_samples_total {total} exceeds the {len(dataset)} clips of "
                          f"{num_frames} frames in {args.dataset_csv}")
    chosen = select_fvd_clips(len(dataset), total, seed=args.dataset_split_seed)
    class_names = {int(l): str(a) for l, a in zip(df["label"], df["action"])}

    settings = run_settings(args, num_frames, input_size, fvd_size, csv_paths, i3d_spec)
    start, end = args.starting_index, args.starting_index + args.num_samples
    claim_output_dir(args.output_dir, settings, start, end)
    return {"settings": settings, "dataset": dataset, "chosen": chosen, "class_names": class_names,
            "start": start, "end": end, "i3d_spec": i3d_spec}


# ---------------------------------------------------------------------------------------------- generation

def _clock(device):
    """perf_counter after the device finished its queued work (honest CUDA timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def resize_video(x, size):
    """(B, 3, T, H, W) -> (B, 3, T, size, size), antialiased bilinear per frame (no-op at that size)."""
    b, c, t, h, w = x.shape
    if (h, w) == (size, size):
        return x
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return frames.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4)


def to_uint8(x):
    """(B, 3, T, H, W) float [0, 1] -> uint8 numpy (B, T, H, W, 3)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def condition_tokens(tokenizer, video, num_cond):
    """Tokens of the first `num_cond` frames, the last of them repeated to the clip length: (B, N) long."""
    t = video.shape[2]
    cond = torch.cat([video[:, :, :num_cond], video[:, :, num_cond - 1:num_cond].expand(-1, -1, t - num_cond,
                                                                                      -1, -1)], dim=2)
    return tokenizer.encode(cond)["bottleneck_rep"]  # (B, N)


def load_models(args, device):
    from larp.ar import load_generator
    from larp.tokenizer import LARPTokenizer
    try:
        tokenizer = LARPTokenizer.from_pretrained(args.tokenizer).to(device).eval()
    except CheckpointError as e:
        raise SampleError(f"--tokenizer: {e}") from None
    try:
        model = load_generator(args.ar_model, device=device).eval()
    except CheckpointError as e:
        raise SampleError(f"--ar_model: {e}") from None
    tokenizer.set_vq_eval_deterministic(True)
    return tokenizer, model


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


def sample_chunks(args, plan, chunks, models, detector, device, log=print):
    """Generate, save and measure the samples of each chunk [c, d) in `chunks` (one loader over all of them).

    A chunk's files are written once all its samples and mp4s are done, its generated stats last (their presence
    marks the chunk finished), so a killed process loses at most the chunk in progress. Returns the timing dicts.
    """
    from larp.fvd import FeatureStats
    from larp.data.video_io import write_video
    from larp.visualize import save_video_grid_png

    s, out = plan["settings"], args.output_dir
    tokenizer, model = models
    batches = [list(range(i, min(i + args.sample_batch_size, d))) for c, d in chunks
               for i in range(c, d, args.sample_batch_size)]  # global indices; a batch never crosses a chunk
    subset = torch.utils.data.Subset(plan["dataset"], plan["chosen"])  # position i = global sample index i
    loader = torch.utils.data.DataLoader(subset, batch_sampler=batches, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda")
    timings, k = [], 0
    new_chunk = True
    with ThreadPoolExecutor(max_workers=4) as pool:
        t_data = time.perf_counter()
        for batch, idx in tqdm(zip(loader, batches), total=len(batches), unit="batch",
                               desc=f"sampling {sum(d - c for c, d in chunks)} videos in {len(chunks)} chunk(s)"):
            if new_chunk:
                gen_stats, gt_stats = FeatureStats(detector=detector.name), FeatureStats(detector=detector.name)
                nlls, rows, pending, tm = [], [], [], _new_timing()
                t_start, new_chunk = t_data, False
            video = batch["video"].to(device, non_blocking=True)  # (B, 3, T, S, S) real clips in [0, 1]
            t0 = _clock(device)
            tm["data_s"] += t0 - t_data
            with torch.no_grad(), autocast(device, s["dtype"]):
                if s["frame_prediction"]:
                    cond = condition_tokens(tokenizer, video, s["num_cond_frames"])  # (B, N)
                else:
                    cond = batch["label"].to(device).long()  # (B,)
                t1 = _clock(device)
                tokens, nll = model.generate(cond, cfg_scale=s["cfg_scale"], cfg_interval=s["cfg_interval"],
                                             temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                                             seeds=[sample_seed(s["seed"], i) for i in idx], return_nll=True)
                t2 = _clock(device)
                fake = tokenizer.decode_from_bottleneck(tokens).float().clamp(0, 1)  # (B, 3, T, S, S)
            t3 = _clock(device)
            if s["frame_prediction"]:
                fake[:, :, :s["num_cond_frames"]] = video[:, :, :s["num_cond_frames"]]
            gen_stats.add(detector(resize_video(fake, s["fvd_size"])))  # (B, 400), fp32 on the detector
            gt_stats.add(detector(resize_video(video, s["fvd_size"])))
            t4 = _clock(device)
            tm["encode_s"] += t1 - t0
            tm["generate_s"] += t2 - t1
            tm["decode_s"] += t3 - t2
            tm["i3d_s"] += t4 - t3
            nlls.append(nll.float().cpu().numpy())
            fake_u8 = to_uint8(fake)
            real_u8 = to_uint8(video) if s["frame_prediction"] else None
            for j, i in enumerate(idx):
                label = int(batch["label"][j])
                path, start = plan["dataset"].clips[plan["chosen"][i]][:2]
                row = {"index": i, "label": label, "action": plan["class_names"].get(label, ""),
                       "clip_path": path, "clip_start": int(start), "path": "", "gt_path": ""}
                videos = [("path", f"sampled_videos/{i}.mp4", fake_u8[j])]
                if real_u8 is not None:
                    videos.append(("gt_path", f"gt_videos/{i}.mp4", real_u8[j]))
                for key, rel, frames in videos:  # --stats_only: list only files left by an earlier run
                    if not args.stats_only:
                        pending.append(pool.submit(write_video, os.path.join(out, rel), frames))
                    row[key] = rel if not args.stats_only or os.path.exists(os.path.join(out, rel)) else ""
                rows.append(row)
            if idx[0] == 0:
                save_preview(os.path.join(out, "preview.png"), fake, video if s["frame_prediction"] else None,
                             rows[:PREVIEW_SAMPLES], save_video_grid_png)
            pending = _drain(pending, keep=4 * args.sample_batch_size)
            if idx[-1] + 1 == chunks[k][1]:  # the chunk is complete
                t5 = time.perf_counter()
                for fut in pending:
                    fut.result()
                tm["write_wait_s"] = time.perf_counter() - t5
                tm["total_s"] = time.perf_counter() - t_start
                timings.append(_write_chunk(out, chunks[k], gen_stats, gt_stats, nlls, rows, tm, detector, s, log))
                k, new_chunk = k + 1, True
            t_data = time.perf_counter()
    return timings


def _write_chunk(out, chunk, gen_stats, gt_stats, nlls, rows, tm, detector, s, log):
    """The files of a finished chunk [a, b), atomically, the generated stats last."""
    from larp.fvd import fvd_label
    a, b = chunk
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
        f"{'; condition encode %.2f s' % tm['encode_s'] if s['frame_prediction'] else ''}; "
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


def save_preview(path, fake, real, rows, save_grid):
    """PNG grid of the first samples (one row per video), labelled with index and class name."""
    n = len(rows)
    names = [f"#{r['index']} {r['action']}" for r in rows]
    if real is None:
        save_grid(fake[:n].float().cpu(), path, row_labels=names)
        return
    both = torch.stack([real[:n], fake[:n]], dim=1).flatten(0, 1).float().cpu()  # (2n, 3, T, H, W) gt/gen pairs
    save_grid(both, path, row_labels=[f"{w} {nm}" for nm in names for w in ("real", "pred")])


# ---------------------------------------------------------------------------------------------- finalization


def run(args):
    """Validate, sample this process's range (its rank's part under torchrun), finalize. Returns the FVD or None."""
    from larp.fvd import load_i3d
    plan = prepare(args)
    rank, world, local_rank = dist_info()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""

    def log(msg):
        print(prefix + msg, flush=True)

    a, b = rank_range(plan["start"], plan["end"] - plan["start"], rank, world)
    out, settings = args.output_dir, plan["settings"]
    log(f"run {run_id(settings)}: samples [{a}, {b}) of [0, {settings['num_samples_total']}) into {out}")
    if args.replace and a < b:
        remove_ranges(out, a, b)
    remove_partial(out, a, b)
    done = finished_ranges(out)
    todo = todo_chunks(done, a, b, args.chunk_size) if a < b and find_tiling(done, a, b) is None else []
    if a < b and not todo:
        log(f"skipping [{a}, {b}): its stats already exist in {out} (use --replace to redo)")
    elif todo:
        left = sum(d - c for c, d in todo)
        if left < b - a:
            log(f"resuming [{a}, {b}): {b - a - left} samples already finished in {out}; sampling the other {left}")
        device = get_device(args.device)
        if device.type == "cuda" and world > 1 and args.device in (None, "", "auto", "cuda"):
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        t0 = time.perf_counter()
        models = load_models(args, device)
        detector = load_i3d(plan["i3d_spec"], device)
        log(f"models and I3D loaded in {time.perf_counter() - t0:.1f} s on {device}")
        sample_chunks(args, plan, todo, models, detector, device, log=log)
    result = finalize(out, settings, replace=args.replace, log=log)
    if result["fvd"] is None:
        log(f"covered {result['covered']} of {settings['num_samples_total']} samples; the FVD is computed when "
            f"the remaining shards finish")
        return None
    print(f"fvd={result['fvd']:.6f}", flush=True)
    return result["fvd"]
