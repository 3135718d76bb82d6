"""Config loading: --opts typing and nesting, unknown-key errors, flag mapping, and that every shipped config
and launch script parses."""
import glob
import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

from larp.core.errors import ConfigError
from larp.training.config_build import build_config, parse_opts, parse_value
from tests.conftest import ROOT

import train

REFERENCE_CMD = ("--cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag default --csv_file ucf101_train.csv "
                 "--out_path save/ --name larp_ar -b 64 -j 8 --frame_num 16 --input_size 128 --opts model.name "
                 "llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint hywang66/LARP-L-long-tokenizer")


def cfg_from_cmdline(argv):
    args = train.build_parser().parse_args(argv)
    return args, build_config(str(ROOT / args.cfg) if not os.path.isabs(args.cfg) else args.cfg,
                              flags=vars(args), opts=args.opts)


@pytest.mark.parametrize("text,value", [
    ("0.0006", 0.0006), ("6e-4", 6e-4), ("-1.5E+2", -150.0), ("66667", 66667), ("true", True), ("false", False),
    ("null", None), ("[4, 16, 16]", [4, 16, 16]), ("{a: 1}", {"a": 1}), ("llama-abs-L", "llama-abs-L"),
    ("hywang66/LARP-L-long-tokenizer", "hywang66/LARP-L-long-tokenizer"), (".inf", float("inf")),
])
def test_parse_value_yaml_types(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_reference_command_line():
    args, cfg = cfg_from_cmdline(shlex.split(REFERENCE_CMD))
    assert cfg.stage == "ar"
    assert cfg.seed == 66667 and cfg.tag == "default" and cfg.batch_size == 64
    assert cfg.data.csv == "ucf101_train.csv" and cfg.data.num_workers == 8
    assert (cfg.data.frame_num, cfg.data.input_size) == (16, 128)
    assert cfg.model.name == "llama-abs-L"
    assert cfg.optimizer.args["lr"] == 0.0006 and isinstance(cfg.optimizer.args["lr"], float)
    assert cfg.vae.checkpoint == "hywang66/LARP-L-long-tokenizer"
    assert (args.out_path, args.name, args.replace, args.wandb_upload) == ("save/", "larp_ar", False, False)


def test_opts_nested_types_and_lists():
    cfg = build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=[
        "model.latent_shape", "[1, 4, 8]", "optimizer.args.betas", "[0.8, 0.9]", "train.max_steps", "7",
        "model.args.dim", "96", "model.frame_prediction", "true", "optimizer.args.lr", "1", "eval.fvd_size", "64",
        "optimizer.args.eps", "1e-6", "lr_schedule.milestones", "[10, 20]", "vae.checkpoint", "some/dir"])
    assert cfg.model.latent_shape == [1, 4, 8]
    assert cfg.optimizer.args["betas"] == [0.8, 0.9]
    assert cfg.train.max_steps == 7 and cfg.model.args["dim"] == 96
    assert cfg.model.frame_prediction is True
    lr = cfg.optimizer.args["lr"]
    assert lr == 1.0 and isinstance(lr, float)  # an int where the config had a float stays a float
    assert cfg.optimizer.args["eps"] == 1e-6  # a new key accepted by AdamW
    assert cfg.lr_schedule.milestones == [10, 20] and cfg.eval.fvd_size == 64


@pytest.mark.parametrize("cfg_file,key", [
    ("quickstart_nar.yaml", "model.nmae"),
    ("quickstart_nar.yaml", "optimizer.args.lrr"),
    ("quickstart_nar.yaml", "model.args.not_a_field"),
    ("quickstart_nar.yaml", "trian.max_steps"),
    ("quickstart_nar.yaml", "train.max_steps.x"),
    ("quickstart_tokenizer.yaml", "vae.checkpoint"),
    ("quickstart_tokenizer.yaml", "model.hidden_size"),
    ("quickstart_tokenizer.yaml", "loss.gan_wieght"),
])
def test_unknown_key_is_an_error_naming_it(cfg_file, key):
    with pytest.raises(ConfigError) as e:
        build_config(str(ROOT / "cfgs" / cfg_file), opts=[key, "1"])
    assert key in str(e.value)


