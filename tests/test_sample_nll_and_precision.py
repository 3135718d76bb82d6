"""sample.py's NLL column and matmul precision: `--nll class_swapped` (the reference NAR's NLL_sampled, a
class-dropout share of samples scored under the null class) and `--matmul_precision`."""
import os

import pytest
import torch

from larp.core.errors import SampleError
from larp.core.utils import matmul_precision
from larp.models.generator import load_generator
from larp.models.sampling_params import SamplingParams
from larp.sampling.job import SampleJob
from larp.sampling.nll import null_class_nll, null_swapped
from larp.sampling.run import sample_seed
from tests.conftest import GOLDEN


def test_null_swap_draw_is_per_sample_and_at_the_dropout_rate():
    def seeds(seed, indices):
        return [sample_seed(seed, i) for i in indices]
    whole = null_swapped(seeds(7, range(4000)), 0.1)
    assert torch.equal(whole, torch.cat([null_swapped(seeds(7, range(1500)), 0.1),
                                         null_swapped(seeds(7, range(1500, 4000)), 0.1)]))
    assert 0.085 < whole.float().mean().item() < 0.115
    assert not torch.equal(whole, null_swapped(seeds(8, range(4000)), 0.1))
    assert not null_swapped(seeds(7, range(100)), 0.0).any()


def test_swapped_rows_take_the_null_class_nll_of_the_decode_pass():
    """Rows scored under the null class equal the NLL the decode pass reports when it samples under the null class
    (a different code path: cached decoding vs one teacher-forced pass); the other rows are left as they are."""
    model = load_generator(os.path.join(GOLDEN, "nar")).eval()
    null = model.cls_embedding.num_classes
    params = SamplingParams(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)
    with torch.no_grad():
        tokens, nll_null = model.generate(torch.full((4,), null), params, seeds=[1, 2, 3, 4], return_nll=True)
        kept = torch.arange(4, dtype=nll_null.dtype) + 100.0
        got = null_class_nll(model, tokens, kept, torch.tensor([True, False, True, False]))
    assert torch.allclose(got[[0, 2]], nll_null[[0, 2]], atol=1e-5)
    assert torch.equal(got[[1, 3]], kept[[1, 3]]) and torch.equal(kept, torch.arange(4.0) + 100.0)


def test_matmul_precision_block_sets_and_restores_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with matmul_precision("high"):
            assert torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        with matmul_precision("highest"):
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("kw,message", [
    (dict(nll="swapped"), "--nll swapped: expected one of"),
    (dict(matmul_precision="medium"), "--matmul_precision medium: expected one of"),
    (dict(nll="class_swapped", frame_prediction=True), "--nll class_swapped with --frame_prediction"),
])
def test_bad_nll_and_precision_flags(kw, message):
    with pytest.raises(SampleError, match=message):
        SampleJob(ar_model="a", tokenizer="t", output_dir="o", **kw)
