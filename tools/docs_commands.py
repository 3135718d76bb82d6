"""Check every shell command shown in markdown files against the code (tests/test_docs_commands.py runs it on
README.md, BENCHMARKS.md and docs/*.md).

A command is a line of a non-Python code block, or an inline code span, that runs `python X.py`, `python -m MOD`,
`bash X.sh` or `torchrun ... X.py` (after any `VAR=value`, `time` or `srun` in front of it). For each one:
- the script or module exists;
- every flag it shows (`--flag`, `-x`) is in that entry point's `--help` (for a subcommand such as
  `make_csv k600`, in the subcommand's `--help`); for a shell script, in the script's text (or in the `--help` of
  the entry point it hands "$@" to); every `VAR=value` in front of a shell script is read by it or by the file it
  sources;
- every environment variable the prose names as inline code (`NAME`, `NAME=value`) is read by some code of the
  project, unless another program reads it (FOREIGN_ENV).

    python tools/docs_commands.py                 # README.md, BENCHMARKS.md and docs/*.md
    python tools/docs_commands.py OLD_README.md   # any markdown file: prints its problems, exit 1 if any
"""
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "BENCHMARKS.md"] + sorted((ROOT / "docs").glob("*.md"))
PROGRAMS = ("python", "python3", "bash", "torchrun")
PREFIXES = ("time", "srun", "nohup", "exec")
TIMEOUT = 120


@dataclass
class Command:
    """One documented command: where it is shown, the entry point it runs and the words after it."""
    source: str
    text: str
    kind: str = ""            # "py" (a .py file), "mod" (python -m), "sh" (a shell script)
    target: str = ""          # the file (relative to the root) or the module
    args: list = field(default_factory=list)
    env: list = field(default_factory=list)


def code_blocks(markdown):
    """(language, body) of every fenced code block."""
    return re.findall(r"^```([\w-]*)[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)


def inline_spans(markdown):
    """Inline code spans outside fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)


def shell_lines(body):
    """Logical lines of a shell block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", body)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def segments(line):
    """The simple commands of a line: split at &&, ||, ;, | and a trailing &."""
    return [s.strip() for s in re.split(r"\s+(?:&&|\|\||\||&)(?:\s+|$)|;", line) if s.strip()]


def words(segment):
    try:
        return shlex.split(segment)
    except ValueError:
        return segment.split()


def parse(segment, source):
    """A Command for a segment that runs one of our entry points, else None."""
    w = words(segment)
    env = []
    while w and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w[0]) or w[0] in PREFIXES):
        if "=" in w[0]:
            env.append(w[0].split("=", 1)[0])
        w = w[1:]
    if not w or w[0] not in PROGRAMS:
        return None
    cmd = Command(source, " ".join(segment.split()), env=env)
    if w[0] == "bash":
        if len(w) < 2 or not w[1].endswith(".sh"):
            return None
        cmd.kind, cmd.target, cmd.args = "sh", w[1], w[2:]
    elif w[0] == "torchrun":
        script = next((i for i, x in enumerate(w) if x.endswith(".py")), None)
        if script is None:
            return None
        cmd.kind, cmd.target, cmd.args = "py", w[script], w[script + 1:]
    elif len(w) > 2 and w[1] == "-m":
        cmd.kind, cmd.target, cmd.args = "mod", w[2], w[3:]
    elif len(w) > 1 and w[1].endswith(".py"):
        cmd.kind, cmd.target, cmd.args = "py", w[1], w[2:]
    else:
        return None  # python -c "...", python with no script
    return None if "*" in cmd.target else cmd  # a family of modules named in prose


def extract(path):
    """Every command shown in one markdown file."""
    text = Path(path).read_text()
    name = os.path.basename(path)
    found = []
    for lang, body in code_blocks(text):
        if lang in ("python", "py", "yaml", "json"):
            continue
        for line in shell_lines(body):
            found += [c for c in (parse(s, name) for s in segments(line)) if c]
    for span in inline_spans(text):
        found += [c for c in (parse(s, name) for s in segments(span)) if c]
    return found


def flags(args):
    """Flags shown in the arguments: --name (also --name=value) and -x; placeholders like [--a B|C] unwrapped."""
    out = []
    for a in args:
        a = a.strip("[](),")
        m = re.match(r"^(--[A-Za-z][\w-]*|-[A-Za-z])(?:=.*)?$", a)
        if m:
            out.append(m.group(1))
    return out


def in_text(flag, text):
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", text) is not None


@lru_cache(maxsize=None)
def run(argv, cwd=None):
    """(returncode, stdout + stderr) of a command run from the repository root (cached)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run(list(argv), cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return p.returncode, p.stdout + p.stderr


def entry_argv(kind, target):
    if kind == "sh":
        return ("bash", target)
    return (sys.executable, "-m", target) if kind == "mod" else (sys.executable, target)


def subcommands(help_text):
    """Subcommand names of an argparse help (the `{a,b,c}` line under "positional arguments")."""
    m = re.search(r"^positional arguments:\n\s+\{([\w,-]+)\}\s*$", help_text, flags=re.M)
    return m.group(1).split(",") if m else []


def exists(kind, target):
    if kind == "mod":
        return (ROOT / (target.replace(".", "/") + ".py")).is_file() or \
            (ROOT / target.replace(".", "/") / "__main__.py").is_file() or target == "pytest"
    return (ROOT / target).is_file()


def forwarded(script_text):
    """The entry point a shell script hands "$@" to: (kind, target) or None."""
    for line in script_text.splitlines():
        if '"$@"' not in line or line.lstrip().startswith("#"):
            continue
        w = words(line.replace('"$@"', ""))
        if "launch" in w:
            return "py", "train.py"
        if "-m" in w and w.index("-m") + 1 < len(w):
            return "mod", w[w.index("-m") + 1]
        py = [x for x in w if x.endswith(".py")]
        if py:
            return "py", py[0]
    return None


def sourced_text(script_path):
    """The script's text plus the text of the files it sources (launch.sh, setup_env.sh)."""
    text = script_path.read_text()
    for name in re.findall(r"source\s+.*?([\w.]+\.sh)", text):
        for candidate in (script_path.parent / name, ROOT / "scripts" / name):
            if candidate.is_file():
                text += candidate.read_text()
                break
    return text


