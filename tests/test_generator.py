"""Generator model: release manifests, golden reference outputs, masks, checkpoints."""
import json

import pytest
import torch

from conftest import RELEASED_GENERATORS, read_manifest
from larp.models.generator import AR_MODELS, Generator, ModelArgs, build_generator, load_generator
from larp.models.transformer import proximity_block_mask
from larp.core.errors import CheckpointError
from larp.models.sampling_params import SamplingParams
from larp.core.io import atomic_save
from larp.core.utils import torch_at_least

GOLDEN = "golden/tiny"


def tiny(order="nar", **kw):
    base = dict(dim=32, n_layer=2, n_head=4, vocab_size=40, num_classes=5, latent_shape=(2, 3, 4),
                max_seq_len=24, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    base.update(kw)
    torch.manual_seed(0)
    model = Generator(ModelArgs(**base), order=order)
    for name, p in model.named_parameters():  # non-zero heads so logits carry information
        if name.startswith("output"):
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.mark.parametrize("manifest,size,order", RELEASED_GENERATORS)
def test_state_dict_matches_release_manifest(reference_dir, manifest, size, order):
    want = read_manifest(reference_dir / manifest)
    with torch.device("meta"):
        model = build_generator(size, order=order, vocab_size=8192, num_classes=101)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    assert {k: want[k][1] for k in want} == got
    assert model.num_blocks == model.args.n_layer + (2 if order == "nar" else 0)


def test_size_table():
    dims = {k: (f().n_layer, f().n_head, f().dim) for k, f in AR_MODELS.items()}
    assert dims == {"llama-abs-S": (12, 6, 384), "llama-abs-B": (12, 12, 768), "llama-abs-L": (24, 16, 1024),
                    "llama-abs-LP": (30, 20, 1280), "llama-abs-XL": (36, 20, 1280),
                    "llama-abs-XXL": (48, 24, 1536), "llama-abs-XXXL": (48, 40, 2560)}


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_golden_teacher_forced(reference_dir, golden_cases, order):
    model = load_generator(reference_dir / GOLDEN / order)
    assert model.order == order and not model.training
    tokens, labels = golden_cases["ar.tokens"], golden_cases["ar.labels"]
    logits, loss = model(tokens, labels, targets=tokens)
    ref = golden_cases[f"{order}.teacher_forced_logits"]
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-4
    assert abs(loss.item() - golden_cases[f"{order}.loss"].item()) < 1e-5


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_golden_greedy_samples_and_pass_count(reference_dir, golden_cases, order):
    model = load_generator(reference_dir / GOLDEN / order)
    calls = []
    model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    for cfg in ("1.0", "2.0"):
        calls.clear()
        out = model.generate(golden_cases["ar.labels"], SamplingParams(cfg_scale=float(cfg), top_k=1))
        assert torch.equal(out, golden_cases[f"{order}.greedy_samples_cfg{cfg}"]), cfg
        assert len(calls) == model.num_decode_steps()
    T, H, W = model.latent_shape
    if order == "nar":
        assert model.num_decode_steps() == golden_cases["nar.num_forward_passes"].item() == T + H + W - 2
    else:
        assert model.num_decode_steps() == T * H * W


def test_nar_logits_depend_only_on_earlier_planes():
    """Independent check of the proximity mask: the logits of token i are a function of the tokens on
    planes < plane(i) only, so perturbing token j changes exactly the logits on planes > plane(j)."""
    model = tiny("nar")
    T, H, W = model.latent_shape
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    plane = (t + h + w).reshape(-1)
    tokens = torch.randint(0, 40, (1, 24), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2])
    base, _ = model(tokens, labels)
    for j in (0, 1 * H * W + 1 * W + 2, 5):
        changed = tokens.clone()
        changed[0, j] = (changed[0, j] + 7) % 40
        diff = (model(changed, labels)[0] - base).abs().amax(-1)[0] > 1e-6  # (N,)
        assert not diff[plane <= plane[j]].any()
        assert diff[plane > plane[j]].all()


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_frame_prediction_every_position_sees_whole_condition(order):
    Nc = 6
    model = tiny(order, frame_prediction=True, cls_token_num=Nc + 1)
    assert model.tok_embeddings.weight.shape[0] == 41 and not hasattr(model, "cls_embedding")
    g = torch.Generator().manual_seed(0)
    cond = torch.randint(0, 40, (1, Nc), generator=g)
    tokens = torch.randint(0, 40, (1, 24), generator=g)
    base, _ = model(tokens, cond)
    for k in range(Nc):
        c2 = cond.clone()
        c2[0, k] = (c2[0, k] + 1) % 40
        diff = (model(tokens, c2)[0] - base).abs().amax(-1)[0]  # (N,)
        assert (diff > 1e-6).all(), (k, diff)
    with pytest.raises(ValueError, match="condition tokens"):
        model(tokens, cond[:, :3])


