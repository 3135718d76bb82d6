"""Training configuration: nested dataclasses, filled from a YAML file, command-line flags and `--opts key value`.

Each section is a dataclass, so a key that is not a field is an error naming it, and every value is coerced to its
field's type (an int where a float is expected becomes a float, a string where an int is expected is an error).
Four sections are open-ended dicts, checked against what consumes them:
  * the tokenizer's `model:` (LARPTokenizer kwargs, the layout of the released config.json) and `loss:`
    (TokenizerLoss kwargs): the YAML holds the whole dict, so `--opts` may only change keys it has;
  * the generator's `model.args:` (ModelArgs fields);
  * every `optimizer.args:` (keyword arguments of the optimizer class).
The clip geometry (frame_num, input_size) is stored once, in `data`; the tokenizer's `model:` section may name it
(the released layout does), which sets `data` and is checked for agreement. Checkpoints store `to_dict(cfg)`.
"""
import copy
import dataclasses
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from larp.models.generator import ModelArgs
from larp.core.errors import LarpError
from larp.models.decoding import SamplingParams
from larp.training.optim import OPTIMIZERS


class ConfigError(LarpError, ValueError):
    """A user error in a config file or an override; the message names the key."""


class StageError(LarpError, ValueError):
    """Settings that disagree with each other or with the data / checkpoints, found before training starts."""


GEOMETRY = ("frame_num", "input_size")


@dataclass
class DataConfig:
    csv: Optional[str] = None       # training CSV spec (path, or name under data/metadata/, joined by +)
    val_csv: Optional[str] = None   # clips for periodic eval (default: the training CSV)
    frame_num: int = 16
    input_size: int = 128
    hflip: bool = False
    num_workers: int = 4
    cache_dir: Optional[str] = None
    skip_bad: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    args: dict = field(default_factory=lambda: {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0})


@dataclass
class LRScheduleConfig:
    name: str = "cosine"      # cosine | step | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the base lr
    milestones: list = field(default_factory=list)  # step: lr *= gamma at each of these steps
    gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # when set, stops here (and the schedule spans it) instead of after `epochs`
    grad_clip: float = 1.0     # max global grad norm; 0 = off
    amp: str = "fp32"          # fp32 | bf16 | fp16 (fp16 uses a GradScaler; both fall back to fp32 when unsupported)
    compile: bool = False
    ema_decay: float = 0.0     # 0 = no EMA; else e.g. 0.9999 (the exported model uses the EMA weights)
    latest_interval: int = 1000  # steps between ckpt_latest.pth writes
    save_epoch: int = 0        # keep ckpt_<epoch>.pth every this many epochs (0 = never)
    log_interval: int = 10
    deterministic: bool = False
    find_unused_parameters: bool = False
    parallel: str = "ddp"      # ddp | fsdp (ar stage: FSDP2 fully_shard per transformer block, then the root)


@dataclass
class EvalConfig:
    interval: int = 0          # steps between evaluations (0 = only at the end)
    num_videos: int = 8        # clips for PSNR / previews / sample grid
    fvd_videos: int = 0        # ar only: generated videos for a small FVD (0 = off)
    i3d: Optional[str] = "random:112"  # detector for the small FVD (larp.metrics.fvd.load_i3d; null: the default one)
    fvd_size: Optional[int] = None  # resize real and generated clips to this size for FVD (64 for K600)
    cfg_scale: float = 1.0     # the sampling knobs of the previews and the small FVD (see `sampling`)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def sampling(self):
        return SamplingParams(cfg_scale=self.cfg_scale, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p)


@dataclass
class WandbConfig:
    mode: str = "offline"      # offline | online | disabled
    project: str = "larp"
    entity: Optional[str] = None


