"""Every *_reproduce.sh resolves to its release recipe: the script runs with a fake torchrun, its train.py command
line is resolved like train.py resolves it, and each value is compared with the table of the reference recipe in
tests/fixtures/reference/recipes.json (reference setting and value -> our key and value)."""
import dataclasses
import json

import pytest

from larp.models.generator import ModelArgs
from tests.conftest import ROOT
from tests.test_config import cfg_from_cmdline, run_script

RECIPES = json.loads((ROOT / "tests" / "fixtures" / "reference" / "recipes.json").read_text())
NAMES = sorted(k for k in RECIPES if not k.startswith("_"))


def resolved(cfg, nproc, key):
    """The value of dotted `key` in the resolved config (model.args.*: with the ModelArgs defaults)."""
    if key == "nproc":
        return nproc
    parts = key.split(".")
    if parts[:2] == ["model", "args"] and cfg.stage == "ar":
        return {**dataclasses.asdict(ModelArgs()), **cfg.model.args}[parts[2]]
    node = cfg
    for p in parts:
        node = node[p] if isinstance(node, dict) else getattr(node, p)
    return node


def test_every_reproduce_script_has_a_recipe():
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*_reproduce.sh"))
    assert scripts == sorted(RECIPES[n]["script"].split("/")[-1] for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_table_rows_without_a_note_are_the_reference_values(name):
    for row in RECIPES[name]["rows"]:
        ref_key, ref_value, key, value = row[:4]
        assert len(row) == 5 or value == ref_value, f"{name}: {ref_key} differs ({ref_value} vs {value}) unexplained"


@pytest.mark.parametrize("name", NAMES)
def test_reproduce_script_resolves_to_the_release_recipe(name, tmp_path):
    recipe = RECIPES[name]
    calls, _ = run_script(str(ROOT / recipe["script"]), tmp_path)
    assert len(calls) == 1
    argv = calls[0]
    i = argv.index("train.py")
    nproc = int(next(a.split("=", 1)[1] for a in argv[:i] if a.startswith("--nproc_per_node")))
    _, cfg = cfg_from_cmdline(argv[i + 1:])
    wrong = [f"{key}: {resolved(cfg, nproc, key)!r}, the release's {value!r} ({ref_key})"
             for ref_key, _, key, value, *_ in recipe["rows"] if key and resolved(cfg, nproc, key) != value]
    assert not wrong, f"{recipe['script']}: " + "; ".join(wrong)
