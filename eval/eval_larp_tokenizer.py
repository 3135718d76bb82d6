"""Reconstruction quality of a LARP tokenizer, by default with the reference's rFVD protocol.

    python eval/eval_larp_tokenizer.py --tokenizer hywang66/LARP-L-long-tokenizer --use_amp --det
    python eval/eval_larp_tokenizer.py --tokenizer quickstart/runs/tokenizer/export --dataset_csv quickstart/data/val.csv \
        --det --i3d random:32

The reference's protocol (its eval/eval_larp_tokenizer.py + rfvd_evaluator.py): `--dataset_csv ucf101_train.csv`,
one random native-rate window of `frame_num` frames per video (9,537 clips; shorter videos padded with their last
frame), resized and centre-cropped as the FVD clips are; `--use_amp` autocasts in fp16 (`--amp_dtype`). Here the
window of video i is drawn from torch.Generator(--seed * 1_000_003 + i), so runs repeat (the reference leaves it
unseeded). `--clips all` takes every non-overlapping clip of the FVD protocol instead (not the reference's).
`--max_clips N` draws N of the clips with seed 42.
Every clip is encoded and decoded; the reconstruction is clamped to [0, 1]. Prints `mse=`, `psnr=` (mean of
per-clip PSNR, dB), `ssim=`, `lpips=` (VGG LPIPS, frame average; only when the torchvision weights are present)
and `fvd=` (reconstructions vs inputs; Kinetics-400 I3D by default, see larp/metrics/detectors.py), then writes
DIR/metrics.json (with the settings it depends on and the protocol card of the FVD), the per-clip I3D features
DIR/features.npz (real, fake: for a bootstrap interval), a preview grid DIR/preview.png
(input row, reconstruction row, ...) and DIR/gallery.html (each preview clip beside its reconstruction, animated,
with the metrics; opens offline). DIR defaults to eval_results/tokenizer_<run>_<hash of the settings>, <run> being
the tokenizer's run folder for a training export (save/<run>/export). A DIR that already holds a result is kept when its settings are
these (its numbers are printed again), refused when they differ; --replace redoes it. A hub id may be pinned with
--revision COMMIT (or owner/name@COMMIT); metrics.json records the commit actually loaded. Files are read safely
(docs/security.md).
"""
import hashlib
import json
import os

from larp.core.cli import TRUST_HELP, parser
from larp.core.errors import CheckpointError, I3DError, LarpError, UsageError, VideoReadError, run_cli


def reconstruct(model, x, amp):
    """(B, 3, T, H, W) in [0, 1] -> (tokens (B, N), reconstruction clamped to [0, 1], float32). `amp`: the
    autocast dtype name (fp32: none)."""
    import torch
    from larp.core.utils import autocast
    with torch.no_grad(), autocast(x.device, amp):
        enc = model.encode(x)
        rec = model.decode(enc["encoded"])
    return enc["bottleneck_rep"], rec.float().clamp(0, 1)


def evaluate(model, loader, device, amp="fp32", detector=None, lpips_model=None, num_preview=8, progress=True):
    """Metric sums over all clips -> dict of means (+ FVD when a detector is given), preview videos and the per-clip
    detector features {"real", "fake"} (empty without a detector)."""
    import numpy as np
    import torch
    from larp.core.utils import progress_bar
    from larp.metrics.fvd import FeatureStats, frechet_distance
    from larp.metrics.image import psnr, ssim
    from larp.models.losses import lpips_video
    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count, codes, preview, features = 0, set(), [], {"real": [], "fake": []}
    real_stats = fake_stats = None
    if detector is not None:
        real_stats, fake_stats = FeatureStats(detector=detector.name), FeatureStats(detector=detector.name)
    for batch in progress_bar(loader, desc="reconstruct", disable=not progress, dynamic_ncols=True):
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
            for key, stats, clips in (("real", real_stats, x), ("fake", fake_stats, rec)):
                feats = detector(clips).numpy()  # (B, F)
                stats.add(feats)
                features[key].append(feats)
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
    return metrics, preview, {k: np.concatenate(v) for k, v in features.items() if v}


def save_preview(preview, path):
    import torch
    from larp.core.visualize import save_video_grid_png
    videos, labels = [], []
    for i, (x, r) in enumerate(preview):
        videos += [x, r]
        labels += [f"input {i}", f"recon {i}"]
    return save_video_grid_png(torch.stack(videos), path, row_labels=labels)


