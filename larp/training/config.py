"""Training configuration: nested dataclasses, filled from a YAML file, command-line flags and `--opts key value`.

Each section is a dataclass (this module), so a key that is not a field is an error naming it, and every value is coerced to its
field's type (an int where a float is expected becomes a float, a string where an int is expected is an error).
Four sections are open-ended dicts, checked against what consumes them:
  * the tokenizer's `model:` (LARPTokenizer kwargs, the layout of the released config.json) and `loss:`
    (TokenizerLoss kwargs): the YAML holds the whole dict, so `--opts` may only change keys it has;
  * the generator's `model.args:` (ModelArgs fields);
  * every `optimizer.args:` (keyword arguments of the optimizer class).
The clip geometry (frame_num, input_size) is stored once, in `data`; the tokenizer's `model:` section may name it
(the released layout does), which sets `data` and is checked for agreement. Checkpoints store `to_dict(cfg)`.
Reading a config (YAML, flags, --opts, coercion, validation) is larp/training/config_build.py.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import yaml

from larp.models.sampling_params import SamplingParams


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
    # which parameters get args.weight_decay (larp.training.optim.param_groups): linear = the weights of nn.Linear
    # layers only (the reference's AR trainers); all = every parameter (its tokenizer and discriminator optimizers)
    decay: str = "linear"


@dataclass
class LRScheduleConfig:
    name: str = "cosine"      # cosine | step | constant
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # when > 0: the warmup in epochs (x steps per epoch), instead of warmup_steps
    warmup_from_min: bool = False  # warm up linearly from the floor base_lr * min_lr_ratio (the reference), not 0
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
    keep: str = "last"         # the exported weights: last | best_val (best validation metric; larp/training/keep_best.py)


@dataclass
class EvalConfig:
    interval: int = 0          # steps between evaluations (0 = only at the end)
    num_videos: int = 8        # clips for PSNR / previews / sample grid
    fvd_videos: int = 0        # ar only: generated videos for a small FVD (0 = off)
    i3d: Optional[str] = "random:112"  # detector for the small FVD (larp.metrics.detectors.load_i3d; null: the default one)
    fvd_size: Optional[int] = None  # resize real and generated clips to this size for FVD (64 for K600)
    # the sampling knobs of the previews and the small FVD (eval.sampling.cfg_scale, ...; see SamplingParams)
    sampling: SamplingParams = field(default_factory=SamplingParams)


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
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(decay="all"))
    # lr = generator lr (with its schedule) x loss.disc_lr_mult
    disc_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        args={"betas": [0.5, 0.9], "weight_decay": 0.0}, decay="all"))

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


def to_dict(cfg):
    """The config as plain data (what checkpoints and config.yaml store)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg):
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
