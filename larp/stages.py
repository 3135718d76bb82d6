"""What differs between the two training stages: models, data, the per-step function and the evaluation.

`setup(cfg, info, run_dir, note)` returns the `run` dict the loop in larp/training.py drives:
raw_model, model_name, optimizer, scaler, train_set, step_fn(run, batch, step) -> logs,
eval_fn(run, step, preview_dir) -> metrics, window_metrics(run) -> metrics (+ loss_fn, disc_* for the tokenizer).
"""
import hashlib
import json
import math
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from larp import dist, engine
from larp.io import atomic_save
from larp.errors import LarpError


class StageError(LarpError, ValueError):
    """Inconsistent settings found before training starts; the message names them."""


def setup(cfg, info, run_dir, note):
    if cfg["stage"] == "tokenizer":
        return setup_tokenizer(cfg, info, note)
    return setup_ar(cfg, info, run_dir, note)


def _val_videos(cfg, count):
    """`count` evaluation clips spread evenly over the val CSV (the training CSV when none): (B,3,T,S,S), labels."""
    from larp.data.dataset import VideoDataset
    d = cfg["data"]
    ds = VideoDataset(d["val_csv"] or d["csv"], num_frames=d["frame_num"], size=d["input_size"], train=False,
                      skip_bad=d["skip_bad"], cache_dir=d["cache_dir"])
    count = min(count, len(ds))
    idx = np.linspace(0, len(ds) - 1, count).round().astype(int).tolist() if count else []
    items = [ds[i] for i in idx]
    videos = torch.stack([it["video"] for it in items]) if items else None
    return videos, torch.tensor([it["label"] for it in items], dtype=torch.long), ds


def _train_videos(cfg):
    from larp.data.dataset import VideoDataset
    d = cfg["data"]
    return VideoDataset(d["csv"], num_frames=d["frame_num"], size=d["input_size"], train=True, hflip=d["hflip"],
                        skip_bad=d["skip_bad"], cache_dir=d["cache_dir"])


# ---------------------------------------------------------------------------------------------- tokenizer
def setup_tokenizer(cfg, info, note):
    from larp.losses import TokenizerLoss
    from larp.tokenizer import LARPTokenizer
    device = info.device
    if "lr" in cfg["disc_optimizer"]["args"]:
        raise StageError("disc_optimizer.args.lr: the discriminator lr is the generator lr x loss.disc_lr_mult")
    try:
        raw = LARPTokenizer(**cfg["model"]).to(device)
        loss_fn = TokenizerLoss(**cfg["loss"]).to(device)
    except TypeError as e:
        raise StageError(f"model/loss section: {e}") from e
    opt = engine.build_optimizer(raw.parameters(), cfg["optimizer"])
    disc_opt = None
    if loss_fn.discriminator is not None:
        disc_opt = engine.build_optimizer(loss_fn.discriminator.parameters(), cfg["disc_optimizer"])
    val = None
    if info.is_main and cfg["eval"]["num_videos"]:
        val = _val_videos(cfg, cfg["eval"]["num_videos"])[0].to(device)
    return {"raw_model": raw, "model_name": "larp_tokenizer", "optimizer": opt,
            "scaler": engine.make_scaler(cfg["train"]["amp"], device), "loss_fn": loss_fn,
            "disc_optimizer": disc_opt, "disc_scaler": engine.make_scaler(cfg["train"]["amp"], device),
            "disc_lr_mult": loss_fn.disc_lr_mult, "train_set": _train_videos(cfg), "val_videos": val,
            "code_counts": torch.zeros(raw.codebook_size, dtype=torch.long, device=device),
            "cfg": cfg, "device": device, "step_fn": tokenizer_step, "eval_fn": tokenizer_eval,
            "window_metrics": tokenizer_window_metrics}


def tokenizer_step(run, batch, step):
    cfg, device = run["cfg"], run["device"]
    tc = cfg["train"]
    x = batch["video"].to(device, non_blocking=True)  # (B, 3, T, H, W)
    logs, out = engine.tokenizer_generator_step(run["model"], run["loss_fn"], x, step, run["total_steps"],
                                                run["optimizer"], run["scaler"], tc["grad_clip"], tc["amp"], device)
    run["code_counts"] += torch.bincount(out["bottleneck_rep"].flatten(), minlength=run["code_counts"].numel())
    if run["loss_fn"].disc_active(step):
        logs.update(engine.tokenizer_discriminator_step(run["loss_fn"], x, out["reconstruction"], step,
                                                        run["disc_optimizer"], run["disc_scaler"], tc["grad_clip"],
                                                        tc["amp"], device))
    return logs


def tokenizer_window_metrics(run):
    """Codebook usage over all tokens of all ranks since the last log line."""
    counts = run["code_counts"]
    if dist.is_dist():
        torch.distributed.all_reduce(counts)
    usage = engine.code_usage(counts)
    counts.zero_()
    return {"codebook_usage_window": usage}


def tokenizer_eval(run, step, preview_dir):
    if run["val_videos"] is None:
        return {}
    path = os.path.join(preview_dir, f"step_{step:07d}.png")
    return engine.eval_tokenizer(run["raw_model"], run["val_videos"], path, run["cfg"]["train"]["amp"])