def write_gallery(out, preview, report):
    """DIR/gallery.html: each preview clip beside its reconstruction (animated thumbnails in DIR/gallery/), under
    the metrics and the protocol card; written only when its bytes change."""
    from larp.core.gallery import Page, Section, Tile, save_thumbnail, write_page
    from larp.core.io import to_uint8
    tiles = []
    for i, (x, r) in enumerate(preview):
        names = (f"gallery/{i}_input.webp", f"gallery/{i}_recon.webp")
        for name, video in zip(names, (x, r)):
            save_thumbnail(os.path.join(out, name), to_uint8(video[None])[0])
        tiles.append(Tile(names, f"clip {i}: input | reconstruction"))
    metrics = {k: (f"{report[k]:.6g}" if isinstance(report[k], float) else report[k])
               for k in ("mse", "psnr", "ssim", "lpips", "fvd", "codebook_usage", "num_clips") if k in report}
    facts = [("metrics", metrics), ("tokenizer", report["tokenizer"]), ("clips", report["dataset_csv"]),
             ("VQ", "argmax" if report["det"] else "sampled"), ("precision", report["amp_dtype"])]
    if "protocol" in report:
        facts.append(("FVD protocol", report["protocol"]))
    links = [(n, n) for n in ("metrics.json", "preview.png") if os.path.exists(os.path.join(out, n))]
    page = Page(title=f"Tokenizer reconstructions: {run_name(report['tokenizer'])}", facts=tuple(facts),
                links=tuple(links), sections=(Section("input | reconstruction", (("", tuple(tiles)),)),))
    return write_page(os.path.join(out, "gallery.html"), page)


def check_args(args):
    """One clear error for each bad flag before any video is read. Returns the tokenizer checkpoint (config, state
    dict, layout), the clip geometry (frame_num, input_size), the detector spec (None with --no_fvd) and the
    tokenizer as the report records it (a hub id with the commit loaded)."""
    from larp.core.checkpoint import expect_kind, local_path, read_checkpoint
    from larp.core.safe_load import loaded_spec, with_revision
    from larp.data.dataset import check_videos_exist, read_video_csv
    from larp.metrics.detectors import check_i3d_spec
    from larp.models.tokenizer import clip_geometry
    spec = with_revision(args.tokenizer, args.revision)
    try:
        path = local_path(spec)  # a hub id: fetched once, here
        ckpt = read_checkpoint(path, args.trust_checkpoint)  # (config, state dict, layout)
        expect_kind(ckpt[0], "tokenizer", args.tokenizer)
    except CheckpointError as e:
        raise CheckpointError(f"--tokenizer: {e}") from None
    config = ckpt[0]
    try:
        df = read_video_csv(args.dataset_csv)  # exists, has the columns, labels are class indices
    except LarpError as e:
        raise UsageError(f"--dataset_csv: {e}") from None
    if not args.skip_bad:
        try:
            check_videos_exist(df, args.dataset_csv)  # one stat per video, before any model loads
        except VideoReadError as e:
            raise VideoReadError(f"{e}; pass --skip_bad to leave unreadable videos out (they are counted)") from None
    geometry = clip_geometry(config, args.num_frames, args.input_size)
    i3d = None
    if not args.no_fvd:
        try:
            i3d = check_i3d_spec(args.i3d, args.trust_checkpoint)
        except I3DError as e:
            raise I3DError(f"--i3d: {e} (or pass --no_fvd)") from None
    if args.max_clips < 0 or args.batch_size < 1:
        raise UsageError("--max_clips must be >= 0 and --batch_size >= 1")
    return ckpt, geometry, i3d, loaded_spec(spec, path)


def protocol_card(args, detector, count, total, amp, size, frame_num):
    """What the rFVD measured: detector and digest, clip set and draw, resize, precision, count."""
    if args.clips == "window":
        clips = (f"one random {frame_num}-frame window per video of {args.dataset_csv} (video i: "
                 f"torch.Generator({args.seed} * 1_000_003 + i))")
    else:
        clips = f"every non-overlapping {frame_num}-frame clip of {args.dataset_csv} (paths sorted as spelled)"
    if count < total:
        clips += f"; {count} of the {total} drawn with random.Random(42).sample"
    return {"detector": detector.name, "detector_sha256": detector.sha256, "clips": clips,
            "resize": f"torchvision Resize({size}, antialias) + CenterCrop({size}); detector input 224x224",
            "precision": f"tokenizer autocast {amp}, {'argmax' if args.det else 'sampled'} VQ; detector fp32",
            "num_samples": count}


