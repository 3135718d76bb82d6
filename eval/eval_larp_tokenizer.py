"""Reconstruction quality of a LARP tokenizer on the evaluation clips of a CSV.

    python eval/eval_larp_tokenizer.py --tokenizer hywang66/LARP-L-long-tokenizer --dataset_csv ucf101_val --det
    python eval/eval_larp_tokenizer.py --tokenizer quickstart/runs/tokenizer/export --dataset_csv quickstart/data/val.csv \
        --det --i3d random:32

Every clip of the FVD protocol (larp.data.dataset.VideoDataset(train=False); `--max_clips N` draws N of them
with seed 42) is encoded and decoded; the reconstruction is clamped to [0, 1]. Prints `mse=`, `psnr=` (mean of
per-clip PSNR, dB), `ssim=`, `lpips=` (VGG LPIPS, frame average; only when the torchvision weights are present)
and `fvd=` (reconstructions vs inputs; Kinetics-400 I3D by default, see larp/metrics/detectors.py), then writes
DIR/metrics.json and a preview grid DIR/preview.png (input row, reconstruction row, ...).
"""
import argparse
import json
import os

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from larp.core.checkpoint import expect_kind, read_checkpoint
from larp.core.errors import CheckpointError, I3DError, LarpError, UsageError, VideoReadError, run_cli
from larp.data.dataset import VideoDataset, read_video_csv, select_fvd_clips
from larp.metrics.detectors import check_i3d_spec, load_i3d
from larp.metrics.fvd import FeatureStats, frechet_distance, fvd_label
from larp.core.io import atomic_write_text, expect_path, naming_write_errors, remove_stale_temps
from larp.models.losses import build_lpips, lpips_available, lpips_backbone_path, lpips_video
from larp.metrics.image import psnr, ssim
from larp.models.tokenizer import LARPTokenizer, clip_geometry
from larp.core.utils import autocast, get_device
from larp.core.visualize import save_video_grid_png


def reconstruct(model, x, amp):
    """(B, 3, T, H, W) in [0, 1] -> (tokens (B, N), reconstruction clamped to [0, 1], float32)."""
    with torch.no_grad(), autocast(x.device, "bf16" if amp else "fp32"):
        enc = model.encode(x)
        rec = model.decode(enc["encoded"])
    return enc["bottleneck_rep"], rec.float().clamp(0, 1)


def evaluate(model, loader, device, amp=False, detector=None, lpips_model=None, num_preview=8, progress=True):
    """Metric sums over all clips -> dict of means (+ FVD when a detector is given) and preview videos."""
    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count, codes, preview = 0, set(), []
    real_stats = fake_stats = None
    if detector is not None:
        real_stats, fake_stats = FeatureStats(detector=detector.name), FeatureStats(detector=detector.name)
    for batch in tqdm(loader, desc="reconstruct", disable=not progress, dynamic_ncols=True):
        x = batch["video"].to(device)  # (B, 3, T, H, W)
        tokens, rec = reconstruct(model, x, amp)
        x = x.float()
        sums["mse"] += (rec - x).pow(2).flatten(1).mean(1).sum().item()
        sums["psnr"] += psnr(rec, x).clamp(max=100.0).sum().item()  # identical clips would give inf
        sums["ssim"] += ssim(rec, x).sum().item()
        if lpips_model is not None:
            with torch.no_grad():
                sums["lpips"] += lpips_video(lpips_model, rec, x).sum().item()
        if detector is not None:
            real_stats.add(detector(x))
            fake_stats.add(detector(rec))
        codes.update(tokens.unique().tolist())
        count += x.shape[0]
        if len(preview) < num_preview:
            for xi, ri in zip(x[: num_preview - len(preview)].cpu(), rec.cpu()):
                preview.append((xi, ri))
    metrics = {k: v / max(count, 1) for k, v in sums.items() if k != "lpips" or lpips_model is not None}
    metrics["num_clips"] = count
    metrics["codebook_usage"] = len(codes) / model.codebook_size
    if detector is not None:
        metrics["fvd"] = frechet_distance(real_stats, fake_stats)
    return metrics, preview


def save_preview(preview, path):
    videos, labels = [], []
    for i, (x, r) in enumerate(preview):
        videos += [x, r]
        labels += [f"input {i}", f"recon {i}"]
    return save_video_grid_png(torch.stack(videos), path, row_labels=labels)


