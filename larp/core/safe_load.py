"""Reading files a user was handed without letting them run code (docs/security.md).

A pickle can call any function while it is read, and a TorchScript archive holds code. So:
  * torch files (checkpoints, token caches, state dicts): `load_torch`, torch.load(weights_only=True) with the
    small allowlist CHECKPOINT_GLOBALS; a file that needs anything else is refused (UnsafeFileError naming the
    file and the types) unless the caller passes trust=True (the `--trust_checkpoint` flag);
  * stats pickles: `load_array_pickle`, an unpickler that builds numpy arrays, dtypes, numpy scalars and plain
    containers and nothing else; .npz / .npy: `load_npz` / `load_npy` with allow_pickle=False;
  * TorchScript: `read_torchscript` hands out the bytes only when their digest is known (KNOWN_TORCHSCRIPT,
    KNOWN_TORCHSCRIPT_GIT_BLOBS, $LARP_I3D_SHA256) or trust=True; the caller loads those same bytes;
  * hub ids: `owner/name@REVISION` pins a revision; `loaded_spec` names the commit a snapshot folder holds.
"""
import collections
import hashlib
import os
import pickle
import re
import sys
import zipfile

import numpy as np
import torch

from larp.core.errors import UnsafeFileError, UsageError

TRUST_FLAG = "--trust_checkpoint"
TRUST_HINT = f"pass {TRUST_FLAG} only if you trust where the file comes from (it can then run any code)"


# ---------------------------------------------------------------------------------------------- torch files
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]   # numpy's array rebuilder (numpy.core before 2.0, numpy._core after)
_SCALAR = np.float64(0).__reduce__()[0]        # numpy scalars: scalar(dtype, bytes)
_FROMBUFFER = np.ndarray(0).__reduce_ex__(5)[0]  # arrays pickled with protocol 5
# numeric dtypes only: an object dtype (whose items would be arbitrary objects) stays refused
_NUMERIC_DTYPES = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"]


class EasyDictStandIn:
    """Loads the `easydict.EasyDict` configs of reference checkpoints (hywang66/LARP, ThisisBillhe/NAR save
    `cfg` and the model/optimizer `args` as EasyDicts) as OrderedDicts: torch's safe unpickler fills only exact
    dict / OrderedDict types, and easydict need not be installed. The attribute copies an EasyDict pickles
    land in the OrderedDict's __dict__, harmlessly."""

    def __new__(cls, *args):
        return collections.OrderedDict()


# Everything a checkpoint may hold besides tensors, containers, numbers and strings (torch's own allowlist): numpy
# arrays / scalars of numeric dtypes (RNG states of older checkpoints and of the reference's) and EasyDict configs.
CHECKPOINT_GLOBALS = [
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"), (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    (_SCALAR, "numpy.core.multiarray.scalar"), (_SCALAR, "numpy._core.multiarray.scalar"),
    np.ndarray, np.dtype, *_NUMERIC_DTYPES, (EasyDictStandIn, "easydict.EasyDict"),
]


def _refused_types(path, error):
    """The globals / types of `path` outside the allowlist, read from the pickle without running it and from the
    weights-only unpickler's message (the latter also names classes that are built, not imported)."""
    names = []
    if zipfile.is_zipfile(path):
        try:
            with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
                names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # a damaged archive: the message below still says what was refused
            names = []
    text = str(error)
    names += re.findall(r"GLOBAL (\S+?)(?: was not| whose)", text) + re.findall(r"but got <class '([^']+)'>", text)
    names = [n if "." in n else f"builtins.{n}" for n in names]  # torch drops the `builtins.` prefix
    return list(dict.fromkeys(names))


def load_torch(path, trust=False, mmap=False):
    """torch.load of a file a user may have been handed, on the CPU, with weights_only=True and the allowlist.

    A file that needs another type raises UnsafeFileError naming the file and the types; trust=True loads it
    anyway (weights_only=False, with a warning). Other read errors (truncated, not a torch file) propagate.
    """
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        types = _refused_types(path, e)
        if not types:  # a damaged pickle rather than a refused type
            raise
        what = ", ".join(types[:5]) + (f" (+{len(types) - 5} more)" if len(types) > 5 else "")
        if not trust:
            raise UnsafeFileError(f"{path}: refusing to load it: it holds {what}, which is neither tensors nor "
                                  f"plain data, and unpickling it could run code; {TRUST_HINT}") from None
    print(f"warning: {path}: loading it with {TRUST_FLAG} although it holds {what}", file=sys.stderr, flush=True)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


