"""Training stage 2: a NAR or raster generator, teacher-forced on the tokens of a frozen LARP tokenizer.

`ARStage(cfg, model, tokenizer, device)` trains a built generator with no dataset (benchmarks and tests build it
that way); `ARStage.from_config` loads the frozen tokenizer, builds the generator and adds the training set (cached
tokens or clips encoded on the fly) and the evaluation clips. The loop in larp/training.py drives it through
`set_lr`, `step`, `window_metrics`, `evaluate`, `state_dict` and `load_state_dict`.
"""
import hashlib
import json
import math
import os

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from larp import dist
from larp.ar import AR_MODELS, build_generator, generator_from_state
from larp.checkpoint import CheckpointError, describe_checkpoint, expect_kind, peek_checkpoint
from larp.config import StageError
from larp.data.dataset import select_fvd_clips
from larp.fvd import FeatureStats, frechet_distance, load_i3d
from larp.io import atomic_save, resize_video
from larp.optim import build_optimizer, check_finite, make_scaler, optimizer_step, set_lr
from larp.safe_load import load_torch
from larp.stage_data import clip_dataset, eval_clips
from larp.tokenizer import LARPTokenizer
from larp.utils import autocast
from larp.visualize import save_video_grid_png


class ARStage:

    def __init__(self, cfg, model, tokenizer, device):
        m = cfg.model
        self.model, self.tokenizer, self.device, self.model_name = model, tokenizer, device, m.name
        self.amp, self.grad_clip, self.optimizer_cfg = cfg.train.amp, cfg.train.grad_clip, cfg.optimizer
        self.num_cond_frames = m.num_cond_frames if m.frame_prediction else 0
        self.encode_dtype = cfg.vae.encode_dtype
        self.sampling, self.fvd_videos, self.fvd_size, self.i3d = (cfg.eval.sampling, cfg.eval.fvd_videos,
                                                                   cfg.eval.fvd_size, cfg.eval.i3d)
        self.eval_batch = max(1, cfg.batch_size)
        self.evaluates = bool(cfg.eval.num_videos or cfg.eval.fvd_videos)
        self.wrapped = model  # what `step` runs; the loop replaces it by its DDP / FSDP / compiled wrapper
        self.build_optimizer()
        self.scaler = make_scaler(self.amp, device)
        self.train_set, self.detector = None, None
        self.val_videos, self.val_labels, self.val_dataset = None, None, None  # (rank 0) evaluation clips
        self.trust_checkpoint = False  # --trust_checkpoint: also for the FVD detector file

    @classmethod
    def from_config(cls, cfg, info, run_dir, note, trust=False):
        """Frozen tokenizer, generator, training set (token cache or clips) and (rank 0) the evaluation clips.
        `trust` (--trust_checkpoint) lets the files read here hold more than tensors and plain data."""
        tok = load_frozen_tokenizer(cfg.vae.checkpoint, cfg.data, info.device, trust)
        stage = cls(cfg, build_ar_model(cfg.model, tok).to(info.device), tok, info.device)
        stage.trust_checkpoint = trust
        m = cfg.model
        if cfg.cache_tokens:
            if info.is_main:
                os.makedirs(run_dir, exist_ok=True)
            stage.train_set = TokenItems(token_cache(stage, cfg, info, run_dir, note, trust))
            labels = stage.train_set.labels
        else:
            stage.train_set = clip_dataset(cfg.data, cfg.data.csv, train=True)
            labels = torch.as_tensor(stage.train_set.df["label"].to_numpy())
        if not m.frame_prediction and int(labels.max()) >= m.num_classes:
            raise StageError(f"the training CSV has label {int(labels.max())} but model.num_classes is "
                             f"{m.num_classes}")
        if info.is_main and stage.evaluates:
            stage.val_videos, stage.val_labels, stage.val_dataset = eval_clips(cfg.data, cfg.eval.num_videos)
        return stage

    def build_optimizer(self):
        self.optimizer = build_optimizer(self.model.parameters(), self.optimizer_cfg.name, self.optimizer_cfg.args)

    def set_lr(self, lr):
        set_lr(self.optimizer, lr)

    @torch.no_grad()
    def tokens(self, video):
        """Frozen-tokenizer tokens (B, N) of a clip batch."""
        with autocast(video.device, self.encode_dtype):
            return self.tokenizer.encode(video)["bottleneck_rep"]

    @torch.no_grad()
    def condition_tokens(self, video):
        """Frame prediction: the tokens (B, N) of the first frames of each clip, the last one repeated."""
        with autocast(video.device, self.encode_dtype):
            return self.tokenizer.encode_condition(video, self.num_cond_frames)

    def encode(self, video):
        """(tokens, condition tokens or None) of a clip batch."""
        return self.tokens(video), (self.condition_tokens(video) if self.num_cond_frames else None)

    def condition(self, videos, labels):
        """The generator's condition for clips: their labels, or the tokens of their first frames."""
        if not self.num_cond_frames:
            return labels.to(self.device)
        return self.condition_tokens(videos.to(self.device))

    def step(self, batch, step, total_steps):
        """One teacher-forced update; `batch` holds cached tokens or clips to encode first."""
        if "tokens" in batch:
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            cond = batch["cond"].to(self.device) if self.num_cond_frames else batch["label"].to(self.device)
        else:
            tokens, cond_tokens = self.encode(batch["video"].to(self.device, non_blocking=True))
            cond = cond_tokens if self.num_cond_frames else batch["label"].to(self.device)
        with autocast(self.device, self.amp):
            _, loss = self.wrapped(tokens, cond, targets=tokens)
        logs = {"loss": check_finite(loss, step)}
        logs["grad_norm"] = optimizer_step(loss, self.optimizer, self.scaler, self.wrapped.parameters(),
                                           self.grad_clip)
        return logs

    def window_metrics(self):
        return {}

    def evaluate(self, model, step, preview_dir):
        """Validation loss and a sample grid PNG on the evaluation clips; a small FVD when eval.fvd_videos > 0."""
        if self.val_dataset is None:
            return {}
        out = {}
        if self.val_videos is not None:
            cond = self.condition(self.val_videos, self.val_labels)
            out["val_loss"] = self.val_loss(model, self.val_videos.to(self.device), cond)
            self.preview(model, cond, os.path.join(preview_dir, f"step_{step:07d}.png"),
                         real=self.val_videos if self.num_cond_frames else None, labels=self.val_labels)
        if self.fvd_videos:
            if self.detector is None:
                self.detector = load_i3d(self.i3d, device=self.device, verbose=False, trust=self.trust_checkpoint)
            ds = self.val_dataset
            items = [ds[i] for i in select_fvd_clips(len(ds), self.fvd_videos)]
            real = torch.stack([it["video"] for it in items]).to(self.device)
            cond = self.condition(real, torch.tensor([it["label"] for it in items], dtype=torch.long))
            out["fvd"] = self.small_fvd(model, real, cond)
        return out

    @torch.no_grad()
    def val_loss(self, model, videos, cond):
        """Teacher-forced cross-entropy (nats/token) of held-out clips: the generators' validation curve."""
        was_training = model.training
        model.eval()
        tokens = self.tokens(videos)
        _, loss = model(tokens, cond, targets=tokens)
        model.train(was_training)
        return float(loss)

    @torch.no_grad()
    def generate_videos(self, model, cond, seeds):
        """Sample tokens with the eval settings and decode them: (B, 3, T, H, W) in [0, 1]."""
        was_training = model.training
        model.eval()
        tokens = model.generate(cond, self.sampling, seeds=seeds)
        model.train(was_training)
        return self.tokenizer.decode_from_bottleneck(tokens).float().clamp(0, 1)

    def preview(self, model, cond, png_path, real=None, labels=None):
        """Sample grid PNG: one generated video per condition (and its real clip above it, for frame prediction)."""
        fake = self.generate_videos(model, cond, seeds=list(range(cond.shape[0])))
        if real is not None:
            rows = torch.stack([real.to(fake.device).float(), fake], dim=1).flatten(0, 1)
            row_labels = [("real" if i % 2 == 0 else "pred") for i in range(rows.shape[0])]
        else:
            rows, row_labels = fake, [f"class {int(c)}" for c in (labels if labels is not None else cond)]
        save_video_grid_png(rows.cpu(), png_path, row_labels=row_labels)

    @torch.no_grad()
    def small_fvd(self, model, real_videos, cond):
        """FVD between `real_videos` and as many generated ones (same conditions), resized to eval.fvd_size."""
        real_stats, fake_stats = FeatureStats(), FeatureStats()
        size, B = self.fvd_size, self.eval_batch
        for i in range(0, cond.shape[0], B):
            real = real_videos[i:i + B]
            fake = self.generate_videos(model, cond[i:i + B], seeds=list(range(i, i + real.shape[0])))
            if size is not None:
                real, fake = resize_video(real, size), resize_video(fake, size)
            real_stats.add(self.detector(real))
            fake_stats.add(self.detector(fake))
        return frechet_distance(real_stats, fake_stats)

    def unsharded_copy(self, state_dict):
        """An unsharded generator with the weights `state_dict` (rank 0's evaluation copy under FSDP)."""
        return generator_from_state(self.model.args, self.model.order, state_dict, self.device)

    def state_dict(self):
        """What a checkpoint needs besides the model, its optimizer and EMA."""
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt, source):
        if ckpt.get("scaler"):  # empty when saved by a disabled (fp32/bf16) scaler
            self.scaler.load_state_dict(ckpt["scaler"])


