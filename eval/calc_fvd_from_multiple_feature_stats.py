"""Merge per-rank FVD feature stats from one folder and print the FVD.

    python eval/calc_fvd_from_multiple_feature_stats.py --dir samples/run1
    python eval/calc_fvd_from_multiple_feature_stats.py --dir D --real_glob 'real_*.npz' --fake_glob 'fake_*.npz'

Sampling shards write `gt_fvd_stats_<a>_<b>.pkl` and `generated_fvd_stats_<a>_<b>.pkl` (sample range [a, b)); the float64 sums add
exactly, so the merged FVD equals the single-process one. Stats that record different clips (length, size,
resize, clip set, draw) or detectors are refused, not merged. Prints `fvd=<value>` last.
"""
import glob
import os
import sys

from larp.core.cli import parser
from larp.core.errors import StatsMismatchError, UsageError, run_cli


def merge_stats(folder, pattern):
    """Sum of all stats files matching `pattern` in `folder` -> (FeatureStats, paths)."""
    from larp.metrics.fvd import FeatureStats
    paths = sorted(glob.glob(os.path.join(folder, pattern)))
    if not paths:
        raise FileNotFoundError(f"no stats files matching '{pattern}' in '{folder}'")
    merged = None
    for path in paths:
        stats = FeatureStats.load(path)
        try:
            merged = stats if merged is None else merged + stats
        except StatsMismatchError as e:
            raise StatsMismatchError(f"{path} and {paths[0]}: {e}") from None
    return merged, paths


def fvd_from_folder(folder, real_glob, fake_glob):
    """-> (fvd, real FeatureStats, fake FeatureStats, label)."""
    from larp.metrics.fvd import check_comparable, frechet_distance, fvd_label
    real, real_paths = merge_stats(folder, real_glob)
    fake, fake_paths = merge_stats(folder, fake_glob)
    print(f"real: {len(real_paths)} file(s), {real.num_items} items; fake: {len(fake_paths)} file(s), "
          f"{fake.num_items} items")
    note = check_comparable(real, fake, ("real", "fake"))
    if note:
        print(note, file=sys.stderr)
    label = fvd_label(fake.detector or real.detector or "unknown (stats files do not record it)")
    return frechet_distance(real, fake), real, fake, label


def get_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--dir", required=True, help="folder holding the shard stats files")
    p.add_argument("--real_glob", default="gt_fvd_stats_*.pkl", help="file name pattern of the real stats")
    p.add_argument("--fake_glob", default="generated_fvd_stats_*.pkl", help="file name pattern of the generated stats")
    return p.parse_args(argv)


def main(args):
    if not os.path.isdir(args.dir):
        raise UsageError(f"--dir {args.dir}: not a folder")
    try:
        fvd, _, _, label = fvd_from_folder(args.dir, args.real_glob, args.fake_glob)
    except (FileNotFoundError, ValueError) as e:  # no stats files, unreadable or unmergeable ones
        raise UsageError(str(e)) from e
    print(label)
    print(f"fvd={fvd:.4f}")
    return fvd


if __name__ == "__main__":
    run_cli(main, get_args())
