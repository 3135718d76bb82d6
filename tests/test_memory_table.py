"""benchmarks/memory_table.py: parameter counts agree with the released state dicts, and docs/training.md shows the
table the script prints today."""
import math

import pytest

from benchmarks import memory_table
from conftest import RELEASED_GENERATORS, ROOT, read_manifest



@pytest.mark.parametrize("manifest,size,order", RELEASED_GENERATORS)
def test_parameter_counts_match_released_checkpoints(reference_dir, manifest, size, order):
    rows = read_manifest(reference_dir / manifest)
    released = sum(math.prod(shape) for kind, shape in rows.values() if kind == "param")
    assert memory_table.estimate(memory_table.build(size, order), batch=8)["params"] == released


def test_estimate_formula_by_hand():
    """NAR-L: 26 blocks, dim 1024, SwiGLU hidden 2816, 1025 positions, 3 heads + loss over 1024 x 8192 logits."""
    e = memory_table.estimate(memory_table.build("llama-abs-L", "nar"), batch=8)
    assert e["blocks"] == 26
    assert e["activations_gb"] * 1e9 == 26 * 8 * 1025 * (8 * 1024 + 4 * 2816) * 2 + 4 * 8 * 1024 * 8192 * 4
    assert e["states_gb"] == pytest.approx(16 * e["params"] / 1e9)


def test_training_doc_holds_the_current_table():
    assert memory_table.table(batch=8, gpu_gb=80, gpus=8) in (ROOT / "docs" / "training.md").read_text()