def settings_of(args, geometry, i3d, tokenizer):
    """What the result depends on: stored in metrics.json and hashed into the default output folder's name.
    `tokenizer`: as check_args records it (a hub id with the commit loaded)."""
    from larp.data.dataset import resolve_csv
    local = [os.path.abspath(spec) if spec and os.path.exists(spec) else spec for spec in (tokenizer, i3d)]
    return {"tokenizer": local[0], "dataset_csv": "+".join(resolve_csv(args.dataset_csv)), "det": args.det,
            "use_amp": args.use_amp, "amp_dtype": args.amp_dtype, "clips": args.clips, "seed": args.seed,
            "num_frames": geometry[0], "input_size": geometry[1],
            "max_clips": args.max_clips, "i3d": local[1], "skip_bad": args.skip_bad, "lpips_net": args.lpips_net}


def run_name(spec):
    """The name a tokenizer goes by: its run folder for a training export (save/<run>/export) or checkpoint
    (save/<run>/ckpt_latest.pth -> <run>_ckpt_latest), else the folder or hub name."""
    path = os.path.abspath(spec) if os.path.exists(spec) else os.path.normpath(spec)
    base, parent = os.path.basename(path), os.path.basename(os.path.dirname(path))
    if base == "export":
        return parent
    return f"{parent}_{os.path.splitext(base)[0]}" if base.endswith(".pth") else base


def output_dir(args, settings):
    if args.out:
        return args.out
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join("eval_results", f"tokenizer_{run_name(args.tokenizer)}_{digest}")


def earlier_result(out, settings, replace):
    """The metrics of an evaluation with these settings already in `out` (kept), or None; another evaluation's
    result there is an error (never overwritten unless --replace)."""
    path = os.path.join(out, "metrics.json")
    if replace or not os.path.exists(path):
        return None
    with open(path) as f:
        old = json.load(f)
    if old.get("settings") == settings:
        return old
    differ = [f"{k}: {old['settings'].get(k)!r} there vs {v!r} now" for k, v in settings.items()
              if old["settings"].get(k) != v] if isinstance(old.get("settings"), dict) else ["it records no settings"]
    raise UsageError(f"{path} holds the result of another evaluation ({'; '.join(differ)}); choose another --out "
                     f"or pass --replace to overwrite it")


def print_metrics(metrics, lpips_net):
    from larp.metrics.fvd import fvd_label
    from larp.models.losses import lpips_backbone_path
    print(f"mse={metrics['mse']:.6f}")
    print(f"psnr={metrics['psnr']:.4f}")
    print(f"ssim={metrics['ssim']:.4f}")
    if "lpips" in metrics:
        print(f"lpips={metrics['lpips']:.4f}")
    else:
        print(f"lpips: not computed (no {lpips_net} weights at {lpips_backbone_path(lpips_net)})")
    if metrics.get("fvd") is not None:
        print(fvd_label(metrics["i3d"]))
        print(f"fvd={metrics['fvd']:.4f}")


def load_clips(args, frame_num, input_size):
    """The evaluation clips of --dataset_csv (one window per video, or every clip; all of them, or --max_clips drawn
    with seed 42) -> (dataset, total)."""
    from torch.utils.data import Subset
    from larp.data.dataset import VideoDataset, select_fvd_clips
    try:
        ds = VideoDataset(args.dataset_csv, frame_num=frame_num, input_size=input_size, train=args.clips == "window",
                          skip_bad=args.skip_bad, window_seed=args.seed)
    except VideoReadError as e:
        raise VideoReadError(f"{e}; pass --skip_bad to leave unreadable videos out (they are counted)") from None
    if ds.num_bad:
        print(f"--skip_bad: left out {ds.num_bad} unreadable video(s) of {args.dataset_csv}", flush=True)
    total = len(ds)
    if args.max_clips and args.max_clips < total:
        ds = Subset(ds, select_fvd_clips(total, args.max_clips))
    return ds, total