@dataclass
class Config:
    """What both stages share; `TokenizerConfig` and `ARConfig` add their own sections."""
    stage: str = ""
    seed: int = 0
    tag: Optional[str] = "default"
    batch_size: int = 8        # GLOBAL batch, split evenly over ranks
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TokenizerConfig(Config):
    stage: str = "tokenizer"
    model: dict = field(default_factory=dict)  # LARPTokenizer kwargs without the geometry (see tokenizer_kwargs)
    loss: dict = field(default_factory=dict)   # TokenizerLoss kwargs
    # lr = generator lr (with its schedule) x loss.disc_lr_mult
    disc_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        args={"betas": [0.5, 0.9], "weight_decay": 0.0}))

    def tokenizer_kwargs(self):
        return {**self.model, "frame_num": self.data.frame_num, "input_size": self.data.input_size}


@dataclass
class ARModelConfig:
    name: str = "llama-abs-L"  # a key of larp.models.generator.AR_MODELS
    order: str = "nar"         # nar | raster
    frame_prediction: bool = False
    num_cond_frames: int = 5
    latent_shape: list = field(default_factory=lambda: [4, 16, 16])
    num_classes: int = 101
    args: dict = field(default_factory=dict)  # ModelArgs overrides


@dataclass
class VAEConfig:
    checkpoint: Optional[str] = None  # the frozen tokenizer: directory, checkpoint or hub id
    encode_dtype: str = "fp32"


@dataclass
class ARConfig(Config):
    stage: str = "ar"
    model: ARModelConfig = field(default_factory=ARModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    cache_tokens: bool = False


STAGES = {"tokenizer": TokenizerConfig, "ar": ARConfig}

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


# ---------------------------------------------------------------------------------------------- values
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


def _coerce(value, kind, key):
    """`value` as the field type `kind` (int, float, bool, str, list, dict or Optional of one), or ConfigError."""
    if typing.get_origin(kind) is typing.Union:
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value):
        return int(value)
    if kind is str and isinstance(value, (str, int, float)):
        return ("true" if value else "false") if isinstance(value, bool) else str(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is list and isinstance(value, (list, tuple)):
        return list(value)
    if kind is dict and isinstance(value, dict):
        return copy.deepcopy(value)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             dict: "a mapping"}
    raise ConfigError(f"config key '{key}': expected {names[kind]}, got {value!r}")


def _keep_kind(old, new):
    """Inside an open dict: keep the kind of the existing value where the YAML reading of the text would change it."""
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, str) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return str(new)
    return new