# ---------------------------------------------------------------------------------------------- AR
class TokenItems(Dataset):
    """Cached tokens: items {"tokens": (N,) long, "label": int[, "cond": (N,) long]}."""

    def __init__(self, cache):
        self.tokens, self.labels, self.cond = cache["tokens"], cache["labels"], cache.get("cond")

    def __len__(self):
        return self.tokens.shape[0]

    def __getitem__(self, i):
        item = {"tokens": self.tokens[i].long(), "label": int(self.labels[i])}
        if self.cond is not None:
            item["cond"] = self.cond[i].long()
        return item


def load_frozen_tokenizer(cfg, device):
    from larp.tokenizer import LARPTokenizer
    spec = cfg["vae"]["checkpoint"]
    if not spec:
        raise StageError("vae.checkpoint is not set: pass --opts vae.checkpoint <tokenizer dir, checkpoint or hub id>")
    tok = LARPTokenizer.from_pretrained(spec).to(device).eval()
    tok.set_vq_eval_deterministic(True)
    for p in tok.parameters():
        p.requires_grad_(False)
    d = cfg["data"]
    if (tok.frame_num, tok.input_size) != (d["frame_num"], d["input_size"]):
        raise StageError(f"vae.checkpoint {spec} encodes {tok.frame_num}-frame {tok.input_size}px clips but "
                         f"data.frame_num/input_size are {d['frame_num']}/{d['input_size']}")
    return tok


def build_ar_model(cfg, tok):
    from larp.ar import AR_MODELS, build_generator
    m = cfg["model"]
    if m["name"] not in AR_MODELS:
        raise StageError(f"model.name: '{m['name']}' is not one of {sorted(AR_MODELS)}")
    N = tok.bottleneck_token_num
    if math.prod(m["latent_shape"]) != N:
        raise StageError(f"model.latent_shape {m['latent_shape']} has {math.prod(m['latent_shape'])} cells but the "
                         f"tokenizer gives {N} tokens per clip")
    kw = dict(vocab_size=tok.codebook_size, latent_shape=tuple(m["latent_shape"]), max_seq_len=N,
              num_classes=m["num_classes"], frame_prediction=m["frame_prediction"],
              cls_token_num=N + 1 if m["frame_prediction"] else 1)
    kw.update(m["args"])
    try:
        return build_generator(AR_MODELS[m["name"]](), order=m["order"], **kw)  # size preset + overrides
    except (TypeError, ValueError) as e:
        raise StageError(f"model section: {e}") from e


