"""What an older torch than CI's gets (docs/install.md has the table): torch 2.4 runs everything but
FSDP, with SDPA repeating the kv heads of grouped-query attention and FlexAttention off with a note; FSDP on a
torch older than 2.7 is one line."""
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from larp.models import transformer
from larp.training import fsdp
from larp.training.config_build import build_config
from larp.core.errors import LarpError
from larp.training.loop import preflight
from larp.core.utils import torch_at_least
from tests.conftest import ROOT
from tests.test_generator import tiny


@pytest.mark.parametrize("version,minimum,want", [
    ("2.4.1+cu121", (2, 5), False), ("2.5.0", (2, 5), True), ("2.10.1+cu130", (2, 7), True),
    ("2.7.0a0+79aa17489c.nv25.04", (2, 7), True), ("2.6.0", (2, 7), False), ("3.0.0", (2, 7), True)])
def test_torch_at_least(monkeypatch, version, minimum, want):
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_at_least(*minimum) is want


def test_fsdp_on_an_older_torch_is_one_line(monkeypatch, tmp_path):
    if torch_at_least(2, 7):
        fsdp.require()  # passes on CI's torch
    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    want = r"train.parallel: fsdp needs torch>=2.7 \(FSDP2\); this is torch 2.6.0\+cu124: use train.parallel ddp"
    with pytest.raises(LarpError, match=want):
        fsdp.require()
    cfg = build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["train.parallel", "fsdp"])
    with pytest.raises(LarpError, match=want):  # train.py's pre-flight, before data, model or torchrun
        preflight(cfg, str(tmp_path / "run"))
    with pytest.raises(LarpError, match=want):
        fsdp.shard_generator(tiny("nar"), "fp32", torch.device("cpu"))


def sdpa_of_torch_2_4(*args, **kwargs):
    """F.scaled_dot_product_attention as torch 2.4 has it: no `enable_gqa`."""
    if "enable_gqa" in kwargs:
        raise TypeError("scaled_dot_product_attention() got an unexpected keyword argument 'enable_gqa'")
    return SDPA(*args, **kwargs)


SDPA = F.scaled_dot_product_attention


@torch.no_grad()
@pytest.mark.parametrize("order", ["nar", "raster"])
def test_grouped_query_attention_without_enable_gqa_is_the_same(monkeypatch, order):
    """torch 2.4: each kv head is repeated for its group of query heads, as enable_gqa (torch 2.5) does."""
    model = tiny(order, n_kv_head=2)
    tokens, labels = torch.randint(0, 40, (3, 24)), torch.tensor([0, 4, 2])
    want = model(tokens, labels)[0]
    monkeypatch.setattr(transformer, "SDPA_GQA", False)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_of_torch_2_4)
    got = model(tokens, labels)[0]
    assert (got - want).abs().max().item() < 1e-5
    plain = tiny(order)  # multi-head attention passes no enable_gqa at all, so it runs on torch 2.4 unchanged
    plain(tokens, labels)


def test_flex_attention_missing_is_a_note_and_sdpa(monkeypatch):
    monkeypatch.setattr(transformer, "_FLEX", {})
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # import fails, as on torch 2.4
    with pytest.warns(UserWarning, match=r"FlexAttention is off \(needs torch>=2.5 with triton"):
        assert transformer.flex_attention_fn("cuda") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert transformer.flex_attention_fn("cuda") is None  # cached: the note comes once per process
