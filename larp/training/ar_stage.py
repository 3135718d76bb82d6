"""Training stage 2: a NAR or raster generator, teacher-forced on the tokens of a frozen LARP tokenizer.

`ARStage(cfg, model, tokenizer, device)` trains a built generator with no dataset (benchmarks and tests build it
that way); `ARStage.from_config` loads the frozen tokenizer, builds the generator and adds the training set (cached
tokens or clips encoded on the fly) and the evaluation clips. The loop in larp/training/loop.py drives it through
`set_lr`, `step`, `window_metrics`, `evaluate`, `state_dict` and `load_state_dict`.
"""
import os

import torch

from larp.core.utils import autocast
from larp.core.visualize import save_preview_png
from larp.data.dataset import check_labels, select_fvd_clips
from larp.metrics.detectors import check_i3d_spec, load_i3d
from larp.metrics.fvd import FeatureStats, frechet_distance
from larp.core.io import resize_video
from larp.models.decoding import generate
from larp.models.generator import AR_MODELS, build_generator, generator_from_state
from larp.core.errors import StageError
from larp.training.frozen_tokenizer import check_frozen_tokenizer, check_token_count, load_frozen_tokenizer
from larp.training.optim import build_optimizer, check_finite, make_scaler, optimizer_step, set_lr
from larp.training.stage_data import clip_dataset, eval_clips
from larp.training.token_cache import TokenItems, token_cache

class ARStage:
    KEEP_METRIC = ("val_loss", "min")  # train.keep best_val keeps the lowest validation loss

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
        self.class_names = {}  # label -> the `action` of the evaluation CSV, for the preview rows

    @staticmethod
    def check_csv(cfg, df, csv):
        """Pre-flight of a CSV the stage will read: class labels within model.num_classes."""
        if not cfg.model.frame_prediction:
            check_labels(df, cfg.model.num_classes, csv, "model.num_classes")

    @staticmethod
    def preflight(cfg, trust=False):
        """Pre-flight of the frozen tokenizer and of the small-FVD detector (`trust`: --trust_checkpoint); returns
        lines to print."""
        notes = [check_frozen_tokenizer(cfg.vae.checkpoint, cfg.data, cfg.model.latent_shape, trust)]
        if cfg.eval.fvd_videos:
            check_i3d_spec(cfg.eval.i3d, trust)
        return notes

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
            df = stage.val_dataset.df
            stage.class_names = {int(label): str(name) for label, name in zip(df["label"], df["action"])}
        return stage

    def build_optimizer(self):
        self.optimizer = build_optimizer(self.model, self.optimizer_cfg)

    def set_lr(self, lr):
        set_lr(self.optimizer, lr)

    @torch.no_grad()
    def tokens(self, video):
        """Frozen-tokenizer tokens (B, N) of a clip batch."""
        with autocast(video.device, self.encode_dtype):
            return self.tokenizer.encode(video, losses=False)["bottleneck_rep"]

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
        # eager: FSDP gathers the weights into new memory at every forward, which a recorded CUDA graph would miss
        tokens = generate(model, cond, self.sampling, seeds=seeds, capture="eager")
        model.train(was_training)
        return self.tokenizer.decode_from_bottleneck(tokens).float().clamp(0, 1)

    def preview(self, model, cond, png_path, real=None, labels=None):
        """Sample grid PNG: one generated video per condition (and its real clip above it, for frame prediction)."""
        fake = self.generate_videos(model, cond, seeds=list(range(cond.shape[0])))
        if real is not None:
            save_preview_png(png_path, fake, [""] * fake.shape[0], real=real)
        else:
            names = [self.class_name(int(c)) for c in (labels if labels is not None else cond)]
            save_preview_png(png_path, fake, names)

    def class_name(self, label):
        """The CSV's action name of a class (as sampling previews show it); `class N` where the CSV has none."""
        name = self.class_names.get(label)
        return name if name and name != str(label) else f"class {label}"

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