def _fingerprint(tok, spec):
    h = hashlib.sha1(json.dumps(tok.config, sort_keys=True, default=str).encode() + str(spec).encode())
    for k, v in sorted(tok.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def token_cache(cfg, tok, info, run_dir, note):
    """Tokens of every evaluation-mode clip of the training CSV (all non-overlapping windows, center crop),
    encoded once (sharded over ranks) into <run_dir>/token_cache.pt and reused while the tokenizer, clips and
    geometry match."""
    from larp.data.dataset import VideoDataset
    d, m = cfg["data"], cfg["model"]
    ds = VideoDataset(d["csv"], num_frames=d["frame_num"], size=d["input_size"], train=False,
                      skip_bad=d["skip_bad"], cache_dir=d["cache_dir"])
    ncf = m["num_cond_frames"] if m["frame_prediction"] else 0
    meta = {"tokenizer": _fingerprint(tok, cfg["vae"]["checkpoint"]), "clips": hashlib.sha1(
        json.dumps([list(c) for c in ds.clips]).encode()).hexdigest(), "frame_num": d["frame_num"],
        "input_size": d["input_size"], "num_cond_frames": ncf, "encode_dtype": cfg["vae"]["encode_dtype"]}
    path = os.path.join(run_dir, "token_cache.pt")
    if os.path.exists(path):
        cache = torch.load(path, map_location="cpu", weights_only=False)
        if cache.get("meta") == meta:
            note(f"token cache: reusing {path} ({cache['tokens'].shape[0]} clips)")
            return cache
        note(f"token cache: {path} was made with other settings; rebuilding it")
    dist.barrier()
    mine = list(range(info.rank, len(ds), info.world_size))
    loader = DataLoader(torch.utils.data.Subset(ds, mine), batch_size=max(1, cfg["batch_size"] // info.world_size),
                        num_workers=d["num_workers"], shuffle=False)
    toks, conds = [], []
    from tqdm import tqdm
    for batch in tqdm(loader, desc="caching tokens", disable=not info.is_main, dynamic_ncols=True):
        t, c = engine.encode_batch(tok, batch["video"].to(info.device), ncf, cfg["vae"]["encode_dtype"])
        toks.append(t.cpu())
        conds.append(c.cpu() if c is not None else None)
    dtype = torch.int16 if tok.codebook_size <= 32767 else torch.int32
    part = {"index": torch.tensor(mine, dtype=torch.long), "tokens": torch.cat(toks).to(dtype),
            "cond": torch.cat(conds).to(dtype) if ncf else None}
    part_path = os.path.join(run_dir, f".token_cache_part{info.rank}.pt")
    atomic_save(part, part_path)
    dist.barrier()
    if info.is_main:
        parts = [torch.load(os.path.join(run_dir, f".token_cache_part{r}.pt")) for r in range(info.world_size)]
        order = torch.cat([p["index"] for p in parts]).argsort()
        cache = {"meta": meta, "tokens": torch.cat([p["tokens"] for p in parts])[order],
                 "labels": torch.tensor([c[2] for c in ds.clips], dtype=torch.long),
                 "cond": torch.cat([p["cond"] for p in parts])[order] if ncf else None}
        atomic_save(cache, path)
        for r in range(info.world_size):
            os.remove(os.path.join(run_dir, f".token_cache_part{r}.pt"))
        note(f"token cache: wrote {path} ({cache['tokens'].shape[0]} clips)")
    dist.barrier()
    return torch.load(path, map_location="cpu", weights_only=False)


def setup_ar(cfg, info, run_dir, note):
    device, m = info.device, cfg["model"]
    tok = load_frozen_tokenizer(cfg, device)
    raw = build_ar_model(cfg, tok).to(device)
    if cfg["cache_tokens"]:
        if info.is_main:
            os.makedirs(run_dir, exist_ok=True)
        train_set = TokenItems(token_cache(cfg, tok, info, run_dir, note))
        labels = train_set.labels
    else:
        train_set = _train_videos(cfg)
        labels = torch.as_tensor(train_set.df["label"].to_numpy())
    if not m["frame_prediction"] and int(labels.max()) >= m["num_classes"]:
        raise StageError(f"the training CSV has label {int(labels.max())} but model.num_classes is {m['num_classes']}")
    run = {"raw_model": raw, "model_name": m["name"], "tokenizer": tok, "cfg": cfg, "device": device,
           "optimizer": engine.build_optimizer(raw.parameters(), cfg["optimizer"]),
           "scaler": engine.make_scaler(cfg["train"]["amp"], device), "train_set": train_set,
           "step_fn": ar_step, "eval_fn": ar_eval, "window_metrics": lambda run: {}, "val": None}
    ev = cfg["eval"]
    if info.is_main and (ev["num_videos"] or ev["fvd_videos"]):
        videos, labels, val_ds = _val_videos(cfg, ev["num_videos"])
        run["val"] = {"videos": videos, "labels": labels, "dataset": val_ds}
    return run


def _condition(run, videos, labels):
    m = run["cfg"]["model"]
    if not m["frame_prediction"]:
        return labels.to(run["device"])
    return engine.encode_batch(run["tokenizer"], videos.to(run["device"]), m["num_cond_frames"],
                               run["cfg"]["vae"]["encode_dtype"])[1]


def ar_step(run, batch, step):
    cfg, device = run["cfg"], run["device"]
    m, tc = cfg["model"], cfg["train"]
    if "tokens" in batch:
        tokens = batch["tokens"].to(device, non_blocking=True)
        cond = batch["cond"].to(device) if m["frame_prediction"] else batch["label"].to(device)
    else:
        video = batch["video"].to(device, non_blocking=True)
        tokens, cond_tokens = engine.encode_batch(run["tokenizer"], video,
                                                  m["num_cond_frames"] if m["frame_prediction"] else 0,
                                                  cfg["vae"]["encode_dtype"])
        cond = cond_tokens if m["frame_prediction"] else batch["label"].to(device)
    return engine.ar_step(run["model"], tokens, cond, step, run["optimizer"], run["scaler"], tc["grad_clip"],
                          tc["amp"], device)


def ar_eval(run, step, preview_dir):
    val, cfg = run["val"], run["cfg"]
    if val is None:
        return {}
    ev, fp = cfg["eval"], cfg["model"]["frame_prediction"]
    out = {}
    if val["videos"] is not None:
        cond = _condition(run, val["videos"], val["labels"])
        out["val_loss"] = engine.val_loss_ar(run["raw_model"], run["tokenizer"], val["videos"].to(run["device"]), cond,
                                             cfg["vae"]["encode_dtype"])
        engine.eval_ar(run["raw_model"], run["tokenizer"], cond, ev, os.path.join(preview_dir, f"step_{step:07d}.png"),
                       real=val["videos"] if fp else None, labels=val["labels"])
    if ev["fvd_videos"]:
        from larp.data.dataset import select_fvd_clips
        from larp.fvd import load_i3d
        if "detector" not in run:
            run["detector"] = load_i3d(ev["i3d"], device=run["device"], verbose=False)
        ds = val["dataset"]
        idx = select_fvd_clips(len(ds), ev["fvd_videos"])
        items = [ds[i] for i in idx]
        real = torch.stack([it["video"] for it in items]).to(run["device"])
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        cond = _condition(run, real, labels)
        out["fvd"] = engine.small_fvd(run["raw_model"], run["tokenizer"], run["detector"], real, cond, ev,
                                      batch_size=max(1, cfg["batch_size"]), size=ev["fvd_size"])
    return out
