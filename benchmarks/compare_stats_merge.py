"""FVD of sharded stats files, merged by ours and by the reference's merge script, side by side.

Writes `gt_fvd_stats_<a>_<b>.pkl` / `generated_fvd_stats_<a>_<b>.pkl` shards as sample.py does (our FeatureStats of
synthetic clips through a detector, the seeded random I3D by default), then prints the FVD of
eval/calc_fvd_from_multiple_feature_stats.py and of the reference's script of the same name, run on the same
folder from the clone in benchmarks/reference_code (its FeatureStats.load, `+` and FVDCalculator.calculate_fvd;
the I3D it would load in FVDCalculator.__init__ is not needed to merge, so it is skipped). The reference's
utils/fvd/fvd.py imports easydict (pip install easydict). Also prints how far the two merged means and covariances
are apart. The FVDs can part by more than round-off when the features are tiny (the random I3D's): the reference's
matrix square root leaves singular values below 1e-10 unrooted, ours keeps every one above round-off.

    git clone https://github.com/hywang66/LARP benchmarks/reference_code/LARP
    python benchmarks/compare_stats_merge.py --samples 10 --shards 2
    python benchmarks/compare_stats_merge.py --samples 64 --shards 4 --i3d kinetics400 --size 64
"""
import argparse
import glob
import importlib.util
import os
import sys
import tempfile
import types

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval.calc_fvd_from_multiple_feature_stats import fvd_from_folder  # noqa: E402
from larp.core.errors import LarpError, UsageError, run_cli  # noqa: E402
from larp.data.synthetic import render_video  # noqa: E402
from larp.metrics.detectors import load_i3d  # noqa: E402
from larp.metrics.fvd import compute_stats  # noqa: E402
from reference_samplers import REFERENCE_DIR, ReferenceMissing  # noqa: E402


def clips(indices, frames, size, seed):
    """float (N, 3, T, S, S) in [0, 1]: synthetic clip i of each index (class i % 8) from rng([seed, i])."""
    videos = [render_video(i % 8, 8, frames, size, np.random.default_rng([seed, i])) for i in indices]
    return torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 255  # (N, T, S, S, 3) -> (N, 3, T, S, S)


def write_shards(folder, detector, samples, shards, frames, size):
    """Shard k holds samples [a, b): real clips (seed 0) and "generated" ones (seed 1), as sample.py names them."""
    meta = {"frames": frames, "size": size, "resize": "none (rendered at size)"}
    for part in np.array_split(np.arange(samples), shards):
        a, b = int(part[0]), int(part[-1]) + 1
        for side, seed in (("gt", 0), ("generated", 1)):
            stats = compute_stats(detector, [clips(part, frames, size, seed)], progress=False, meta=meta)
            stats.save(os.path.join(folder, f"{side}_fvd_stats_{a}_{b}.pkl"))


def reference_merge_script():
    """The reference's eval/calc_fvd_from_multiple_feature_stats.py as a module, its `from utils import
    FeatureStats, FVDCalculator` served by utils/fvd/fvd.py alone (the package's __init__ pulls in the FID,
    tensorboard and the training helpers)."""
    root = os.path.join(REFERENCE_DIR, "LARP")
    script = os.path.join(root, "eval", "calc_fvd_from_multiple_feature_stats.py")
    if not os.path.isfile(script):
        raise ReferenceMissing(f"{script} not found; run: git clone https://github.com/hywang66/LARP {root}")
    package = types.ModuleType("utils")
    package.__path__ = [os.path.join(root, "utils")]
    sys.modules["utils"] = package
    spec = importlib.util.spec_from_file_location("utils.fvd.fvd", os.path.join(root, "utils", "fvd", "fvd.py"))
    fvd = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(fvd)
    except ImportError as e:
        raise LarpError(f"the reference's utils/fvd/fvd.py: {e}; pip install {e.name or 'it'}") from None

    class MergeOnly(fvd.FVDCalculator):
        def __init__(self):  # calculate_fvd uses no detector
            pass

    package.FeatureStats, package.FVDCalculator = fvd.FeatureStats, MergeOnly
    spec = importlib.util.spec_from_file_location("reference_calc_fvd", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def moment_difference(reference, folder, side, ours):
    """Largest |difference| between the reference's merged mean / covariance of one side and ours."""
    files = sorted(glob.glob(os.path.join(folder, f"{side}_fvd_stats_*.pkl")))
    theirs = reference.load_feature_stats_from_multiple_files(files).get_mean_cov()
    return max(float(np.abs(np.asarray(t) - o).max()) for t, o in zip(theirs, ours.mean_cov()))


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10, help="samples per side (default %(default)s)")
    ap.add_argument("--shards", type=int, default=2, help="shard files per side (default %(default)s)")
    ap.add_argument("--i3d", default="random:32", help="detector spec, as eval/compute_fvd.py takes it")
    ap.add_argument("--frames", type=int, default=8, help="clip length (default %(default)s)")
    ap.add_argument("--size", type=int, default=32, help="clip size (default %(default)s)")
    ap.add_argument("--dir", default=None, help="folder for the shard files (default: a temporary one)")
    return ap.parse_args(argv)


def main(args):
    if not 1 <= args.shards <= args.samples:
        raise UsageError(f"--shards {args.shards}: expected 1 to --samples ({args.samples})")
    reference = reference_merge_script()
    detector = load_i3d(args.i3d, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        os.makedirs(folder, exist_ok=True)
        write_shards(folder, detector, args.samples, args.shards, args.frames, args.size)
        ours, real, fake, _ = fvd_from_folder(folder, "gt_fvd_stats_*.pkl", "generated_fvd_stats_*.pkl")
        theirs = float(reference.main(argparse.Namespace(feature_stats_dir=folder)))
        moments = max(moment_difference(reference, folder, side, stats)
                      for side, stats in (("gt", real), ("generated", fake)))
    rel = abs(ours - theirs) / max(abs(theirs), 1e-300)
    print(f"{args.samples} samples {args.shards} shards ({detector.name}): ours {ours:.10g}, reference "
          f"{theirs:.10g} (rel diff {rel:.2e}); merged mean and covariance differ by at most {moments:.2e}")


if __name__ == "__main__":
    run_cli(main, get_args())
