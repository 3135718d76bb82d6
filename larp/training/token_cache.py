"""The AR stage's token cache: the frozen tokenizer's tokens of every training clip, encoded once (sharded over
ranks) into <run_dir>/token_cache.pt and reused while the tokenizer, the clips and the geometry match."""
import hashlib
import json
import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from larp.core import dist
from larp.core.io import atomic_save
from larp.core.safe_load import load_torch
from larp.core.utils import progress_bar
from larp.training.stage_data import clip_dataset


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


def _fingerprint(tok, spec):
    h = hashlib.sha1(json.dumps(tok.config, sort_keys=True, default=str).encode() + str(spec).encode())
    for k, v in sorted(tok.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def token_cache(stage, cfg, info, run_dir, note, trust=False):
    """Tokens of every evaluation-mode clip of the training CSV (all non-overlapping windows, center crop),
    encoded once (sharded over ranks) into <run_dir>/token_cache.pt and reused while the tokenizer, clips and
    geometry match. Read back as tensors and plain data only (larp/core/safe_load.py; `trust`: --trust_checkpoint)."""
    d = cfg.data
    ds = clip_dataset(d, d.csv, train=False)
    ncf = stage.num_cond_frames
    meta = {"tokenizer": _fingerprint(stage.tokenizer, cfg.vae.checkpoint), "clips": hashlib.sha1(
        json.dumps([list(c) for c in ds.clips]).encode()).hexdigest(), "frame_num": d.frame_num,
        "input_size": d.input_size, "num_cond_frames": ncf, "encode_dtype": cfg.vae.encode_dtype}
    path = os.path.join(run_dir, "token_cache.pt")
    if os.path.exists(path):
        cache = load_torch(path, trust)
        if cache.get("meta") == meta:
            note(f"token cache: reusing {path} ({cache['tokens'].shape[0]} clips)")
            return cache
        note(f"token cache: {path} was made with other settings; rebuilding it")
    dist.barrier()
    mine = list(range(info.rank, len(ds), info.world_size))
    loader = DataLoader(Subset(ds, mine), batch_size=max(1, cfg.batch_size // info.world_size),
                        num_workers=d.num_workers, shuffle=False)
    toks, conds = [], []
    for batch in progress_bar(loader, desc="caching tokens", disable=not info.is_main, dynamic_ncols=True):
        t, c = stage.encode(batch["video"].to(info.device))
        toks.append(t.cpu())
        conds.append(c.cpu() if c is not None else None)
    dtype = torch.int16 if stage.tokenizer.codebook_size <= 32767 else torch.int32
    part = {"index": torch.tensor(mine, dtype=torch.long), "tokens": torch.cat(toks).to(dtype),
            "cond": torch.cat(conds).to(dtype) if ncf else None}
    part_path = os.path.join(run_dir, f".token_cache_part{info.rank}.pt")
    atomic_save(part, part_path)
    dist.barrier()
    if info.is_main:
        parts = [load_torch(os.path.join(run_dir, f".token_cache_part{r}.pt"), trust) for r in range(info.world_size)]
        order = torch.cat([p["index"] for p in parts]).argsort()
        cache = {"meta": meta, "tokens": torch.cat([p["tokens"] for p in parts])[order],
                 "labels": torch.tensor([c[2] for c in ds.clips], dtype=torch.long),
                 "cond": torch.cat([p["cond"] for p in parts])[order] if ncf else None}
        atomic_save(cache, path)
        for r in range(info.world_size):
            os.remove(os.path.join(run_dir, f".token_cache_part{r}.pt"))
        note(f"token cache: wrote {path} ({cache['tokens'].shape[0]} clips)")
    dist.barrier()
    return load_torch(path, trust)
