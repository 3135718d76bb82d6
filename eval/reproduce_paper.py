"""The papers' table in one command: every published number with the paper's protocol, ours beside it.

    python eval/reproduce_paper.py --out paper_results
    python eval/reproduce_paper.py --dry-run
    python eval/reproduce_paper.py --smoke --out paper_smoke

Rows (larp/sampling/paper_rows.py holds their protocol flags; docs/evaluation.md, "The papers' table", says what each
does): tokenizer_rfvd (LARP-L-Long tokenizer rFVD, PSNR, SSIM, LPIPS), ucf_larp_ar (LARP-L-Long AR, UCF-101,
10,000 samples), ucf_nar_l and ucf_nar_lp (NAR-L / NAR-LP, UCF-101; no public checkpoint: pass --model ROW=PATH),
k600_fp (LARP-L-Long AR-FP, K600 frame prediction, 50,000 samples). Each row runs sample.py or
eval/eval_larp_tokenizer.py (printed first) into OUT/<row>/, through torchrun on every GPU of the node when there are
several. A row finished earlier with the same command is read, not rerun; a killed table continues where it stopped
(sample.py resumes its chunks). The table goes to OUT/paper_table.md and .csv: the paper's number, ours, a 95 %
bootstrap interval over the per-sample I3D features, the samples, the protocol card (detector: StyleGAN-V's
i3d_torchscript.pt when it is at checkpoints/ with its known digest, else our Kinetics-400 port), wall time and
GPU-hours, and the command. Checkpoints are the public hub ids, unpinned (the newest revision); --model and
--tokenizer take local copies or pinned hub ids (owner/name@COMMIT).

--dry-run prints each row's paper number, command, checkpoints and data (what is missing named) and a wall-time
estimate from the throughputs measured in BENCHMARKS.md (benchmarks/throughputs.json), and runs nothing. --smoke
runs every row on tiny models in the release formats and tiny synthetic UCF-101 / K600 trees with a random detector
(offline, minutes on a CPU; not the paper's protocol).
"""
import os

from larp.core.cli import parser
from larp.core.errors import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "reference", "golden", "tiny")


def get_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--out", default="paper_results", help="folder of the rows' outputs and the table")
    p.add_argument("--rows", default="all", help="comma-separated rows: tokenizer_rfvd, ucf_larp_ar, ucf_nar_l, "
                   "ucf_nar_lp, k600_fp, or all")
    p.add_argument("--model", action="append", default=[], metavar="ROW=PATH",
                   help="the generator of ROW: a local copy, or a hub id pinned as owner/name@COMMIT (required for "
                   "ucf_nar_l and ucf_nar_lp); repeatable")
    p.add_argument("--tokenizer", default=None, help="a local LARP-L-Long tokenizer or a pinned hub id "
                   "owner/name@COMMIT (default: the hub id hywang66/LARP-L-long-tokenizer, unpinned)")
    p.add_argument("--num_samples", type=int, default=None, help="a quick look: this many samples (clips) per row "
                   "instead of the paper's (the cells say: not the paper's protocol)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples of the 95 %% interval, 0: "
                   "none (default: 1000; 50 with --smoke)")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the plan and run nothing")
    p.add_argument("--smoke", action="store_true", help="every row on tiny models and synthetic data, offline")
    return p.parse_args(argv)


def options(args):
    """TableOptions of the flags (the smoke run's inputs built here), the rows and the detector checked."""
    import torch
    from larp.core.errors import UsageError
    from larp.sampling import paper_plan as plan
    from larp.sampling.paper_rows import TOKENIZER_HUB
    from larp.sampling.paper_smoke import SMOKE_SAMPLES, smoke_inputs
    rows, models = plan.parse_rows(args.rows), plan.parse_models(args.model)
    if args.num_samples is not None and args.num_samples < 2:
        raise UsageError(f"--num_samples {args.num_samples}: an FVD needs at least 2 samples")
    out = os.path.abspath(args.out)
    tokenizer = plan.local_or_hub(args.tokenizer) if args.tokenizer else TOKENIZER_HUB
    gpus = torch.cuda.device_count()
    kw = {"gpus": gpus, "device_name": torch.cuda.get_device_name(0) if gpus else "CPU"}
    if args.smoke:
        smoke_models, tokenizer, datasets = smoke_inputs(os.path.join(out, "smoke_inputs"), GOLDEN)
        models = {**smoke_models, **models}
        device = {"--device": "cpu", "--num_workers": "0", "--sample_batch_size": "4", "--chunk_size": "4",
                  "--gallery_per_class": "0"}
        kw = {"gpus": 0, "device_name": "CPU", "datasets": datasets, "num_samples": SMOKE_SAMPLES,
              "extra": {"sample.py": device, "eval/eval_larp_tokenizer.py": {"--device": "cpu", "--batch_size": "4"}}}
    elif args.num_samples is not None:
        kw["num_samples"] = args.num_samples
    if args.bootstrap is not None and args.bootstrap < 0:
        raise UsageError(f"--bootstrap {args.bootstrap}: expected a number of resamples >= 0 (0: no interval)")
    bootstrap = args.bootstrap if args.bootstrap is not None else 50 if args.smoke else 1000
    return plan.TableOptions(out=out, rows=rows, models=models, tokenizer=tokenizer, smoke=args.smoke,
                             bootstrap=bootstrap, **kw)


def main(args):
    from larp.sampling import paper_plan as plan
    from larp.sampling.paper_table import dry_run_lines, run_table
    if args.smoke and args.dry_run:
        from larp.core.errors import UsageError
        raise UsageError("--smoke and --dry-run: choose one")
    opts = options(args)
    plan.check_models(opts)
    detector = plan.choose_detector(opts.smoke)
    plans = [plan.plan_row(r, opts, detector) for r in opts.rows]
    if args.dry_run:
        print("\n".join(dry_run_lines(plans, opts, detector, plan.load_throughputs())))
        return None
    plan.check_data(plans)
    plan.check_detector(detector)
    return run_table(plans, opts)


if __name__ == "__main__":
    run_cli(main, get_args())  # the flags are parsed before torch is imported: --help answers at once
