"""`--help` of every entry point: each flag says its default (or that it is required) and has a line of help, and
the script entry points answer it without importing torch or the networks."""
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = ["train.py", "sample.py", "eval/compute_fvd.py", "eval/eval_larp_tokenizer.py",
           "eval/calc_fvd_from_multiple_feature_stats.py", "eval/reproduce_paper.py"]
MODULES = [["larp.data.synthetic"], ["larp.data.oracle"], ["larp.data.make_csv", "ucf101"],
           ["larp.data.make_csv", "k600"]]  # these import torch through the library; only their help is checked

# Runs entry points with --help in one fresh interpreter (a script path or a module name, then its arguments), and
# reports each help text with the modules imported so far.
RUNNER = """
import contextlib, io, json, runpy, sys
pages = []
for target, *extra in json.loads(sys.argv[1]):
    sys.argv = [target, *extra, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            (runpy.run_path if target.endswith(".py") else runpy.run_module)(target, run_name="__main__")
        except SystemExit:
            pass
    pages.append({"help": out.getvalue(), "modules": sorted(sys.modules)})
print(json.dumps(pages))
"""


def run_help(*commands):
    """[{"help", "modules"}] of each command ([target, *args]), run in order in one interpreter."""
    res = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    pages = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(pages) == len(commands)
    return pages


def flag_helps(text):
    """{flag: its help text, joined into one line} from an argparse help page (options section)."""
    helps, flag = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (?:-\w(?: \S+)?, )?(--[\w-]+)(.*)$", line)
        if m:
            flag = m.group(1)
            helps[flag] = m.group(2).strip()
        elif flag and line.startswith("    "):
            helps[flag] += " " + line.strip()
    helps.pop("--help", None)
    return helps


def check_flags(target, text):
    helps = flag_helps(text)
    assert len(helps) >= 2, (target, text)
    for flag, h in helps.items():
        words = re.sub(r"^[A-Z_\[\]{},.\d ]+\s", "", h)  # drop the metavar (e.g. "NUM_FRAMES", "{1,2,3}")
        assert len(words) > 12, f"{target} {flag}: no help text ({h!r})"
        assert "default" in h.lower() or "(required)" in h, f"{target} {flag}: default not shown ({h!r})"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_shows_defaults_without_importing_torch(script):
    result, = run_help([script])  # alone in its interpreter: what it imports is its own
    check_flags(script, result["help"])
    heavy = [m for m in result["modules"] if m == "torch" or m.startswith("torch.")
             or (m.startswith("larp.models.") and m != "larp.models.sampling_params")]
    assert not heavy, f"{script} --help imported {heavy[:5]}"


def test_module_help_shows_defaults():
    """The modules' help pages, one interpreter for all (each imports torch through the library)."""
    for module, page in zip(MODULES, run_help(*MODULES)):
        check_flags(" ".join(module), page["help"])


def test_the_help_check_can_fail():
    """A flag without help text, and one whose default is not shown, are both caught."""
    page = "options:\n  -h, --help  show\n  --a A       the a flag (default: 1)\n  --b B\n"
    with pytest.raises(AssertionError, match="--b: no help text"):
        check_flags("x", page)
    with pytest.raises(AssertionError, match="--b: default not shown"):
        check_flags("x", page.replace("--b B\n", "--b B       a flag that hides its value\n"))
