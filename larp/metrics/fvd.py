"""FVD: mergeable feature statistics of a detector's features and the Frechet distance between two of them.

The detector (I3D, which one and how it runs) is larp.metrics.detectors. Statistics keep the float64 sum and sum
of outer products, so shards from several processes merge exactly; mu = sum/n and sigma = sum_outer/n - mu mu^T
(population covariance). They also record what the features were computed on (`FeatureStats.meta`: clip length,
size, resize, clip set and draw; with the detector), so stats of different clips never merge or compare silently.
"""
import json
import os
import pickle
import zipfile

import numpy as np
import torch

from larp.core.errors import StatsMismatchError
from larp.core.io import atomic_write
from larp.core.safe_load import load_array_pickle, load_npz
from larp.core.utils import progress_bar
from larp.metrics.detectors import RANDOM_LABEL

# What features were computed on, besides the detector: clip length, frame size, how frames reached that size,
# which clips (CSV / folder) and which of them (the draw). Merged stats must agree on all of them.
META_KEYS = ("frames", "size", "resize", "clips", "draw")
# The two sides of an FVD must agree on these (their clip sets and draws differ by design: real vs generated).
COMPARE_KEYS = ("frames", "size", "resize")
# StyleGAN-V's FeatureStats pickles its __dict__; its FeatureStats.load reads these attributes, which our .pkl files
# carry beside our keys (raw_mean / raw_cov are the same float64 sums Σx, Σxxᵀ on both sides).
REFERENCE_SUMS = {"capture_all": False, "capture_mean_cov": True, "max_items": None, "only_stats_mode": False,
                  "loaded_mean": None, "loaded_cov": None, "all_features": None}
# ... and of stats known only by mu / sigma: its only_stats_mode, which it compares but does not merge
REFERENCE_MOMENTS = {"capture_all": False, "capture_mean_cov": False, "max_items": None, "only_stats_mode": True}


def fvd_label(detector):
    """Text to print next to an FVD number; says loudly when the detector is random."""
    name = getattr(detector, "name", None) or str(detector)
    random_ = getattr(detector, "is_random", None)
    if random_ is None:
        random_ = name.startswith("random")
    return f"detector: {name}" + (f" -- {RANDOM_LABEL}" if random_ else "")


