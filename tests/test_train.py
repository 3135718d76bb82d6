"""Training on CPU with tiny models and a tiny synthetic set: loss drops, exact resume after SIGKILL,
2-process torchrun equals 1 process, atomic checkpoints, non-finite loss stops, exports load."""
import csv
import math
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from larp.training import checkpoints, loader, optim
from larp.training.ar_stage import ARStage
from larp.core.errors import run_cli
from larp.data.synthetic import make_synthetic_dataset
from tests.conftest import ROOT

import train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(str(out), classes=4, videos_per_class=6, frames=16, size=32, progress=False)


def ar_argv(synth, reference_dir, out, name, steps, extra=(), cache=True):
    train_csv, val_csv = synth
    argv = ["--cfg", str(ROOT / "cfgs/quickstart_nar.yaml"), "--csv_file", train_csv, "--out_path", str(out),
            "--name", name, "-b", "8", "-j", "0", "--manualSeed", "3"] + (["--cache_tokens"] if cache else [])
    return argv + ["--opts", "data.val_csv", val_csv, "vae.checkpoint", str(reference_dir / "golden/tiny/tokenizer"),
                   "model.num_classes", "4", "train.max_steps", str(steps), "train.log_interval", "1",
                   "lr_schedule.warmup_steps", "5", "optimizer.args.lr", "1e-3", "eval.num_videos", "2",
                   "wandb.mode", "disabled", *extra]


def run_main(argv):
    return train.main(train.build_parser().parse_args(argv))