def main(args):
    from torch.utils.data import DataLoader
    from larp.core.io import atomic_savez, atomic_write_text, expect_path, naming_write_errors, remove_stale_temps
    from larp.core.utils import dtype_name, get_device
    from larp.metrics.detectors import load_i3d
    from larp.models.losses import build_lpips, lpips_available
    from larp.models.tokenizer import LARPTokenizer
    (config, sd, _), (frame_num, input_size), i3d, tokenizer = check_args(args)
    settings = settings_of(args, (frame_num, input_size), i3d, tokenizer)
    out = output_dir(args, settings)
    expect_path(out, "--out")
    kept = earlier_result(out, settings, args.replace)
    if kept is not None:
        print(f"{out}/metrics.json already holds this evaluation (same settings): kept, printed below; --replace "
              f"redoes it")
        print_metrics(kept, args.lpips_net)
        return kept
    device = get_device(args.device)
    try:
        model = LARPTokenizer.from_config_and_state_dict(config, sd, source=str(args.tokenizer))
    except CheckpointError as e:
        raise CheckpointError(f"--tokenizer: {e}") from None
    model = model.to(device).set_vq_eval_deterministic(args.det)
    ds, total = load_clips(args, frame_num, input_size)
    print(f"tokenizer: {args.tokenizer} ({model.bottleneck_token_num} tokens, codebook {model.codebook_size}, "
          f"{'argmax' if args.det else 'sampled'} VQ)  clips: {len(ds)} of {total} "
          f"({'one window per video, seed %d' % args.seed if args.clips == 'window' else 'every clip'})", flush=True)
    lpips_model = build_lpips(args.lpips_net).to(device) if lpips_available(args.lpips_net) else None
    detector = load_i3d(i3d, device, batch_size=args.batch_size, trust=args.trust_checkpoint) if i3d is not None \
        else None
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    amp = dtype_name(args.amp_dtype) if args.use_amp else "fp32"
    metrics, preview, features = evaluate(model, loader, device, amp, detector, lpips_model, args.num_preview)

    with naming_write_errors(out):
        os.makedirs(out, exist_ok=True)
    remove_stale_temps(out)
    remove_stale_temps(os.path.join(out, "gallery"))
    if preview:
        save_preview(preview, os.path.join(out, "preview.png"))
    report = {**metrics, "tokenizer": tokenizer, "dataset_csv": str(args.dataset_csv), "det": args.det,
              "use_amp": args.use_amp, "amp_dtype": amp, "clips": args.clips, "seed": args.seed,
              "i3d": None if detector is None else detector.name, "settings": settings}
    if detector is not None:
        report["protocol"] = protocol_card(args, detector, metrics["num_clips"], total, amp, input_size, frame_num)
    if features:  # per-clip features, for a bootstrap interval of the rFVD (larp.metrics.fvd.bootstrap_fvd)
        atomic_savez(os.path.join(out, "features.npz"), features)
    atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(report, indent=2) + "\n")
    write_gallery(out, preview, report)
    print_metrics(report, args.lpips_net)
    print(f"wrote {out}/metrics.json, {out}/preview.png and {out}/gallery.html (input beside reconstruction)")
    return metrics


def get_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--tokenizer", required=True, help="hub-mixin dir, *.pth+*.json dir, training checkpoint or hub id")
    p.add_argument("--revision", default=None, help="hub commit of --tokenizer (a hub id)")
    p.add_argument("--trust_checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--dataset_csv", default="ucf101_train.csv",
                   help="CSV path or name under data/metadata (several joined by +); the reference's: ucf101_train")
    p.add_argument("--clips", default="window", choices=["window", "all"], help="window: one random window per "
                   "video, seeded by --seed (the reference's rFVD); all: every non-overlapping clip from frame 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows (--clips window)")
    p.add_argument("--det", action="store_true", help="deterministic (argmax) VQ; off: samples as in training")
    p.add_argument("--use_amp", action="store_true", help="autocast in --amp_dtype where the device supports it")
    p.add_argument("--amp_dtype", default="float16", choices=["float16", "bfloat16"],
                   help="the autocast dtype of --use_amp (the reference's default: float16)")
    p.add_argument("--num_frames", type=int, default=None, help="clip length (default: the tokenizer's frame_num)")
    p.add_argument("--input_size", type=int, default=None, help="frame size (default: the tokenizer's input_size)")
    p.add_argument("--batch_size", type=int, default=8, help="clips per batch")
    p.add_argument("--max_clips", type=int, default=0, help="evaluate this many clips drawn with seed 42 (0 = all)")
    p.add_argument("--i3d", default=None, help="kinetics400 | i3d_torchscript.pt | state dict | random[:SIZE] "
                   "(default: $LARP_I3D, else checkpoints/i3d_torchscript.pt, else kinetics400)")
    p.add_argument("--no_fvd", action="store_true", help="skip the FVD (and the detector)")
    p.add_argument("--skip_bad", action="store_true", help="leave unreadable videos out of the clip index (counted)")
    p.add_argument("--lpips_net", default="vgg", choices=["vgg", "alex", "squeeze"], help="LPIPS backbone")
    p.add_argument("--num_preview", type=int, default=8, help="clips shown in preview.png")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="output folder (default: eval_results/tokenizer_<run>_<hash of the "
                   "settings>)")
    p.add_argument("--replace", action="store_true", help="redo an evaluation whose metrics.json is in the output "
                   "folder (default: kept when its settings match, refused when not)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, get_args())  # the flags are parsed before torch is imported: --help answers at once
