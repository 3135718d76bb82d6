"""FSDP2 and multi-node training on CPU (gloo), tiny NAR generator on cached tokens, 2 processes:
FSDP = DDP at the same global batch, kill-and-resume under FSDP, DDP <-> FSDP checkpoints resume across
modes, the export is the same hub layout, and a two-node launch (two torchrun launchers on this machine)
equals the single-node 2-process run."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from larp.core.errors import ConfigError
from larp.training.config_build import build_config
from larp.data.synthetic import make_synthetic_dataset
from larp.core.utils import torch_at_least
from tests.conftest import ROOT
from tests.test_train import ar_argv, subprocess_env, train_rows

STEPS = 10
# the runs need FSDP2 (torch >= 2.7); an older torch's one-line refusal is tested in test_torch_versions.py
needs_fsdp = pytest.mark.skipif(not torch_at_least(2, 7), reason="train.parallel fsdp needs torch>=2.7")
# no dropout / label drop: the two modes then see identical randomness (none) and only summation order differs;
# EMA on, so its sharded state is saved, resumed and exported too
EXTRA = ["model.args.class_dropout_prob", "0.0", "model.args.resid_dropout_p", "0.0",
         "model.args.ffn_dropout_p", "0.0", "eval.num_videos", "1", "train.save_epoch", "1", "train.ema_decay", "0.8"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return make_synthetic_dataset(str(out), classes=4, videos_per_class=6, frames=16, size=32, progress=False)


def torchrun_argv(synth, reference_dir, out, name, parallel, extra=(), nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(ROOT / "train.py")] + ar_argv(synth, reference_dir, out, name, STEPS,
                                              EXTRA + ["train.parallel", parallel, *extra])


def run_ok(cmd):
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(run_dir, steps=range(1, STEPS + 1)):
    rows = train_rows(run_dir)
    assert sorted(rows) == list(steps), sorted(rows)
    return [float(rows[s]["loss"]) for s in steps]


@pytest.fixture(scope="module")
def runs(synth, reference_dir, tmp_path_factory):
    """The uninterrupted 2-process DDP and FSDP runs (ckpt_1.pth = the step-4 state, end of epoch 1)."""
    out = tmp_path_factory.mktemp("runs")
    for mode in ("ddp", "fsdp"):
        res = run_ok(torchrun_argv(synth, reference_dir, out, mode, mode))
        assert "(4/rank x 2)" in res.stdout
    return out


def assert_same_ema(run_a, run_b, atol):
    a = torch.load(run_a / "ckpt_latest.pth", weights_only=False)
    b = torch.load(run_b / "ckpt_latest.pth", weights_only=False)
    assert a["step"] == b["step"] == STEPS and a["ema"].keys() == b["ema"].keys()
    for k, v in a["ema"].items():
        assert (v - b["ema"][k]).abs().max().item() <= atol, k


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- config
def test_fsdp_config_refusals():
    cfg = build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["train.parallel", "fsdp"])
    assert cfg.train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.parallel: 'zero' is not ddp or fsdp"):
        build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["train.parallel", "zero"])
    with pytest.raises(ConfigError, match="train.parallel: fsdp shards the generator"):
        build_config(str(ROOT / "cfgs/quickstart_tokenizer.yaml"), opts=["train.parallel", "fsdp"])
    with pytest.raises(ConfigError, match="use train.amp bf16"):
        build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["train.parallel", "fsdp", "train.amp", "fp16"])


# ---------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
@needs_fsdp
def test_fsdp_matches_ddp_and_exports_the_same_layout(runs):
    from larp.models.generator import load_generator
    ddp, fsdp = losses(runs / "ddp"), losses(runs / "fsdp")
    assert fsdp == pytest.approx(ddp, abs=1e-5)
    assert ddp[-1] < ddp[0] - 0.5  # it trains
    a = torch.load(runs / "ddp" / "ckpt_latest.pth", weights_only=False)
    b = torch.load(runs / "fsdp" / "ckpt_latest.pth", weights_only=False)
    assert a["model"]["sd"].keys() == b["model"]["sd"].keys() and a["model"]["args"] == b["model"]["args"]
    for k, v in a["model"]["sd"].items():  # full (gathered) tensors, not shards
        assert b["model"]["sd"][k].shape == v.shape and torch.allclose(b["model"]["sd"][k], v, atol=1e-5)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # same integer-id layout
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, s in a["optimizer"]["state"].items():
        assert torch.allclose(b["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], atol=1e-6)
    assert a["ema"].keys() == b["ema"].keys()
    for k, v in a["ema"].items():
        assert torch.allclose(b["ema"][k], v, atol=1e-5)
    assert any(not torch.allclose(b["ema"][k], b["model"]["sd"][k]) for k in b["ema"])  # EMA is not the weights
    ea, eb = runs / "ddp" / "export", runs / "fsdp" / "export"
    assert sorted(os.listdir(ea)) == sorted(os.listdir(eb)) == ["config.json", "model.safetensors"]
    assert json.loads((ea / "config.json").read_text()) == json.loads((eb / "config.json").read_text())
    ga, gb = load_generator(str(ea)), load_generator(str(eb))  # what sample.py calls
    for k, v in ga.state_dict().items():  # the exports hold the EMA weights
        assert torch.equal(gb.state_dict()[k], b["ema"][k]) and torch.allclose(gb.state_dict()[k], v, atol=1e-5)


KILLER = """import os, runpy, signal, sys
from larp.training.ar_stage import ARStage
real_step = ARStage.step
def step(stage, batch, step, total_steps):  # rank 0 has written the step-5 checkpoint before it starts step index 5
    if step == 5 and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(stage, batch, step, total_steps)