def test_section_and_odd_opts_errors():
    with pytest.raises(ConfigError, match="'train' is a section"):
        build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["train", "1"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_opts(["model.name"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("stage: ar\ntrain:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match="train.max_stepz"):
        build_config(str(p))
    p.write_text("train: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match="stage"):
        build_config(str(p))


def test_tokenizer_geometry_follows_flags():
    _, cfg = cfg_from_cmdline(["--cfg", "cfgs/quickstart_tokenizer.yaml", "--frame_num", "16", "--input_size", "64"])
    assert (cfg.data.frame_num, cfg.data.input_size) == (16, 64)
    assert "frame_num" not in cfg.model and cfg.tokenizer_kwargs()["frame_num"] == 16  # stored once, in data
    cfg = build_config(str(ROOT / "cfgs/quickstart_tokenizer.yaml"))
    assert (cfg.data.frame_num, cfg.data.input_size) == (8, 32)  # from the model section


def test_larp_tokenizer_yaml_is_the_released_config(reference_dir):
    released = json.loads((reference_dir / "tokenizer_larp_L_long.config.json").read_text())
    cfg = build_config(str(ROOT / "cfgs/larp_tokenizer.yaml"))
    assert cfg.tokenizer_kwargs() == released


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "cfgs" / "*.yaml"))), ids=os.path.basename)
def test_every_config_parses(path):
    cfg = build_config(path)
    assert cfg.stage in ("tokenizer", "ar")


FAKE_TORCHRUN = """#!{python}
import json, os, sys
with open(os.environ["FAKE_TORCHRUN_OUT"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


SCRIPTS = sorted(glob.glob(str(ROOT / "scripts" / "train_*.sh")))


def test_all_training_scripts_present():
    names = {os.path.basename(p) for p in SCRIPTS}
    for stage in ("tokenizer", "ar", "ar_fp"):
        assert f"train_larp_{stage}.sh" in names and f"train_larp_{stage}_reproduce.sh" in names


def run_script(script, tmp_path):
    """Run a launch script with a fake torchrun and a fake python that record their arguments: (torchrun calls,
    pre-flight python calls), each an argv list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, out in (("torchrun", "argv.jsonl"), ("python", "check.jsonl")):
        fake = bin_dir / name
        fake.write_text(FAKE_TORCHRUN.replace("FAKE_TORCHRUN_OUT", f"FAKE_OUT_{name}").format(python=sys.executable))
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT_torchrun=str(tmp_path / "argv.jsonl"),
               FAKE_OUT_python=str(tmp_path / "check.jsonl"))
    subprocess.run(["bash", script], cwd=ROOT, env=env, check=True, timeout=60)
    calls = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    checks = [json.loads(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    return calls, checks


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_script_command_parses(script, tmp_path):
    """Run the script with a fake torchrun and a fake python that record their arguments, then parse those like
    train.py. The pre-flight `python train.py --check NPROC` must check exactly what torchrun then launches."""
    calls, checks = run_script(script, tmp_path)
    assert calls, f"{script} did not call torchrun"
    assert len(checks) == len(calls), f"{script}: one pre-flight `python train.py --check` per torchrun call"
    for argv, check in zip(calls, checks):
        i = argv.index("train.py")
        nproc = next(a.split("=", 1)[1] for a in argv[:i] if a.startswith("--nproc_per_node"))
        assert check[:3] == ["train.py", "--check", nproc] and check[3:] == argv[i + 1:]
        args, cfg = cfg_from_cmdline(argv[i + 1:])
        assert args.batch_size is None or cfg.batch_size == args.batch_size
        if cfg.stage == "ar":
            assert cfg.vae.checkpoint


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_script_defaults_to_one_8_gpu_node(script, tmp_path, monkeypatch):
    """The release recipes ran on one 8-GPU node, and docs/training.md says every script launches 8 processes
    unless NPROC says otherwise."""
    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.delenv("NNODES", raising=False)
    calls, _ = run_script(script, tmp_path)
    argv = calls[0]
    assert "--nproc_per_node=8" in argv and "--nnodes=1" in argv, argv[:argv.index("train.py")]


def test_reference_configs_build_the_released_layouts(reference_dir):
    """cfgs/larp_ar.yaml (with the L-long tokenizer's 1024 tokens / 8192 codes) and cfgs/larp_tokenizer.yaml
    build models whose state dicts have exactly the released names and shapes (meta device: no memory)."""
    from types import SimpleNamespace

    import torch

    from larp.training.ar_stage import build_ar_model
    from larp.models.tokenizer import LARPTokenizer
    from tests.conftest import read_manifest

    def shapes(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def manifest(name):
        return {k: s for k, (_, s) in read_manifest(reference_dir / name).items()}

    with torch.device("meta"):
        ar = build_ar_model(build_config(str(ROOT / "cfgs/larp_ar.yaml")).model,
                                   SimpleNamespace(bottleneck_token_num=1024, codebook_size=8192))
        tok = LARPTokenizer(**build_config(str(ROOT / "cfgs/larp_tokenizer.yaml")).tokenizer_kwargs())
    assert shapes(ar) == manifest("nar_llama-abs-L.state_dict.tsv")
    assert shapes(tok) == manifest("tokenizer_larp_L_long.state_dict.tsv")


def test_values_are_coerced_by_field_type_and_bad_types_name_the_key():
    cfg = build_config(str(ROOT / "cfgs/quickstart_nar.yaml"),
                       opts=["train.max_steps", "7.0", "eval.sampling.cfg_scale", "2", "tag", "12",
                             "train.grad_clip", "0"])
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.eval.sampling.cfg_scale == 2.0 and type(cfg.eval.sampling.cfg_scale) is float
    assert cfg.tag == "12" and type(cfg.train.grad_clip) is float
    for key, text in [("train.max_steps", "abc"), ("train.max_steps", "7.5"), ("train.compile", "1"),
                      ("model.latent_shape", "3"), ("eval.sampling.top_k", "1.5"), ("data.hflip", "maybe")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=[key, text])


def test_eval_sampling_knobs_are_one_sampling_params():
    from larp.models.sampling_params import SamplingParams
    from larp.training.config import to_dict
    from larp.training.config_build import from_dict
    path = str(ROOT / "cfgs/quickstart_nar.yaml")
    cfg = build_config(path, opts=["eval.sampling.cfg_scale", "4", "eval.sampling.top_k", "10"])
    assert cfg.eval.sampling == SamplingParams(cfg_scale=4.0, top_k=10)
    with pytest.raises(ConfigError, match="eval.sampling.top_p"):
        build_config(path, opts=["eval.sampling.top_p", "0"])
    with pytest.raises(ConfigError, match="eval.sampling.top_q"):
        build_config(path, opts=["eval.sampling.top_q", "0"])
    # a config stored by an earlier version (flat eval.cfg_scale, ...) reads the same
    old = to_dict(cfg)
    old["eval"].update(old["eval"].pop("sampling"))
    assert "cfg_scale" in old["eval"] and from_dict(old) == cfg


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "cfgs" / "*.yaml"))), ids=os.path.basename)
def test_config_round_trips_through_plain_data(path):
    """Checkpoints and config.yaml store to_dict(cfg); reading that back gives the same config."""
    import yaml

    from larp.training.config import dump_yaml, to_dict
    from larp.training.config_build import from_dict
    cfg = build_config(path)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_tokenizer_geometry_is_stored_once(tmp_path):
    text = (ROOT / "cfgs/quickstart_tokenizer.yaml").read_text()
    cfg = build_config(str(ROOT / "cfgs/quickstart_tokenizer.yaml"), opts=["model.input_size", "64"])
    assert cfg.data.input_size == 64 and "input_size" not in cfg.model  # the released name sets data.*
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("  frame_num: 8\n  input_size: 32\n  hflip", "  frame_num: 16\n  input_size: 32\n  hflip"))
    with pytest.raises(ConfigError, match="data.frame_num = 16 disagrees with model.frame_num = 8"):
        build_config(str(bad))


def test_yaml_dict_settings_merge_into_their_defaults(tmp_path):
    """A YAML `optimizer.args` naming only the lr keeps the default betas and weight decay (as it always did)."""
    p = tmp_path / "partial.yaml"
    p.write_text((ROOT / "cfgs/quickstart_nar.yaml").read_text().split("optimizer:")[0] +
                 "optimizer:\n  name: adamw\n  args: {lr: 3.0e-4}\n")
    cfg = build_config(str(p))
    assert cfg.optimizer.args == {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}
    p.write_text("stage: ar\noptimizer:\n  args: {weight_decay: 0.1}\n")
    assert build_config(str(p)).optimizer.args == {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}


def test_geometry_given_twice_must_agree():
    with pytest.raises(ConfigError, match="given twice"):
        build_config(str(ROOT / "cfgs/quickstart_tokenizer.yaml"), opts=["data.frame_num", "4", "model.frame_num", "2"])
    cfg = build_config(str(ROOT / "cfgs/quickstart_tokenizer.yaml"), opts=["data.frame_num", "4", "model.frame_num", "4"])
    assert cfg.data.frame_num == 4
