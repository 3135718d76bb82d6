"""Training configuration: YAML file + command-line flags + `--opts key value` dotted overrides.

The config is a plain nested dict. Every key must be known: a YAML file or an `--opts` key that is not in
the defaults of its stage is an error naming the key. Three sections are open-ended, with their allowed
keys checked elsewhere: the tokenizer's `model:` (LARPTokenizer kwargs; the YAML holds the whole dict, so
`--opts` may only change keys it has) and `loss:` (TokenizerLoss kwargs, likewise), the AR `model.args:`
(ModelArgs fields) and every `optimizer.args:` (keyword arguments of the optimizer class).
"""
import copy
import inspect
import os
import re

import yaml

from larp.errors import LarpError


class ConfigError(LarpError, ValueError):
    """A user error in a config file or an override; the message names the key."""


STAGES = ("tokenizer", "ar")
OPTIMIZERS = ("adamw", "adam", "sgd")

COMMON = {
    "stage": None,
    "seed": 0,
    "tag": "default",
    "batch_size": 8,          # GLOBAL batch, split evenly over ranks
    "data": {
        "csv": None,          # training CSV spec (path, or name under data/metadata/, joined by +)
        "val_csv": None,      # clips for periodic eval (default: the training CSV)
        "frame_num": 16,
        "input_size": 128,
        "hflip": False,
        "num_workers": 4,
        "cache_dir": None,
        "skip_bad": False,
    },
    "optimizer": {"name": "adamw", "args": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}},
    "lr_schedule": {
        "name": "cosine",     # cosine | step | constant
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,  # cosine floor as a fraction of the base lr
        "milestones": [],     # step: lr *= gamma at each of these steps
        "gamma": 0.1,
    },
    "train": {
        "epochs": 1,
        "max_steps": None,    # when set, stops here (and the schedule spans it) instead of after `epochs`
        "grad_clip": 1.0,     # max global grad norm; 0 = off
        "amp": "fp32",        # fp32 | bf16 | fp16 (fp16 uses a GradScaler; both fall back to fp32 when unsupported)
        "compile": False,
        "ema_decay": 0.0,     # 0 = no EMA; else e.g. 0.9999 (the exported model uses the EMA weights)
        "latest_interval": 1000,  # steps between ckpt_latest.pth writes
        "save_epoch": 0,      # keep ckpt_<epoch>.pth every this many epochs (0 = never)
        "log_interval": 10,
        "deterministic": False,
        "find_unused_parameters": False,
        "parallel": "ddp",    # ddp | fsdp (ar stage: FSDP2 fully_shard per transformer block, then the root)
    },
    "eval": {
        "interval": 0,        # steps between evaluations (0 = only at the end)
        "num_videos": 8,      # clips for PSNR / previews / sample grid
        "fvd_videos": 0,      # AR only: generated videos for a small FVD (0 = off)
        "i3d": "random:112",  # detector spec for the small FVD (see larp.fvd.load_i3d)
        "fvd_size": None,     # resize real and generated clips to this size for FVD (64 for K600 frame pred.)
        "cfg_scale": 1.0,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
    },
    "wandb": {"mode": "offline", "project": "larp", "entity": None},
}

STAGE_DEFAULTS = {
    "tokenizer": {
        "model": {},
        "loss": {},
        # lr = generator lr (with its schedule) x loss.disc_lr_mult
        "disc_optimizer": {"name": "adamw", "args": {"betas": [0.5, 0.9], "weight_decay": 0.0}},
    },
    "ar": {
        "model": {
            "name": "llama-abs-L",
            "order": "nar",
            "frame_prediction": False,
            "num_cond_frames": 5,
            "latent_shape": [4, 16, 16],
            "num_classes": 101,
            "args": {},
        },
        "vae": {"checkpoint": None, "encode_dtype": "fp32"},
        "cache_tokens": False,
    },
}

# Sections whose keys are not listed in the defaults (see the module docstring).
OPEN_SECTIONS = {"tokenizer": ("model", "loss"), "ar": ("model.args",)}

