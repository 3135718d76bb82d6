"""Every *_reproduce.sh resolves to its release recipe: the script runs with a fake torchrun, its train.py command
line is resolved like train.py resolves it, and each value is compared with the table of the reference recipe in
tests/fixtures/reference/recipes.json (reference setting and value -> our key and value); its _sampling and
_formats tables are compared with sample.py's defaults and with the stats files and CSV labels."""
import dataclasses
import importlib
import json
import math
import os
import types

import numpy as np
import pytest
import torch

import sample
from larp.data import make_csv
from larp.data.dataset import METADATA_DIR, read_video_csv
from larp.metrics import fvd
from larp.metrics.fvd import FeatureStats
from larp.models.generator import ModelArgs, build_generator
from larp.training.ar_stage import ARStage, build_ar_model
from larp.training.config_build import build_config
from larp.training.optim import build_optimizer
from larp.training.tokenizer_stage import TokenizerStage
from tests.conftest import ROOT
from tests.test_config import cfg_from_cmdline, run_script

RECIPES = json.loads((ROOT / "tests" / "fixtures" / "reference" / "recipes.json").read_text())
NAMES = sorted(k for k in RECIPES if not k.startswith("_"))
AR_NAMES = [n for n in NAMES if "optimizer_groups" in RECIPES[n]]


def resolved(cfg, nproc, key):
    """The value of dotted `key` in the resolved config (model.args.*: with the ModelArgs defaults)."""
    if key == "nproc":
        return nproc
    parts = key.split(".")
    if parts[:2] == ["model", "args"] and cfg.stage == "ar":
        return {**dataclasses.asdict(ModelArgs()), **cfg.model.args}[parts[2]]
    node = cfg
    for p in parts:
        node = node[p] if isinstance(node, dict) else getattr(node, p)
    return node


def test_every_reproduce_script_has_a_recipe():
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*_reproduce.sh"))
    assert scripts == sorted(RECIPES[n]["script"].split("/")[-1] for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_table_rows_without_a_note_are_the_reference_values(name):
    for row in RECIPES[name]["rows"]:
        ref_key, ref_value, key, value = row[:4]
        assert len(row) == 5 or value == ref_value, f"{name}: {ref_key} differs ({ref_value} vs {value}) unexplained"


@pytest.mark.parametrize("name", NAMES)
def test_reproduce_script_resolves_to_the_release_recipe(name, tmp_path):
    recipe = RECIPES[name]
    calls, _ = run_script(str(ROOT / recipe["script"]), tmp_path)
    assert len(calls) == 1
    argv = calls[0]
    i = argv.index("train.py")
    nproc = int(next(a.split("=", 1)[1] for a in argv[:i] if a.startswith("--nproc_per_node")))
    _, cfg = cfg_from_cmdline(argv[i + 1:])
    wrong = [f"{key}: {resolved(cfg, nproc, key)!r}, the release's {value!r} ({ref_key})"
             for ref_key, _, key, value, *_ in recipe["rows"] if key and resolved(cfg, nproc, key) != value]
    assert not wrong, f"{recipe['script']}: " + "; ".join(wrong)


def resolved_recipe(name, tmp_path):
    """(nproc, config) of the recipe's *_reproduce.sh, resolved as train.py resolves it."""
    calls, _ = run_script(str(ROOT / RECIPES[name]["script"]), tmp_path)
    argv = calls[0]
    i = argv.index("train.py")
    nproc = int(next(a.split("=", 1)[1] for a in argv[:i] if a.startswith("--nproc_per_node")))
    return nproc, cfg_from_cmdline(argv[i + 1:])[1]


def reference_value(name, ref_key_start):
    return next(row[1] for row in RECIPES[name]["rows"] if row[0].startswith(ref_key_start))


@pytest.mark.parametrize("name", AR_NAMES)
def test_optimizer_groups_are_the_reference_trainers(name, tmp_path):
    """The optimizer the resolved recipe builds (full size, on the meta device) has the reference trainer's weight
    decay groups: the same tensor and parameter counts, nn.Linear weights decayed, all the rest at 0."""
    _, cfg = resolved_recipe(name, tmp_path)
    tok = types.SimpleNamespace(bottleneck_token_num=math.prod(cfg.model.latent_shape), codebook_size=8192)
    with torch.device("meta"):
        model = build_ar_model(cfg.model, tok)
    groups = build_optimizer(model, cfg.optimizer).param_groups
    want = RECIPES[name]["optimizer_groups"]
    got = {g["name"]: {"tensors": len(g["params"]), "parameters": sum(p.numel() for p in g["params"])}
           for g in groups}
    assert got == {k: v for k, v in want.items() if k != "source"}
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"decay": cfg.optimizer.args["weight_decay"], "no_decay": 0.0} and decay["decay"] > 0
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert all(id(p) in linear for p in groups[0]["params"])
    assert not any(id(p) in linear for p in groups[1]["params"])
    assert any(p is model.abs_pe for p in groups[1]["params"])


