"""Training fidelity of the tokenizer: init and loss formulas of the reference, and the quickstart's options."""
import copy
import json
import math

import pytest
import torch

from larp.models.losses import TokenizerLoss
from larp.models.quantizer import VectorQuantizer, VQConfig
from larp.models.tokenizer import LARPTokenizer


@pytest.fixture(scope="module")
def tiny_cfg(reference_dir):
    with open(reference_dir / "golden" / "tiny" / "tokenizer" / "config.json") as f:
        return json.load(f)


def test_output_layer_is_zero_at_init(tiny_cfg):
    """As the reference: the decoder's output layer starts at zero, so a new tokenizer decodes 0 everywhere."""
    torch.manual_seed(0)
    model = LARPTokenizer(**tiny_cfg)
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.bias) == 0
    with torch.no_grad():
        rec = model.decode(model.encode(torch.rand(2, 3, 8, 32, 32))["encoded"])
    assert torch.count_nonzero(rec) == 0
    # everything before it is random (xavier), so training can start
    assert model.decoder.blocks[0].attn.qkv.weight.std() > 0


def test_codebook_is_kaiming_uniform():
    """As the reference: U(-b, b) with b = sqrt(2) * sqrt(3 / fan_in) = sqrt(6 / d) (fan_in = code dim d)."""
    torch.manual_seed(0)
    d = 8
    w = VectorQuantizer(d, VQConfig(codebook_size=4096)).embedding.weight.detach()
    bound = math.sqrt(6 / d)
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.99 * bound  # fills the interval (a normal(0, 1/sqrt(d)) init would exceed b)
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01
    assert abs(w.mean().item()) < 0.01


def _reference_entropy(z, codebook, temperature):
    """The reference's entropy loss, written out: affinity = -squared distance between the unit vectors,
    per-token entropy of softmax(affinity / T) minus the entropy of its batch mean (log with eps 1e-5)."""
    z = torch.nn.functional.normalize(z.reshape(-1, z.shape[-1]).double(), dim=-1)
    e = torch.nn.functional.normalize(codebook.double(), dim=-1)
    d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1)[None] - 2 * z @ e.t()
    probs = torch.softmax(-d / temperature, dim=-1)
    sample_entropy = -(probs * torch.log_softmax(-d / temperature, dim=-1)).sum(-1).mean()
    avg = probs.mean(0)
    return sample_entropy - (-(avg * torch.log(avg + 1e-5)).sum())


@pytest.mark.parametrize("stochastic", [False, True])
def test_entropy_loss_is_reference_formula_on_squared_distance(stochastic):
    """The entropy term works on -||z - e||^2 = 2 cos - 2, twice as sharp as on cos. With stochastic VQ the
    reference fails (its distances are only computed in the deterministic branch); ours gives the same value."""
    torch.manual_seed(0)
    temperature = 0.1
    vq = VectorQuantizer(8, VQConfig(codebook_size=64, entropy_loss_weight=0.5, entropy_loss_temperature=temperature,
                                     stochastic=stochastic)).train()
    z = torch.randn(4, 16, 8)
    out = vq(z)
    ref = _reference_entropy(z, vq.embedding.weight.detach(), temperature)
    assert abs(out["entropy_loss"].item() - ref.item()) < 1e-5
    # on cos instead (the old formula) the value differs: the test can tell the two apart
    assert abs(_reference_entropy(z, vq.embedding.weight.detach(), 2 * temperature).item() - ref.item()) > 1e-2
    commit = torch.nn.functional.mse_loss(torch.nn.functional.normalize(z, dim=-1), out["regularized_z"].detach())
    assert abs(out["loss"].item() - (1.25 * commit.item() + 0.5 * ref.item())) < 1e-5


def test_local_query_attention_keeps_tokens_local(tiny_cfg):
    """With local_query_attention and one encoder block, latent i depends only on patch i of the input."""
    cfg = dict(tiny_cfg, local_query_attention=True, encoder_depth=1)
    torch.manual_seed(0)
    model = LARPTokenizer(**cfg).eval()
    x = torch.rand(1, 3, 8, 32, 32)
    y = x.clone()
    y[:, :, 4:8, 8:16, 16:24] = torch.rand(1, 3, 4, 8, 8)  # patch (t=1, h=1, w=2) = index 1*16 + 1*4 + 2 = 22
    with torch.no_grad():
        a = model.encoder(model.x_embedder(x) + model.encoder_patch_pe, model.latent_query)
        b = model.encoder(model.x_embedder(y) + model.encoder_patch_pe, model.latent_query)
    changed = ((a - b).abs().amax(-1) > 1e-6)[0]
    assert changed.nonzero().flatten().tolist() == [22]
    # the state dict stays the released layout: the mask is not saved
    assert set(model.state_dict()) == set(LARPTokenizer(**dict(tiny_cfg, encoder_depth=1)).state_dict())
    # without the option every latent sees every patch
    model = LARPTokenizer(**dict(tiny_cfg, encoder_depth=1)).eval()
    with torch.no_grad():
        a = model.encoder(model.x_embedder(x) + model.encoder_patch_pe, model.latent_query)
        b = model.encoder(model.x_embedder(y) + model.encoder_patch_pe, model.latent_query)
    assert ((a - b).abs().amax(-1) > 1e-6).all()


def test_input_centering_feeds_encoder_2x_minus_1(tiny_cfg):
    torch.manual_seed(0)
    plain = LARPTokenizer(**tiny_cfg).eval().set_vq_eval_deterministic(True)
    centred = LARPTokenizer(**dict(tiny_cfg, input_centering=True)).eval().set_vq_eval_deterministic(True)
    centred.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(centred.encode(x)["encoded"], plain.encode(x * 2 - 1)["encoded"])
        assert not torch.equal(centred.encode(x)["encoded"], plain.encode(x)["encoded"])


def test_l2_weight_adds_mean_squared_error():
    x = torch.rand(2, 3, 8, 32, 32)
    rec = torch.rand(2, 3, 8, 32, 32)
    out = {"reconstruction": rec, "loss_vq": torch.tensor(0.5), "loss_prior": torch.tensor(2.0)}
    kw = dict(perceptual_weight=0.0, gan_weight=0.0, vq_weight=1.0, prior_weight=0.03)
    l1_only, _ = TokenizerLoss(l1_weight=1.0, **kw).generator_loss(x, copy.copy(out), 0)
    mixed, logs = TokenizerLoss(l1_weight=0.5, l2_weight=2.0, **kw).generator_loss(x, copy.copy(out), 0)
    l1, l2 = (rec - x).abs().mean().item(), (rec - x).pow(2).mean().item()
    assert abs(l1_only.item() - (l1 + 0.5 + 0.06)) < 1e-5
    assert abs(mixed.item() - (0.5 * l1 + 2.0 * l2 + 0.5 + 0.06)) < 1e-5
    assert abs(logs["l2"] - l2) < 1e-6
