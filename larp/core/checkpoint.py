"""Checkpoint plumbing shared by the tokenizer and the generators.

Three on-disk layouts are accepted everywhere (see docs/reference.md):
  1. hub-mixin directory: config.json (constructor kwargs) + model.safetensors
  2. NAR tokenizer directory: one *.pth (raw state dict) + one *.json (kwargs)
  3. training checkpoint *.pth: {"model": {"name", "args", "sd"}, "optimizer", ...}
A hub id (owner/name, or owner/name@REVISION to pin a commit) is resolved to a layout-1 directory with
huggingface_hub. *.pth files are read with larp.core.safe_load.load_torch (tensors and plain data only, see
docs/security.md).
"""
import json
import os
import zipfile

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from larp.core.errors import CheckpointError, UnsafeFileError
from larp.core.io import atomic_write, atomic_write_text
from larp.core.safe_load import load_torch, split_hub_spec


def strip_prefixes(sd):
    """Remove wrappers' prefixes (torch.compile `_orig_mod.`, DDP `module.`)."""
    out = {}
    for k, v in sd.items():
        for p in ("_orig_mod.", "module."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_state_dict_strict(model, sd, source="checkpoint"):
    """Strict load whose error names missing/unexpected keys and shape mismatches."""
    sd = check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def check_state_dict(model, sd, source="checkpoint"):
    """`sd` without wrapper prefixes; a CheckpointError names missing/unexpected keys and shape mismatches."""
    sd = strip_prefixes(sd)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def short(xs):
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys [{short(missing)}]")
        if unexpected:
            parts.append(f"unexpected keys [{short(unexpected)}]")
        if shapes:
            parts.append(f"shape mismatches [{short(shapes)}]")
        raise CheckpointError(f"{source}: state dict does not match the model: " + "; ".join(parts))
    return sd


def _first_line(e):
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


TRUNCATED_HINT = "truncated or corrupt (an interrupted download, copy or write?)"


def load_safetensors(path):
    path = os.fspath(path)
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError: header too small, invalid header length, incomplete metadata
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)}); {TRUNCATED_HINT}") from e


def check_weights_file(path):
    """Cheap integrity check of a weights file without reading the tensors: a safetensors header must cover
    the whole file; a torch.save zip archive must have its central directory (both fail when truncated)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            with safe_open(path, "pt") as f:
                f.keys()
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)}); "
                                  f"{TRUNCATED_HINT}") from e
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)}); "
                                  f"{TRUNCATED_HINT}") from e
    elif head[:1] != b"\x80":  # neither a zip archive (torch.save) nor a legacy pickle
        raise CheckpointError(f"{path}: not a torch checkpoint (expected a torch.save file: a zip archive"
                              f"{', empty file' if not head else ''}); {TRUNCATED_HINT}")


def read_config_json(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({_first_line(e)})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object of model settings, got {type(cfg).__name__}")
    return cfg


def checkpoint_kind(cfg):
    """'tokenizer', 'generator' or None (not recognised), from a checkpoint's config dict."""
    name = str(cfg.get("__name__") or "")
    if name in ("larp_tokenizer", "larp") or "bottleneck_token_num" in cfg or "bottleneck" in cfg:
        return "tokenizer"
    if name.startswith("llama") or "vocab_size" in cfg or "n_layer" in cfg:
        return "generator"
    return None


def describe_checkpoint(cfg):
    """'a LARP tokenizer', 'a class-conditional NAR generator', 'a frame-prediction raster generator' or None."""
    kind = checkpoint_kind(cfg)
    if kind == "tokenizer":
        return "a LARP tokenizer"
    if kind == "generator":
        fp = bool(cfg.get("frame_prediction", cfg.get("model_type") == "frame_pred"))
        order = cfg.get("order") or ("nar" if cfg.get("latent_shape") else "raster")
        return f"a {'frame-prediction' if fp else 'class-conditional'} {'NAR' if order == 'nar' else order} generator"
    return None


def expect_kind(cfg, want, source):
    """Raise a CheckpointError naming `source` unless its config is a `want` ('tokenizer' or 'generator')."""
    kind = checkpoint_kind(cfg)
    if kind == want:
        return
    expected = "a LARP tokenizer" if want == "tokenizer" else "a generator (NAR or raster)"
    if kind is None:
        raise CheckpointError(f"{source}: its config has neither tokenizer nor generator keys, expected {expected}")
    raise CheckpointError(f"{source}: holds {describe_checkpoint(cfg)}, expected {expected}")


