"""Sampling: cached decoding equals the teacher-forced forward, per-sample seeds, sampling utilities."""
import copy

import pytest
import torch
import torch.nn.functional as F

import larp.models.decoding as gen
from larp.models.sampling_params import SAMPLING_FIELDS, SamplingParams
from tests.test_generator import tiny


def record_generate(model, monkeypatch, cond, **kw):
    """Run generate() and rebuild the full (B, N, V) logits it sampled from (raster order)."""
    seen = []
    real = gen.sample_logits

    def spy(logits, u, *a, **k):
        seen.append(logits.clone())
        return real(logits, u, *a, **k)

    monkeypatch.setattr(gen, "sample_logits", spy)
    out = model.generate(cond, **kw)
    monkeypatch.setattr(gen, "sample_logits", real)
    tokens = out[0] if isinstance(out, tuple) else out
    plan = gen.nar_plan(model) if model.order == "nar" else gen.raster_plan(model)
    assert len(seen) == len(plan) == model.num_decode_steps()
    full = torch.empty(tokens.shape[0], model.num_tokens, seen[0].shape[-1])
    for step, logits in zip(plan, seen):
        full[:, step["targets"]] = logits
    return out, full


def guided_forward(model, tokens, cond, cfg_scale):
    logits, _ = model(tokens, cond)
    if cfg_scale == 1.0:
        return logits
    uncond, _ = model(tokens, torch.full_like(cond, model.args.num_classes))
    return uncond + cfg_scale * (logits - uncond)


@pytest.mark.parametrize("order", ["nar", "raster"])
@pytest.mark.parametrize("cfg_scale,kv", [(1.0, None), (2.5, 2)])
def test_cached_generation_equals_teacher_forced(monkeypatch, order, cfg_scale, kv):
    model = tiny(order, n_kv_head=kv)
    labels = torch.tensor([0, 3, 4])
    (tokens, nll), used = record_generate(model, monkeypatch, labels, params=SamplingParams(cfg_scale=cfg_scale), seeds=[1, 2, 3],
                                          return_nll=True)
    assert tokens.shape == (3, 24) and tokens.dtype == torch.long
    ref = guided_forward(model, tokens, labels, cfg_scale)
    assert (used - ref).abs().max().item() < 1e-4
    unguided = model(tokens, labels)[0]  # NLL_sampled: the unguided model's cross-entropy, whatever the guidance
    ref_nll = -torch.log_softmax(unguided, -1).gather(-1, tokens[..., None])[..., 0].mean(1)
    assert torch.allclose(nll, ref_nll, atol=1e-5)


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_cfg_interval_guides_only_the_first_passes(monkeypatch, order):
    model = tiny(order)
    labels = torch.tensor([1, 2])
    tokens, used = record_generate(model, monkeypatch, labels, params=SamplingParams(cfg_scale=3.0, cfg_interval=3),
                                   seeds=[5, 6])
    guided, plain = guided_forward(model, tokens, labels, 3.0), guided_forward(model, tokens, labels, 1.0)
    plan = gen.nar_plan(model) if order == "nar" else gen.raster_plan(model)
    # the references: the prefill, then raster decode steps i = s - 1 <= 3 (LARP), NAR planes decoded while at
    # most 3 tokens exist (NAR: planes 0 and 1 of the 2x3x4 grid hold 1 and 3 tokens)
    guided_steps = {0, 1, 2, 3, 4} if order == "raster" else {0, 1}
    for s, step in enumerate(plan):
        ref = guided if s in guided_steps else plain
        assert (used[:, step["targets"]] - ref[:, step["targets"]]).abs().max().item() < 1e-4, s


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_frame_prediction_generation(monkeypatch, order):
    model = tiny(order, frame_prediction=True, cls_token_num=7)
    cond = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens, used = record_generate(model, monkeypatch, cond, seeds=[0, 1], params=SamplingParams(top_k=10))
    assert (used - model(tokens, cond)[0]).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match="class-conditional"):
        model.generate(cond, SamplingParams(cfg_scale=2.0))


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_sample_depends_only_on_its_seed(order):
    model = tiny(order)
    kw = dict(params=SamplingParams(cfg_scale=1.75, temperature=1.3, top_k=20, top_p=0.9))
    batch = model.generate(torch.tensor([4, 1, 2, 0]), seeds=[11, 12, 13, 14], **kw)
    alone = model.generate(torch.tensor([2]), seeds=[13], **kw)
    assert torch.equal(alone[0], batch[2])
    other = model.generate(torch.tensor([2]), seeds=[99], **kw)
    assert not torch.equal(other[0], batch[2])


def test_forward_pass_counts_and_bf16():
    model = tiny("nar", latent_shape=(3, 2, 4))
    calls = []
    model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.tensor([0, 1]), SamplingParams(cfg_scale=1.5))
    assert len(calls) == 3 + 2 + 4 - 2 == model.num_decode_steps()
    assert out.shape == (2, 24) and out.min() >= 0 and out.max() < 40
    raster = tiny("raster").to(torch.bfloat16)
    out = raster.generate(torch.tensor([0]), SamplingParams(top_p=0.8))
    assert out.shape == (1, 24) and raster.num_decode_steps() == 24


