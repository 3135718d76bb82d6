r"""Sample videos from a trained generator and compute FVD against the same real clips.

Class-conditional (UCF-101 protocol, 10,000 clips):
  python sample.py --ar_model hywang66/LARP-L-long-AR --tokenizer hywang66/LARP-L-long-tokenizer \
      --output_dir samples/larp_l --num_samples 10000 --sample_batch_size 64 --cfg_scale 1.25 \
      --dataset_csv ucf101_train.csv --dtype bfloat16
Parallel shards (any order, any machines, same --output_dir); the last one to finish computes the FVD:
  python sample.py ... --num_samples 2500 --num_samples_total 10000 --starting_index 0|2500|5000|7500
  torchrun --nproc_per_node 8 sample.py ...   (ranks split this process's range)
Frame prediction (K600, 5 conditioning frames, all 16 decoded frames scored at 64x64): add --frame_prediction
(and --cfg_scale 1).
Hub ids may be pinned to a commit (--ar_model_revision / --tokenizer_revision, or owner/name@COMMIT); the run
settings and the report row record the commit actually loaded. Files are read safely (docs/security.md).

Outputs (sampled_videos/, samples.csv, preview.png, gallery.html, fvd_report.csv, timing.json), resuming and the
seeding rule are described in larp/sampling/run.py; the checks made before any model loads in larp/sampling/job.py.
"""
from larp.core.cli import TRUST_HELP, parser
from larp.core.errors import SampleError, run_cli
from larp.models.sampling_params import SamplingParams  # plain dataclass: no torch, no networks