def save_hub_dir(directory, config, state_dict):
    """Write the hub-mixin layout: config.json + model.safetensors (atomically)."""
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_file(sd, tmp))
    atomic_write_text(os.path.join(directory, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_hub_id(name):
    """Download (or find in the offline cache) a hub repo, `owner/name` or `owner/name@REVISION`; return its local
    directory (huggingface_hub's snapshots/<commit>/)."""
    try:  # lazy: a slow import (network stack) needed only for hub ids
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise CheckpointError(f"{name}: not a local path, and huggingface_hub is not installed") from e
    repo, revision = split_hub_spec(name)
    try:
        return snapshot_download(repo_id=repo, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.pth", "*.bin"])
    except Exception as e:
        raise CheckpointError(
            f"{name}: not a local path and could not be fetched from the hub "
            f"({type(e).__name__}); download it on a machine with network access and pass the local "
            f"directory, or set HF_HUB_OFFLINE=1 with a warm cache") from e


def local_path(spec):
    """`spec` as an existing local path: itself, or the snapshot folder of a hub id (`owner/name`)."""
    path = os.fspath(spec)
    if os.path.exists(path):
        return path
    if path.count("/") == 1 and not path.startswith((".", "/")) and not path.endswith((".pth", ".pt", ".json")):
        return resolve_hub_id(path)
    raise CheckpointError(f"{path}: no such file or directory")


def peek_checkpoint(spec, trust=False):
    """The config dict of a checkpoint without reading the tensors of a hub-style folder (its weights files are
    checked for truncation: header / zip directory); training *.pth files are read whole (`trust`: see
    read_checkpoint). Raises CheckpointError."""
    path = local_path(spec)
    jsons = sorted(p for p in os.listdir(path) if p.endswith(".json")) if os.path.isdir(path) else []
    if not (os.path.isdir(path) and ("config.json" in jsons or len(jsons) == 1)):
        return read_checkpoint(path, trust)[0]
    cfg = read_config_json(os.path.join(path, "config.json" if "config.json" in jsons else jsons[0]))
    weights = sorted(p for p in os.listdir(path) if p.endswith((".safetensors", ".pth")))
    if not weights:
        raise CheckpointError(f"{path}: no model.safetensors or *.pth weights beside {jsons[0]}")
    for name in weights:
        check_weights_file(os.path.join(path, name))
    return cfg


def read_checkpoint(spec, trust=False):
    """Resolve `spec` to (config dict, state dict, layout name).

    `config` is the constructor kwargs / model args; for training checkpoints the
    size name is returned as config["__name__"] when present. Every failure is a CheckpointError naming the file
    and what was expected, except a *.pth that needs more than tensors and plain data: UnsafeFileError, unless
    `trust` (--trust_checkpoint) lets larp.core.safe_load.load_torch read it anyway.
    """
    spec = local_path(spec)
    if os.path.isdir(spec):
        return _read_folder(spec, trust)
    if spec.endswith(".safetensors"):
        cfg_path = os.path.join(os.path.dirname(spec), "config.json")
        if not os.path.exists(cfg_path):
            raise CheckpointError(f"{spec}: no config.json beside it")
        return read_config_json(cfg_path), load_safetensors(spec), "hub"
    if spec.endswith(".json"):
        raise CheckpointError(f"{spec}: a config alone; pass its folder (config.json + model.safetensors)")
    return _read_training_checkpoint(spec, trust)


def read_pth(path, trust, unreadable):
    """A *.pth file checked for truncation and read through larp.core.safe_load.load_torch (`trust`:
    --trust_checkpoint). A file that cannot be read is a CheckpointError `<path>: <unreadable> (<cause>)`; one
    refused as unsafe stays an UnsafeFileError."""
    check_weights_file(path)
    try:
        return load_torch(path, trust)
    except UnsafeFileError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: {unreadable} ({_first_line(e)})") from e


def _read_folder(spec, trust=False):
    """(config, state dict, layout) of a hub-mixin folder or a *.pth + *.json folder."""
    cfg_path = os.path.join(spec, "config.json")
    st_path = os.path.join(spec, "model.safetensors")
    if os.path.exists(cfg_path) and os.path.exists(st_path):
        return read_config_json(cfg_path), load_safetensors(st_path), "hub"
    pths = sorted(p for p in os.listdir(spec) if p.endswith(".pth"))
    jsons = sorted(p for p in os.listdir(spec) if p.endswith(".json"))
    if len(pths) == 1 and len(jsons) == 1:
        cfg = read_config_json(os.path.join(spec, jsons[0]))
        pth = os.path.join(spec, pths[0])
        return cfg, read_pth(pth, trust, "not a readable state dict"), "pth_json"
    raise CheckpointError(
        f"{spec}: expected config.json + model.safetensors, or exactly one *.pth + one *.json "
        f"(found {len(pths)} .pth, {len(jsons)} .json)")


def _read_training_checkpoint(spec, trust=False):
    """(args with the size name as "__name__", state dict, "train_ckpt") of a training checkpoint file."""
    ckpt = read_pth(spec, trust, "cannot be read as a torch checkpoint")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and "sd" in ckpt["model"]:
        m = ckpt["model"]
        cfg = dict(m.get("args") or {})
        if m.get("name") is not None:
            cfg["__name__"] = m["name"]
        return cfg, m["sd"], "train_ckpt"
    raise CheckpointError(f"{spec}: unknown checkpoint layout (expected a training checkpoint "
                          f"{{'model': {{'name', 'args', 'sd'}}}}, a config.json + model.safetensors folder or a "
                          f"*.pth + *.json folder)")
