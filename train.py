r"""Train the LARP tokenizer or an AR (NAR / raster, class-conditional or frame-prediction) generator.

    python train.py --cfg cfgs/larp_ar.yaml --manualSeed 66667 --tag default --csv_file ucf101_train.csv \
        --out_path save/ --name larp_ar -b 64 -j 8 --frame_num 16 --input_size 128 \
        --opts model.name llama-abs-L optimizer.args.lr 0.0006 vae.checkpoint hywang66/LARP-L-long-tokenizer

The stage comes from the config (`stage: tokenizer|ar`). Launch with torchrun for several processes; -b is the
global batch. A run resumes from <out_path>/<name>/ckpt_latest.pth unless --replace is given; a run that finished
(exported its model) with the same number of steps does nothing.
"""
import os

from larp.core.cli import TRUST_HELP, parser
from larp.core.errors import run_cli


def build_parser():
    p = parser(__doc__)
    p.add_argument("--cfg", required=True, help="YAML config (cfgs/*.yaml)")
    p.add_argument("--manualSeed", type=int, default=None, help="seed (config key seed; default: the config's)")
    p.add_argument("--tag", default=None, help="free-form run tag (wandb tag; default: the config's)")
    p.add_argument("--csv_file", default=None, help="training CSV: path or name under data/metadata/, a+b joins "
                   "(config key data.csv; default: the config's)")
    p.add_argument("--out_path", default="save/", help="runs go to <out_path>/<name>/")
    p.add_argument("--name", default=None, help="run name (default: the config file name)")
    p.add_argument("-b", "--batch_size", type=int, default=None, help="GLOBAL batch size, split over ranks "
                   "(default: the config's batch_size)")
    p.add_argument("-j", "--workers", type=int, default=None, help="data loader workers per process (default: the "
                   "config's data.num_workers)")
    p.add_argument("--frame_num", type=int, default=None, help="frames per clip (default: the config's "
                   "data.frame_num)")
    p.add_argument("--input_size", type=int, default=None, help="clip height = width (default: the config's "
                   "data.input_size)")
    p.add_argument("--cache_tokens", action="store_true", default=None,
                   help="AR: encode the training clips once into <run>/token_cache.pt and train on those tokens "
                        "(default: the config's cache_tokens)")
    p.add_argument("--i3d", default=None, help="detector for the periodic small FVD, e.g. random:112 or a path "
                   "(default: the config's eval.i3d)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--replace", action="store_true", help="start fresh instead of resuming from ckpt_latest.pth")
    p.add_argument("--trust_checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--check", type=int, nargs="?", const=1, default=None, metavar="NPROC",
                   help="check the config, CSVs, listed videos, checkpoints and the batch split over NPROC "
                        "processes in all, every node together (1 when no number is given) without training, then "
                        "exit; the launch scripts run it before torchrun (default: off)")
    p.add_argument("--wandb-upload", dest="wandb_upload", action="store_true",
                   help="log to wandb online (default: offline files under the run folder)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE",
                   help="dotted config overrides with YAML-typed values, e.g. optimizer.args.lr 0.0006")
    return p


def main(args):
    """Train; returns the summary dict on rank 0 (None elsewhere). With --check, only the pre-flight checks.
    User errors raise LarpError subclasses, which the edge below prints as one line."""
    from larp.core import dist  # torch and the models: imported once the flags are parsed
    from larp.core.io import expect_path
    from larp.training.config_build import build_config
    from larp.training.loop import preflight, train
    cfg = build_config(args.cfg, flags=vars(args), opts=args.opts)
    name = args.name or os.path.splitext(os.path.basename(args.cfg))[0]
    run_dir = os.path.join(args.out_path, name)
    expect_path(run_dir, "--out_path/--name")
    if args.check is not None:
        for line in preflight(cfg, run_dir, args.check, replace=args.replace, trust=args.trust_checkpoint):
            print(f"train.py --check: {line}", flush=True)
        print(f"train.py --check: ok ({cfg.stage} stage, global batch {cfg.batch_size} over {args.check} "
              f"process(es))", flush=True)
        return None
    info = dist.init_distributed(args.device)
    try:
        mode = "online" if args.wandb_upload else None
        return train(cfg, run_dir, info, replace=args.replace, wandb_mode=mode, trust=args.trust_checkpoint)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())  # the flags are parsed before torch is imported: --help answers at once