def build_parser():
    p = parser(__doc__)
    p.add_argument("--ar_model", required=True, help="generator: hub id, hub-style dir or training .pth")
    p.add_argument("--tokenizer", required=True, help="LARP tokenizer: hub id, hub-style dir, .pth+.json dir")
    p.add_argument("--ar_model_revision", default=None, help="hub commit of --ar_model (a hub id)")
    p.add_argument("--tokenizer_revision", default=None, help="hub commit of --tokenizer (a hub id)")
    p.add_argument("--trust_checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--output_dir", required=True, help="folder of this run (videos, stats, report); shards of one "
                   "run share it")
    p.add_argument("--num_samples", type=int, default=10000, help="samples of this shard")
    p.add_argument("--num_samples_total", type=int, default=None, help="samples of the whole run "
                   "(default: --num_samples, with --starting_index 0)")
    p.add_argument("--starting_index", type=int, default=0, help="first global sample index of this shard")
    p.add_argument("--sample_batch_size", type=int, default=32, help="videos generated per batch")
    SamplingParams.add_arguments(p)  # --cfg_scale --cfg_interval --temperature --top_k --top_p
    p.add_argument("--dtype", default="bf16", help="the generator's weights are cast to it (the reference's default, "
                   "bfloat16): fp32, bf16 or fp16 (float32, bfloat16, float16 also accepted)")
    p.add_argument("--tokenizer_dtype", default=None, help="the tokenizer's weights are cast to it: fp32, bf16 or "
                   "fp16 (default as the reference: fp16 class-conditional, fp32 frame prediction)")
    p.add_argument("--matmul_precision", default="high", choices=["high", "highest"],
                   help="float32 matmuls of generation and decoding on CUDA: high = TF32 allowed (the reference's "
                   "sample.py), highest = full fp32; the I3D keeps fp32 either way (default: %(default)s)")
    p.add_argument("--nll", default="conditional", choices=["conditional", "class_swapped"],
                   help="the NLL column: conditional = under each sample's class; class_swapped = the reference "
                   "NAR's published NLL_sampled (a class-dropout share of samples scored under the null class)")
    p.add_argument("--capture", default="auto", help="how each decode pass runs: auto = recorded once as a CUDA "
                   "graph and replayed on CUDA, eager elsewhere; graph; compile (torch.compile, or compile:<backend>); "
                   "eager")
    p.add_argument("--no_compile", dest="capture", action="store_const", const="eager",
                   help="decode eagerly (the same as --capture eager)")
    p.add_argument("--dataset_csv", default="ucf101_train.csv", help="CSV path or name under data/metadata/")
    p.add_argument("--dataset_split_seed", type=int, default=42, help="seed of the FVD clip selection")
    p.add_argument("--frame_prediction", action="store_true", help="frame prediction (K600): condition on the "
                   "first --num_cond_frames frames of each clip instead of its class")
    p.add_argument("--num_cond_frames", type=int, default=5, help="frame prediction: conditioning frames")
    p.add_argument("--paste_cond_frames", action="store_true", help="frame prediction: score (and save) the "
                   "generated clip with its conditioning frames replaced by the real ones (not the reference "
                   "protocol, which scores all decoded frames; lowers the FVD)")
    p.add_argument("--argmax_cond", action="store_true", help="frame prediction: condition tokens by argmax VQ "
                   "(the reference samples them; here from per-sample seeds)")
    p.add_argument("--stats_only", action="store_true", help="do not write mp4 files")
    p.add_argument("--gallery_per_class", type=int, default=4, help="samples per class shown (with their real "
                   "clips) on <output_dir>/gallery.html, which is updated as shards finish; 0: no gallery")
    p.add_argument("--replace", action="store_true", help="redo ranges whose stats already exist")
    p.add_argument("--chunk_size", type=int, default=256, help="samples per saved chunk: a killed shard resumes "
                   "from its last finished chunk (keep it fixed for bit-identical reruns)")
    p.add_argument("--i3d", default=None, help="I3D detector: kinetics400, torchscript/state-dict path, `random` "
                   "or `random:S` (default: $LARP_I3D, else checkpoints/i3d_torchscript.pt, else kinetics400)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed * 1_000_003 + i")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--num_frames", type=int, default=None, help="clip length (default: the tokenizer's)")
    p.add_argument("--input_size", type=int, default=None, help="frame size (default: the tokenizer's)")
    p.add_argument("--fvd_size", type=int, default=None, help="real and generated frames are resized to this for "
                   "FVD (default: the input size; 64 for frame prediction)")
    p.add_argument("--num_workers", type=int, default=2, help="data loader worker processes")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def make_job(args):
    """The typed SampleJob of the parsed flags: argparse stays here, the library sees typed values only."""
    from larp.core.safe_load import with_revision  # imports torch: after the flags are parsed
    from larp.sampling.job import SampleJob
    try:
        params = SamplingParams.from_args(args)
    except ValueError as e:  # "temperature: must be >= 0 (0 = greedy), got -1.0"
        raise SampleError(f"--{e}") from None
    ar_model = with_revision(args.ar_model, args.ar_model_revision, "--ar_model_revision")
    tokenizer = with_revision(args.tokenizer, args.tokenizer_revision, "--tokenizer_revision")
    return SampleJob(ar_model=ar_model, tokenizer=tokenizer, output_dir=args.output_dir,
                     dataset_csv=args.dataset_csv, num_samples=args.num_samples,
                     num_samples_total=args.num_samples_total, starting_index=args.starting_index, params=params,
                     seed=args.seed, dtype=args.dtype, tokenizer_dtype=args.tokenizer_dtype,
                     dataset_split_seed=args.dataset_split_seed, frame_prediction=args.frame_prediction,
                     num_cond_frames=args.num_cond_frames, paste_cond_frames=args.paste_cond_frames,
                     argmax_cond=args.argmax_cond,
                     frame_num=args.num_frames, input_size=args.input_size, fvd_size=args.fvd_size,
                     sample_batch_size=args.sample_batch_size, chunk_size=args.chunk_size,
                     num_workers=args.num_workers, i3d=args.i3d, replace=args.replace, stats_only=args.stats_only,
                     device=args.device, trust_checkpoint=args.trust_checkpoint, capture=args.capture,
                     gallery_per_class=args.gallery_per_class, matmul_precision=args.matmul_precision,
                     nll=args.nll)


def main(args):
    """Sample and score one shard; returns the FVD once the whole run is covered, else None."""
    from larp.sampling import run as sampling
    return sampling.run(make_job(args))


if __name__ == "__main__":
    run_cli(main, parse_args())  # the flags are parsed before torch is imported: --help answers at once
