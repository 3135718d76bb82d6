"""CUDA paths against the golden cases and the CPU: FlexAttention teacher forcing, cached sampling, the tokenizer,
a bf16 training step, and one FSDP step. Skipped without CUDA; benchmarks/gpu_check.sh runs them on a GPU."""
import pytest
import torch

from larp.models.generator import load_generator
from larp.training.ar_stage import ARStage
from larp.training.config import ARConfig
from larp.models.sampling_params import SamplingParams
from larp.models.tokenizer import LARPTokenizer
from tests.test_generator import GOLDEN, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA (benchmarks/gpu_check.sh runs these on a GPU machine)")
CUDA = torch.device("cuda")


def ar_stage(model, amp, lr):
    """A training stage around a built generator, with AdamW(lr) and grad clipping at 1 (no data, no tokenizer)."""
    cfg = ARConfig()
    cfg.train.amp, cfg.train.grad_clip, cfg.optimizer.args = amp, 1.0, {"lr": lr}
    return ARStage(cfg, model, None, CUDA)


@pytest.fixture(autouse=True)
def full_fp32():
    """Compare in full fp32: no TF32 in cuDNN convolutions (on by default) or matmuls."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_golden_teacher_forced_on_cuda(reference_dir, golden_cases, order):
    """NAR on CUDA takes the FlexAttention BlockMask path; the golden logits come from the reference code."""
    model = load_generator(reference_dir / GOLDEN / order, device="cuda")
    tokens, labels = golden_cases["ar.tokens"].to(CUDA), golden_cases["ar.labels"].to(CUDA)
    with torch.no_grad():
        logits, loss = model(tokens, labels, targets=tokens)
    ref = golden_cases[f"{order}.teacher_forced_logits"]
    assert (logits.cpu() - ref).abs().max().item() < 1e-3
    assert abs(loss.item() - golden_cases[f"{order}.loss"].item()) < 1e-4


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_golden_greedy_samples_on_cuda(reference_dir, golden_cases, order):
    model = load_generator(reference_dir / GOLDEN / order, device="cuda")
    for cfg in ("1.0", "2.0"):
        out = model.generate(golden_cases["ar.labels"].to(CUDA), SamplingParams(cfg_scale=float(cfg), top_k=1))
        assert torch.equal(out.cpu(), golden_cases[f"{order}.greedy_samples_cfg{cfg}"]), cfg


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_seeded_sampling_cuda_matches_cpu(order):
    """Per-sample seeds draw their uniforms on the CPU, so a fp32 CUDA run picks the same tokens as the CPU
    (up to rare near-ties of the CDF)."""
    model = tiny(order)
    labels = torch.tensor([0, 1, 2, 3])
    cpu = model.generate(labels, SamplingParams(cfg_scale=1.5), seeds=[0, 1, 2, 3])
    gpu = model.to(CUDA).generate(labels.to(CUDA), SamplingParams(cfg_scale=1.5), seeds=[0, 1, 2, 3]).cpu()
    assert (cpu == gpu).float().mean().item() >= 0.99


@pytest.mark.parametrize("order", ["nar", "raster"])
@pytest.mark.parametrize("kind", ["class", "frame"])
def test_cuda_graph_decoding_gives_the_eager_tokens(order, kind):
    """The recorded passes replay the eager kernels: same tokens and NLLs as eager decoding, on the first call
    (eager passes, then recording) and on the next (replays only), class-conditional with CFG and an interval, and
    frame prediction."""
    if kind == "class":
        model = tiny(order).to(CUDA)
        cond, params = torch.tensor([0, 1, 2, 3], device=CUDA), SamplingParams(cfg_scale=1.5, cfg_interval=3, top_k=20)
    else:
        model = tiny(order, frame_prediction=True, cls_token_num=7).to(CUDA)
        cond = torch.randint(0, 40, (4, 6), generator=torch.Generator().manual_seed(0)).to(CUDA)
        params = SamplingParams()
    seeds = [3, 4, 5, 6]
    eager = model.generate(cond, params, seeds=seeds, return_nll=True, capture="eager")
    for _ in range(2):
        graph = model.generate(cond, params, seeds=seeds, return_nll=True, capture="graph")
        assert torch.equal(graph[0], eager[0]) and torch.equal(graph[1], eager[1])
    runner = model.__dict__["_decode_runner"][1]
    assert runner.failed is None and len(runner.calls) > 1


def test_cuda_graph_decoding_under_bf16_autocast():
    """bf16 autocast (the seed command's precision): recorded without the autocast weight cache, replayed after the
    autocast region that recorded it has ended; the tokens of eager and recorded passes agree."""
    model = tiny("raster").to(CUDA)
    labels = torch.arange(4, device=CUDA)
    runs = []
    for capture in ("eager", "graph", "graph"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs.append(model.generate(labels, SamplingParams(cfg_scale=1.25), seeds=[0, 1, 2, 3], capture=capture))
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])


def test_golden_tokenizer_on_cuda(reference_dir, golden_cases):
    tok = LARPTokenizer.from_pretrained(reference_dir / GOLDEN / "tokenizer").to(CUDA).set_vq_eval_deterministic(True)
    with torch.no_grad():
        enc = tok.encode(golden_cases["tokenizer.input_video"].to(CUDA))
        dec = tok.decode_from_bottleneck(golden_cases["tokenizer.tokens"].to(CUDA))
    assert torch.equal(enc["bottleneck_rep"].cpu(), golden_cases["tokenizer.tokens"])
    assert (dec.cpu() - golden_cases["tokenizer.decoded_from_tokens"]).abs().max() < 1e-3


def test_bf16_training_step_reaches_every_parameter():
    """bf16 autocast through the compiled FlexAttention forward and backward: finite loss, a gradient for every
    parameter, and the loss goes down over a few steps on one batch."""
    model = tiny("nar", dim=64).to(CUDA).train()  # head dim 16: the smallest the FlexAttention kernel takes
    stage = ar_stage(model, "bf16", 1e-2)
    batch = {"tokens": torch.randint(0, 40, (4, 24), device=CUDA), "label": torch.tensor([0, 1, 2, 3], device=CUDA)}
    first = stage.step(batch, 0, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for step in range(1, 10):
        last = stage.step(batch, step, 10)
    assert last["loss"] < first["loss"] - 0.5


def test_fsdp_step_equals_plain_step_on_cuda():
    """One process, NCCL: an FSDP-sharded generator takes the same fp32 step as the plain one."""
    import torch.distributed as dist

    from larp.training import fsdp
    plain, sharded = tiny("nar", dim=64).to(CUDA).train(), tiny("nar", dim=64).to(CUDA).train()
    started = not dist.is_initialized()
    try:
        fsdp.shard_generator(sharded, "fp32", CUDA)
        batch = {"tokens": torch.randint(0, 40, (4, 24), device=CUDA),
                 "label": torch.tensor([0, 1, 2, 3], device=CUDA)}
        logs = []
        for model in (plain, sharded):
            torch.manual_seed(1)  # the same label drops (class_dropout_prob) for both models
            stage = ar_stage(model, "fp32", 1e-2)
            logs.append([stage.step(batch, s, 3) for s in range(3)])
        for a, b in zip(*logs):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        # After 3 AdamW steps at lr 1e-2 the weights agree to a small fraction of one step: Adam divides by the
        # gradient's own scale, so a gradient near zero that differs in its last bits (the sharded reduction
        # sums in another order) moves its weight by a visibly different fraction of lr. On an H200 the largest
        # difference was 1.1e-5 = 0.1 % of lr, so the bound is 1 % of lr.
        full = fsdp.full_model_state(sharded)
        for k, v in plain.state_dict().items():
            assert (full[k] - v.cpu()).abs().max().item() < 1e-4
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()
