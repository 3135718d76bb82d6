"""No file a user is handed runs code (docs/security.md): a malicious file in each format is refused on
every path that reads it, with one line naming the file and what it holds, and its payload never runs (each
payload would create a marker file); legitimate files (ours, old ones, the reference's layouts) still load."""
import os
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from larp.models.generator import load_generator
from larp.training.token_cache import token_cache
from larp.core.checkpoint import peek_checkpoint, read_checkpoint
from larp.core.dist import DistInfo
from larp.core.errors import run_cli
from larp.metrics.detectors import load_i3d
from larp.core.io import atomic_save
from larp.training.optim import EMA
from larp.training.checkpoints import capture_rng, check_resume, load_checkpoint, save_checkpoint
from larp.core.errors import UnsafeFileError
from larp.core.safe_load import load_torch
from larp.models.tokenizer import LARPTokenizer
from tests.conftest import GOLDEN, ROOT


class Payload:
    """Unpickling this creates `marker` (through builtins.exec: a global no allowlist holds)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class SystemPayload(Payload):
    """A pickle that calls os.system (posix.system) when loaded."""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_refused(excinfo, path, *needles):
    """One line naming the file and what it holds."""
    text = str(excinfo.value)
    assert "\n" not in text and str(path) in text, text
    for needle in needles:
        assert needle in text, text


def training_checkpoint(kind="generator"):
    """{"model": {"name", "args", "sd"}, ...} of a golden tiny model, the layout train.py writes."""
    cfg, sd, _ = read_checkpoint(GOLDEN / ("nar" if kind == "generator" else "tokenizer"))
    name = "llama-abs-L" if kind == "generator" else "larp_tokenizer"
    return {"model": {"name": name, "args": cfg, "sd": sd}, "optimizer": {}, "ema": None, "step": 3, "epoch": 0,
            "cfg": {"stage": "ar" if kind == "generator" else "tokenizer", "seed": 0, "model": {}}}


def evil_file(path, marker, kind="generator", payload=Payload):
    ckpt = training_checkpoint(kind)
    ckpt["note"] = payload(marker)
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------------------------------- checkpoints
def _pth_json_folder(tmp_path, marker):
    folder = tmp_path / "nar_layout"
    folder.mkdir()
    (folder / "larp.json").write_text((GOLDEN / "tokenizer" / "config.json").read_text())
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, folder / "larp.pth")
    return folder, folder / "larp.pth"


LOAD_PATHS = {
    "generator": lambda p: load_generator(p),
    "generator_preflight": lambda p: peek_checkpoint(p),
    "tokenizer": lambda p: LARPTokenizer.from_pretrained(p),
    "resume_preflight": lambda p: check_resume(p, {"stage": "ar", "model": {}}),
    "resume": lambda p: load_checkpoint(p, None, None, DistInfo()),
    "i3d_state_dict": lambda p: load_i3d(str(p), verbose=False),
}


@pytest.mark.parametrize("path_kind", sorted(LOAD_PATHS))
def test_checkpoint_with_code_is_refused_on_every_load_path(path_kind, tmp_path, marker):
    evil = evil_file(tmp_path / "evil.pth", marker, "tokenizer" if path_kind == "tokenizer" else "generator")
    with pytest.raises(UnsafeFileError) as e:
        LOAD_PATHS[path_kind](evil)
    assert_refused(e, evil, "builtins.exec", "--trust_checkpoint")
    assert not marker.exists()


def test_nar_layout_state_dict_with_code_is_refused(tmp_path, marker):
    folder, pth = _pth_json_folder(tmp_path, marker)
    with pytest.raises(UnsafeFileError) as e:
        LARPTokenizer.from_pretrained(folder)
    assert_refused(e, pth, "builtins.exec")
    assert not marker.exists()


def test_trust_flag_loads_it_and_the_payload_is_real(tmp_path, marker, capsys):
    """The control: the same file does run its payload when trusted (so the refusals above can fail)."""
    evil = evil_file(tmp_path / "evil.pth", marker)
    assert load_torch(evil, trust=True)["step"] == 3 and marker.exists()
    marker.unlink()
    assert load_generator(evil, trust=True).order == "nar" and marker.exists()  # what --trust_checkpoint passes
    assert "--trust_checkpoint" in capsys.readouterr().err
    marker.unlink()


@pytest.mark.slow
def test_sample_py_refuses_the_issue_reproduction(tmp_path, marker):
    """`sample.py --ar_model evil.pth` (os.system payload): one error line naming the file, no command run."""
    evil = evil_file(tmp_path / "evil.pth", marker, payload=SystemPayload)
    r = subprocess.run([sys.executable, "sample.py", "--ar_model", str(evil), "--tokenizer", str(GOLDEN / "tokenizer"),
                        "--output_dir", str(tmp_path / "out"), "--dataset_csv", _tiny_clips(tmp_path / "syn")[0],
                        "--i3d", "random:32",
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("sample.py: error: ") and str(evil) in lines[0] and "posix.system" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def _tiny_clips(root):
    """(train CSV, val CSV) of 4 + 4 synthetic 8-frame 32px videos, one clip each."""
    from larp.data.synthetic import make_synthetic_dataset
    return make_synthetic_dataset(str(root), classes=4, videos_per_class=2, frames=8, size=32, val_fraction=0.5,
                                  progress=False)


def test_train_py_refuses_a_frozen_tokenizer_and_a_checkpoint_to_resume(tmp_path, marker, capsys):
    import train
    train_csv, val_csv = _tiny_clips(tmp_path / "syn")
    evil_tok = evil_file(tmp_path / "tok.pth", marker, "tokenizer")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    evil_file(run_dir / "ckpt_latest.pth", marker)
    base = ["--cfg", "cfgs/quickstart_nar.yaml", "--csv_file", train_csv, "--out_path", str(tmp_path / "runs"),
            "--name", "r", "-b", "4", "--check", "--opts", "data.val_csv", val_csv, "model.num_classes", "4"]
    for tok, bad in ((evil_tok, evil_tok), (GOLDEN / "tokenizer", run_dir / "ckpt_latest.pth")):
        with pytest.raises(SystemExit):
            run_cli(train.main, train.build_parser().parse_args(base + ["vae.checkpoint", str(tok)]), prog="train.py")
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("train.py: error: "), err
        assert str(bad) in err and "builtins.exec" in err, err
    assert not marker.exists()


def test_token_cache_with_code_is_refused_and_ours_is_reused(tmp_path, marker):
    tok = LARPTokenizer.from_pretrained(GOLDEN / "tokenizer").set_vq_eval_deterministic(True)
    stage = types.SimpleNamespace(tokenizer=tok, num_cond_frames=0,
                                  encode=lambda v: (tok.encode(v)["bottleneck_rep"], None))
    data = types.SimpleNamespace(csv=_tiny_clips(tmp_path / "syn")[0], frame_num=8, input_size=32, hflip=False,
                                 skip_bad=False, cache_dir=None, num_workers=0)
    cfg = types.SimpleNamespace(data=data, batch_size=2, vae=types.SimpleNamespace(
        checkpoint=str(GOLDEN / "tokenizer"), encode_dtype="fp32"))
    run_dir, notes = tmp_path / "run", []
    run_dir.mkdir()
    torch.save({"meta": {}, "tokens": torch.zeros(1, 32), "x": Payload(marker)}, run_dir / "token_cache.pt")
    with pytest.raises(UnsafeFileError) as e:
        token_cache(stage, cfg, DistInfo(), str(run_dir), notes.append)
    assert_refused(e, run_dir / "token_cache.pt", "builtins.exec")
    assert not marker.exists()
    os.remove(run_dir / "token_cache.pt")
    built = token_cache(stage, cfg, DistInfo(), str(run_dir), notes.append)  # ours: written, then read back safely
    again = token_cache(stage, cfg, DistInfo(), str(run_dir), notes.append)
    assert "reusing" in notes[-1] and torch.equal(built["tokens"], again["tokens"])
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(run_dir / "token_cache.pt")) == []
    cfg.vae.encode_dtype = "bf16"  # another encode precision: the cache is made again
    token_cache(stage, cfg, DistInfo(), str(run_dir), notes.append)
    assert "rebuilding" in notes[-2] and "wrote" in notes[-1]


# ---------------------------------------------------------------------------------------------- our checkpoints
def _tiny_stage():
    model = load_generator(GOLDEN / "nar").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 64, (2, 32))
    model(tokens, torch.tensor([0, 1]), targets=tokens)[1].backward()
    opt.step()
    return types.SimpleNamespace(model=model, optimizer=opt, model_name="llama-abs-L",
                                 state_dict=lambda: {"scaler": {}}, load_state_dict=lambda ckpt, source: None)


def test_our_checkpoints_are_tensors_and_plain_data_and_resume_the_rng(tmp_path):
    stage = _tiny_stage()
    ema = EMA(stage.model, 0.9)
    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    want = (np.random.rand(3), random.random(), torch.rand(3))
    np.random.seed(5)
    random.seed(6)
    torch.manual_seed(7)
    save_checkpoint(str(tmp_path / "ckpt.pth"), stage, ema, {"stage": "ar", "seed": 0, "model": {}}, 4, 1)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "ckpt.pth")) == []
    torch.load(tmp_path / "ckpt.pth", weights_only=True)  # no allowlist needed at all
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    step, _, _ = load_checkpoint(str(tmp_path / "ckpt.pth"), _tiny_stage(), EMA(stage.model, 0.9), DistInfo())
    got = (np.random.rand(3), random.random(), torch.rand(3))
    assert step == 4 and np.array_equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2])


def test_old_checkpoints_with_numpy_rng_state_still_load(tmp_path):
    """Before this change capture_rng stored np.random.get_state() (a uint32 array): admitted, restored exactly."""
    ckpt = training_checkpoint()
    np.random.seed(11)
    ckpt["rng"] = [{"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}]
    want = np.random.rand(4)
    ckpt["cfg"]["lr"] = np.float64(0.5)  # a numpy scalar, too
    atomic_save(ckpt, tmp_path / "old.pth")
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "old.pth"))
    assert check_resume(tmp_path / "old.pth", {"stage": "ar", "model": {}}) == 3
    assert load_generator(tmp_path / "old.pth") is not None
    from larp.training.checkpoints import restore_rng
    np.random.seed(0)
    restore_rng(load_torch(tmp_path / "old.pth")["rng"][0])
    assert np.array_equal(np.random.rand(4), want)
    assert isinstance(capture_rng()["numpy"][1], torch.Tensor)  # what we write now


def _easydict_module():
    """A stand-in for easydict.EasyDict (not installed here): a dict whose keys are mirrored as attributes, pickled
    like the real one (GLOBAL easydict.EasyDict, NEWOBJ, SETITEMS, BUILD of the attribute dict)."""
    mod = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None, **kw):
            super().__init__()
            for k, v in {**(d or {}), **kw}.items():
                setattr(self, k, v)

        def __setattr__(self, name, value):
            if isinstance(value, dict) and not isinstance(value, EasyDict):
                value = EasyDict(value)
            elif isinstance(value, (list, tuple)):
                value = type(value)(EasyDict(x) if isinstance(x, dict) else x for x in value)
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__, EasyDict.__qualname__, mod.EasyDict = "easydict", "EasyDict", EasyDict
    return mod


@pytest.mark.parametrize("kind", ["generator", "tokenizer"])
def test_reference_training_checkpoints_load(kind, tmp_path, monkeypatch):
    """hywang66/LARP and ThisisBillhe/NAR (trainers/base_trainer.py) save {'model': {name, args, sd, ema_sd},
    'optimizer', 'epoch', 'cfg' (EasyDict), 'wandb_run_id', 'rng_states_per_rank' (numpy RNG state), 'loss'}."""
    mod = _easydict_module()
    monkeypatch.setitem(sys.modules, "easydict", mod)
    cfg, sd, _ = read_checkpoint(GOLDEN / ("nar" if kind == "generator" else "tokenizer"))
    name = "llama-abs-L" if kind == "generator" else "larp_tokenizer"
    run_cfg = mod.EasyDict({"model": {"name": name, "args": cfg}, "optimizer": {"name": "adamw", "args": {"lr": 1e-4}},
                            "loss": {"name": "l", "args": {}}, "env": {"save_dir": "save/x"}, "max_epoch": 10})
    model_spec = dict(run_cfg["model"])
    model_spec["sd"] = sd
    model_spec["ema_sd"] = {0.999: sd}
    ckpt = {"model": model_spec, "optimizer": {**dict(run_cfg["optimizer"]), "sd": {"state": {}, "param_groups": []}},
            "epoch": 3, "cfg": run_cfg, "wandb_run_id": None, "loss": {**dict(run_cfg["loss"]), "sd": {}},
            "rng_states_per_rank": {0: {"torch_rng_state": torch.get_rng_state(),
                                        "numpy_rng_state": np.random.get_state(),
                                        "python_rng_state": random.getstate()}}}
    torch.save(ckpt, tmp_path / "epoch-last.pth")
    monkeypatch.delitem(sys.modules, "easydict")  # the loader has no easydict either
    loaded = load_torch(tmp_path / "epoch-last.pth")
    assert loaded["cfg"]["model"]["args"] == cfg and loaded["cfg"]["env"]["save_dir"] == "save/x"
    model = load_generator(tmp_path / "epoch-last.pth") if kind == "generator" else \
        LARPTokenizer.from_pretrained(tmp_path / "epoch-last.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
