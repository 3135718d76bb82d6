"""Our decode loop at two revisions of this repository, side by side on the same saved weights: tokens, NLLs, aten ops
per pass and seconds per call, for NAR and raster, class-conditional with CFG (seeded and greedy) and frame
prediction.

    python benchmarks/compare_decode_revisions.py --before HEAD~1            # the checkout against HEAD~1
    python benchmarks/compare_decode_revisions.py --before v1 --after v2     # two revisions

Each revision is exported with `git archive` into a temporary folder and run in its own process (imports come from
that folder), on generators saved once in the release format by this process. Tokens must be equal where the two
loops run the same arithmetic; where an attention kernel over a different number of cache slots moves low-order
bits, the table gives the share of equal tokens and the largest NLL difference instead.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from larp.core.errors import run_cli
from larp.models.generator import Generator, ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4

# run inside each revision's folder: generate every case, count aten ops per pass, time one call per case
WORKER = r"""
import json, sys, time
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from larp.models.generator import load_generator
from larp.models.sampling_params import SamplingParams

class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))

torch.set_num_threads(1)
cases, out = json.load(open(sys.argv[1])), {}
for case in cases:
    model = load_generator(case["model"]).eval()
    cond = torch.tensor(case["cond"])
    params = SamplingParams(**case["params"])
    call = lambda: model.generate(cond, params, seeds=case["seeds"], return_nll=True, capture="eager")
    tokens, nll = call()
    with Count() as c:
        call()
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    out[case["name"]] = {"tokens": tokens, "nll": nll, "ops_per_pass": c.n / model.num_decode_steps(),
                         "seconds": seconds}
torch.save(out, sys.argv[2])
"""


def save_models(folder, dim, layers, grid, vocab):
    """NAR and raster generators (random weights, seed 0), class-conditional and frame prediction, saved in the
    release format; returns {name: folder}."""
    paths = {}
    for fp in (False, True):
        for order in ("nar", "raster"):
            torch.manual_seed(0)
            kw = {"frame_prediction": True, "cls_token_num": 65} if fp else {}
            args = ModelArgs(dim=dim, n_layer=layers, n_head=dim // 64, vocab_size=vocab, latent_shape=tuple(grid),
                             max_seq_len=grid[0] * grid[1] * grid[2], token_dropout_p=0.0, resid_dropout_p=0.0,
                             ffn_dropout_p=0.0, **kw)
            model = Generator(args, order=order)
            for name, p in model.named_parameters():  # non-zero heads, so that sampling is not uniform
                if name.startswith("output"):
                    torch.nn.init.normal_(p, std=args.initializer_range)
            name = f"{order}{'_fp' if fp else ''}"
            paths[name] = os.path.join(folder, name)
            model.save_pretrained(paths[name])
    return paths


def make_cases(paths, vocab):
    labels = [i % 101 for i in range(BATCH)]
    cond_fp = torch.randint(0, vocab, (BATCH, 64), generator=torch.Generator().manual_seed(0)).tolist()
    cases = []
    for order in ("nar", "raster"):
        cases += [{"name": f"{order} class cfg 1.5 seeded", "model": paths[order], "cond": labels,
                   "params": {"cfg_scale": 1.5}, "seeds": list(range(BATCH))},
                  {"name": f"{order} class cfg 1.5 greedy", "model": paths[order], "cond": labels,
                   "params": {"cfg_scale": 1.5, "top_k": 1}, "seeds": list(range(BATCH))},
                  {"name": f"{order} frame prediction seeded", "model": paths[f"{order}_fp"], "cond": cond_fp,
                   "params": {}, "seeds": list(range(10, 10 + BATCH))}]
    return cases


def run_revision(rev, cases_file, out_file, tmp):
    """Export `rev` (None: the working tree) and run WORKER in it; returns its results."""
    if rev is None:
        src = ROOT
    else:
        src = os.path.join(tmp, f"rev_{len(os.listdir(tmp))}")
        os.makedirs(src)
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", WORKER, cases_file, out_file], check=True, cwd=src, env=env)
    return torch.load(out_file)


def compare(before, after, cases):
    rows = []
    for case in cases:
        b, a = before[case["name"]], after[case["name"]]
        rows.append({"case": case["name"], "tokens_equal": torch.equal(a["tokens"], b["tokens"]),
                     "equal_share": (a["tokens"] == b["tokens"]).float().mean().item(),
                     "max_nll_diff": (a["nll"] - b["nll"]).abs().max().item(),
                     "ops_before": b["ops_per_pass"], "ops_after": a["ops_per_pass"],
                     "s_before": b["seconds"], "s_after": a["seconds"]})
    return rows


def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_models(tmp, args.dim, args.layers, args.grid, args.vocab)
        cases = make_cases(paths, args.vocab)
        cases_file = os.path.join(tmp, "cases.json")
        with open(cases_file, "w") as f:
            json.dump(cases, f)
        before = run_revision(args.before, cases_file, os.path.join(tmp, "before.pt"), tmp)
        after = run_revision(args.after, cases_file, os.path.join(tmp, "after.pt"), tmp)
    rows = compare(before, after, cases)
    print(f"before {args.before}, after {args.after or 'working tree'}; dim {args.dim}, {args.layers} layers, grid "
          f"{'x'.join(map(str, args.grid))}, vocab {args.vocab}, batch {BATCH}, fp32, CPU, 1 thread, eager")
    print("| case | tokens equal | equal share | max NLL diff | aten ops/pass before | after | s before | s after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {'yes' if r['tokens_equal'] else 'no'} | {100 * r['equal_share']:.3f} % | "
              f"{r['max_nll_diff']:.2e} | {r['ops_before']:.1f} | {r['ops_after']:.1f} | {r['s_before']:.2f} | "
              f"{r['s_after']:.2f} |")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision of the loop to compare against")
    p.add_argument("--after", default=None, help="git revision to compare (default: the working tree)")
    p.add_argument("--dim", type=int, default=256, help="model width (heads of 64)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--grid", type=int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"), help="token grid")
    p.add_argument("--vocab", type=int, default=1024, help="codebook size")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