def test_label_dropout_only_in_training():
    model = tiny("nar", class_dropout_prob=1.0)
    tokens = torch.randint(0, 40, (2, 24))
    labels = torch.tensor([1, 3])
    null = torch.full_like(labels, 5)
    model.train()
    assert torch.allclose(model(tokens, labels)[0], model(tokens, null)[0])
    model.eval()
    assert not torch.allclose(model(tokens, labels)[0], model(tokens, null)[0])


@pytest.mark.skipif(not torch_at_least(2, 5), reason="FlexAttention needs torch>=2.5")
@torch.no_grad()  # FlexAttention has no CPU backward
def test_flex_attention_block_mask_matches_sdpa_bool_mask():
    """The CUDA training path (FlexAttention BlockMask) computes the same as the CPU bool-mask SDPA;
    checked here with the eager FlexAttention reference on CPU."""
    import warnings
    model = tiny("nar", n_kv_head=2)
    tokens = torch.randint(0, 40, (2, 24))
    labels = torch.tensor([0, 4])
    C = model.cls_token_num
    x = torch.cat([model.embed_condition(labels),
                   model.embed_tokens(tokens[:, model.decode_order], model.decode_order + C)], dim=1)
    ref = model.run_layers(x, mask=model.attn_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": expected for the eager reference
        out = model.run_layers(x, mask=proximity_block_mask(model.rank, "cpu"))
    for a, b in zip(out, ref):
        assert (a - b).abs().max().item() < 1e-5


def test_save_pretrained_round_trip(tmp_path):
    model = tiny("nar")
    model.save_pretrained(tmp_path / "hub")
    cfg = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert "order" not in cfg and cfg["latent_shape"] == [2, 3, 4]
    back = load_generator(tmp_path / "hub")
    assert back.order == "nar" and back.config == model.config
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_training_checkpoint_layout_and_strict_errors(tmp_path):
    model = tiny("raster", latent_shape=None)
    assert model.latent_shape == (1, 1, 24)
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    ckpt = {"model": {"name": "llama-abs-S", "args": model.config, "sd": sd}, "optimizer": {}, "epoch": 3}
    atomic_save(ckpt, tmp_path / "ck.pth")
    back = load_generator(tmp_path / "ck.pth")
    assert back.order == "raster"
    tokens, labels = torch.randint(0, 40, (2, 24)), torch.tensor([0, 1])
    assert torch.equal(back(tokens, labels)[0], model(tokens, labels)[0])

    partial = {"name": "llama-abs-S", "args": {"n_layer": 1, "vocab_size": 40, "num_classes": 5,
                                               "latent_shape": [2, 3, 4], "max_seq_len": 24, "order": "nar"}}
    src = build_generator("llama-abs-S", order="nar", n_layer=1, vocab_size=40, num_classes=5,
                          latent_shape=(2, 3, 4), max_seq_len=24)
    atomic_save({"model": dict(partial, sd=src.state_dict())}, tmp_path / "partial.pth")
    back = load_generator(tmp_path / "partial.pth")
    assert (back.args.dim, back.args.n_head, back.num_blocks, back.order) == (384, 6, 3, "nar")

    bad = dict(ckpt["model"], args=dict(model.config, order="nar"))
    atomic_save({"model": bad}, tmp_path / "bad_order.pth")
    with pytest.raises(CheckpointError, match="order"):
        load_generator(tmp_path / "bad_order.pth")
    sd_missing = {k: v for k, v in sd.items() if not k.endswith("layers.1.ffn_norm.weight")}
    atomic_save({"model": dict(ckpt["model"], sd=sd_missing)}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.ffn_norm\.weight"):
        load_generator(tmp_path / "missing.pth")
    wrong = dict(ckpt["model"], args=dict(model.config, dim=48))
    atomic_save({"model": wrong}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="shape"):
        load_generator(tmp_path / "shape.pth")


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_training_step_reaches_every_parameter(order):
    model = tiny(order, token_dropout_p=0.1, resid_dropout_p=0.1, drop_path_rate=0.1).train()
    tokens = torch.randint(0, 40, (3, 24))
    logits, loss = model(tokens, torch.tensor([0, 1, 2]), targets=tokens)
    assert logits.shape == (3, 24, 40) and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
