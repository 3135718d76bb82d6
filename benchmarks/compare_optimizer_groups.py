"""The weight-decay groups of a release recipe's generator, ours beside the reference trainer's.

Ours: `larp.training.optim.param_groups` on the generator the recipe's config builds. The reference's: its AR
trainer's `configure_optimizers`, read from the clone in benchmarks/reference_code and run on the reference's own
model definition of the same size (ours built on the meta device, theirs on the CPU). Prints, per group, the
number of tensors and of parameters on each side.

    python benchmarks/compare_optimizer_groups.py                      # NAR-L: cfgs/larp_ar.yaml, NAR's trainer
    python benchmarks/compare_optimizer_groups.py --reference raster --opts model.name llama-abs-LP model.order raster
"""
import argparse
import ast
import copy
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from larp.training.ar_stage import build_ar_model  # noqa: E402
from larp.training.config_build import build_config  # noqa: E402
from larp.training.optim import param_groups  # noqa: E402
from reference_samplers import import_reference, reference_root  # noqa: E402


def reference_configure_optimizers(order):
    """The reference AR trainer's `configure_optimizers`, compiled from its source file with the names it uses
    (its RMSNorm and LabelEmbedder classes, an AdamW table) bound: the trainer module itself imports wandb and the
    whole training stack."""
    root = reference_root(order)
    path = os.path.join(root, "trainers", "larp_ar_trainer.py")
    tree = ast.parse(open(path).read(), path)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "configure_optimizers")
    module = import_reference(order)
    embed = sys.modules["models.embed"] if "models.embed" in sys.modules else None
    norm = sys.modules["models.norm"] if "models.norm" in sys.modules else None
    namespace = {"torch": torch, "deepcopy": copy.deepcopy, "optimizer_dict": {"adamw": torch.optim.AdamW},
                 "LabelEmbedder": getattr(embed, "LabelEmbedder", None) or module.LabelEmbedder,
                 "RMSNorm": getattr(norm, "RMSNorm", None) or module.RMSNorm}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
    return namespace["configure_optimizers"], module


def counts(groups):
    return [(g["weight_decay"], len(g["params"]), sum(p.numel() for p in g["params"])) for g in groups]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cfg", default="cfgs/larp_ar.yaml", help="the recipe's config (default: %(default)s)")
    ap.add_argument("--reference", default="nar", choices=["nar", "raster"],
                    help="whose trainer: nar (ThisisBillhe/NAR) or raster (hywang66/LARP); default %(default)s")
    ap.add_argument("--opts", nargs="*", default=[], help="config overrides, as train.py takes them")
    ap.add_argument("--codebook_size", type=int, default=8192, help="the release tokenizer's (default %(default)s)")
    args = ap.parse_args()
    cfg = build_config(args.cfg, opts=args.opts)
    m, wd = cfg.model, cfg.optimizer.args.get("weight_decay", 0.0)
    tokens = 1
    for s in m.latent_shape:
        tokens *= s
    tok = types.SimpleNamespace(bottleneck_token_num=tokens, codebook_size=args.codebook_size)
    with torch.device("meta"):
        ours = build_ar_model(m, tok)
    configure, module = reference_configure_optimizers(args.reference)
    ref_args = dict(vocab_size=args.codebook_size, max_seq_len=tokens, num_classes=m.num_classes, cls_token_num=1,
                    token_dropout_p=0.1, use_fixed_pe=False)
    if m.frame_prediction:  # as the reference's frame-prediction trainer sets them
        ref_args.update(frame_prediction=True, cls_token_num=tokens + 1)
    ref_model = module.larp_ar_models[m.name](**ref_args)  # on the CPU: its constructor reads tensor values
    trainer = types.SimpleNamespace(orig_model=ref_model)
    configure(trainer, {"name": "adamw", "args": {"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": wd}})
    mine = counts(param_groups(ours, wd, cfg.optimizer.decay))
    theirs = counts(trainer.optimizer.param_groups)
    print(f"{args.cfg} {' '.join(args.opts)}: model {m.name} ({m.order}), optimizer.decay {cfg.optimizer.decay}, weight decay {wd}")
    print(f"{'group':<10} {'ours: tensors':>14} {'parameters':>14}   {'reference: tensors':>18} {'parameters':>14}")
    for i, name in enumerate(("decay", "no_decay")):
        a = mine[i] if i < len(mine) else (0, 0, 0)
        b = theirs[i] if i < len(theirs) else (0, 0, 0)
        print(f"{name:<10} {a[1]:>14,} {a[2]:>14,}   {b[1]:>18,} {b[2]:>14,}")
    total_a, total_b = sum(c[2] for c in mine), sum(c[2] for c in theirs)
    print(f"{'total':<10} {sum(c[1] for c in mine):>14,} {total_a:>14,}   {sum(c[1] for c in theirs):>18,} "
          f"{total_b:>14,}")


if __name__ == "__main__":
    main()
