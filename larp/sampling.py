"""Sharded sampling with FVD on completion: the work behind `sample.py`.

One output folder holds one run (one set of settings, `run_settings`); shards of it may run in any order, on any
machines, at the same time:

  run_config.json                    the run's settings; a later call with other settings is refused
  shards.json                        the shard ranges [a, b) used so far; a different overlapping range is refused
  sampled_videos/<i>.mp4             the generated video of global index i (gt_videos/<i>.mp4: its real clip,
                                     frame prediction only)
  generated_fvd_stats_<a>_<b>.pkl    I3D feature statistics of the samples [a, b) (b exclusive), written last:
  gt_fvd_stats_<a>_<b>.pkl, nll_<a>_<b>.npy    a range with all three files is finished and is skipped on reruns
  parts/samples_<a>_<b>.csv, parts/range_<a>_<b>.json    per-range rows and timing, merged into samples.csv
                                     (index,label,action,path,...: readable by larp.data.oracle) and timing.json
  preview.png, fvd_report.csv, .fvd.lock

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

from larp.checkpoint import CheckpointError, atomic_write, atomic_write_text, read_checkpoint, resolve_hub_id
from larp.sample_folder import (SAMPLE_COLUMNS, SampleError, claim_output_dir, finalize,
                                find_tiling, finished_ranges, remove_ranges, run_id, stats_paths, write_csv)
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


def read_model_config(spec, flag):
    """The config dict of a checkpoint without building the model (weights are read only for *.pth files)."""
    try:
        path = spec
        if not os.path.exists(path):
            if spec.count("/") == 1 and not spec.startswith((".", "/")) and not spec.endswith((".pth", ".pt")):
                path = resolve_hub_id(spec)
            else:
                raise SampleError(f"error: --{flag} {spec}: no such file or directory")
        jsons = sorted(p for p in os.listdir(path) if p.endswith(".json")) if os.path.isdir(path) else []
        if os.path.isdir(path) and ("config.json" in jsons or len(jsons) == 1):
            with open(os.path.join(path, "config.json" if "config.json" in jsons else jsons[0])) as f:
                return json.load(f)
        return read_checkpoint(path)[0]
    except CheckpointError as e:
        raise SampleError(f"error: --{flag}: {e}") from None


def _check_ranges(args, total):
    if args.num_samples < 1 or args.sample_batch_size < 1:
        raise SampleError("error: --num_samples and --sample_batch_size must be >= 1")
    if args.starting_index < 0 or args.starting_index >= total:
        raise SampleError(f"error: --starting_index {args.starting_index} is outside [0, {total}) "
                          f"(--num_samples_total {total})")
    if args.starting_index + args.num_samples > total:
        raise SampleError(f"error: --starting_index {args.starting_index} + --num_samples {args.num_samples} "
                          f"exceeds --num_samples_total {total}")
    if args.frame_prediction and args.cfg_scale != 1.0:
        raise SampleError(f"error: --cfg_scale {args.cfg_scale} with --frame_prediction: classifier-free "
                          f"guidance needs a class condition; use --cfg_scale 1")


def _check_models(args, tok_cfg, ar_cfg):
    """Config-level consistency of tokenizer, generator and flags; returns (num_frames, input_size)."""
    frames, size = tok_cfg.get("frame_num"), tok_cfg.get("input_size")
    for flag, want, have in (("num_frames", frames, args.num_frames), ("input_size", size, args.input_size)):
        if have is not None and want is not None and have != want:
            raise SampleError(f"error: --{flag} {have} does not match the tokenizer ({want})")
    frames, size = args.num_frames or frames, args.input_size or size
    if frames is None or size is None:
        raise SampleError("error: the tokenizer config has no frame_num/input_size; pass --num_frames/--input_size")
    fp = bool(ar_cfg.get("frame_prediction", ar_cfg.get("model_type") == "frame_pred"))
    if fp != bool(args.frame_prediction):
        raise SampleError(f"error: --ar_model is a {'frame-prediction' if fp else 'class-conditional'} generator; "
                          f"{'add' if fp else 'remove'} --frame_prediction")
    if args.frame_prediction and not 1 <= args.num_cond_frames < frames:
        raise SampleError(f"error: --num_cond_frames {args.num_cond_frames} must be in [1, {frames})")
    shape, n_tok = ar_cfg.get("latent_shape"), tok_cfg.get("bottleneck_token_num")
    if shape and n_tok and int(np.prod(shape)) != n_tok:
        raise SampleError(f"error: generator grid {list(shape)} has {int(np.prod(shape))} tokens but the tokenizer "
                          f"makes {n_tok}")
    if fp and shape and ar_cfg.get("cls_token_num") and ar_cfg["cls_token_num"] != int(np.prod(shape)) + 1:
        raise SampleError(f"error: frame-prediction generator has cls_token_num {ar_cfg['cls_token_num']}, "
                          f"expected {int(np.prod(shape)) + 1} (condition tokens + separator)")
    reg = tok_cfg.get("bottleneck", {}).get("args", {}).get("regularizer", {}).get("args", {})
    if reg.get("codebook_size") and ar_cfg.get("vocab_size") and reg["codebook_size"] != ar_cfg["vocab_size"]:
        raise SampleError(f"error: generator vocab_size {ar_cfg['vocab_size']} != tokenizer codebook_size "
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
    from larp.data.dataset import VideoDataset, read_video_csv, resolve_csv, select_fvd_clips
    from larp.data.video_io import VideoReadError

    if args.dtype not in DTYPE_NAMES:
        raise SampleError(f"error: --dtype {args.dtype}: expected one of {sorted(DTYPE_NAMES)}")
    total = args.num_samples if args.num_samples_total is None else args.num_samples_total
    args.num_samples_total = total
    _check_ranges(args, total)
    try:
        csv_paths = resolve_csv(args.dataset_csv)
    except (FileNotFoundError, ValueError) as e:
        raise SampleError(f"error: --dataset_csv {args.dataset_csv}: {e}") from None
    tok_cfg = read_model_config(args.tokenizer, "tokenizer")
    ar_cfg = read_model_config(args.ar_model, "ar_model")
    num_frames, input_size = _check_models(args, tok_cfg, ar_cfg)
    try:
        i3d_spec = fvd.check_i3d_spec(args.i3d)
    except fvd.I3DError as e:
        raise SampleError(f"error: --i3d: {e}") from None
    fvd_size = args.fvd_size or (64 if args.frame_prediction else input_size)

    try:
        dataset = VideoDataset(args.dataset_csv, num_frames=num_frames, size=input_size, train=False)
    except (VideoReadError, ValueError) as e:
        raise SampleError(f"error: --dataset_csv {args.dataset_csv}: {e}") from None
    if total > len(dataset):
        raise SampleError(f"error: --num_samples_total {total} exceeds the {len(dataset)} clips of "
                          f"{num_frames} frames in {args.dataset_csv}")
    chosen = select_fvd_clips(len(dataset), total, seed=args.dataset_split_seed)
    labels = [int(dataset.clips[i][2]) for i in chosen]
    if not args.frame_prediction and ar_cfg.get("num_classes") and max(labels) >= ar_cfg["num_classes"]:
        raise SampleError(f"error: {args.dataset_csv} has label {max(labels)} but the generator knows "
                          f"{ar_cfg['num_classes']} classes")
    df = read_video_csv(args.dataset_csv)
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
        model = load_generator(args.ar_model, device=device).eval()
    except CheckpointError as e:
        raise SampleError(f"error: {e}") from None
    tokenizer.set_vq_eval_deterministic(True)
    return tokenizer, model


def sample_range(args, plan, a, b, models, detector, device, log=print):
    """Generate, save and measure the samples [a, b); write their stats files last. Returns the timing dict."""
    from larp.fvd import FeatureStats, fvd_label
    from larp.data.video_io import write_video
    from larp.visualize import save_video_grid_png

    s, out = plan["settings"], args.output_dir
    tokenizer, model = models
    subset = torch.utils.data.Subset(plan["dataset"], plan["chosen"][a:b])
    loader = torch.utils.data.DataLoader(subset, batch_size=args.sample_batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    gen_stats, gt_stats = FeatureStats(detector=detector.name), FeatureStats(detector=detector.name)
    nlls, rows, pending = [], [], []
    tm = dict.fromkeys(["data_s", "encode_s", "generate_s", "decode_s", "i3d_s", "write_wait_s"], 0.0)
    t_start = t_data = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        pos = a
        for batch in tqdm(loader, desc=f"sampling [{a}, {b})", unit="batch"):
            video = batch["video"].to(device, non_blocking=True)  # (B, 3, T, S, S) real clips in [0, 1]
            idx = list(range(pos, pos + video.shape[0]))
            pos += video.shape[0]
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
            t_data = time.perf_counter()
        t5 = time.perf_counter()
        for f in pending:
            f.result()
    tm["write_wait_s"] = time.perf_counter() - t5
    tm["total_s"] = time.perf_counter() - t_start
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
    done = [r for r in finished_ranges(out) if a <= r[0] and r[1] <= b]
    if a < b and find_tiling(done, a, b) is not None and not args.replace:
        log(f"skipping [{a}, {b}): its stats already exist in {out} (use --replace to redo)")
    elif a < b:
        if args.replace:
            remove_ranges(out, a, b)
        device = get_device(args.device)
        if device.type == "cuda" and world > 1 and args.device in (None, "", "auto", "cuda"):
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        t0 = time.perf_counter()
        models = load_models(args, device)
        detector = load_i3d(plan["i3d_spec"], device)
        log(f"models and I3D loaded in {time.perf_counter() - t0:.1f} s on {device}")
        sample_range(args, plan, a, b, models, detector, device, log=log)
    result = finalize(out, settings, replace=args.replace, log=log)
    if result["fvd"] is None:
        log(f"covered {result['covered']} of {settings['num_samples_total']} samples; the FVD is computed when "
            f"the remaining shards finish")
        return None
    print(f"fvd={result['fvd']:.6f}", flush=True)
    return result["fvd"]