def optimizer_args(name):
    """The keyword arguments the optimizer `name` accepts."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: '{name}' is not one of {list(OPTIMIZERS)}")
    return set(inspect.signature(OPTIMIZERS[name].__init__).parameters) - {"self", "params"}


# ---------------------------------------------------------------------------------------------- building
def _fill(obj, data, stage, prefix=""):
    """Set the fields of dataclass `obj` from the mapping `data`, recursing into sections."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (stage {stage})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping, got {v!r}")
            _fill(current, v, stage, key + ".")
        elif isinstance(current, dict) and isinstance(v, dict):  # merged into the defaults, e.g. optimizer.args
            _merge_dict(current, v)
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _merge_dict(base, new):
    """Merge the mapping `new` into `base` (recursively): what `new` leaves out keeps its default."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge_dict(base[k], v)
        else:
            base[k] = copy.deepcopy(v)


def set_dotted(cfg, dotted, value):
    """Set `a.b.c` = value. The key must be a field, or an accepted key of an open section."""
    keys = dotted.split(".")
    if cfg.stage == "tokenizer" and keys[0] == "model" and len(keys) == 2 and keys[1] in GEOMETRY:
        keys = ["data", keys[1]]  # the released layout's name for the geometry, which lives in `data`
    node = cfg
    for i, k in enumerate(keys):
        here, last = ".".join(keys[:i + 1]), i == len(keys) - 1
        if isinstance(node, dict):
            _set_open(cfg, node, keys, i, value, dotted)
            return
        if k not in {f.name for f in dataclasses.fields(node)}:
            if i == 0:
                raise ConfigError(f"unknown config key '{dotted}' (stage {cfg.stage})")
            raise ConfigError(f"unknown config key '{dotted}' (stage {cfg.stage}; '{'.'.join(keys[:i])}' has no "
                              f"key '{k}')")
        child = getattr(node, k)
        if last:
            if dataclasses.is_dataclass(child) or (isinstance(child, dict) and _is_section(keys)):
                names = [f.name for f in dataclasses.fields(child)] if dataclasses.is_dataclass(child) else list(child)
                raise ConfigError(f"config key '{dotted}' is a section; set one of its keys ({', '.join(names)})")
            setattr(node, k, _coerce(value, typing.get_type_hints(type(node))[k], dotted))
            return
        if not (dataclasses.is_dataclass(child) or isinstance(child, dict)):
            raise ConfigError(f"unknown config key '{dotted}' ('{here}' is not a section)")
        node = child


def _is_section(keys):
    """Whether the dict-valued field at `keys` is an open section (not a dict-valued setting)."""
    return keys in (["model"], ["loss"], ["model", "args"], ["optimizer", "args"], ["disc_optimizer", "args"])


def _set_open(cfg, node, keys, i, value, dotted):
    """Set keys[i:] inside the open dict `node` (reached through keys[:i])."""
    section = keys[:i]
    rest = keys[i:]
    if section[-1] == "args" and section[0] in ("optimizer", "disc_optimizer") and len(rest) == 1:
        opt = getattr(cfg, section[0])
        if rest[0] not in optimizer_args(opt.name):
            raise ConfigError(f"unknown config key '{dotted}' (not an argument of {opt.name})")
        node[rest[0]] = _keep_kind(node.get(rest[0]), value)
        return
    if section == ["model", "args"] and len(rest) == 1:
        if rest[0] not in {f.name for f in dataclasses.fields(ModelArgs)}:
            raise ConfigError(f"unknown config key '{dotted}' (not a ModelArgs field)")
        node[rest[0]] = _keep_kind(node.get(rest[0]), value)
        return
    for j, k in enumerate(rest):  # tokenizer model / loss: only keys the YAML has
        if not isinstance(node, dict) or k not in node:
            raise ConfigError(f"unknown config key '{dotted}' (stage {cfg.stage}; the section lists every "
                              f"accepted key)")
        if j == len(rest) - 1:
            if isinstance(node[k], dict):
                raise ConfigError(f"config key '{dotted}' is a section; set one of its keys ({', '.join(node[k])})")
            node[k] = _keep_kind(node[k], value)
            return
        node = node[k]


def parse_opts(opts):
    """['a.b', '1', 'c', 'x'] -> [('a.b', 1), ('c', 'x')]."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"--opts takes key value pairs; '{opts[-1]}' has no value")
    return [(opts[i], parse_value(opts[i + 1])) for i in range(0, len(opts), 2)]


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


def from_dict(data, where="config"):
    """A Config of the stage named in `data` (a plain dict: a YAML file, or a checkpoint's stored config)."""
    stage = data.get("stage")
    if stage is None:
        raise ConfigError(f"{where}: missing top-level key 'stage' (one of {list(STAGES)})")
    if stage not in STAGES:
        raise ConfigError(f"stage: '{stage}' is not one of {list(STAGES)}")
    data = copy.deepcopy(data)
    cfg = STAGES[stage]()
    if stage == "tokenizer":
        _take_geometry(data, where)
    try:
        _fill(cfg, data, stage)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if stage == "ar":
        _check_model_args(cfg.model.args)
    return cfg


def _take_geometry(data, where):
    """Move the tokenizer's model.frame_num / input_size into data.*; both given and different is an error."""
    model, d = data.get("model") or {}, data.setdefault("data", {})
    if not isinstance(d, dict):
        return
    for k in GEOMETRY:
        if isinstance(model, dict) and k in model:
            m = model.pop(k)
            if k in d and d[k] != m:
                raise ConfigError(f"{where}: data.{k} = {d[k]} disagrees with model.{k} = {m}")
            d[k] = m


