"""Building a training Config (larp/training/config.py) from a YAML file, command-line flags and `--opts key value`:
YAML-typed values, coercion to each field's type, dotted overrides, the geometry given once, validation."""
import copy
import dataclasses
import inspect
import os
import re
import typing

import yaml

from larp.models.generator import ModelArgs
from larp.models.sampling_params import SAMPLING_FIELDS
from larp.training.config import GEOMETRY, STAGES
from larp.core.errors import ConfigError
from larp.training.optim import DECAY_RULES, OPTIMIZERS

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
            if _is_frozen(current):
                setattr(obj, k, _replaced(current, v, stage, key + "."))
            else:
                _fill(current, v, stage, key + ".")
        elif isinstance(current, dict) and isinstance(v, dict):  # merged into the defaults, e.g. optimizer.args
            _merge_dict(current, v)
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _is_frozen(section):
    return type(section).__dataclass_params__.frozen


def _replaced(section, data, stage, prefix):
    """A copy of the frozen dataclass `section` (e.g. eval.sampling, a SamplingParams) with the fields in `data`,
    coerced to their types and checked by the class itself."""
    hints = typing.get_type_hints(type(section))
    values = {}
    for k, v in data.items():
        if k not in hints:
            raise ConfigError(f"unknown config key '{prefix}{k}' (stage {stage})")
        values[k] = _coerce(v, hints[k], prefix + k)
    try:
        return dataclasses.replace(section, **values)
    except ValueError as e:  # "top_p: must be in (0, 1], got 0.0"
        raise ConfigError(f"{prefix}{e}") from None


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
        if dataclasses.is_dataclass(child) and _is_frozen(child) and i == len(keys) - 2:
            setattr(node, k, _replaced(child, {keys[-1]: value}, cfg.stage, ".".join(keys[:-1]) + "."))
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
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder, expected a YAML config file")
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
    _nest_sampling_knobs(data)
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


def _nest_sampling_knobs(data):
    """Configs (and checkpoints) of earlier versions kept the sampling knobs flat in eval (eval.cfg_scale, ...):
    move them into eval.sampling."""
    ev = data.get("eval")
    if isinstance(ev, dict) and any(k in ev for k in SAMPLING_FIELDS):
        nested = ev.setdefault("sampling", {})
        for k in SAMPLING_FIELDS:
            if k in ev:
                nested.setdefault(k, ev.pop(k))


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
               ("optimizer.decay", cfg.optimizer.decay, DECAY_RULES),
               ("train.parallel", cfg.train.parallel, ("ddp", "fsdp")),
               ("train.keep", cfg.train.keep, ("last", "best_val")),
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
    if cfg.train.keep == "best_val" and not (cfg.data.val_csv and cfg.eval.num_videos):
        raise ConfigError("train.keep: best_val needs a validation set: set data.val_csv and eval.num_videos > 0 "
                          "(eval.interval sets how often it compares; 0 = only at the end)")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive integer, got {cfg.batch_size!r}")
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
