"""The shape of the package: the layers are the subpackages of larp/ (the folder a module sits in is its layer),
no import circle, no import from a lower layer to a higher one or between the subpackages of one layer (training
and sampling stay apart), files under 400 lines and functions under 60, imports at the top unless an optional
dependency needs a lazy one, and a training config that is read where it is needed instead of being threaded down
and back up."""
import ast
import glob
import os

import pytest

from tools.config_path import import_graph, trace_stages
from tests.conftest import ROOT

# The subpackages of larp/, bottom to top. A module may import its own subpackage and the layers below its own;
# subpackages that share a layer do not import each other.
LAYERS = [["core"], ["data", "models", "metrics"], ["sampling", "training"], ["quickstart"]]
ENTRY_POINTS = {"train", "sample"}
# imports allowed inside functions: optional or slow dependencies used by few code paths
LAZY_OK = {"huggingface_hub", "torch.nn.attention.flex_attention", "torch.utils._triton", "lpips", "wandb"}


def layer_of(module):
    """(layer index, subpackage) of a larp module, from the folder it sits in."""
    parts = module.split(".")
    if parts[0] != "larp" or len(parts) < 3:
        return None
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i, parts[1]
    return None


@pytest.fixture(scope="module")
def graph():
    return import_graph()[0]


def test_every_module_sits_in_a_layer_folder(graph):
    folders = sorted(d for d in os.listdir(ROOT / "larp") if (ROOT / "larp" / d / "__init__.py").exists())
    assert folders == sorted(n for names in LAYERS for n in names), "add the new subpackage to LAYERS"
    packages = {"larp"} | {f"larp.{d}" for d in folders}
    outside = [m for m in graph if m not in packages and m not in ENTRY_POINTS and layer_of(m) is None]
    assert not outside, f"modules outside a layer folder: {outside}"


def test_no_import_circle(graph):
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import circle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_import_upward_or_sideways(graph):
    bad = []
    for m, deps in graph.items():
        mine = layer_of(m)
        for d in deps:
            theirs = layer_of(d)
            if mine is None or theirs is None:
                continue
            if theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                bad.append(f"{m} ({mine[1]}) imports {d} ({theirs[1]})")
    assert not bad, bad


def test_the_layer_test_can_fail():
    """An import from models up to training, or from sampling across to training, is caught."""
    graph = {"larp.models.generator": {"larp.training.loop"}, "larp.training.loop": set(),
             "larp.sampling.run": {"larp.training.config"}, "larp.training.config": set()}
    with pytest.raises(AssertionError, match="generator.*loop"):
        test_no_import_upward_or_sideways(graph)
    with pytest.raises(AssertionError, match="sampling.run"):
        test_no_import_upward_or_sideways({k: v for k, v in graph.items() if "models" not in k})


def source_files():
    patterns = ["larp/**/*.py", "eval/*.py", "benchmarks/*.py", "scripts/*.py", "tests/*.py", "*.py"]
    return sorted({p for pat in patterns for p in glob.glob(str(ROOT / pat), recursive=True)})


def test_no_source_file_over_400_lines():
    long = {os.path.relpath(p, ROOT): n for p in source_files() if (n := len(open(p).read().splitlines())) > 400}
    assert not long, long


def function_lengths(paths):
    """[(lines, "file:function")] of every function (methods and nested ones too), longest first."""
    rows = []
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{os.path.relpath(path, ROOT)}:{node.name}"))
    return sorted(rows, reverse=True)


def test_no_function_in_larp_over_60_lines():
    rows = function_lengths(glob.glob(str(ROOT / "larp/**/*.py"), recursive=True))
    assert rows and not [r for r in rows if r[0] > 60], rows[:5]


def test_imports_at_the_top_unless_lazy_for_an_optional_dependency():
    found = []
    for path in glob.glob(str(ROOT / "larp/**/*.py"), recursive=True):
        for fn in ast.walk(ast.parse(open(path).read())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module]
                else:
                    continue
                found += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {n}" for n in names if n not in LAZY_OK]
    assert not found, found


def test_training_config_climbs_back_up_at_most_8_times(tmp_path):
    """A two-step run of each stage: the functions that get the config (or a section) as an argument, in call
    order; a move to a module that imports the current one is a climb. Measured with tools/config_path.py on
    the same runs, the code before the refactor climbed 11 times."""
    result = trace_stages(str(tmp_path))
    climbs = {stage: c for stage, (_, c) in result.items()}
    assert sum(len(c) for c in climbs.values()) <= 8, climbs
    assert all(stays for stays, _ in result.values())  # the trace saw the config at all