class FeatureStats:
    """Float64 running sum and sum of outer products of features; shards merge with `+`.

    `meta` records what the features were computed on (META_KEYS: frames, size, resize, clips, draw); a key it
    lacks is unknown (stats written before they recorded it, or by another tool). Merging stats whose known values
    differ, or comparing two whose frames / size / resize / detector differ, raises StatsMismatchError.
    Stats loaded from an .npz holding only mu/sigma (no count) can be compared but not merged.
    """

    def __init__(self, num_features=None, detector=None, meta=None):
        self.num_features, self.detector = num_features, detector
        self.meta = {k: v for k, v in (meta or {}).items() if k in META_KEYS and v is not None}
        self.num_items = 0
        self.sum = None        # (F,) float64
        self.sum_outer = None  # (F, F) float64
        self._moments = None   # (mu, sigma) when loaded without a count

    def add(self, feats):
        """feats (N, F) tensor or array."""
        if self._moments is not None:
            raise ValueError("cannot add features to stats loaded from mu/sigma without an item count")
        if isinstance(feats, torch.Tensor):
            feats = feats.detach().cpu().numpy()
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, F), got shape {x.shape}")
        self._check_features(x.shape[1], "features")
        if self.sum is None:
            self.sum = np.zeros(x.shape[1])
            self.sum_outer = np.zeros((x.shape[1], x.shape[1]))
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x
        self.num_items += x.shape[0]
        return self

    def _check_features(self, num, what):
        if self.num_features is not None and num != self.num_features:
            raise ValueError(f"feature size mismatch: stats have {self.num_features} features, {what} have {num}")
        self.num_features = num

    def provenance(self):
        """{"detector", "frames", ...}: what is known of how the features were computed."""
        return {"detector": self.detector or None, **self.meta}

    def _is_empty(self):
        return self._moments is None and not self.num_items

    def __add__(self, other):
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if self._moments is not None or other._moments is not None:
            raise ValueError("cannot merge stats loaded from mu/sigma without an item count")
        differ = mismatches(self, other, ("detector",) + META_KEYS)
        if differ:
            kind = "detectors" if differ[0][0] == "detector" else "clips"
            raise StatsMismatchError(f"cannot merge stats from different {kind}: {describe(differ)}")
        # a key known to one side only is unknown for the merged stats (an empty accumulator knows nothing)
        meta = other.meta if self._is_empty() else self.meta if other._is_empty() else \
            {k: v for k, v in self.meta.items() if other.meta.get(k) == v}
        out = FeatureStats(self.num_features, self.detector or other.detector, meta)
        if other.num_features is not None:
            out._check_features(other.num_features, "the other stats")
        for s in (self, other):
            if s.sum is not None:
                out.sum = s.sum.copy() if out.sum is None else out.sum + s.sum
                out.sum_outer = s.sum_outer.copy() if out.sum_outer is None else out.sum_outer + s.sum_outer
            out.num_items += s.num_items
        return out

    def __radd__(self, other):  # lets sum([a, b, c]) work
        return self if other == 0 else NotImplemented

    def mean_cov(self):
        """-> (mu (F,), sigma (F, F)) float64, population covariance."""
        if self._moments is not None:
            return self._moments
        if not self.num_items:
            raise ValueError("no features accumulated")
        mu = self.sum / self.num_items
        return mu, self.sum_outer / self.num_items - np.outer(mu, mu)

    def to_dict(self):
        """Our keys plus StyleGAN-V's FeatureStats attributes (REFERENCE_SUMS), whose raw_mean / raw_cov are the
        same float64 sums, so the reference's FeatureStats.load and its merge script read the file as its own."""
        return {"num_items": self.num_items, "num_features": self.num_features, "raw_mean": self.sum,
                "raw_cov": self.sum_outer, "detector": self.detector, "meta": dict(self.meta), **REFERENCE_SUMS}

    def _moments_dict(self):
        """mu / sigma without a count; in the reference's layout, its only_stats_mode (comparable, not mergeable)."""
        mu, sigma = self._moments
        return {"mu": mu, "sigma": sigma, "detector": self.detector, "meta": dict(self.meta),
                **REFERENCE_MOMENTS, "loaded_mean": mu, "loaded_cov": sigma}

    def save(self, path):
        """.pkl: plain dict (num_items, num_features, raw_mean = sum, raw_cov = sum of outer products, detector,
        meta: a dict of str / int; and the reference's keys, see to_dict); .npz: mu, sigma, n (+ detector, meta as
        a JSON string). Atomic."""
        path = os.fspath(path)
        if path.endswith(".pkl"):
            d = self.to_dict() if self._moments is None else self._moments_dict()

            def write(tmp):
                with open(tmp, "wb") as f:
                    pickle.dump(d, f)
        elif path.endswith(".npz"):
            mu, sigma = self.mean_cov()
            extra = {"n": np.int64(self.num_items)} if self._moments is None else {}
            if self.detector:
                extra["detector"] = np.array(self.detector)
            if self.meta:
                extra["meta"] = np.array(json.dumps(self.meta, sort_keys=True))  # a str array, no pickling

            def write(tmp):
                with open(tmp, "wb") as f:
                    np.savez(f, mu=mu, sigma=sigma, **extra)
        else:
            raise ValueError(f"stats file must end in .pkl or .npz: '{path}'")
        return atomic_write(path, write)

    @classmethod
    def load(cls, path):
        """Reads our .pkl/.npz and StyleGAN-V-style pickles (raw_mean/raw_cov sums, or all_features)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"stats file not found: '{path}'")
        if path.endswith(".npz"):
            try:
                d = load_npz(path)  # allow_pickle=False: an object array is refused
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f"'{path}': not a readable .npz stats file ({e})") from e
            return cls._from_moments(d, path)
        if not path.endswith(".pkl"):
            raise ValueError(f"stats file must end in .pkl or .npz: '{path}'")
        try:
            d = load_array_pickle(path)  # numpy arrays and plain containers only
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
            raise ValueError(f"'{path}': not a readable stats pickle ({type(e).__name__}: {e}); truncated?") from e
        if not isinstance(d, dict):
            raise ValueError(f"'{path}': expected a pickled dict of statistics, got {type(d).__name__}")
        return cls._from_dict(d, path)

    @classmethod
    def _from_dict(cls, d, path):
        """Our pickle or StyleGAN-V's FeatureStats.__dict__: sums (capture_mean_cov), all features (capture_all)
        or, in its only_stats_mode, loaded_mean / loaded_cov without a count."""
        if "mu" in d and "sigma" in d:
            return cls._from_moments(d, path)
        if d.get("only_stats_mode"):
            if d.get("loaded_mean") is None or d.get("loaded_cov") is None:
                raise ValueError(f"'{path}': only_stats_mode stats without loaded_mean / loaded_cov")
            return cls._from_moments({**d, "mu": d["loaded_mean"], "sigma": d["loaded_cov"]}, path)
        detector = d.get("detector")
        stats = cls(detector=str(detector) if detector is not None else None, meta=_read_meta(d.get("meta")))
        sums = d.get("capture_mean_cov", True) and d.get("raw_mean") is not None and d.get("raw_cov") is not None
        if sums:  # the reference keeps zero sums when it captured all features instead
            stats.sum = np.asarray(d["raw_mean"], dtype=np.float64)
            stats.sum_outer = np.asarray(d["raw_cov"], dtype=np.float64)
            stats.num_items, stats.num_features = int(d["num_items"]), stats.sum.shape[0]
        elif d.get("all_features") is not None and len(d["all_features"]):
            feats = d["all_features"]  # the reference's list of per-batch arrays, or one (N, F) array
            feats = np.concatenate(feats) if isinstance(feats, (list, tuple)) else np.asarray(feats)
            stats.add(feats[: d.get("num_items")])
        elif d.get("num_items", 0) != 0:
            raise ValueError(f"'{path}': no raw_mean/raw_cov, mu/sigma, loaded_mean/loaded_cov or all_features "
                             f"in the stats dict")
        return stats

    @classmethod
    def _from_moments(cls, d, path):
        if "mu" not in d or "sigma" not in d:
            raise ValueError(f"'{path}': expected arrays 'mu' and 'sigma', found {sorted(d)}")
        mu, sigma = np.asarray(d["mu"], np.float64), np.asarray(d["sigma"], np.float64)
        detector = d.get("detector")
        stats = cls(mu.shape[0], str(detector) if detector is not None else None, _read_meta(d.get("meta")))
        if d.get("n") is not None:  # with a count the sums are recoverable, so the stats stay mergeable
            n = int(d["n"])
            stats.num_items, stats.sum, stats.sum_outer = n, n * mu, n * (sigma + np.outer(mu, mu))
        else:
            stats.num_items, stats._moments = None, (mu, sigma)
        return stats


def _read_meta(value):
    """The `meta` of a stats file: a dict (.pkl) or a JSON string array (.npz); absent or unreadable: unknown."""
    if isinstance(value, np.ndarray):
        value = value.item() if value.shape == () else None
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def mismatches(a, b, keys):
    """[(key, a's value, b's value)] of the `keys` both stats record, with different values."""
    pa, pb = a.provenance(), b.provenance()
    return [(k, pa[k], pb[k]) for k in keys if pa.get(k) is not None and pb.get(k) is not None and pa[k] != pb[k]]


def describe(differ, names=None):
    """"frames 16 vs 8; size 128 vs 32" (with names: "frames 16 (real) vs 8 (fake)")."""
    n1, n2 = (f" ({names[0]})", f" ({names[1]})") if names else ("", "")
    return "; ".join(f"{k} {v1!r}{n1} vs {v2!r}{n2}" for k, v1, v2 in differ)


def check_comparable(a, b, names=("first", "second")):
    """Raise StatsMismatchError when two stats record different detectors, clip lengths, sizes or resizes. Returns
    a one-line note naming what one of them does not record (None when both record everything), for the CLIs."""
    differ = mismatches(a, b, ("detector",) + COMPARE_KEYS)
    if differ:
        raise StatsMismatchError(f"the {names[0]} and {names[1]} stats were computed differently: "
                                 f"{describe(differ, names)}; FVD needs the same detector, clip length, size and "
                                 f"resize on both sides")
    unknown = [f"the {name} stats do not record {', '.join(missing)}" for name, s in zip(names, (a, b))
               if (missing := [k for k in ("detector",) + COMPARE_KEYS if s.provenance().get(k) is None])]
    if not unknown:
        return None
    return f"note: {'; '.join(unknown)} (written by an older version or another tool): not checked"


def _moments(x, which):
    if isinstance(x, FeatureStats):
        if x.num_items is not None and x.num_items < 2:
            raise ValueError(f"{which} stats have {x.num_items} item(s); FVD needs at least 2")
        return x.mean_cov()
    mu, sigma = x
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def _psd_eigenvalues(w):
    """Eigenvalues of a PSD matrix with round-off removed: those below the usual numerical-rank tolerance
    (size * eps * largest) are zero. Otherwise sqrt turns ~1e-16 noise on the null space of a rank-deficient
    covariance into ~1e-8 per eigenvalue, and FVD(x, x) drifts away from 0."""
    tol = w.shape[0] * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
    return np.where(w > tol, w, 0.0)


def frechet_distance(a, b):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) for FeatureStats or (mu, sigma) pairs.

    tr((S1 S2)^1/2) is computed as the sum of sqrt-eigenvalues of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1),
    which has the same eigenvalues as S1 S2; this avoids the complex/unstable sqrtm of a non-symmetric product
    and stays accurate for rank-deficient covariances (fewer items than features).
    """
    if isinstance(a, FeatureStats) and isinstance(b, FeatureStats):
        check_comparable(a, b)
    mu1, s1 = _moments(a, "first")
    mu2, s2 = _moments(b, "second")
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature size mismatch: {mu1.shape[0]} vs {mu2.shape[0]}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * np.sqrt(_psd_eigenvalues(w))) @ v.T   # (F, F)
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _video_batch(batch):
    """Dataset batches are dicts {'video': ...}, (video, label) tuples or bare tensors."""
    if isinstance(batch, dict):
        return batch["video"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def compute_stats(detector, batches, total=None, desc="I3D features", stats=None, progress=True, meta=None,
                  keep=None):
    """Run the detector over an iterable of video batches (B, 3, T, H, W) in [0, 1] -> FeatureStats (recording
    `meta`, see FeatureStats). `keep`: a list that receives each batch's features (N, F) too (for `bootstrap_fvd`)."""
    stats = stats if stats is not None else FeatureStats(detector=getattr(detector, "name", None), meta=meta)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for batch in progress_bar(batches, total=total, desc=desc, disable=not progress, dynamic_ncols=True):
        feats = detector(_video_batch(batch))
        stats.add(feats)
        if keep is not None:
            keep.append(np.asarray(feats, dtype=np.float64))
    return stats


def _weighted_moments(x, w):
    """(mu, population sigma) of the rows of x (n, F) counted w (n,) times."""
    n = w.sum()
    mu = w @ x / n
    return mu, (x * w[:, None]).T @ x / n - np.outer(mu, mu)


def bootstrap_fvd(real, fake, num=1000, seed=0, level=0.95):
    """Percentile bootstrap of the FVD: real (n, F) and fake (m, F) features are each resampled with replacement
    `num` times (numpy Generator(seed)). Returns {"lo", "hi", "std", "num", "level"}: the (1 - level) / 2 and
    (1 + level) / 2 quantiles and the standard deviation of the resampled FVDs."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(num)):
        wr = rng.multinomial(len(real), np.full(len(real), 1 / len(real))).astype(np.float64)
        wf = rng.multinomial(len(fake), np.full(len(fake), 1 / len(fake))).astype(np.float64)
        values.append(frechet_distance(_weighted_moments(real, wr), _weighted_moments(fake, wf)))
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return {"lo": float(lo), "hi": float(hi), "std": float(np.std(values)), "num": int(num), "level": level}