def train_rows(run_dir):
    """{step: row} of the training rows of metrics.csv (eval rows have no loss)."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f) if r.get("loss")}


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


# ---------------------------------------------------------------------------------------------- units
def test_lr_schedules():
    sched = {"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}
    assert optim.lr_at(0, 1.0, 110, **sched) == pytest.approx(0.1)
    assert optim.lr_at(9, 1.0, 110, **sched) == pytest.approx(1.0)
    assert optim.lr_at(60, 1.0, 110, **sched) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: mean of max and floor
    assert optim.lr_at(110, 1.0, 110, **sched) == pytest.approx(0.1)
    # the reference's: warmup in epochs, from the floor min_lr_ratio * lr up to lr
    ref = optim.schedule_args({"name": "cosine", "warmup_steps": 0, "warmup_epochs": 2.0, "min_lr_ratio": 0.01,
                               "warmup_from_min": True}, steps_per_epoch=5)
    assert ref["warmup_steps"] == 10 and "warmup_epochs" not in ref
    assert optim.lr_at(0, 1.0, 110, **ref) == pytest.approx(0.01 + 0.99 * 0.1)
    assert optim.lr_at(9, 1.0, 110, **ref) == pytest.approx(1.0)
    assert optim.lr_at(110, 1.0, 110, **ref) == pytest.approx(0.01)
    step = {"name": "step", "warmup_steps": 0, "milestones": [5, 8], "gamma": 0.5}
    assert [optim.lr_at(s, 2.0, 10, **step) for s in (0, 4, 5, 7, 8, 9)] == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]


def test_sampler_ranks_partition_the_global_batch_and_skip():
    one = list(loader.ResumableBatchSampler(30, 6, 0, 1, seed=5, epoch=2))
    two = [list(loader.ResumableBatchSampler(30, 6, r, 2, seed=5, epoch=2)) for r in range(2)]
    assert len(one) == 5
    for b in range(5):
        assert two[0][b] + two[1][b] == one[b]
    assert sorted(i for b in one for i, _ in b) == list(range(30))
    assert list(loader.ResumableBatchSampler(30, 6, 0, 1, seed=5, epoch=2, start_batch=3)) == one[3:]
    assert list(loader.ResumableBatchSampler(30, 6, 0, 1, seed=5, epoch=3)) != one


def test_seeded_items_are_reproducible(synth):
    from larp.data.dataset import VideoDataset
    ds = loader.SeededItems(VideoDataset(synth[0], frame_num=8, input_size=32, train=True, hflip=True))
    a = ds[(3, 1234)]["video"]
    torch.rand(100)  # the global stream moves on; the item does not
    assert torch.equal(ds[(3, 1234)]["video"], a)
    assert any(not torch.equal(ds[(3, s)]["video"], a) for s in range(5))  # other seeds: other windows/flips


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from larp.models.generator import ModelArgs, build_generator
    model = build_generator(ModelArgs(dim=32, n_layer=1, n_head=2, vocab_size=16, max_seq_len=8,
                                      latent_shape=(2, 2, 2), num_classes=2), order="raster")
    stage = SimpleNamespace(model=model, model_name="tiny", optimizer=torch.optim.AdamW(model.parameters()),
                            state_dict=lambda: {"scaler": optim.make_scaler("fp32", "cpu").state_dict()})
    path = tmp_path / "ckpt_latest.pth"
    checkpoints.save_checkpoint(str(path), stage, None, {"seed": 0}, step=1, epoch=0)
    before = path.read_bytes()

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        with open(f, "wb") as fh:
            fh.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(str(path), stage, None, {"seed": 0}, step=2, epoch=0)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt_latest.pth"]
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1


def test_stages_build_and_step_without_a_dataset():
    """A benchmark or test builds a stage from its config and a model alone, and steps it on random inputs."""
    from larp.training.ar_stage import build_ar_model
    from larp.training.config_build import build_config
    from larp.training.tokenizer_stage import TokenizerStage
    torch.manual_seed(0)
    cfg = build_config(str(ROOT / "cfgs/quickstart_tokenizer.yaml"))
    tok = TokenizerStage(cfg, torch.device("cpu"))
    assert tok.train_set is None and tok.val_videos is None
    logs = tok.step({"video": torch.rand(2, 3, 8, 32, 32)}, 0, 10)
    assert math.isfinite(logs["loss"]) and logs["grad_norm"] > 0
    cfg = build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["model.num_classes", "4"])
    model = build_ar_model(cfg.model, SimpleNamespace(bottleneck_token_num=32, codebook_size=64))
    ar = ARStage(cfg, model, None, torch.device("cpu"))
    batch = {"tokens": torch.randint(64, (4, 32)), "label": torch.tensor([0, 1, 2, 3])}
    first = ar.step(batch, 0, 10)["loss"]
    assert first == pytest.approx(math.log(64), abs=0.05)  # zero-initialised heads
    ar.set_lr(1e-2)
    assert all(ar.step(batch, s, 10)["loss"] < first for s in range(1, 4))


# ---------------------------------------------------------------------------------------------- AR runs
def test_ema_update_matches_formula():
    model = torch.nn.Linear(3, 2)
    ema = optim.EMA(model, decay=0.75)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], 0.75 * w0 + 0.25 * (w0 + 1.0))


@pytest.mark.parametrize("order", ["nar", "raster"])
def test_ar_loss_drops_and_export_loads(synth, reference_dir, tmp_path, order):
    from larp.models.generator import load_generator
    summary = run_main(ar_argv(synth, reference_dir, tmp_path, order, 40, extra=["model.order", order]))
    rows = train_rows(summary["run_dir"])
    first = float(rows[1]["loss"])
    last10 = sum(float(rows[s]["loss"]) for s in range(31, 41)) / 10
    assert first == pytest.approx(math.log(64), abs=0.05)  # zero-initialised heads: uniform over 64 codes
    assert last10 < first - 1.0, (first, last10)
    assert os.path.exists(os.path.join(summary["run_dir"], "previews", "step_0000040.png"))
    ckpt = torch.load(os.path.join(summary["run_dir"], "ckpt_latest.pth"), weights_only=False)
    assert ckpt["step"] == 40 and ckpt["model"]["args"]["order"] == order
    exported = load_generator(summary["export"])
    resumed = load_generator(os.path.join(summary["run_dir"], "ckpt_latest.pth"))
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ckpt["model"]["sd"][k]) and torch.equal(v, resumed.state_dict()[k])
    assert exported.order == order and exported.config["latent_shape"] == [2, 4, 4]


def test_frame_prediction_ema_save_epoch_and_replace(synth, reference_dir, tmp_path):
    """Frame prediction trains on condition tokens of the first frames (the last one repeated); EMA weights are
    exported; ckpt_<epoch>.pth is kept every save_epoch epochs; --replace starts over."""
    from larp.models.generator import load_generator
    from larp.models.tokenizer import LARPTokenizer
    extra = ["model.frame_prediction", "true", "model.num_cond_frames", "3", "train.ema_decay", "0.5",
             "train.save_epoch", "1"]
    argv = ar_argv(synth, reference_dir, tmp_path, "fp", 5, extra)  # 32 cached clips / batch 8: 4 steps/epoch
    summary = run_main(argv)
    run_dir = summary["run_dir"]
    cache = torch.load(os.path.join(run_dir, "token_cache.pt"), weights_only=False)
    from larp.data.dataset import VideoDataset
    clip = VideoDataset(synth[0], frame_num=8, input_size=32, train=False)[5]["video"][None]  # (1, 3, 8, 32, 32)
    cond_video = torch.cat([clip[:, :, :3]] + [clip[:, :, 2:3]] * 5, dim=2)
    tok = LARPTokenizer.from_pretrained(reference_dir / "golden/tiny/tokenizer").set_vq_eval_deterministic(True)
    with torch.no_grad():
        assert torch.equal(cache["cond"][5].long(), tok.encode(cond_video)["bottleneck_rep"][0])
        assert torch.equal(cache["tokens"][5].long(), tok.encode(clip)["bottleneck_rep"][0])
    ckpt = torch.load(os.path.join(run_dir, "ckpt_latest.pth"), weights_only=False)
    exported = load_generator(summary["export"])
    assert exported.frame_prediction and exported.cls_token_num == 33
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k].to(v.dtype))
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"]["sd"][k]) for k in ckpt["ema"])
    assert torch.load(os.path.join(run_dir, "ckpt_1.pth"), weights_only=False)["step"] == 4
    assert os.path.exists(os.path.join(run_dir, "previews", "step_0000005.png"))
    run_main(argv[:argv.index("--opts")] + ["--replace"] + argv[argv.index("--opts"):] + ["train.max_steps", "2"])
    assert sorted(train_rows(run_dir)) == [1, 2] and not os.path.exists(os.path.join(run_dir, "ckpt_1.pth"))


def test_nonfinite_loss_stops_naming_the_step(synth, reference_dir, tmp_path, capsys):
    argv = ar_argv(synth, reference_dir, tmp_path, "nan", 6, extra=[
        "optimizer.args.lr", ".inf", "lr_schedule.warmup_steps", "0", "train.grad_clip", "0"])
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, train.build_parser().parse_args(argv))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 2" in err


@pytest.mark.slow
def test_ar_resume_after_crash_on_the_fly_encoding(synth, reference_dir, tmp_path, monkeypatch):
    """AR stage encoding videos on the fly (no cache), dropout and label drop on: a run that dies after its
    step-4 checkpoint and is restarted repeats the uninterrupted losses exactly."""
    steps, extra = 8, ["train.latest_interval", "4", "data.hflip", "true"]
    full = run_main(ar_argv(synth, reference_dir, tmp_path, "full", steps, extra, cache=False))
    real_step = ARStage.step

    def crash_at_6th(stage, batch, step, total_steps):
        if step == 5:
            raise RuntimeError("simulated crash")
        return real_step(stage, batch, step, total_steps)

    monkeypatch.setattr(ARStage, "step", crash_at_6th)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main(ar_argv(synth, reference_dir, tmp_path, "crashed", steps, extra, cache=False))
    monkeypatch.setattr(ARStage, "step", real_step)
    run_main(ar_argv(synth, reference_dir, tmp_path, "crashed", steps, extra, cache=False))
    a, b = train_rows(full["run_dir"]), train_rows(tmp_path / "crashed")
    assert sorted(b) == list(range(1, steps + 1))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in b]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(synth, reference_dir, tmp_path):
    extra = ["model.args.class_dropout_prob", "0.0", "model.args.resid_dropout_p", "0.0",
             "model.args.ffn_dropout_p", "0.0", "eval.num_videos", "0", "train.keep", "last"]
    one = run_main(ar_argv(synth, reference_dir, tmp_path, "one", 10, extra))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py")] + ar_argv(synth, reference_dir, tmp_path, "two", 10, extra)
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(4/rank x 2)" in res.stdout
    a, b = train_rows(one["run_dir"]), train_rows(tmp_path / "two")
    assert sorted(b) == list(range(1, 11))
    for s in range(1, 11):
        assert float(b[s]["loss"]) == pytest.approx(float(a[s]["loss"]), abs=1e-4)
    assert float(a[10]["loss"]) < float(a[1]["loss"]) - 0.05


# ---------------------------------------------------------------------------------------------- tokenizer
def tok_argv(synth, out, name, steps):
    train_csv, val_csv = synth
    return ["--cfg", str(ROOT / "cfgs/quickstart_tokenizer.yaml"), "--csv_file", train_csv, "--out_path", str(out),
            "--name", name, "-b", "4", "-j", "0", "--opts", "data.val_csv", val_csv,
            "model.encoder_hidden_size", "32", "model.decoder_hidden_size", "32", "model.encoder_num_heads", "2",
            "model.decoder_num_heads", "2", "model.encoder_depth", "1", "model.decoder_depth", "1",
            "loss.gan_weight", "0.1", "loss.disc_start_step", "2", "loss.lecam_weight", "0.001", "loss.disc_dim",
            "32", "loss.disc_depth", "1", "train.max_steps", str(steps), "train.latest_interval", "3",
            "train.log_interval", "1", "eval.num_videos", "2", "lr_schedule.warmup_steps", "2", "wandb.mode",
            "disabled"]


def test_tokenizer_stage_gan_and_export(synth, tmp_path):
    """Generator/discriminator alternation from disc_start_step, prior / codebook metrics logged, the checkpoint
    holds the discriminator, and the export loads with from_pretrained."""
    from larp.models.tokenizer import LARPTokenizer
    full = run_main(tok_argv(synth, tmp_path, "full", 6))
    rows = train_rows(full["run_dir"])
    assert rows[2].get("d_loss") in (None, "") and rows[3]["d_loss"] != ""  # step index 2 = the 3rd step
    for key in ("prior", "prior_acc", "codebook_usage_window", "ss_ratio", "l1"):
        assert rows[6][key] != ""
    assert 0 < float(rows[6]["codebook_usage_window"]) <= 1
    tok = LARPTokenizer.from_pretrained(full["export"])
    ckpt = torch.load(os.path.join(full["run_dir"], "ckpt_latest.pth"), weights_only=False)
    assert ckpt["model"]["name"] == "larp_tokenizer"
    assert any(k.startswith("discriminator.") for k in ckpt["loss"]) and ckpt["disc_optimizer"] is not None
    for k, v in tok.state_dict().items():
        assert torch.equal(v, ckpt["model"]["sd"][k])
    assert "val_psnr" in full["eval"] and math.isfinite(full["eval"]["val_psnr"])


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(synth, tmp_path):
    """Tokenizer stage (pixels drive the loss): random windows + flips drawn in a loader worker, stochastic VQ,
    scheduled sampling and GAN updates. Killed with SIGKILL after its step-5 checkpoint and restarted, it
    reaches the same losses as an uninterrupted run."""
    steps, extra = 12, ["train.latest_interval", "5", "data.hflip", "true", "data.num_workers", "1"]
    full = run_main(tok_argv(synth, tmp_path, "full", steps) + extra)
    argv = [sys.executable, str(ROOT / "train.py")] + tok_argv(synth, tmp_path, "killed", steps) + extra
    proc = subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "saved checkpoint step 5" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_dir = tmp_path / "killed"
    assert torch.load(run_dir / "ckpt_latest.pth", weights_only=False)["step"] == 5
    assert not (run_dir / "export").exists()
    resumed = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    a, b = train_rows(full["run_dir"]), train_rows(run_dir)
    assert sorted(b) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        assert (a[s]["loss"], a[s]["d_loss"]) == (b[s]["loss"], b[s]["d_loss"]), (s, a[s]["loss"], b[s]["loss"])
    assert float(a[1]["loss"]) != float(a[steps]["loss"])