def test_inverse_cdf_matches_a_direct_search():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 7, generator=g) * (torch.rand(50, 7, generator=g) > 0.4)
    probs[:, 3] += 0.01
    u = torch.rand(50, generator=g)
    got = gen.sample_inverse_cdf(probs, u)
    for i in range(50):
        p = (probs[i] / probs[i].sum()).tolist()
        acc, want = 0.0, None
        for j, pj in enumerate(p):
            acc += pj
            if u[i].item() < acc:
                want = j
                break
        assert got[i].item() == want and probs[i, want] > 0


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40000
    u = torch.rand(1, n, generator=torch.Generator().manual_seed(0))
    tok = gen.sample_logits(logits.expand(n, -1)[None], u, temperature=0.7, top_k=4, top_p=0.95)[0]
    p = torch.softmax(logits[0] / 0.7, -1)
    keep = torch.zeros(6, dtype=torch.bool)
    keep[:4] = True  # top-4
    cum = torch.cumsum(p[:4] / p[:4].sum(), 0)
    keep[1:4] &= cum[:3] <= 0.95  # nucleus: keep tokens until the cumulative mass first exceeds 0.95
    want = torch.where(keep, p, torch.zeros_like(p))
    want /= want.sum()
    freq = torch.bincount(tok, minlength=6).float() / n
    assert (freq - want).abs().max() < 0.01
    assert torch.equal(gen.sample_logits(logits[None], torch.rand(1, 1), top_k=1), torch.tensor([[0]]))


def test_sampling_benchmark_runs_and_shares_weights():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampling.py"
    spec = importlib.util.spec_from_file_location("bench_sampling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--dim", "32", "--grid", "2", "3", "4", "--vocab", "64", "--batch", "2",
                             "--repeats", "1", "--warmup", "0", "--device", "cpu"])  # no captured row on a CPU
    nar, raster = bench.build_pair(args)
    assert torch.equal(raster.layers[3].attention.wqkv.weight, nar.layers[3].attention.wqkv.weight)
    assert torch.equal(raster.output.weight, nar.output_B.weight)
    res = bench.run(args)
    assert (res["nar"]["steps"], res["raster"]["steps"]) == (7, 24) and res["speedup"] > 0
    assert "captured_s" not in res["nar"] and res["captured_mode"] == "off"


def test_generate_runs_in_eval_mode_and_restores_it():
    model = tiny("nar", class_dropout_prob=1.0, token_dropout_p=0.5).train()
    a = model.generate(torch.tensor([1, 2]), SamplingParams(cfg_scale=2.0), seeds=[3, 4])
    assert model.training
    b = model.eval().generate(torch.tensor([1, 2]), SamplingParams(cfg_scale=2.0), seeds=[3, 4])
    assert torch.equal(a, b)
    with torch.inference_mode():
        model.eval()(torch.randint(0, 40, (1, 24)), torch.tensor([0]))  # first forward builds cached indices
    tokens = torch.randint(0, 40, (1, 24))
    model.train()(tokens, torch.tensor([0]), targets=tokens)[1].backward()


def test_sampling_params_declare_their_flags():
    """One declaration: the argparse flags carry the dataclass defaults and help texts, and parse back to the same
    SamplingParams (with the same checks)."""
    import argparse
    assert SAMPLING_FIELDS == ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")
    parser = SamplingParams.add_arguments(argparse.ArgumentParser())
    assert [a.dest for a in parser._actions if a.dest != "help"] == list(SAMPLING_FIELDS)
    assert all(a.help for a in parser._actions)
    assert SamplingParams.from_args(parser.parse_args([])) == SamplingParams()
    args = parser.parse_args(["--cfg_scale", "4", "--cfg_interval", "3", "--top_k", "10", "--top_p", "0.9"])
    params = SamplingParams.from_args(args)
    assert params == SamplingParams(cfg_scale=4.0, cfg_interval=3, top_k=10, top_p=0.9)
    assert params.as_dict() == {"cfg_scale": 4.0, "cfg_interval": 3, "temperature": 1.0, "top_k": 10, "top_p": 0.9}
    with pytest.raises(ValueError, match="temperature: must be >= 0"):
        SamplingParams.from_args(parser.parse_args(["--temperature", "-1"]))


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_bf16_weights_decode_is_judged_by_its_nll(order):
    """Weights cast to bf16 once (sample.py's precision): the NLL_sampled the loop reports for its tokens equals the
    fp32 model's teacher-forced NLL of those tokens to bf16 rounding (1e-2 nats), far below the gap to other tokens
    (the same tokens given to other samples' conditions)."""
    model = tiny(order).eval()
    labels = torch.tensor([0, 1, 2, 3])
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    tokens, nll = bf16.generate(labels, SamplingParams(cfg_scale=1.5), seeds=[0, 1, 2, 3], return_nll=True)
    with torch.no_grad():
        logits, _ = model(tokens, labels)
    want = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)  # (B,) fp32 NLL
    other = F.cross_entropy(logits.transpose(1, 2), tokens.roll(1, 0), reduction="none").mean(1)
    assert (nll - want).abs().max() < 1e-2 < (other - want).abs().max() / 10
