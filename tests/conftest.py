import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = pathlib.Path(os.environ.get("LARP_REFERENCE", ROOT.parent / "shared" / "reference"))

# Tiny models are dispatch-bound, and on a busy 2-core machine two OpenMP threads stall at barriers (10-30x
# slower in spot checks): the whole suite runs on one thread, and so do the subprocesses it starts.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def reference_dir():
    assert REFERENCE.is_dir(), f"reference folder not found at {REFERENCE} (set LARP_REFERENCE)"
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