def check_args(args):
    """One clear error for each bad flag before any video is read. Returns the tokenizer checkpoint (config, state
    dict, layout), the clip geometry (frame_num, input_size) and the detector spec (None with --no_fvd)."""
    try:
        ckpt = read_checkpoint(args.tokenizer)  # (config, state dict, layout)
        expect_kind(ckpt[0], "tokenizer", args.tokenizer)
    except CheckpointError as e:
        raise CheckpointError(f"--tokenizer: {e}") from None
    config = ckpt[0]
    try:
        read_video_csv(args.dataset_csv)  # exists, has the columns, labels are class indices
    except LarpError as e:
        raise UsageError(f"--dataset_csv: {e}") from None
    geometry = clip_geometry(config, args.num_frames, args.input_size)
    i3d = None
    if not args.no_fvd:
        try:
            i3d = check_i3d_spec(args.i3d)
        except I3DError as e:
            raise I3DError(f"--i3d: {e} (or pass --no_fvd)") from None
    if args.max_clips < 0 or args.batch_size < 1:
        raise UsageError("--max_clips must be >= 0 and --batch_size >= 1")
    expect_path(out_dir(args), "--out")
    return ckpt, geometry, i3d


def out_dir(args):
    return args.out or os.path.join("eval_results", "tokenizer_" + os.path.basename(os.path.normpath(args.tokenizer)))


def main(args):
    (config, sd, _), (frame_num, input_size), i3d = check_args(args)
    device = get_device(args.device)
    try:
        model = LARPTokenizer.from_config_and_state_dict(config, sd, source=str(args.tokenizer))
    except CheckpointError as e:
        raise CheckpointError(f"--tokenizer: {e}") from None
    model = model.to(device).set_vq_eval_deterministic(args.det)
    try:
        ds = VideoDataset(args.dataset_csv, frame_num=frame_num, input_size=input_size, train=False,
                          skip_bad=args.skip_bad)
    except VideoReadError as e:
        raise VideoReadError(f"{e}; pass --skip_bad to leave unreadable videos out (they are counted)") from None
    if ds.num_bad:
        print(f"--skip_bad: left out {ds.num_bad} unreadable video(s) of {args.dataset_csv}", flush=True)
    total = len(ds)
    if args.max_clips and args.max_clips < total:
        ds = Subset(ds, select_fvd_clips(total, args.max_clips))
    print(f"tokenizer: {args.tokenizer} ({model.bottleneck_token_num} tokens, codebook {model.codebook_size}, "
          f"{'argmax' if args.det else 'sampled'} VQ)  clips: {len(ds)} of {total}", flush=True)
    lpips_model = None
    if lpips_available(args.lpips_net):
        lpips_model = build_lpips(args.lpips_net).to(device)
    detector = None
    if i3d is not None:
        detector = load_i3d(i3d, device, batch_size=args.batch_size)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    metrics, preview = evaluate(model, loader, device, args.use_amp, detector, lpips_model, args.num_preview)

    out = out_dir(args)
    with naming_write_errors(out):
        os.makedirs(out, exist_ok=True)
    remove_stale_temps(out)
    if preview:
        save_preview(preview, os.path.join(out, "preview.png"))
    report = {**metrics, "tokenizer": str(args.tokenizer), "dataset_csv": str(args.dataset_csv), "det": args.det,
              "use_amp": args.use_amp, "i3d": None if detector is None else detector.name}
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(report, indent=2) + "\n")
    print(f"mse={metrics['mse']:.6f}")
    print(f"psnr={metrics['psnr']:.4f}")
    print(f"ssim={metrics['ssim']:.4f}")
    if "lpips" in metrics:
        print(f"lpips={metrics['lpips']:.4f}")
    else:
        print(f"lpips: not computed (no {args.lpips_net} weights at {lpips_backbone_path(args.lpips_net)})")
    if detector is not None:
        print(fvd_label(detector))
        print(f"fvd={metrics['fvd']:.4f}")
    print(f"wrote {out}/metrics.json and {out}/preview.png")
    return metrics


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="hub-mixin dir, *.pth+*.json dir, training checkpoint or hub id")
    p.add_argument("--dataset_csv", required=True, help="CSV path or name under data/metadata (several joined by +)")
    p.add_argument("--det", action="store_true", help="deterministic (argmax) VQ; default samples as in training")
    p.add_argument("--use_amp", action="store_true", help="bf16 autocast where the device supports it")
    p.add_argument("--num_frames", type=int, default=None, help="default: the tokenizer's frame_num")
    p.add_argument("--input_size", type=int, default=None, help="default: the tokenizer's input_size")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_clips", type=int, default=0, help="evaluate this many clips drawn with seed 42 (0 = all)")
    p.add_argument("--i3d", default=None, help="kinetics400 | i3d_torchscript.pt | state dict | random[:SIZE] "
                   "(default: $LARP_I3D, else checkpoints/i3d_torchscript.pt, else kinetics400)")
    p.add_argument("--no_fvd", action="store_true")
    p.add_argument("--skip_bad", action="store_true", help="leave unreadable videos out of the clip index (counted)")
    p.add_argument("--lpips_net", default="vgg", choices=["vgg", "alex", "squeeze"])
    p.add_argument("--num_preview", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default eval_results/tokenizer_<name>)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, get_args())