# argparse dest -> config key (flags spelled as in the reference command lines).
FLAG_KEYS = {
    "manualSeed": "seed",
    "tag": "tag",
    "csv_file": "data.csv",
    "batch_size": "batch_size",
    "workers": "data.num_workers",
    "frame_num": "data.frame_num",
    "input_size": "data.input_size",
    "cache_tokens": "cache_tokens",
    "i3d": "eval.i3d",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `6e-4`-style numbers as floats (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text):
    """YAML-typed value of an override: `0.0006` float, `true` bool, `[1, 2]` list, `null` None."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def load_yaml(path):
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def defaults_for(stage):
    if stage not in STAGES:
        raise ConfigError(f"stage: '{stage}' is not one of {list(STAGES)}")
    cfg = copy.deepcopy(COMMON)
    cfg.update(copy.deepcopy(STAGE_DEFAULTS[stage]))
    cfg["stage"] = stage
    return cfg


def _is_open(stage, dotted):
    return any(dotted == p or dotted.startswith(p + ".") for p in OPEN_SECTIONS[stage])


def _merge(base, new, stage, prefix=""):
    """Recursively merge `new` into `base`; keys absent from `base` are errors outside open sections."""
    for k, v in new.items():
        dotted = f"{prefix}{k}"
        if k not in base and not _is_open(stage, dotted):
            raise ConfigError(f"unknown config key '{dotted}' (stage {stage})")
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, stage, dotted + ".")
        else:
            base[k] = copy.deepcopy(v)


def _coerce(old, new):
    """Keep the kind of the existing value where the YAML reading of the text would change it."""
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, str) and isinstance(new, (int, float, bool)):
        return str(new) if not isinstance(new, bool) else ("true" if new else "false")
    return new


def _check_open_key(cfg, keys):
    """Validate a new key inside an open section, naming it when it is not accepted."""
    stage, dotted = cfg["stage"], ".".join(keys)
    if stage == "ar" and keys[:2] == ["model", "args"] and len(keys) == 3:
        from larp.ar import ModelArgs
        fields = set(getattr(ModelArgs, "__dataclass_fields__", {}))
        if keys[2] not in fields:
            raise ConfigError(f"unknown config key '{dotted}' (not a ModelArgs field)")
        return
    raise ConfigError(f"unknown config key '{dotted}' (stage {stage}; the section lists every accepted key)")


def optimizer_keys(name):
    import torch
    classes = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ConfigError(f"optimizer.name: '{name}' is not one of {list(OPTIMIZERS)}")
    return classes[name], set(inspect.signature(classes[name].__init__).parameters) - {"self", "params"}


def set_dotted(cfg, dotted, value):
    """Set `a.b.c` = value. The key must exist, or be an accepted new key of an open section."""
    keys = dotted.split(".")
    node = cfg
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node, dict) or k not in node or not isinstance(node[k], dict):
            raise ConfigError(f"unknown config key '{dotted}' ('{'.'.join(keys[:i + 1])}' is not a section)")
        node = node[k]
    last = keys[-1]
    if last not in node:
        if len(keys) >= 2 and keys[-2] == "args" and keys[0] in ("optimizer", "disc_optimizer") and len(keys) == 3:
            _, allowed = optimizer_keys(cfg[keys[0]]["name"])
            if last not in allowed:
                raise ConfigError(f"unknown config key '{dotted}' (not an argument of {cfg[keys[0]]['name']})")
        else:
            _check_open_key(cfg, keys)
        node[last] = value
        return
    if isinstance(node[last], dict):
        raise ConfigError(f"config key '{dotted}' is a section; set one of its keys ({', '.join(node[last])})")
    node[last] = _coerce(node[last], value)


def parse_opts(opts):
    """['a.b', '1', 'c', 'x'] -> [('a.b', 1), ('c', 'x')]."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"--opts takes key value pairs; '{opts[-1]}' has no value")
    return [(opts[i], parse_value(opts[i + 1])) for i in range(0, len(opts), 2)]


def validate(cfg):
    """Cross-field checks that would otherwise fail late."""
    stage = cfg["stage"]
    for sec in ("optimizer", "disc_optimizer"):
        if sec in cfg:
            _, allowed = optimizer_keys(cfg[sec]["name"])
            bad = sorted(set(cfg[sec]["args"]) - allowed)
            if bad:
                raise ConfigError(f"unknown config key '{sec}.args.{bad[0]}' (not an argument of {cfg[sec]['name']})")
    if cfg["lr_schedule"]["name"] not in ("cosine", "step", "constant"):
        raise ConfigError(f"lr_schedule.name: '{cfg['lr_schedule']['name']}' is not cosine, step or constant")
    if cfg["train"]["amp"] not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.amp: '{cfg['train']['amp']}' is not fp32, bf16 or fp16")
    if cfg["train"]["parallel"] not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel: '{cfg['train']['parallel']}' is not ddp or fsdp")
    if cfg["train"]["parallel"] == "fsdp":
        if stage != "ar":
            raise ConfigError("train.parallel: fsdp shards the generator (ar stage); the tokenizer trains with ddp")
        if cfg["train"]["amp"] == "fp16":
            raise ConfigError("train.parallel: fsdp runs fp32 or bf16 (train.amp fp16 needs a GradScaler whose "
                              "inf checks are not synchronised over shards); use train.amp bf16")
    if cfg["wandb"]["mode"] not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode: '{cfg['wandb']['mode']}' is not offline, online or disabled")
    if not isinstance(cfg["batch_size"], int) or cfg["batch_size"] < 1:
        raise ConfigError(f"batch_size: must be a positive integer, got {cfg['batch_size']!r}")
    if stage == "ar":
        m = cfg["model"]
        if m["order"] not in ("nar", "raster"):
            raise ConfigError(f"model.order: '{m['order']}' is not nar or raster")
        if len(m["latent_shape"]) != 3:
            raise ConfigError(f"model.latent_shape: expected [T, H, W], got {m['latent_shape']}")
        if m["frame_prediction"] and not 0 < m["num_cond_frames"] < cfg["data"]["frame_num"]:
            raise ConfigError(f"model.num_cond_frames: {m['num_cond_frames']} must be in 1..frame_num-1")
    if stage == "tokenizer":
        if not cfg["model"]:
            raise ConfigError("model: the tokenizer stage needs the LARPTokenizer kwargs under 'model:'")
    return cfg


def build_config(cfg_path, flags=None, opts=None):
    """YAML file -> defaults of its stage -> flags (dest: value, None = not given) -> `--opts`."""
    data = load_yaml(cfg_path)
    if "stage" not in data:
        raise ConfigError(f"{cfg_path}: missing top-level key 'stage' (one of {list(STAGES)})")
    cfg = defaults_for(data["stage"])
    try:
        _merge(cfg, data, cfg["stage"])
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None
    if cfg["stage"] == "tokenizer":
        _sync_geometry(cfg, data.get("data", {}), from_model=True, where=cfg_path)
    before = {k: cfg["data"][k] for k in ("frame_num", "input_size")}
    for dest, value in (flags or {}).items():
        if value is None or dest not in FLAG_KEYS:
            continue
        if FLAG_KEYS[dest] == "cache_tokens" and cfg["stage"] != "ar":
            if value:
                raise ConfigError("--cache_tokens applies to the ar stage only")
            continue
        set_dotted(cfg, FLAG_KEYS[dest], value)
    for key, value in parse_opts(opts):
        set_dotted(cfg, key, value)
    if cfg["stage"] == "tokenizer":
        changed = {k: v for k, v in before.items() if cfg["data"][k] != v}
        _sync_geometry(cfg, changed, from_model=not changed, where="flags/--opts")
    return validate(cfg)


def _sync_geometry(cfg, explicit, from_model, where):
    """The tokenizer kwargs hold the clip geometry too (frame_num, input_size): keep the two in agreement.

    `explicit` holds the data.* values the user set on purpose; they win, and disagreeing with the model
    section when both were set in one place is an error naming the key.
    """
    for k in ("frame_num", "input_size"):
        m, d = cfg["model"].get(k), cfg["data"][k]
        if k in explicit and from_model and m is not None and explicit[k] != m:
            raise ConfigError(f"{where}: data.{k} = {explicit[k]} disagrees with model.{k} = {m}")
        if from_model and m is not None:
            cfg["data"][k] = m
        else:
            cfg["model"][k] = d


def dump_yaml(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
