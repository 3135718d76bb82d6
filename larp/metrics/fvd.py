"""FVD: mergeable feature statistics of a detector's features and the Frechet distance between two of them.

The detector (I3D, which one and how it runs) is larp.metrics.detectors. Statistics keep the float64 sum and sum
of outer products, so shards from several processes merge exactly; mu = sum/n and sigma = sum_outer/n - mu mu^T
(population covariance).
"""
import os
import pickle
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from larp.core.io import atomic_write
from larp.metrics.detectors import RANDOM_LABEL


def fvd_label(detector):
    """Text to print next to an FVD number; says loudly when the detector is random."""
    name = getattr(detector, "name", None) or str(detector)
    random_ = getattr(detector, "is_random", None)
    if random_ is None:
        random_ = name.startswith("random")
    return f"detector: {name}" + (f" -- {RANDOM_LABEL}" if random_ else "")


class FeatureStats:
    """Float64 running sum and sum of outer products of features; shards merge with `+`.

    Stats loaded from an .npz holding only mu/sigma (no count) can be compared but not merged.
    """

    def __init__(self, num_features=None, detector=None):
        self.num_features, self.detector = num_features, detector
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

    def __add__(self, other):
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if self._moments is not None or other._moments is not None:
            raise ValueError("cannot merge stats loaded from mu/sigma without an item count")
        if self.detector and other.detector and self.detector != other.detector:
            raise ValueError(f"cannot merge stats from different detectors: '{self.detector}' vs '{other.detector}'")
        out = FeatureStats(self.num_features, self.detector or other.detector)
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
        return {"num_items": self.num_items, "num_features": self.num_features, "raw_mean": self.sum,
                "raw_cov": self.sum_outer, "detector": self.detector}

    def save(self, path):
        """.pkl: plain dict (num_items, num_features, raw_mean = sum, raw_cov = sum of outer products, detector);
        .npz: mu, sigma, n (+ detector). Atomic."""
        path = os.fspath(path)
        if path.endswith(".pkl"):
            if self._moments is not None:
                d = {"mu": self._moments[0], "sigma": self._moments[1], "detector": self.detector}
            else:
                d = self.to_dict()

            def write(tmp):
                with open(tmp, "wb") as f:
                    pickle.dump(d, f)
        elif path.endswith(".npz"):
            mu, sigma = self.mean_cov()
            extra = {"n": np.int64(self.num_items)} if self._moments is None else {}
            if self.detector:
                extra["detector"] = np.array(self.detector)

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
                with np.load(path) as z:
                    d = {k: z[k] for k in z.files}
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f"'{path}': not a readable .npz stats file ({e})") from e
            return cls._from_moments(d, path)
        if not path.endswith(".pkl"):
            raise ValueError(f"stats file must end in .pkl or .npz: '{path}'")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
            raise ValueError(f"'{path}': not a readable stats pickle ({type(e).__name__}: {e}); truncated?") from e
        if not isinstance(d, dict):
            raise ValueError(f"'{path}': expected a pickled dict of statistics, got {type(d).__name__}")
        if "mu" in d and "sigma" in d:
            return cls._from_moments(d, path)
        detector = d.get("detector")
        stats = cls(detector=str(detector) if detector is not None else None)
        if d.get("raw_mean") is not None and d.get("raw_cov") is not None:
            stats.sum = np.asarray(d["raw_mean"], dtype=np.float64)
            stats.sum_outer = np.asarray(d["raw_cov"], dtype=np.float64)
            stats.num_items, stats.num_features = int(d["num_items"]), stats.sum.shape[0]
        elif d.get("all_features") is not None:
            stats.add(np.asarray(d["all_features"])[: d.get("num_items")])
        elif d.get("num_items", 0) != 0:
            raise ValueError(f"'{path}': no raw_mean/raw_cov, mu/sigma or all_features in the stats dict")
        return stats

    @classmethod
    def _from_moments(cls, d, path):
        if "mu" not in d or "sigma" not in d:
            raise ValueError(f"'{path}': expected arrays 'mu' and 'sigma', found {sorted(d)}")
        mu, sigma = np.asarray(d["mu"], np.float64), np.asarray(d["sigma"], np.float64)
        detector = d.get("detector")
        stats = cls(mu.shape[0], str(detector) if detector is not None else None)
        if d.get("n") is not None:  # with a count the sums are recoverable, so the stats stay mergeable
            n = int(d["n"])
            stats.num_items, stats.sum, stats.sum_outer = n, n * mu, n * (sigma + np.outer(mu, mu))
        else:
            stats.num_items, stats._moments = None, (mu, sigma)
        return stats


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


def compute_stats(detector, batches, total=None, desc="I3D features", stats=None, progress=True, keep=None):
    """Run the detector over an iterable of video batches (B, 3, T, H, W) in [0, 1] -> FeatureStats. `keep`: a list
    that receives each batch's features (N, F) too (for `bootstrap_fvd`)."""
    stats = stats if stats is not None else FeatureStats(detector=getattr(detector, "name", None))
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, dynamic_ncols=True):
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