def _check_model_args(args):
    bad = sorted(set(args) - {f.name for f in dataclasses.fields(ModelArgs)})
    if bad:
        raise ConfigError(f"unknown config key 'model.args.{bad[0]}' (not a ModelArgs field)")


def build_config(cfg_path, flags=None, opts=None):
    """YAML file -> defaults of its stage -> flags (dest: value, None = not given) -> `--opts`, validated."""
    cfg = from_dict(load_yaml(cfg_path), where=cfg_path)
    opts = parse_opts(opts)
    if cfg.stage == "tokenizer":
        _check_geometry_overrides(flags or {}, opts)
    for dest, value in (flags or {}).items():
        if value is None or dest not in FLAG_KEYS:
            continue
        if FLAG_KEYS[dest] == "cache_tokens" and cfg.stage != "ar":
            if value:
                raise ConfigError("--cache_tokens applies to the ar stage only")
            continue
        set_dotted(cfg, FLAG_KEYS[dest], value)
    for key, value in opts:
        set_dotted(cfg, key, value)
    return validate(cfg)


def _check_geometry_overrides(flags, opts):
    """The tokenizer geometry given twice in one command (--frame_num / data.* and model.*) must agree."""
    for k in GEOMETRY:
        given = {f"--{k}": flags.get(k)} if flags.get(k) is not None else {}
        given.update({key: v for key, v in opts if key in (f"data.{k}", f"model.{k}")})
        if len({str(v) for v in given.values()}) > 1:
            raise ConfigError(f"the clip geometry is given twice with different values: "
                              f"{', '.join(f'{key} {v}' for key, v in given.items())}")


def validate(cfg):
    """Cross-field checks that would otherwise fail late."""
    if "lr" not in cfg.optimizer.args:
        raise ConfigError("optimizer.args.lr: the learning rate is not set")
    for name in ("optimizer", "disc_optimizer"):
        opt = getattr(cfg, name, None)
        if opt is not None:
            bad = sorted(set(opt.args) - optimizer_args(opt.name))
            if bad:
                raise ConfigError(f"unknown config key '{name}.args.{bad[0]}' (not an argument of {opt.name})")
    choices = (("lr_schedule.name", cfg.lr_schedule.name, ("cosine", "step", "constant")),
               ("train.amp", cfg.train.amp, ("fp32", "bf16", "fp16")),
               ("train.parallel", cfg.train.parallel, ("ddp", "fsdp")),
               ("wandb.mode", cfg.wandb.mode, ("offline", "online", "disabled")))
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not {', '.join(allowed[:-1])} or {allowed[-1]}")
    if cfg.train.parallel == "fsdp":
        if cfg.stage != "ar":
            raise ConfigError("train.parallel: fsdp shards the generator (ar stage); the tokenizer trains with ddp")
        if cfg.train.amp == "fp16":
            raise ConfigError("train.parallel: fsdp runs fp32 or bf16 (train.amp fp16 needs a GradScaler whose "
                              "inf checks are not synchronised over shards); use train.amp bf16")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive integer, got {cfg.batch_size!r}")
    try:
        cfg.eval.sampling
    except ValueError as e:
        raise ConfigError(f"eval.{e}") from None
    if cfg.stage == "ar":
        m = cfg.model
        if m.order not in ("nar", "raster"):
            raise ConfigError(f"model.order: '{m.order}' is not nar or raster")
        if len(m.latent_shape) != 3:
            raise ConfigError(f"model.latent_shape: expected [T, H, W], got {m.latent_shape}")
        if m.frame_prediction and not 0 < m.num_cond_frames < cfg.data.frame_num:
            raise ConfigError(f"model.num_cond_frames: {m.num_cond_frames} must be in 1..frame_num-1")
    elif not cfg.model:
        raise ConfigError("model: the tokenizer stage needs the LARPTokenizer kwargs under 'model:'")
    return cfg


def to_dict(cfg):
    """The config as plain data (what checkpoints and config.yaml store)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