class RecordingTokenizer(torch.nn.Module):
    """Stands in for the frozen tokenizer: records the autocast dtype each encode call runs under."""
    bottleneck_token_num, codebook_size = 4, 8

    def __init__(self):
        super().__init__()
        self.seen = []

    def _record(self, video):
        on = torch.is_autocast_enabled("cpu")
        self.seen.append(str(torch.get_autocast_dtype("cpu")).removeprefix("torch.") if on else "float32")
        return torch.zeros(video.shape[0], self.bottleneck_token_num, dtype=torch.long)

    def encode(self, video, losses=False):
        return {"bottleneck_rep": self._record(video)}

    def encode_condition(self, video, num_cond_frames):
        return self._record(video)


@pytest.mark.parametrize("name", AR_NAMES)
def test_frozen_tokenizer_encodes_at_the_reference_precision(name, tmp_path):
    """The AR stage of the resolved recipe runs the frozen tokenizer's encode (and the frame-prediction condition's)
    under the reference's autocast dtype."""
    _, cfg = resolved_recipe(name, tmp_path)
    model = build_generator(ModelArgs(dim=16, n_layer=1, n_head=2, vocab_size=8, num_classes=101,
                                      latent_shape=(1, 2, 2), max_seq_len=4,
                                      frame_prediction=cfg.model.frame_prediction,
                                      cls_token_num=5 if cfg.model.frame_prediction else 1), order="raster")
    tok = RecordingTokenizer()
    ARStage(cfg, model, tok, "cpu").encode(torch.rand(1, 3, 2, 8, 8))
    want = {"bf16": "bfloat16", "fp32": "float32"}[reference_value(name, "vae.encode under")]
    assert tok.seen == [want] * (2 if cfg.model.frame_prediction else 1)


def test_tokenizer_step_updates_the_discriminator_before_the_generator_loss():
    cfg = build_config(str(ROOT / "cfgs" / "quickstart_tokenizer.yaml"),
                       opts=["loss.gan_weight", "0.1", "loss.disc_start_step", "0", "loss.perceptual_weight", "0"])
    stage = TokenizerStage(cfg, "cpu")
    order = []
    d_step, g_loss = stage.discriminator_step, stage.loss_fn.generator_loss
    stage.discriminator_step = lambda *a: order.append("discriminator") or d_step(*a)
    stage.loss_fn.generator_loss = lambda *a: order.append("generator") or g_loss(*a)
    before = [p.detach().clone() for p in stage.loss_fn.discriminator.parameters()]
    frame, size = cfg.data.frame_num, cfg.data.input_size
    logs = stage.step({"video": torch.rand(2, 3, frame, size, size)}, 0, 10)
    assert order == ["discriminator", "generator"] and "d_loss" in logs and "loss" in logs
    assert any(not torch.equal(a, b) for a, b in zip(before, stage.loss_fn.discriminator.parameters()))
    assert all(p.requires_grad for p in stage.loss_fn.discriminator.parameters())


def test_sample_defaults_are_the_reference_protocol():
    """sample.py's defaults for the settings in the _sampling table; a row without a note has the reference's
    value as the default."""
    parser = sample.build_parser()
    flags = {a.option_strings[0]: a.default for a in parser._actions if a.option_strings}
    for ref_key, ref_value, flag, value, *note in RECIPES["_sampling"]["rows"]:
        assert flags[flag] == value, f"{flag}: default {flags[flag]!r}, the table's {value!r}"
        assert note or value == ref_value, f"{ref_key}: {value!r} differs from {ref_value!r} unexplained"


def test_format_rows_are_the_code():
    """The _formats table: a dict value is the named attribute; the label rule holds on the shipped CSVs, and our
    stats files carry the reference's keys with the documented sums."""
    for ref_key, ref_value, where, value, *note in RECIPES["_formats"]["rows"]:
        module, name = where.rsplit(".", 1)
        attribute = getattr(importlib.import_module(module), name)
        assert note or value == ref_value, f"{ref_key}: {value!r} differs from {ref_value!r} unexplained"
        if isinstance(value, dict):
            assert attribute == value, f"{where}: {attribute!r}, the table's {value!r}"
    for csv in ("ucf101_train.csv", "ucf101_val.csv"):
        assert make_csv.ucf_label_warning(read_video_csv(os.path.join(METADATA_DIR, csv)), csv) is None
    x = np.random.default_rng(0).normal(size=(5, 3))
    saved = FeatureStats().add(x).to_dict()
    assert saved.items() >= fvd.REFERENCE_SUMS.items()
    np.testing.assert_allclose(saved["raw_mean"], x.sum(0), rtol=1e-12)
    np.testing.assert_allclose(saved["raw_cov"], x.T @ x, rtol=1e-12)
