"""What one call of `sample.py` asks for (`SampleJob`) and the checks and plan made before any model loads.

`sample.py` parses the flags and builds a `SampleJob`; `prepare(job)` validates it against the checkpoints' configs,
the CSV and the output folder, and returns a `SamplePlan`: the run settings (recorded in run_config.json and hashed
into the run id), the dataset and its FVD clip selection. Every problem is a `SampleError` naming the flag, raised
before any model or detector loads.
"""
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from larp.core.checkpoint import checkpoint_kind, expect_kind, local_path, peek_checkpoint
from larp.core.io import expect_path
from larp.core.errors import (CSVError, CSVNotFoundError, CheckpointError, GeometryError, I3DError, SampleError,
                              VideoReadError)
from larp.data.dataset import (FRAME_TRANSFORM, VideoDataset, check_labels, clip_set_name, read_video_csv,
                               resolve_csv, select_fvd_clips)
from larp.metrics.detectors import check_i3d_spec
from larp.models.decode_runner import CAPTURE_MODES
from larp.models.sampling_params import SamplingParams
from larp.models.tokenizer import clip_geometry
from larp.core.safe_load import loaded_spec
from larp.core.utils import DTYPES, dtype_name


MATMUL_PRECISIONS = ("high", "highest")
NLL_KINDS = ("conditional", "class_swapped")


