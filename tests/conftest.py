import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Golden cases and release manifests live in the repository (tests/fixtures/reference/README.md says where each
# file comes from); a clone needs nothing beside it.
REFERENCE = ROOT / "tests" / "fixtures" / "reference"
GOLDEN = REFERENCE / "golden" / "tiny"
# (manifest, size, order) of the released generators whose state-dict manifests are in REFERENCE
RELEASED_GENERATORS = [
    ("nar_llama-abs-L.state_dict.tsv", "llama-abs-L", "nar"),
    ("nar_llama-abs-LP.state_dict.tsv", "llama-abs-LP", "nar"),
    ("raster_ar_llama-abs-LP.state_dict.tsv", "llama-abs-LP", "raster"),
]

# Tiny models are dispatch-bound, and on a busy 2-core machine two OpenMP threads stall at barriers (10-30x
# slower in spot checks): the whole suite runs on one thread, and so do the subprocesses it starts.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def reference_dir():
    return REFERENCE


@pytest.fixture(scope="session")
def golden_cases(reference_dir):
    from safetensors.torch import load_file
    return load_file(str(reference_dir / "golden" / "tiny" / "cases.safetensors"))


def read_manifest(path):
    """Rows of a state-dict manifest .tsv as {name: (kind, shape tuple)}."""
    rows = {}
    with open(path) as f:
        next(f)
        for line in f:
            kind, name, shape, _dtype = line.rstrip("\n").split("\t")
            rows[name] = (kind, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()))
    return rows


def patch_everywhere(monkeypatch, module, name, replacement):
    """Replace `module.name` and every reference to the same object that a project module imported by name
    (`from larp.metrics.fvd import load_i3d`), so a test's patch holds whether the code under test imports the name at
    the top, inside a function, or through the module. Returns how many places were patched."""
    import sys
    original, patched = getattr(module, name), 0
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name.split(".")[0] in ("larp", "sample", "train") or mod is module):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                monkeypatch.setattr(mod, attr, replacement)
                patched += 1
    return patched


@pytest.fixture
def marker(tmp_path):
    """Where a malicious file's payload would leave its trace (tests/test_security*.py)."""
    return tmp_path / "payload_ran"


def fault_env(fault=None, do=None, **extra):
    """Environment of a subprocess that runs the project with tests/faults/sitecustomize.py loaded: `fault` and `do`
    set LARP_FAULT and LARP_FAULT_DO (see that file); `extra` adds variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LARP_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'faults'}", OMP_NUM_THREADS="1", **extra)
    if fault:
        env["LARP_FAULT"] = fault
    if do:
        env["LARP_FAULT_DO"] = do
    return env


def failing_writes(monkeypatch, name, nth=1, code=None):
    """A full disk: the nth atomic write of a path ending in `name` writes half of its file, then the file system
    refuses with OSError(code, default ENOSPC)."""
    import errno
    from larp.core import io
    real, seen, code = io.atomic_write, [0], code or errno.ENOSPC

    def write(path, writer):
        if not os.fspath(path).endswith(name):
            return real(path, writer)
        seen[0] += 1
        if seen[0] != nth:
            return real(path, writer)

        def half(tmp):
            writer(tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            raise OSError(code, os.strerror(code))
        return real(path, half)
    patch_everywhere(monkeypatch, io, "atomic_write", write)


def read_only(monkeypatch, folder):
    """A read-only file system below `folder` (root ignores chmod): creating a file or a folder there raises
    OSError(EROFS), as the kernel would."""
    import errno
    real_open, real_mkdir, folder = os.open, os.mkdir, str(folder)

    def refuse(path):
        if os.path.abspath(path).startswith(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    def ro_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)


def wait_for(path, proc, timeout=300):
    """Until `path` exists (a paused fault point was reached); fails if the subprocess `proc` ends first."""
    import time
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and os.path.exists(path), proc.communicate()
