"""Checkpoint plumbing shared by the tokenizer and the generators.

Three on-disk layouts are accepted everywhere (see docs/reference.md):
  1. hub-mixin directory: config.json (constructor kwargs) + model.safetensors
  2. NAR tokenizer directory: one *.pth (raw state dict) + one *.json (kwargs)
  3. training checkpoint *.pth: {"model": {"name", "args", "sd"}, "optimizer", ...}
A hub id (owner/name) is resolved to a layout-1 directory with huggingface_hub.
"""
import json
import os
import tempfile

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or keys."""


def atomic_write(path, write):
    """Call write(tmp_path) on a temp file beside `path` (same suffix), then rename it over `path`.

    Readers never see a half-written file, and a failed write leaves the old file untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj, path):
    """torch.save, atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)


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


def load_safetensors(path):
    from safetensors.torch import load_file
    return load_file(os.fspath(path))


def save_hub_dir(directory, config, state_dict):
    """Write the hub-mixin layout: config.json + model.safetensors (atomically)."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(os.path.join(directory, "model.safetensors"), lambda tmp: save_file(sd, tmp))
    atomic_write_text(os.path.join(directory, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_hub_id(name):
    """Download (or find in the offline cache) a hub repo; return its local directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise CheckpointError(f"{name}: not a local path, and huggingface_hub is not installed") from e
    try:
        return snapshot_download(repo_id=name, allow_patterns=["*.json", "*.safetensors", "*.pth", "*.bin"])
    except Exception as e:
        raise CheckpointError(
            f"{name}: not a local path and could not be fetched from the hub "
            f"({type(e).__name__}); download it on a machine with network access and pass the local "
            f"directory, or set HF_HUB_OFFLINE=1 with a warm cache") from e


def read_checkpoint(spec):
    """Resolve `spec` to (config dict, state dict, layout name).

    `config` is the constructor kwargs / model args; for training checkpoints the
    size name is returned as config["__name__"] when present.
    """
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        if spec.count("/") == 1 and not spec.startswith((".", "/")) and not spec.endswith((".pth", ".pt", ".json")):
            spec = resolve_hub_id(spec)
        else:
            raise CheckpointError(f"{spec}: no such file or directory")
    if os.path.isdir(spec):
        cfg_path = os.path.join(spec, "config.json")
        st_path = os.path.join(spec, "model.safetensors")
        if os.path.exists(cfg_path) and os.path.exists(st_path):
            with open(cfg_path) as f:
                return json.load(f), load_safetensors(st_path), "hub"
        pths = sorted(p for p in os.listdir(spec) if p.endswith(".pth"))
        jsons = sorted(p for p in os.listdir(spec) if p.endswith(".json"))
        if len(pths) == 1 and len(jsons) == 1:
            with open(os.path.join(spec, jsons[0])) as f:
                cfg = json.load(f)
            sd = torch.load(os.path.join(spec, pths[0]), map_location="cpu", weights_only=True)
            return cfg, sd, "pth_json"
        raise CheckpointError(
            f"{spec}: expected config.json + model.safetensors, or exactly one *.pth + one *.json "
            f"(found {len(pths)} .pth, {len(jsons)} .json)")
    if spec.endswith(".safetensors"):
        cfg_path = os.path.join(os.path.dirname(spec), "config.json")
        if not os.path.exists(cfg_path):
            raise CheckpointError(f"{spec}: no config.json beside it")
        with open(cfg_path) as f:
            return json.load(f), load_safetensors(spec), "hub"
    try:
        ckpt = torch.load(spec, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{spec}: cannot be read as a torch checkpoint ({e})") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and "sd" in ckpt["model"]:
        m = ckpt["model"]
        cfg = dict(m.get("args") or {})
        if m.get("name") is not None:
            cfg["__name__"] = m["name"]
        return cfg, m["sd"], "train_ckpt"
    raise CheckpointError(f"{spec}: not a training checkpoint (expected {{'model': {{'name', 'args', 'sd'}}}})")