@dataclass(frozen=True)
class SampleJob:
    """One sampling call as typed values (the flags of `sample.py`, same names where they exist).

    The shard is [starting_index, starting_index + num_samples) of the run's [0, num_samples_total)
    (num_samples_total None: num_samples). frame_num / input_size None: the tokenizer's; fvd_size None: input_size
    (64 for frame prediction); i3d None: the default detector (larp.metrics.detectors.check_i3d_spec). `dtype` is
    stored in its canonical spelling (fp32, bf16, fp16). A hub id may pin a revision: `owner/name@COMMIT`.
    trust_checkpoint: also load files that hold more than tensors and plain data, or TorchScript of unknown digest
    (dangerous; see larp/core/safe_load.py).

    Precision as the reference's sample.py: the generator's weights are cast to `dtype` (bf16 by default) and the
    tokenizer runs in `tokenizer_dtype` (None: fp16 class-conditional, fp32 frame prediction). Frame prediction:
    the condition tokens come from the tokenizer's sampling quantiser with per-sample seeds (`argmax_cond`: argmax
    instead) and all decoded frames are scored (`paste_cond_frames`: the real condition frames replace the decoded
    ones first, a deliberate deviation, off by default). `capture`: how the decode passes run
    (larp.models.decoding.generate; not a run setting: graphs replay the eager kernels). `gallery_per_class`: samples
    per class on the run's gallery page (larp.sampling.run_gallery; 0: no page; not a run setting either).
    `matmul_precision`: float32 matmuls of generation and decoding on CUDA, "high" (TF32 allowed, as the reference's
    sample.py sets for its whole run) or "highest" (full fp32); the I3D always runs its own precision (fp32).
    `nll`: the NLL_sampled column, "conditional" (under the sample's class, LARP's definition) or "class_swapped"
    (the reference NAR's published figure: each sample's NLL is taken under the null class with the generator's
    class-dropout probability, a per-sample draw).
    """
    ar_model: str
    tokenizer: str
    output_dir: str
    dataset_csv: str = "ucf101_train.csv"
    num_samples: int = 10000
    num_samples_total: Optional[int] = None
    starting_index: int = 0
    params: SamplingParams = SamplingParams()
    seed: int = 0
    dtype: str = "bf16"
    tokenizer_dtype: Optional[str] = None
    dataset_split_seed: int = 42
    frame_prediction: bool = False
    num_cond_frames: int = 5
    paste_cond_frames: bool = False
    argmax_cond: bool = False
    frame_num: Optional[int] = None
    input_size: Optional[int] = None
    fvd_size: Optional[int] = None
    sample_batch_size: int = 32
    chunk_size: int = 256
    num_workers: int = 2
    i3d: Optional[str] = None
    replace: bool = False
    stats_only: bool = False
    device: str = "auto"
    trust_checkpoint: bool = False
    capture: str = "auto"
    gallery_per_class: int = 4
    matmul_precision: str = "high"
    nll: str = "conditional"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise SampleError(f"--dtype {self.dtype}: expected one of {sorted(DTYPES)}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.tokenizer_dtype is None:
            object.__setattr__(self, "tokenizer_dtype", "fp32" if self.frame_prediction else "fp16")
        if self.tokenizer_dtype not in DTYPES:
            raise SampleError(f"--tokenizer_dtype {self.tokenizer_dtype}: expected one of {sorted(DTYPES)}")
        object.__setattr__(self, "tokenizer_dtype", dtype_name(self.tokenizer_dtype))
        if not self.frame_prediction and (self.paste_cond_frames or self.argmax_cond):
            raise SampleError("--paste_cond_frames and --argmax_cond apply to --frame_prediction only")
        if self.num_samples_total is None:
            object.__setattr__(self, "num_samples_total", self.num_samples)
        total = self.num_samples_total
        if self.num_samples < 1 or self.sample_batch_size < 1 or self.chunk_size < 1:
            raise SampleError("--num_samples, --sample_batch_size and --chunk_size must be >= 1")
        if self.starting_index < 0 or self.starting_index >= total:
            raise SampleError(f"--starting_index {self.starting_index} is outside [0, {total}) "
                              f"(--num_samples_total {total})")
        if self.starting_index + self.num_samples > total:
            raise SampleError(f"--starting_index {self.starting_index} + --num_samples {self.num_samples} "
                              f"exceeds --num_samples_total {total}")
        if self.gallery_per_class < 0:
            raise SampleError(f"--gallery_per_class {self.gallery_per_class}: expected a number of samples >= 0")
        if self.capture not in CAPTURE_MODES:
            raise SampleError(f"--capture {self.capture}: expected one of {CAPTURE_MODES}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise SampleError(f"--matmul_precision {self.matmul_precision}: expected one of {MATMUL_PRECISIONS}")
        if self.nll not in NLL_KINDS:
            raise SampleError(f"--nll {self.nll}: expected one of {NLL_KINDS}")
        if self.frame_prediction and self.nll != "conditional":
            raise SampleError(f"--nll {self.nll} with --frame_prediction: the null-class swap needs a class condition")
        if self.frame_prediction and self.params.cfg_scale != 1.0:
            raise SampleError(f"--cfg_scale {self.params.cfg_scale} with --frame_prediction: classifier-free "
                              f"guidance needs a class condition; use --cfg_scale 1")


@dataclass(frozen=True)
class SamplePlan:
    """What `prepare` found: the run settings, the clips to compare against and the sizes to use.

    Global sample i is conditioned on (and compared with) clip `dataset[chosen[i]]`. `ar_model` / `tokenizer`: the
    local paths to load (a hub id's snapshot folder, fetched once by `prepare`).
    """
    settings: dict
    dataset: Dataset
    chosen: list
    class_names: dict
    fvd_size: int
    i3d_spec: str
    ar_model: str
    tokenizer: str
    stats_meta: dict  # what the run's feature stats record (larp.metrics.fvd.FeatureStats.meta)


def _spec_id(spec):
    """A model/file spec as recorded in the settings: absolute path when local, else the hub id / keyword."""
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def resolve_model(spec, flag):
    """(local path, spec as the settings record it) of a model flag: a hub id is fetched once, here, and recorded
    as `owner/name@COMMIT`, the commit of the snapshot that is then loaded; a local path as itself."""
    if not os.path.exists(spec) and (spec.count("/") != 1 or spec.startswith((".", "/")) or spec.endswith(".pth")):
        raise SampleError(f"--{flag} {spec}: no such file or directory")  # not a hub id either
    try:
        path = local_path(spec)
    except CheckpointError as e:
        raise SampleError(f"--{flag}: {e}") from None
    return path, loaded_spec(spec, path)


def read_model_config(spec, flag, want, trust=False):
    """The config dict of a checkpoint, checked cheaply before any model is built
    (larp.core.checkpoint.peek_checkpoint)
    and required to be a `want` ('tokenizer' or 'generator'). `spec`: a local path (resolve_model); `trust`:
    --trust_checkpoint."""
    try:
        cfg = peek_checkpoint(spec, trust)
    except CheckpointError as e:
        raise SampleError(f"--{flag}: {e}") from None
    try:
        expect_kind(cfg, want, f"--{flag} {spec}")
    except CheckpointError as e:
        swapped = "; are --ar_model and --tokenizer swapped?" if checkpoint_kind(cfg) else ""
        raise SampleError(f"{e}{swapped}") from None
    return cfg


def check_models(job, tok_cfg, ar_cfg):
    """Config-level consistency of tokenizer, generator and job; returns (frame_num, input_size)."""
    try:
        frame_num, input_size = clip_geometry(tok_cfg, job.frame_num, job.input_size)
    except GeometryError as e:
        raise SampleError(str(e)) from None
    if frame_num is None or input_size is None:
        raise SampleError("the tokenizer config has no frame_num/input_size; pass --num_frames/--input_size")
    fp = bool(ar_cfg.get("frame_prediction", ar_cfg.get("model_type") == "frame_pred"))
    if fp != bool(job.frame_prediction):
        raise SampleError(f"--ar_model is a {'frame-prediction' if fp else 'class-conditional'} generator; "
                          f"{'add' if fp else 'remove'} --frame_prediction")
    if job.frame_prediction and not 1 <= job.num_cond_frames < frame_num:
        raise SampleError(f"--num_cond_frames {job.num_cond_frames} must be in [1, {frame_num})")
    shape, n_tok = ar_cfg.get("latent_shape"), tok_cfg.get("bottleneck_token_num")
    if shape and n_tok and int(np.prod(shape)) != n_tok:
        raise SampleError(f"generator grid {list(shape)} has {int(np.prod(shape))} tokens but the tokenizer "
                          f"makes {n_tok}")
    if fp and shape and ar_cfg.get("cls_token_num") and ar_cfg["cls_token_num"] != int(np.prod(shape)) + 1:
        raise SampleError(f"frame-prediction generator has cls_token_num {ar_cfg['cls_token_num']}, "
                          f"expected {int(np.prod(shape)) + 1} (condition tokens + separator)")
    reg = tok_cfg.get("bottleneck", {}).get("args", {}).get("regularizer", {}).get("args", {})
    if reg.get("codebook_size") and ar_cfg.get("vocab_size") and reg["codebook_size"] != ar_cfg["vocab_size"]:
        raise SampleError(f"generator vocab_size {ar_cfg['vocab_size']} != tokenizer codebook_size "
                          f"{reg['codebook_size']}")
    return int(frame_num), int(input_size)


def run_settings(job, frame_num, input_size, fvd_size, csv_paths, i3d_spec):
    """Everything that changes the result: stored in run_config.json and hashed into the run id (an output folder
    of a version without tokenizer_dtype / paste_cond_frames / argmax_cond, whose real clips were resized
    differently, is refused rather than merged)."""
    s = {"ar_model": _spec_id(job.ar_model), "tokenizer": _spec_id(job.tokenizer),
         "dataset_csv": "+".join(os.path.abspath(p) for p in csv_paths),
         "dataset_split_seed": int(job.dataset_split_seed), "num_samples_total": int(job.num_samples_total),
         **job.params.as_dict(), "dtype": dtype_name(job.dtype), "tokenizer_dtype": job.tokenizer_dtype,
         "seed": int(job.seed), "frame_prediction": bool(job.frame_prediction),
         "num_cond_frames": int(job.num_cond_frames) if job.frame_prediction else 0,
         "paste_cond_frames": bool(job.paste_cond_frames), "argmax_cond": bool(job.argmax_cond),
         "num_frames": frame_num, "input_size": input_size, "fvd_size": int(fvd_size), "i3d": _spec_id(i3d_spec),
         "matmul_precision": job.matmul_precision, "nll": job.nll}
    return json.loads(json.dumps(s))


def prepare(job):
    """Validate the job against the checkpoints, the data and the output folder before any model loads.
    Returns the SamplePlan (the caller claims the shard in the output folder with claim_output_dir)."""
    total = job.num_samples_total
    expect_path(job.output_dir, "--output_dir")
    try:
        csv_paths = resolve_csv(job.dataset_csv)
    except CSVNotFoundError as e:
        raise SampleError(f"--dataset_csv {job.dataset_csv}: {e}") from None
    tok_path, tok_spec = resolve_model(job.tokenizer, "tokenizer")
    ar_path, ar_spec = resolve_model(job.ar_model, "ar_model")
    tok_cfg = read_model_config(tok_path, "tokenizer", "tokenizer", job.trust_checkpoint)
    ar_cfg = read_model_config(ar_path, "ar_model", "generator", job.trust_checkpoint)
    frame_num, input_size = check_models(job, tok_cfg, ar_cfg)
    try:
        i3d_spec = check_i3d_spec(job.i3d, job.trust_checkpoint)
    except I3DError as e:
        raise SampleError(f"--i3d: {e}") from None
    fvd_size = job.fvd_size or (64 if job.frame_prediction else input_size)

    try:
        df = read_video_csv(job.dataset_csv)
        if not job.frame_prediction and ar_cfg.get("num_classes"):
            check_labels(df, ar_cfg["num_classes"], job.dataset_csv, f"the generator --ar_model {job.ar_model}")
        dataset = VideoDataset(job.dataset_csv, frame_num=frame_num, input_size=input_size, train=False)
    except (VideoReadError, CSVError) as e:  # the message names the CSV or the video
        raise SampleError(f"--dataset_csv: {e}") from None
    if total > len(dataset):
        raise SampleError(f"--num_samples_total {total} exceeds the {len(dataset)} clips of "
                          f"{frame_num} frames in {job.dataset_csv}")
    chosen = select_fvd_clips(len(dataset), total, seed=job.dataset_split_seed)
    class_names = {int(l): str(a) for l, a in zip(df["label"], df["action"])}

    recorded = dataclasses.replace(job, tokenizer=tok_spec, ar_model=ar_spec)  # hub ids with the commit loaded
    settings = run_settings(recorded, frame_num, input_size, fvd_size, csv_paths, i3d_spec)
    resize = FRAME_TRANSFORM if fvd_size == input_size else \
        f"{FRAME_TRANSFORM} to {input_size}, then bilinear (antialias) to {fvd_size}"
    meta = {"frames": frame_num, "size": int(fvd_size), "resize": resize, "clips": clip_set_name(csv_paths),
            "draw": f"{total} of {len(dataset)} clips, seed {job.dataset_split_seed}"}
    return SamplePlan(settings=settings, dataset=dataset, chosen=chosen, class_names=class_names,
                      fvd_size=int(fvd_size), i3d_spec=i3d_spec, ar_model=ar_path, tokenizer=tok_path,
                      stats_meta=meta)
