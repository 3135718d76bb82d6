"""Follow the training config through the package from `larp.training.loop.train`: the functions that receive it (or
one of its sections) as an argument, in call order, grouped into consecutive stays per module. A climb is a move
from a module to one that imports it (directly or not), i.e. back up the import order. A config threaded down and
back up through the layers climbs often; one read where it is needed climbs little.

    python tools/config_path.py          # two-step AR and tokenizer runs on a tiny synthetic set

tests/test_layout.py runs the same trace and bounds the climbs.
"""
import argparse
import ast
import dataclasses
import os
import sys
import tempfile

import torch

from larp.core import dist
from larp.training import loop as training
from larp.training.config_build import build_config
from larp.data.synthetic import make_synthetic_dataset
from larp.core.errors import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph(root=ROOT):
    """{module: set of larp modules it imports (anywhere in the file)} for larp/ and train.py."""
    files, packages = {"train": os.path.join(root, "train.py")}, set()
    for dp, _, fn in os.walk(os.path.join(root, "larp")):
        for f in fn:
            if f.endswith(".py"):
                m = os.path.relpath(os.path.join(dp, f), root)[:-3].replace(os.sep, ".")
                if m.endswith(".__init__"):
                    m = m[:-9]
                    packages.add(m)
                files[m] = os.path.join(dp, f)
    graph = {}
    for m, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(n for n in names if n in files and n != m and n not in packages)
        graph[m] = deps
    return graph, files


def above(graph):
    """{m: modules that import m directly or transitively}."""
    reach = {}
    def down(m, seen):
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                down(d, seen)
        return seen
    for m in graph:
        for d in down(m, set()):
            reach.setdefault(d, set()).add(m)
    return reach


def config_objects(cfg):
    """ids of the config and every section (dict / dataclass) inside it."""
    out, todo = set(), [cfg]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            out.add(id(x))
            todo.extend(x.values())
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            out.add(id(x))
            todo.extend(getattr(x, f.name) for f in dataclasses.fields(x))
    return out


def trace_path(fn, cfg, files, first_only=True):
    """Run fn() and return [(module, function)] of the functions that got the config (or a section) as an
    argument, each once, in first-call order."""
    ids = config_objects(cfg)
    by_file = {os.path.abspath(p): m for m, p in files.items()}
    seen, path = set(), []

    def prof(frame, event, arg):
        if event != "call":
            return
        mod = by_file.get(os.path.abspath(frame.f_code.co_filename))
        if mod is None:
            return
        code = frame.f_code
        nargs = code.co_argcount + code.co_kwonlyargcount
        names = code.co_varnames[:nargs]
        if any(id(frame.f_locals.get(n)) in ids for n in names):
            key = (mod, code.co_qualname)
            if not first_only or key not in seen:
                seen.add(key)
                path.append(key)

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return path


def summarize(path, graph):
    stays = []
    for mod, func in path:
        if stays and stays[-1][0] == mod:
            stays[-1][1].append(func)
        else:
            stays.append((mod, [func]))
    up = above(graph)
    climbs = [(a, b) for (a, _), (b, _) in zip(stays, stays[1:]) if b in up.get(a, set())]
    return stays, climbs


def trace_stages(workdir, first_only=False):
    """{stage: (stays, climbs)} of a two-step run of each stage (quickstart configs, the golden tiny tokenizer for
    the generator, evaluation and a small FVD on) on a tiny synthetic set written under `workdir`."""
    train_csv, val_csv = make_synthetic_dataset(os.path.join(workdir, "synthetic"), classes=4, videos_per_class=6,
                                                frames=16, size=32, progress=False)
    tokenizer = os.path.join(ROOT, "tests", "fixtures", "reference", "golden", "tiny", "tokenizer")
    runs = {"ar": ("quickstart_nar", ["vae.checkpoint", tokenizer, "model.num_classes", "4", "eval.fvd_videos", "2",
                                      "eval.i3d", "random:32"]),
            "tokenizer": ("quickstart_tokenizer", [])}
    graph, files = import_graph()
    info = dist.init_distributed("cpu")
    out = {}
    for stage, (name, opts) in runs.items():
        cfg = build_config(os.path.join(ROOT, "cfgs", name + ".yaml"),
                           flags={"csv_file": train_csv, "batch_size": 4, "workers": 0, "manualSeed": 1},
                           opts=["data.val_csv", val_csv, "train.max_steps", "2", "eval.num_videos", "2",
                                 "eval.interval", "1", "wandb.mode", "disabled"] + opts)
        run_dir = os.path.join(workdir, stage)
        path = trace_path(lambda: training.train(cfg, run_dir, info), cfg, files, first_only)
        out[stage] = summarize(path, graph)
    return out


def main(args):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = trace_stages(tmp, first_only=args.first_only)
    for stage, (stays, climbs) in result.items():
        print(f"\n{stage}: {len(stays)} stays in {len({m for m, _ in stays})} modules, {len(climbs)} climbs")
        for mod, funcs in stays:
            print(f"  {mod}: {', '.join(funcs)}")
        for a, b in climbs:
            print(f"  climb: {a} -> {b}")
    print(f"\ntotal climbs: {sum(len(c) for _, c in result.values())}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--first_only", action="store_true", help="count each function once (its first call)")
    run_cli(main, p.parse_args())