# ---------------------------------------------------------------------------------------------- numpy files
def _latin1_bytes(text, encoding="latin1"):
    """What protocol-2 pickles call (`_codecs.encode(text, 'latin1')`) to rebuild bytes; no other codec."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with the codec {encoding!r}")
    return text.encode("latin1")


ARRAY_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT, ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR, ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER, ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
}
_PLAIN = (str, bytes, int, float, bool, complex, type(None), np.generic)


class ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes, numpy scalars and plain containers; any other global is refused (raises
    UnsafeFileError naming `path`) before anything is called."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        try:
            return ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"{self.path}: refusing to unpickle {module}.{name}: this file may hold only "
                                  f"numpy arrays and plain data, and unpickling anything else could run code") from None


def _check_plain(obj, path, where=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, path, where)
            _check_plain(v, path, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, path, f"{where}/{i}")
    elif isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise UnsafeFileError(f"{path}: refusing it: {where or 'it'} is an object array, expected numeric arrays")
    elif not isinstance(obj, (np.ndarray, *_PLAIN)):
        raise UnsafeFileError(f"{path}: refusing it: {where or 'it'} is a {type(obj).__name__}, expected numpy "
                              f"arrays and plain data")


def load_array_pickle(path):
    """A pickle of numpy arrays and plain containers (FVD stats: ours and the reference's FeatureStats layout),
    read with ArrayUnpickler. Truncated or malformed pickles raise the usual pickle errors."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        obj = ArrayUnpickler(f, path).load()
    _check_plain(obj, path)
    return obj


def _no_object_arrays(path, error):
    if "allow_pickle" in str(error):
        return UnsafeFileError(f"{path}: refusing to load it: it holds an object array, which is unpickled when "
                               f"read and could run code; expected numeric arrays")
    return error


def load_npz(path):
    """{name: array} of an .npz with allow_pickle=False: an object array is refused (UnsafeFileError)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise _no_object_arrays(path, e) from None


def load_npy(path):
    """The array of an .npy with allow_pickle=False: an object array is refused (UnsafeFileError)."""
    path = os.fspath(path)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise _no_object_arrays(path, e) from None


# ---------------------------------------------------------------------------------------------- TorchScript
# SHA-256 -> name of TorchScript files known to be what they claim. None verified yet: no copy was at hand to hash.
KNOWN_TORCHSCRIPT = {}
# git blob id (SHA-1 of b"blob <size>\0" + bytes) -> name: the file as committed to the reference repositories.
KNOWN_TORCHSCRIPT_GIT_BLOBS = {
    "93daef59c7ae0e9e8f76225521407e60cbafa6aa":
        "StyleGAN-V i3d_torchscript.pt (utils/fvd/ in hywang66/LARP and ThisisBillhe/NAR)",
}
TORCHSCRIPT_SHA256_ENV = "LARP_I3D_SHA256"  # a digest the user checked, accepted like the known ones


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def known_torchscript(data, sha256=None):
    """Whether TorchScript bytes are a file known to be what it claims: its SHA-256 (`sha256`, computed when not
    given) in KNOWN_TORCHSCRIPT, or its git blob id in KNOWN_TORCHSCRIPT_GIT_BLOBS."""
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    return sha256 in KNOWN_TORCHSCRIPT or git_blob_sha1(data) in KNOWN_TORCHSCRIPT_GIT_BLOBS


def read_torchscript(path, trust=False):
    """(bytes, SHA-256) of a TorchScript archive whose digest is known (or any, with trust=True); load those bytes,
    not the file again. Unknown digests raise UnsafeFileError naming the file and the digest."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    mine = (os.environ.get(TORCHSCRIPT_SHA256_ENV) or "").strip().lower()
    if digest == mine or known_torchscript(data, digest):
        return data, digest
    if not trust:
        raise UnsafeFileError(f"{path}: refusing to load TorchScript of unknown SHA-256 {digest} (a TorchScript "
                              f"file holds code that runs); if you checked this file, set "
                              f"${TORCHSCRIPT_SHA256_ENV}={digest}, or {TRUST_HINT}")
    print(f"warning: {path}: loading TorchScript of unknown SHA-256 {digest} with {TRUST_FLAG}", file=sys.stderr,
          flush=True)
    return data, digest


# ---------------------------------------------------------------------------------------------- hub revisions
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def split_hub_spec(spec):
    """'owner/name@REVISION' -> ('owner/name', 'REVISION'); 'owner/name' -> ('owner/name', None)."""
    repo, _, revision = str(spec).partition("@")
    return repo, revision or None


def with_revision(spec, revision, flag="--revision"):
    """`spec` pinned to `revision` (a hub commit): 'owner/name@REVISION'; unchanged when revision is None."""
    if not revision:
        return spec
    if os.path.exists(spec):
        raise UsageError(f"{flag} {revision}: applies to hub ids (owner/name), but '{spec}' is a local path")
    repo, pinned = split_hub_spec(spec)
    if pinned and pinned != revision:
        raise UsageError(f"{flag} {revision}: '{spec}' already names revision {pinned}")
    return f"{repo}@{revision}"


def loaded_spec(spec, path):
    """How to record a model spec once it resolved to the local `path`: a hub id as 'owner/name@COMMIT', the
    commit of the snapshot folder actually loaded (huggingface_hub keeps snapshots/<commit>/); else `spec`."""
    spec = os.fspath(spec)
    if os.path.exists(spec):
        return spec
    commit = os.path.basename(os.path.normpath(path))
    return f"{split_hub_spec(spec)[0]}@{commit}" if COMMIT_RE.match(commit) else spec