# ---------------------------------------------------------------------------------------------- building
def require_tokenizer_spec(spec):
    if not spec:
        raise StageError("vae.checkpoint is not set: pass --opts vae.checkpoint <tokenizer dir, checkpoint or hub id>")


def check_frozen_tokenizer(spec, data, latent_shape, trust=False):
    """Pre-flight: the tokenizer checkpoint `spec` is one, readable, of the config's clip geometry and token count
    (its config only: no weights are read; `trust`: --trust_checkpoint). Returns a line describing it."""
    require_tokenizer_spec(spec)
    try:
        tok = peek_checkpoint(spec, trust)
    except CheckpointError as e:
        raise CheckpointError(f"vae.checkpoint: {e}") from None
    expect_kind(tok, "tokenizer", f"vae.checkpoint {spec}")
    geometry = (tok.get("frame_num"), tok.get("input_size"))
    if None not in geometry:
        check_tokenizer_geometry(spec, *geometry, data)
    n = tok.get("bottleneck_token_num")
    if n:
        check_token_count(latent_shape, n, f"the tokenizer {spec}")
    return f"vae.checkpoint: {spec} ({describe_checkpoint(tok)})"


def load_frozen_tokenizer(spec, data, device, trust=False):
    """The tokenizer `spec` (directory, checkpoint or hub id) in eval mode with deterministic VQ and no grads;
    its clip geometry must be the config's. `trust`: --trust_checkpoint."""
    require_tokenizer_spec(spec)
    tok = LARPTokenizer.from_pretrained(spec, trust=trust).to(device).eval()
    tok.set_vq_eval_deterministic(True)
    for p in tok.parameters():
        p.requires_grad_(False)
    check_tokenizer_geometry(spec, tok.frame_num, tok.input_size, data)
    return tok