@lru_cache(maxsize=None)
def help_text(kind, target, sub=None):
    """(exit status, output) of `<entry point> [sub] --help`. Run in this process (the entry points parse their
    flags before any work, and the imports are shared), except pytest; the --help commands the docs show also run
    as their own processes (test_offline_commands_run)."""
    if target == "pytest":
        return run(entry_argv(kind, target) + ("--help",))
    buf, old_argv, old_path = io.StringIO(), sys.argv, list(sys.path)
    torch = sys.modules.get("torch")
    grad = torch.is_grad_enabled() if torch is not None else None
    sys.argv = [target] + ([sub] if sub else []) + ["--help"]
    # sys.path[0] as python sets it: the script's folder, or the working directory (the root) for -m
    sys.path.insert(0, str(ROOT if kind == "mod" else (ROOT / target).parent))
    code = 1
    try:
        with redirect_stdout(buf), redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before (by a test)
            if kind == "mod":
                runpy.run_module(target, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(ROOT / target), run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:  # an entry point that fails before it parses its flags
        buf.write(f"{type(e).__name__}: {e}")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        if grad is not None:  # an entry point may switch autograd off for its process: not for the caller's
            torch.set_grad_enabled(grad)
    return code, buf.getvalue()


def check_command(c):
    """Problems of one command (empty: it is consistent with the code)."""
    where = f"{c.source}: `{c.text}`"
    if not exists(c.kind, c.target):
        return [f"{where}: {c.target} does not exist"]
    problems = []
    shown = flags(c.args)
    if c.kind == "sh":
        script = ROOT / c.target
        text = sourced_text(script)
        fw = forwarded(script.read_text())
        fw_help = help_text(*fw)[1] if fw and exists(*fw) else ""
        problems += [f"{where}: {f} is not read by {c.target}" + (f" nor by {fw[1]}" if fw else "")
                     for f in shown if not in_text(f, text) and not in_text(f, fw_help)]
        problems += [f"{where}: {v} is not read by {c.target}" for v in c.env if not in_text(v, text)]
        return problems
    rc, top = help_text(c.kind, c.target)
    if rc != 0:
        return [f"{where}: `{c.target} --help` failed: {top.strip().splitlines()[-1:]}"]
    text = top
    positional = [a for a in c.args if not a.startswith("-")]
    subs = subcommands(top)
    if subs and positional and positional[0] in subs:
        rc, text = help_text(c.kind, c.target, positional[0])
        if rc != 0:
            return [f"{where}: `{c.target} {positional[0]} --help` failed"]
    elif subs and positional and not positional[0].startswith(("$", ".")):
        problems.append(f"{where}: {positional[0]} is not a subcommand of {c.target} ({', '.join(subs)})")
    problems += [f"{where}: {f} is not an option of {c.target}" + (f" {positional[0]}" if text is not top else "")
                 for f in shown if not in_text(f, text)]
    return problems


# environment variables read by other programs (torch, huggingface_hub, SLURM, the shell), not by this code
FOREIGN_ENV = {"CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME", "OMP_NUM_THREADS", "PYTHONPATH",
               "MASTER_ADDR", "MASTER_PORT"}


@lru_cache(maxsize=None)
def code_text():
    """The text of every Python file and shell script of the project (tests and this checker excluded)."""
    files = [f for f in ROOT.rglob("*") if f.suffix in (".py", ".sh") and f.is_file() and f != Path(__file__)
             and not {"tests", ".venv", ".git"} & set(f.relative_to(ROOT).parts)]
    return "\n".join(f.read_text(errors="replace") for f in files)


def env_names(path):
    """Environment variables the prose names as inline code: `NAME` or `NAME=value`, NAME in capitals with a _."""
    names = set()
    for span in inline_spans(Path(path).read_text()):
        for m in re.finditer(r"(?:^|[\s,])\$?([A-Z][A-Z0-9]*_[A-Z0-9_]+)(?==|$|[\s,])", span):
            names.add(m.group(1))
    return names


def check_files(paths):
    """(number of commands checked, problems) for markdown files."""
    commands = [c for p in paths for c in extract(p)]
    problems = [p for c in commands for p in check_command(c)]
    for path in paths:
        problems += [f"{os.path.basename(path)}: the environment variable {name} is read by no code"
                     for name in sorted(env_names(path) - FOREIGN_ENV)
                     if not name.startswith("SLURM_") and not in_text(name, code_text())]
    return len(commands), problems


if __name__ == "__main__":
    n, found = check_files(sys.argv[1:] or DOC_FILES)
    print("\n".join(found))
    print(f"{n} commands checked, {len(found)} problems")
    sys.exit(1 if found else 0)