ARStage.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@needs_fsdp
def test_fsdp_kill_and_resume_matches_uninterrupted(synth, reference_dir, runs, tmp_path):
    """Rank 0 is SIGKILLed right after its step-5 checkpoint (torchrun then stops rank 1); the same command
    resumes and logs the uninterrupted run's losses."""
    cmd = torchrun_argv(synth, reference_dir, tmp_path, "killed", "fsdp", ["train.latest_interval", "5"])
    killer = tmp_path / "kill_after_step5.py"
    killer.write_text(KILLER)
    i = cmd.index(str(ROOT / "train.py"))
    res = subprocess.run(cmd[:i] + [str(killer)] + cmd[i:], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)
    run_dir = tmp_path / "killed"
    assert res.returncode != 0 and "saved checkpoint step 5" in res.stdout, res.stderr[-3000:]
    assert torch.load(run_dir / "ckpt_latest.pth", weights_only=False)["step"] == 5
    assert not (run_dir / "export").exists()
    res = run_ok(cmd)
    assert "resumed from" in res.stdout and "at step 5" in res.stdout
    assert losses(run_dir) == losses(runs / "fsdp")
    assert_same_ema(run_dir, runs / "fsdp", atol=0)


@pytest.mark.slow
@needs_fsdp
@pytest.mark.parametrize("source,target", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_checkpoint_resumes_across_modes(synth, reference_dir, runs, tmp_path, source, target):
    """The step-4 checkpoint of one mode, resumed in the other, continues as the uninterrupted run of that mode."""
    run_dir = tmp_path / f"{source}_to_{target}"
    run_dir.mkdir()
    shutil.copy(runs / source / "ckpt_1.pth", run_dir / "ckpt_latest.pth")
    shutil.copy(runs / source / "token_cache.pt", run_dir / "token_cache.pt")
    res = run_ok(torchrun_argv(synth, reference_dir, tmp_path, run_dir.name, target))
    assert "at step 4" in res.stdout
    assert losses(run_dir, range(5, STEPS + 1)) == pytest.approx(losses(runs / target)[4:], abs=1e-5)
    assert_same_ema(run_dir, runs / target, atol=1e-5)


@pytest.mark.slow
@needs_fsdp
def test_two_node_launch_equals_one_node(synth, reference_dir, runs, tmp_path):
    """Two torchrun launchers (--nnodes 2, node ranks 0 and 1, one process each, master 127.0.0.1) train as one
    2-process job, as the scripts/train_*.sh wrappers launch it with NNODES=2."""
    port = str(free_port())
    argv = ar_argv(synth, reference_dir, tmp_path, "two_nodes", STEPS, EXTRA + ["train.parallel", "ddp"])
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(ROOT / "train.py")] + argv, cwd=ROOT, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "(4/rank x 2)" in outs[0][0]
    assert losses(tmp_path / "two_nodes") == losses(runs / "ddp")