def check_tokenizer_geometry(spec, frame_num, input_size, data):
    if (frame_num, input_size) != (data.frame_num, data.input_size):
        raise StageError(f"vae.checkpoint {spec} encodes {frame_num}-frame {input_size}px clips but "
                         f"data.frame_num/input_size are {data.frame_num}/{data.input_size}")


def check_token_count(latent_shape, num_tokens, spec="the tokenizer"):
    if math.prod(latent_shape) != num_tokens:
        raise StageError(f"model.latent_shape {latent_shape} has {math.prod(latent_shape)} cells but "
                         f"{spec} gives {num_tokens} tokens per clip")


def build_ar_model(m, tok):
    """The generator of the config's model section `m` for the tokenizer `tok` (its token count and codebook)."""
    if m.name not in AR_MODELS:
        raise StageError(f"model.name: '{m.name}' is not one of {sorted(AR_MODELS)}")
    N = tok.bottleneck_token_num
    check_token_count(m.latent_shape, N)
    kw = dict(vocab_size=tok.codebook_size, latent_shape=tuple(m.latent_shape), max_seq_len=N,
              num_classes=m.num_classes, frame_prediction=m.frame_prediction,
              cls_token_num=N + 1 if m.frame_prediction else 1)
    kw.update(m.args)
    try:
        return build_generator(AR_MODELS[m.name](), order=m.order, **kw)  # size preset + overrides
    except (TypeError, ValueError) as e:
        raise StageError(f"model section: {e}") from e


# ---------------------------------------------------------------------------------------------- token cache
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
    geometry match. Read back as tensors and plain data only (larp.safe_load; `trust`: --trust_checkpoint)."""
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
    for batch in tqdm(loader, desc="caching tokens", disable=not info.is_main, dynamic_ncols=True):
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
