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
