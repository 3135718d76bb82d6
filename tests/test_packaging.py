"""Package metadata: runtime dependencies are lower bounds, so `pip install -e .` keeps an environment's
own torch; pytest, pytest-xdist and scipy are the `test` extra; constraints.txt pins every dependency for CI and the quickstart."""
import email
import json
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

BUILD_METADATA = """
import json, sys, tempfile, pathlib
from setuptools import build_meta
out = tempfile.mkdtemp()
print(json.dumps(str(pathlib.Path(out, build_meta.prepare_metadata_for_build_wheel(out), "METADATA"))))
"""


@pytest.fixture(scope="module")
def requires():
    """(runtime, {extra: requirements}) from the METADATA that setuptools builds from this checkout's pyproject."""
    res = subprocess.run([sys.executable, "-c", BUILD_METADATA], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = email.message_from_string(open(json.loads(res.stdout.splitlines()[-1])).read())
    runtime, extras = [], {}
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker and "extra" in str(req.marker):
            extra = next(e for e in meta.get_all("Provides-Extra") if req.marker.evaluate({"extra": e}))
            extras.setdefault(extra, []).append(req)
        else:
            runtime.append(req)
    return runtime, extras


def test_no_runtime_dependency_is_pinned_exactly(requires):
    runtime, _ = requires
    assert {r.name for r in runtime} >= {"torch", "torchvision"}
    pinned = [str(r) for r in runtime if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"pinned runtime dependencies (move the exact version to constraints.txt): {pinned}"
    torch_req = next(r for r in runtime if r.name == "torch")
    assert all(s.operator == ">=" for s in torch_req.specifier) and torch_req.specifier.contains("2.4.0")


def test_pytest_xdist_and_scipy_are_the_test_extra(requires):
    runtime, extras = requires
    assert sorted(canonicalize_name(r.name) for r in extras["test"]) == ["pytest", "pytest-xdist", "scipy"]
    assert not {canonicalize_name(r.name) for r in runtime} & {"pytest", "pytest-xdist", "scipy"}


def test_constraints_pin_every_dependency_within_its_bounds(requires):
    """CI installs exactly constraints.txt: each dependency of larp[test] has one `==` line there, and that version
    meets the lower bound of pyproject (so the pins are a version the package accepts)."""
    runtime, extras = requires
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"  # the releases on the machines' disk
    for req in runtime + extras["test"]:
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} vs {req}"
